#!/usr/bin/env python3
"""MetaClaw in one command: create the environment, install, migrate, load the demo, and run
the web app, a Celery worker and beat together.

    python3 scripts/run.py            # http://127.0.0.1:8000
    python3 scripts/run.py --port 9000 --no-demo

With nothing set it runs embedded: SQLite and a filesystem broker under ./var. With
DATABASE_URL / REDIS_URL set it uses PostgreSQL / Redis instead. Needs only Python 3.11+.

The settings its processes run with are written to var/run.env, which manage.py reads, so
`python3 manage.py <command>` acts on the same site. Each process's output goes to a log file
under var/log/; the terminal shows their warnings and errors, each line prefixed with its name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import venv
from collections.abc import Callable
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VAR = Path(os.environ.get("METACLAW_VAR_DIR", ROOT / "var")).absolute()
RUN_ENV = VAR / "run.env"
LOG_DIR = VAR / "log"
# What commands need to act on the site this runner serves; manage.py reads them back from
# RUN_ENV (the environment wins). Same-named variables are read the same way by both.
SHARED_SETTINGS = (
    "SECRET_KEY",
    "DATABASE_URL",
    "REDIS_URL",
    "METACLAW_PUBLIC_URL",
    "STATIC_ROOT",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
)
READY_TIMEOUT_SECONDS = 120

# A log record's first line as the processes write it: Celery ("[2026-01-02 03:04:05,678:
# WARNING/MainProcess] ..."), Django's LOGGING ("2026-01-02 03:04:05,678 WARNING name: ...") and
# uvicorn ("WARNING:  ..."). The lines after it (a traceback) belong to it.
RECORD = re.compile(r"^(?:\[[\d\- :,]+: |[\d\- :,]+ )?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
# The warnings module's first line ("/path/x.py:39: UserWarning: ..."): a library's advice,
# kept in the log file.
PYTHON_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")
SHOWN_LEVELS = {"WARNING", "ERROR", "CRITICAL"}
WORKER_READY = re.compile(r"\bready\.\s*$")


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def shown(path: Path) -> str:
    """A path as short as it can be said from where the command was typed."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def hold_the_lock(url: str, port: int) -> IO[str] | None:
    """Take ``var/run.lock`` for as long as this process lives (the system lets go of it when
    the process ends, however it ends), or exit with a message naming the runner holding it.
    Taken before anything else, so a second runner changes nothing: no install, no migration,
    no demo data, no log file truncated, no second worker."""
    try:
        import fcntl
    except ImportError:  # Windows: the port check still catches a second runner on that port
        return None
    VAR.mkdir(parents=True, exist_ok=True)
    lock = open(VAR / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another scripts/run.py"
        sys.exit(
            f"MetaClaw is already running from {shown(VAR)} ({holder}).\n"
            "Stop it first (Ctrl-C in its terminal), or start another one with its own folder "
            "and port:\n"
            f"  METACLAW_VAR_DIR=var2 python3 scripts/run.py --port {port + 1}"
        )
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}, {url}\n")
    lock.flush()
    return lock


