"""The first hour of a new team: ``python3 scripts/run.py`` and then the README's commands.

One runner serves the module (embedded: SQLite and the filesystem broker in a temporary folder,
on a free port): its start-up screen, the ``python3 manage.py …`` commands the README prints,
a second runner beside it, and the API docs it serves. It is started as a person starts it,
from a terminal in its own process group, and stopped with Ctrl-C's signal to that group."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.helpers import last_line_of_success, run_in_checkout

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "scripts" / "run.py"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
# The runner's settings reach a command only through its var folder; whatever the suite's own
# environment says about settings must not help.
UNSET = {
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "DJANGO_SETTINGS_MODULE",
    "SECRET_KEY",
    "METACLAW_TESTING",
    "METACLAW_CACHE_PREFIX",
    "STATIC_ROOT",
    "DEBUG",
    "VIRTUAL_ENV",
}
READY_LINE = "Press Ctrl-C to stop."


def plain_environment(var_dir: Path) -> dict[str, str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in UNSET and not k.startswith("PYTEST")
    }
    environment["METACLAW_VAR_DIR"] = str(var_dir)
    # A venv's bin first on PATH would let "python3" mean the venv: a person's shell has none.
    environment["PATH"] = os.pathsep.join(
        part
        for part in environment.get("PATH", "").split(os.pathsep)
        if not part.startswith(str(ROOT / ".venv"))
    )
    return environment


def system_python() -> str:
    """The Python a person types ``python3`` into: the one this suite's venv was made from."""
    base = getattr(sys, "_base_executable", sys.executable)
    return base if sys.prefix != sys.base_prefix else sys.executable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Runner:
    var_dir: Path
    port: int
    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.popen.poll() is not None:
                time.sleep(0.5)  # the reader's last lines
                break
            time.sleep(0.2)
        pytest.fail(f"the runner never printed {text!r}; it printed:\n{self.output[-4000:]}")

    def stop(self) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        try:
            return self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.wait()


