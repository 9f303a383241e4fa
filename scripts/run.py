#!/usr/bin/env python3
"""MetaClaw in one command: create the environment, install, migrate, load the demo, and run
the web app, a Celery worker and beat together.

    python3 scripts/run.py            # http://127.0.0.1:8000
    python3 scripts/run.py --port 9000 --no-demo

With nothing set it runs embedded: SQLite and a filesystem broker under ./var. With
DATABASE_URL / REDIS_URL set it uses PostgreSQL / Redis instead. Needs only Python 3.11+.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VAR = Path(os.environ.get("METACLAW_VAR_DIR", ROOT / "var"))


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def ensure_environment(skip_install: bool) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"MetaClaw needs Python 3.11 or newer; this is {sys.version.split()[0]}.")
    if not venv_python().exists():
        step(f"Creating a virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    if skip_install:
        return
    marker = VENV / ".metaclaw-installed"
    stamp = str((ROOT / "pyproject.toml").stat().st_mtime) + str(
        (ROOT / "constraints.txt").stat().st_mtime
    )
    if marker.exists() and marker.read_text() == stamp:
        return
    step("Installing MetaClaw and its dependencies (first run only; a minute or two)")
    subprocess.run(
        [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(ROOT / "constraints.txt"), "-e", str(ROOT)],
        check=True,
    )  # fmt: skip
    marker.write_text(stamp)


def environment(port: int) -> dict[str, str]:
    env = dict(os.environ)
    VAR.mkdir(parents=True, exist_ok=True)
    key_file = VAR / "secret_key"
    if "SECRET_KEY" not in env:
        if not key_file.exists():
            key_file.write_text(secrets.token_urlsafe(50))
            key_file.chmod(0o600)
        env["SECRET_KEY"] = key_file.read_text().strip()
    env.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")
    env.setdefault("METACLAW_VAR_DIR", str(VAR))
    env.setdefault("METACLAW_PUBLIC_URL", f"http://127.0.0.1:{port}")
    # This command serves plain HTTP on this machine, so cookies cannot require HTTPS here.
    # Behind TLS in production, leave these unset (secure by default).
    env.setdefault("SESSION_COOKIE_SECURE", "0")
    env.setdefault("CSRF_COOKIE_SECURE", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [str(venv_python()), str(ROOT / "manage.py"), *args], check=True, env=env, cwd=ROOT
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-demo", action="store_true", help="Do not load the demo data.")
    parser.add_argument("--skip-install", action="store_true")
    args = parser.parse_args()

    ensure_environment(args.skip_install)
    env = environment(args.port)
    mode = (
        "production services (PostgreSQL/Redis)"
        if env.get("DATABASE_URL")
        else "embedded (SQLite + filesystem broker)"
    )
    step(f"Mode: {mode}")
    step("Migrating the database")
    manage(env, "migrate", "--noinput", "-v", "0")
    if not args.no_demo:
        step("Loading the demo data")
        manage(env, "seed_demo")

    bin_dir = venv_python().parent
    processes = {
        "web": [str(bin_dir / "uvicorn"), "metaclaw_site.asgi:application", "--host", args.host,
                "--port", str(args.port), "--no-access-log"],
        # The fast queue (skill proposals, notifications) with beat inside it, and a separate
        # worker for the slow queue so a training run never delays a proposal.
        "worker-fast": [str(bin_dir / "celery"), "-A", "metaclaw_site", "worker", "-Q", "fast", "-B",
                        "-n", "fast@%h", "--concurrency", "2", "--loglevel", "INFO"],
        "worker-slow": [str(bin_dir / "celery"), "-A", "metaclaw_site", "worker", "-Q", "slow",
                        "-n", "slow@%h", "--concurrency", "1", "--loglevel", "INFO"],
    }  # fmt: skip
    running: dict[str, subprocess.Popen] = {}
    for name, command in processes.items():
        running[name] = subprocess.Popen(command, env=env, cwd=ROOT)

    url = f"http://{args.host}:{args.port}/"
    creds = VAR / "demo-credentials.json"
    print()
    print(f"MetaClaw is running at {url}")
    if creds.exists() and not args.no_demo:
        import json

        data = json.loads(creds.read_text())
        print(f"  Log in as {data['username']} / {data['password']}")
        print(f"  API key:  {data['api_key']}")
        print("  Try it:")
        print(
            f"    curl -s -X POST {url}api/v1/incidents -H 'Authorization: Bearer {data['api_key']}' \\"
        )
        print("      -H 'Content-Type: application/json' \\")
        print(
            '      -d \'{"id": "first-1", "agent": {"name": "my-agent"}, "kind": "tool_error", '
            '"error": {"type": "ValueError", "message": "bad date 2026-13-01"}}\''
        )
        print(f"    curl -s {url}api/v1/groups -H 'Authorization: Bearer {data['api_key']}'")
    print(f"  API docs: {url}api/v1/docs")
    print("Press Ctrl-C to stop.", flush=True)

    def stop(*_: object) -> None:
        for process in running.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.time() + 10
        for process in running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while True:
        for name, process in running.items():
            if process.poll() is not None:
                print(f"{name} exited with {process.returncode}; stopping.", file=sys.stderr)
                stop()
        time.sleep(1)


if __name__ == "__main__":
    main()