def check_port_free(host: str, port: int) -> None:
    """Exit with a message when something already listens on ``host:port`` (uvicorn would
    otherwise fail to bind after the workers had started)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        sys.exit(f"Cannot listen on {host}: {error.strerror}.")
    with socket.socket(family, kind, proto) as probe:
        if os.name != "nt":  # as uvicorn does; it does not let two listen on one port
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            sys.exit(
                f"Port {port} on {host} is already in use ({error.strerror}): another program "
                "listens there.\n"
                f"Stop it, or choose another port: python3 scripts/run.py --port {port + 1}"
            )


def ensure_environment(skip_install: bool) -> None:
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


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            words = shlex.split(line, comments=True)
            if words:
                name, _, value = words[0].partition("=")
                values[name] = value
    return values


def secret_key() -> str:
    """The key this site signs with, kept across runs (sessions and approval links stay valid):
    the one in run.env, else the one earlier versions kept in var/secret_key, else a new one."""
    kept = read_env_file(RUN_ENV).get("SECRET_KEY")
    if kept:
        return kept
    legacy = VAR / "secret_key"
    if legacy.exists() and legacy.read_text().strip():
        return legacy.read_text().strip()
    return secrets.token_urlsafe(50)


def environment(port: int) -> dict[str, str]:
    env = dict(os.environ)
    VAR.mkdir(parents=True, exist_ok=True)
    if "SECRET_KEY" not in env:
        env["SECRET_KEY"] = secret_key()
    env.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")
    env.setdefault("METACLAW_VAR_DIR", str(VAR))
    env.setdefault("METACLAW_PUBLIC_URL", f"http://127.0.0.1:{port}")
    env.setdefault("STATIC_ROOT", str(VAR / "static"))
    # This command serves plain HTTP on this machine, so cookies cannot require HTTPS here.
    # Behind TLS in production, leave these unset (secure by default).
    env.setdefault("SESSION_COOKIE_SECURE", "0")
    env.setdefault("CSRF_COOKIE_SECURE", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    write_run_env(env)
    return env


def write_run_env(env: dict[str, str]) -> None:
    """Written afresh on every start, before anything runs, so no setting of an earlier run
    (another database) lingers. Only its owner may read it: it holds the secret key."""
    lines = [
        "# Written by scripts/run.py on each start: the settings its processes run with.",
        "# manage.py reads this file (a variable set in the environment wins), so",
        "# `python3 manage.py <command>` acts on the same site. Not for production.",
        *(f"{name}={shlex.quote(env[name])}" for name in SHARED_SETTINGS if env.get(name)),
    ]
    descriptor = os.open(RUN_ENV, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")
    RUN_ENV.chmod(0o600)


def manage(env: dict[str, str], log: Path, *args: str) -> None:
    """Run a command with its output in ``log``; on failure show its end and exit."""
    with log.open("a") as file:
        done = subprocess.run(
            [str(venv_python()), str(ROOT / "manage.py"), *args],
            env=env,
            cwd=ROOT,
            stdout=file,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        print_tail(log)
        sys.exit(f"manage.py {args[0]} failed (exit status {done.returncode}); see {shown(log)}.")


def print_tail(log: Path, lines: int = 25) -> None:
    if log.exists():
        for line in log.read_text(errors="replace").splitlines()[-lines:]:
            print(f"  {line}", file=sys.stderr)


class TerminalFilter:
    """Which lines of a process's stderr the terminal shows: its log records from WARNING up,
    with the lines that follow one (a traceback), and a traceback of its own (a crash)."""

    def __init__(self) -> None:
        self.showing = False

    def shows(self, line: str) -> bool:
        record = RECORD.match(line)
        if record:
            self.showing = record.group(1) in SHOWN_LEVELS
        elif line.startswith("Traceback (most recent call last):"):
            self.showing = True
        elif PYTHON_WARNING.match(line):
            self.showing = False
        return self.showing


class Process:
    """A child process whose output goes to its log file, and whose warnings and errors also go
    to the terminal, each line prefixed with the process's name. Celery's banner and the INFO
    lines stay in the log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], width: int) -> None:
        self.name = name
        self.log = LOG_DIR / f"{name}.log"
        self.prefix = f"{name.ljust(width)} | "
        self.ready = threading.Event()
        self.quiet = threading.Event()  # set while stopping: the rest goes to the log only
        self._file = self.log.open("w", buffering=1)
        self._lock = threading.Lock()
        self.popen = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        assert self.popen.stdout is not None and self.popen.stderr is not None
        # Celery prints its banner on stdout and logs on stderr, as uvicorn and Django do.
        self._readers = [
            threading.Thread(target=self._copy, args=(self.popen.stdout, False), daemon=True),
            threading.Thread(target=self._copy, args=(self.popen.stderr, True), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _copy(self, stream: IO[str], to_terminal: bool) -> None:
        terminal = TerminalFilter()
        for line in stream:
            with self._lock:
                if not self._file.closed:
                    self._file.write(line)
            if WORKER_READY.search(line):
                self.ready.set()
            if to_terminal and terminal.shows(line) and not self.quiet.is_set():
                try:
                    print(self.prefix + line.rstrip("\n"), flush=True)
                except OSError:  # the terminal went away: keep reading, or the child would block
                    self.quiet.set()

    def close(self) -> None:
        for reader in self._readers:
            reader.join(timeout=2)
        with self._lock:
            self._file.close()


def wait_until_ready(
    running: dict[str, Process], host: str, port: int, stopping: Callable[[], bool]
) -> None:
    """Until the web app answers and each worker has said it is ready, so that what is printed
    next (the credentials) comes last; a process that exits meanwhile is reported by the
    caller's loop."""
    address = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    web_ready = False
    while time.monotonic() < deadline and not stopping():
        if any(process.popen.poll() is not None for process in running.values()):
            return
        if not web_ready:
            try:
                socket.create_connection((address, port), timeout=1).close()
                web_ready = True
            except OSError:
                pass
        workers = [process for name, process in running.items() if name != "web"]
        if web_ready and all(process.ready.is_set() for process in workers):
            return
        time.sleep(0.2)


def credentials_block(url: str, logs: list[Path], show_demo: bool) -> list[str]:
    lines = [
        "",
        f"MetaClaw is running at {url}",
        f"  API docs:  {url}api/v1/docs",
        f"  Logs:      {', '.join(shown(log) for log in logs)}",
        f"  Commands:  python3 {shown(ROOT / 'manage.py')} <command>  (uses {shown(RUN_ENV)})",
    ]
    creds = VAR / "demo-credentials.json"
    if show_demo and creds.exists():
        data = json.loads(creds.read_text())
        key = data["api_key"]
        lines += [
            "  Try it:",
            f"    curl -s -X POST {url}api/v1/incidents -H 'Authorization: Bearer {key}' \\",
            "      -H 'Content-Type: application/json' \\",
            '      -d \'{"id": "first-1", "agent": {"name": "my-agent"}, "kind": "tool_error", '
            '"error": {"type": "ValueError", "message": "bad date 2026-13-01"}}\'',
            f"    curl -s {url}api/v1/groups -H 'Authorization: Bearer {key}'",
            "",
            f"  Log in:    {data['username']} / {data['password']}",
            f"  API key:   {key}",
        ]
    lines.append("Press Ctrl-C to stop.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-demo", action="store_true", help="Do not load the demo data.")
    parser.add_argument("--skip-install", action="store_true")
    args = parser.parse_args()
    if sys.version_info < (3, 11):
        sys.exit(f"MetaClaw needs Python 3.11 or newer; this is {sys.version.split()[0]}.")

    url = f"http://{args.host}:{args.port}/"
    # Kept referenced until the process ends: closing the file would let go of the lock.
    _held = hold_the_lock(url, args.port)
    check_port_free(args.host, args.port)
    ensure_environment(args.skip_install)
    env = environment(args.port)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    setup_log = LOG_DIR / "setup.log"
    setup_log.write_text("")
    mode = (
        "production services (PostgreSQL/Redis)"
        if env.get("DATABASE_URL")
        else "embedded (SQLite + filesystem broker)"
    )
    step(f"Mode: {mode}")
    step("Migrating the database")
    manage(env, setup_log, "migrate", "--noinput", "-v", "0")
    if not args.no_demo:
        step("Loading the demo data")
        manage(env, setup_log, "seed_demo", "--quiet")
    step("Collecting the static files")
    manage(env, setup_log, "collectstatic", "--noinput", "-v", "0")

    bin_dir = venv_python().parent
    celery = [str(bin_dir / "celery"), "-A", "metaclaw_site", "worker", "--loglevel", "INFO"]
    commands = {
        # Django does not speak ASGI's lifespan protocol: off, uvicorn does not ask.
        "web": [str(bin_dir / "uvicorn"), "metaclaw_site.asgi:application", "--host", args.host,
                "--port", str(args.port), "--no-access-log", "--lifespan", "off"],
        # The fast queue (skill proposals, notifications) with beat inside it, and a separate
        # worker for the slow queue so a training run never delays a proposal.
        "worker-fast": [*celery, "-Q", "fast", "-B", "-n", "fast@%h", "--concurrency", "2"],
        "worker-slow": [*celery, "-Q", "slow", "-n", "slow@%h", "--concurrency", "1"],
    }  # fmt: skip
    step("Starting the web app and the workers")
    width = max(len(name) for name in commands)
    running = {name: Process(name, command, env, width) for name, command in commands.items()}

    signals: list[int] = []

    def on_signal(number: int, _frame: object) -> None:
        if signals:  # a second Ctrl-C: do not wait for the workers' warm shutdown
            for process in running.values():
                if process.popen.poll() is None:
                    process.popen.kill()
        signals.append(number)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def stop(status: int) -> None:
        for process in running.values():
            process.quiet.set()
            if process.popen.poll() is None:
                process.popen.terminate()
        deadline = time.monotonic() + 10
        for process in running.values():
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            process.close()
        sys.exit(status)

    def exited() -> Process | None:
        return next((p for p in running.values() if p.popen.poll() is not None), None)

    def stop_because(process: Process) -> None:
        process.close()
        print(
            f"{process.name} stopped unexpectedly (exit status {process.popen.returncode}); "
            f"the end of {shown(process.log)}:",
            file=sys.stderr,
        )
        print_tail(process.log)
        print("Stopping the others.", file=sys.stderr, flush=True)
        stop(1)

    wait_until_ready(running, args.host, args.port, lambda: bool(signals))
    if not signals and (dead := exited()) is not None:
        stop_because(dead)
    if not signals:
        logs = [process.log for process in running.values()]
        print("\n".join(credentials_block(url, logs, not args.no_demo)), flush=True)
    while not signals:
        if (dead := exited()) is not None:
            stop_because(dead)
        time.sleep(0.5)
    creds = VAR / "demo-credentials.json"
    step("Stopping" + ("" if args.no_demo else f" (the demo login and key stay in {shown(creds)})"))
    stop(0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the processes started: nothing to stop
        sys.exit(130)