def start_runner(var_dir: Path, port: int, *args: str) -> Runner:
    popen = subprocess.Popen(
        [system_python(), str(RUN), "--skip-install", "--port", str(port), *args],
        cwd=ROOT,
        env=plain_environment(var_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    runner = Runner(var_dir=var_dir, port=port, popen=popen)
    threading.Thread(target=runner.read, daemon=True).start()
    return runner


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv (scripts/test and scripts/run.py make it)")
    running = start_runner(tmp_path_factory.mktemp("var"), free_port())
    try:
        running.wait_for(READY_LINE, timeout=150)
        yield running
    finally:
        running.stop()


def get(url: str, **headers: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


# --- The start-up screen (item 4) ------------------------------------------------------------


def test_the_start_up_screen_ends_with_the_login_and_keeps_worker_output_in_log_files(runner):
    credentials = (runner.var_dir / "demo-credentials.json").read_text()
    password = re.search(r'"password": "([^"]+)"', credentials).group(1)
    lines = [line for line in runner.lines if line.strip()]
    end = lines.index(READY_LINE)
    assert lines[end - 2].startswith("  Log in:    demo / ")
    assert lines[end - 1].startswith("  API key:   mc_")
    assert runner.output.count(password) == 1  # printed once, not twice
    before = "\n".join(lines[:end])
    for noise in (
        "-------------- fast@",  # Celery's banner
        "[tasks]",
        "[config]",
        "No directory at",  # WhiteNoise without collectstatic's folder
        "No hostname was supplied",  # kombu on the filesystem broker's URL
        "lifespan",  # uvicorn asking Django for ASGI's lifespan
        "INFO",
        "Warning",
    ):
        assert noise not in before, noise
    logs = {
        name: runner.var_dir / "log" / f"{name}.log"
        for name in ("web", "worker-fast", "worker-slow")
    }
    for log in logs.values():
        assert log.exists()
        assert str(log) in before  # its path is printed (absolute: the folder is not below here)
    assert "-------------- fast@" in logs["worker-fast"].read_text()  # the banner is kept there
    assert "slow@" in logs["worker-slow"].read_text()


def load_runner_module():
    spec = importlib.util.spec_from_file_location("metaclaw_run_script", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_terminal_shows_warnings_errors_and_tracebacks_but_not_banners_or_info():
    terminal = load_runner_module().TerminalFilter()
    stderr = {
        "/x/celery/platforms.py:893: SecurityWarning: You're running the worker as root": False,
        "absolutely not recommended!": False,
        " -------------- fast@vm v5.7.0 (collider)": False,
        "[tasks]": False,
        "  . skills.tasks.propose_skill": False,
        "[2026-01-02 03:04:05,678: INFO/MainProcess] fast@vm ready.": False,
        "[2026-01-02 03:04:05,678: ERROR/ForkPoolWorker-1] Task x raised unexpected: E()": True,
        "Traceback (most recent call last):": True,
        '  File "x.py", line 1, in f': True,
        "ValueError: bad": True,
        "INFO:     Started server process [1]": False,
        "2026-01-02 03:04:05,678 WARNING django.request: Not Found: /x": True,
        "WARNING:  Invalid HTTP request received.": True,
        "2026-01-02 03:04:05,678 INFO base.boot: loaded": False,
    }
    assert {line: terminal.shows(line) for line in stderr} == stderr
    crash = load_runner_module().TerminalFilter()  # a crash before any log record
    assert crash.shows("Traceback (most recent call last):")
    assert crash.shows("ModuleNotFoundError: No module named 'x'")


# --- The README's manage.py commands (item 2) ------------------------------------------------


def readme_commands(heading: str) -> list[str]:
    """The ``python3 manage.py`` lines of the first bash block after ``heading``."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("python3 manage.py ")]


def test_the_readmes_manage_py_commands_work_as_printed_after_the_runner(runner):
    commands = readme_commands("Projects, people and keys")
    assert [shlex.split(line)[2] for line in commands] == [
        "createsuperuser",
        "create_project",
        "add_member",
        "create_api_key",
    ]
    environment = plain_environment(runner.var_dir)
    environment["DJANGO_SUPERUSER_PASSWORD"] = "a-first-hour-password"
    outputs = []
    for line in commands:
        words = shlex.split(line)
        if words[2] == "createsuperuser":  # its prompts need a terminal; the same, unattended
            words += ["--noinput", "--username", "alice", "--email", "alice@example.com"]
        # A system python3, outside .venv, in the checkout's folder, as the README prints it.
        words = [system_python(), *(w if w != "..." else "bob-first-hour-pw" for w in words[1:])]
        done = run_in_checkout(words, environment)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    key = outputs[-1].strip().splitlines()[-1]
    assert key.startswith("mc_")
    # The same site as the running one: its web process knows the new project's key.
    status, _, body = get(f"{runner.url}api/v1/groups", Authorization=f"Bearer {key}")
    assert status == 200, body


def test_every_readme_manage_py_command_is_printed_as_python3():
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"(?<![\w3])python manage\.py", readme)
    members = (ROOT / "templates" / "base" / "members.html").read_text()
    assert "python3 manage.py add_member" in members


def test_manage_py_without_the_runners_settings_says_where_they_come_from(tmp_path):
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv")
    done = run_in_checkout([system_python(), "manage.py", "check"], plain_environment(tmp_path))
    assert done.returncode != 0
    assert "SECRET_KEY must be set" in done.stderr
    assert "var/run.env" in done.stderr


def test_the_environment_wins_over_the_runners_settings(runner, tmp_path):
    environment = plain_environment(runner.var_dir)
    environment["METACLAW_PUBLIC_URL"] = "https://metaclaw.example"
    script = "from django.conf import settings; print(settings.METACLAW_PUBLIC_URL)"
    printed = last_line_of_success(
        [system_python(), "manage.py", "shell", "-c", script], environment
    )
    assert printed == "https://metaclaw.example"


# --- A second runner (item 3) ----------------------------------------------------------------


def test_a_second_runner_in_the_same_folder_changes_nothing_and_exits_non_zero(runner):
    web_log = runner.var_dir / "log" / "web.log"
    settings_before = (runner.var_dir / "run.env").read_text()
    log_before = web_log.stat()
    done = run_in_checkout(
        [system_python(), str(RUN), "--skip-install", "--port", str(free_port())],
        plain_environment(runner.var_dir),
        timeout=60,
    )
    assert done.returncode == 1
    assert "MetaClaw is already running from" in done.stderr
    assert f"pid {runner.popen.pid}, {runner.url}" in done.stderr
    assert "MetaClaw is running" not in done.stdout
    assert "API key" not in done.stdout + done.stderr
    assert (runner.var_dir / "run.env").read_text() == settings_before
    assert (
        web_log.stat().st_ino == log_before.st_ino and web_log.stat().st_size >= log_before.st_size
    )
    assert runner.popen.poll() is None


def test_a_runner_on_a_port_in_use_exits_non_zero_before_starting_anything(runner, tmp_path):
    done = run_in_checkout(
        [system_python(), str(RUN), "--skip-install", "--port", str(runner.port)],
        plain_environment(tmp_path),
        timeout=60,
    )
    assert done.returncode == 1
    assert f"Port {runner.port} on 127.0.0.1 is already in use" in done.stderr
    assert "MetaClaw is running" not in done.stdout
    assert not (tmp_path / "log").exists()  # no worker was started
    assert not (tmp_path / "metaclaw.sqlite3").exists()


# --- The API docs, offline (item 5) ----------------------------------------------------------


class AssetLinks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href"} and value:
                self.urls.append(value)


def asset_urls(html: str) -> list[str]:
    parser = AssetLinks()
    parser.feed(html)
    return parser.urls


def test_the_api_docs_use_only_local_assets_and_the_runner_serves_them(runner):
    status, _, body = get(f"{runner.url}api/v1/docs")
    assert status == 200
    urls = asset_urls(body.decode())
    assert "/static/ninja/swagger-ui-bundle.js" in urls
    assert "/static/ninja/swagger-ui.css" in urls
    for url in urls:
        assert url.startswith("/static/"), url  # no CDN, no other site
        status, content_type, content = get(runner.url.rstrip("/") + url)
        assert status == 200 and content, url
        assert content_type.split(";")[0] in {
            "text/css",
            "text/javascript",
            "application/javascript",
            "image/svg+xml",
            "image/png",
        }, (url, content_type)
    # collectstatic gathered them too, as a production deployment does.
    assert (runner.var_dir / "static" / "ninja" / "swagger-ui-bundle.js").exists()


def test_the_api_docs_use_only_local_assets_in_production_settings(client):
    from django.contrib.staticfiles import finders

    response = client.get("/api/v1/docs")
    assert response.status_code == 200
    urls = asset_urls(response.content.decode())
    assert urls and all(url.startswith("/static/ninja/") for url in urls), urls
    for url in urls:
        assert finders.find(url.removeprefix("/static/")) is not None, url  # collectstatic's
        served = client.get(url)  # WhiteNoise, from the finders
        assert served.status_code == 200, url
        assert b"".join(served.streaming_content), url


# Playwright's sync API keeps an event loop in the thread that used it, which Django's
# async_to_sync then refuses (tests/browser/ run last for it): here it runs in a process of its
# own, so this test runs beside the module's runner.
OFFLINE_BROWSER = r"""
import json, sys
from playwright.sync_api import sync_playwright

chromium, url = sys.argv[1:]
refused = []

def offline(route):
    if route.request.url.startswith(url):
        route.continue_()
    else:
        refused.append(route.request.url)
        route.abort()

with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page()
    page.route("**/*", offline)
    page.goto(url + "api/v1/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    operations = page.locator(".opblock").count()
    title = page.inner_text(".info .title")
    browser.close()
print(json.dumps({"operations": operations, "title": title, "refused": refused}))
"""


def test_the_api_docs_render_without_internet_in_a_browser(runner):
    """Swagger UI draws the operations with every request off this machine refused."""
    chromium = os.environ.get("METACLAW_CHROMIUM", "/usr/bin/chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        playwright = None
    if playwright is None or not Path(chromium).exists():
        reason = "needs the playwright package and Chromium (as tests/browser/ do)"
        if os.environ.get("METACLAW_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    seen = json.loads(
        last_line_of_success([sys.executable, "-c", OFFLINE_BROWSER, chromium, runner.url])
    )
    assert seen["refused"] == []
    assert seen["operations"] > 10
    assert "MetaClaw API" in seen["title"]


# --- Last: a process that dies takes the runner down with a non-zero status (item 3) ---------


def process_group(leader: int) -> dict[int, str]:
    """The processes of ``leader``'s process group, other than itself: pid -> command line."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        if int(fields[2]) == leader and pid != leader and fields[0] != "Z":
            members[pid] = command
    return members


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_process_that_dies_stops_the_others_and_the_runner_exits_non_zero(runner):
    children = process_group(runner.popen.pid)
    web = [pid for pid, command in children.items() if "uvicorn" in command]
    assert len(web) == 1 and any("celery" in command for command in children.values())
    os.kill(web[0], signal.SIGKILL)
    assert runner.popen.wait(timeout=30) == 1
    time.sleep(0.5)  # the reader's last lines
    assert "web stopped unexpectedly (exit status -9)" in runner.output
    deadline = time.monotonic() + 10
    while process_group(runner.popen.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process_group(runner.popen.pid) == {}
