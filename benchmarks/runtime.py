#!/usr/bin/env python
"""The runtime's speed under the production ASGI server: the proxy and the policy API.

Runs MetaClaw under uvicorn (uvloop + httptools) on PostgreSQL + Redis (a database of its own,
``metaclaw_rt_bench``), with 1,000 approved skills in the active policy, in front of a loopback
upstream that answers instantly (a raw asyncio HTTP server in its own process, so the upstream is
not the bottleneck). Prints:

(a) one client at a time: the latency the proxy adds over calling the upstream directly, p50/p99;
(b) 32 concurrent clients: the proxy's requests/s and p99;
(c) ``POST /api/v1/runtime/skills/retrieve`` and ``GET /api/v1/runtime/policy`` with ``ETag``
    (answered 304), p50/p99, one client;
(d) ``stream: true`` (the upstream streams 50 chunks): the time to first token the proxy adds,
    one client, and 32 clients' streamed answers per second.

    python benchmarks/runtime.py [--workers 2] [--requests 2000] [--duration 10] [--litellm]
                                 [--retrieval-sizes 1k,100k]

``--retrieval-sizes``: (c) is measured again with a project of each further size of live skills
(default 1,000 and 100,000), so that the cost of a bigger library shows.

``--door both`` runs it all twice, on the ASGI fast lane and on Django's own async stack
(``METACLAW_FAST_LANE=0``): the A/B of what the fast lane still buys.

With ``--litellm``, LiteLLM's proxy (``litellm[proxy]`` in its own virtual environment: the
``LITELLM_VENV`` variable, or ``.litellm-venv`` / ``../litellm-venv``) is started against the same
upstream, measured in the same harness, and the ratio printed.

Targets on this 2-core machine: (a) added p50 <= 2 ms, p99 <= 5 ms; (b) >= 5x LiteLLM (~130-150
requests/s there); (c) retrieve p99 <= 5 ms, policy with ETag p99 <= 3 ms.

One file past 500 lines: the instant upstream, the benchmark's data and the four measurements
serve one run against one server and read best together; nothing else imports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _growth import parse_sizes
from _harness import (
    ROOT,
    LoadResult,
    Server,
    _read_response,
    build_request,
    django_ready,
    free_port,
    run_load,
)

SKILLS = 1000
PROJECT_SLUG = "runtime-bench"

# --- An upstream that answers instantly ---------------------------------------------------

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Done: the order ships tomorrow."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 420, "completion_tokens": 8, "total_tokens": 428},
    }
).encode()
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_COMPLETION)).encode()
    + b"\r\n\r\n"
    + _COMPLETION
)


STREAM_CHUNKS = 50


def _sse_response() -> bytes:
    """A chunked ``text/event-stream`` answer of ``STREAM_CHUNKS`` deltas and ``[DONE]``."""
    events = []
    for i in range(STREAM_CHUNKS):
        delta = {"content": f"w{i} "} if i else {"role": "assistant", "content": "w0 "}
        chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                 "created": 1700000000, "model": "bench-model",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body
    )


_STREAM_RESPONSE = _sse_response()


def _upstream_main(port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                streamed = b'"stream":true' in body.replace(b" ", b"")
                writer.write(_STREAM_RESPONSE if streamed else _RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# --- Data ---------------------------------------------------------------------------------

_TOPICS = [
    "order search", "refunds", "shipping labels", "invoices", "password resets", "SQL queries",
    "Python imports", "Docker builds", "CSV exports", "calendar invites", "Slack alerts",
    "TLS certificates", "disk usage", "rate limits", "webhooks", "translations", "PDF reports",
    "customer addresses", "discount codes", "inventory counts", "cron jobs", "log rotation",
    "user permissions", "API pagination", "time zones",
]  # fmt: skip
_SITUATIONS = [
    "the tool rejects a relative date", "the call times out", "the user writes in another language",
    "the result is empty", "an argument has the wrong type", "the user asks for a summary",
    "the response is too long", "a required field is missing", "the data has duplicates",
    "the user is angry", "the request needs approval", "two records conflict",
    "the API returns 429", "the file is too large", "the id looks malformed",
    "the user changes their mind", "the answer needs a table", "the total does not add up",
    "the user asks about last week", "credentials have expired",
]  # fmt: skip
_ACTIONS = [
    "convert it to ISO 8601 first", "retry once with backoff", "ask one clarifying question",
    "answer in the user's language", "cite the record id", "split the work into batches",
    "check the policy before promising anything", "never guess; look it up",
]  # fmt: skip

QUESTIONS = [
    "Find my orders since last week, the order search tool says invalid date",
    "Can I get a refund for the blender I bought 40 days ago?",
    "The CSV export is empty again, what is going on?",
    "Our webhook keeps getting 429 from the API, please fix the rate limits",
    "My Python script fails with ImportError when importing requests",
    "Create a calendar invite for Tuesday 3pm Berlin time",
    "The TLS certificate on the shop expires tomorrow",
    "Reset the password for the account of jane@example.com",
]
SYSTEM_PROMPT = (
    "You are ShopBot, the customer support agent of Example Shop. Be concise and friendly. "
    "Use the tools to look things up; never invent order data. " * 12
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_orders",
            "description": "Search the customer's orders.",
            "parameters": {
                "type": "object",
                "properties": {"since": {"type": "string"}, "status": {"type": "string"}},
            },
        },
    }
]


def chat_body(i: int, stream: bool = False) -> bytes:
    return json.dumps(
        {
            **({"stream": True} if stream else {}),
            "model": "bench-model",
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "Hi, I need help with my account."},
                {"role": "assistant", "content": "Sure, what can I do for you?"},
                # Unique per request: the proxy caches query embeddings, which would hide
                # their cost.
                {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})"},
            ],
            "tools": TOOLS,
            "temperature": 0.2,
        }
    ).encode()


def setup_project(skills: int = SKILLS, slug: str = PROJECT_SLUG) -> str:
    """The benchmark project with ``skills`` approved skills in its active version; a runtime
    key. Django must be set up."""
    from base import services
    from base.models import Project
    from metaclaw_site.projects import project_create
    from skills.library.models import RevisionStatus, Skill, SkillRevision
    from skills.versions.models import PolicyVersion, VersionStatus
    from skills.versions.services import policy_version_create_candidate, policy_version_promote

    project = Project.objects.filter(slug=slug).first() or project_create(
        name=f"Runtime bench ({skills:,} skills)", slug=slug
    )
    active = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    if active.revisions.count() != skills:
        # Benchmark data only: rows made in bulk (1,000 approvals through the service would
        # make 1,000 versions); the version itself goes through the services.
        rng = random.Random(7)
        Skill.objects.filter(project=project).delete()
        rows = Skill.objects.bulk_create(
            (Skill(project=project, slug=f"skill-{n:06d}") for n in range(skills)), batch_size=5000
        )
        revisions = []
        for n, skill in enumerate(rows):
            topic, situation = _TOPICS[n % len(_TOPICS)], rng.choice(_SITUATIONS)
            action = rng.choice(_ACTIONS)
            revisions.append(
                SkillRevision(
                    skill=skill,
                    number=1,
                    name=f"{topic.capitalize()}: when {situation}",
                    description=f"When working on {topic} and {situation}.",
                    instructions=(
                        f"For {topic}, when {situation}, {action}. Explain what you did in one "
                        f"sentence. Variant {n}."
                    ),
                    category="general",
                    author="human",
                    origin="human",
                    status=RevisionStatus.APPROVED,
                )
            )
        SkillRevision.objects.bulk_create(revisions, batch_size=5000)
        candidate = policy_version_create_candidate(
            project=project,
            adapter_ref="",
            base_model="",
            changelog=f"{skills:,} skills for the runtime benchmark",
            actor_label="benchmark",
            revisions=list(SkillRevision.objects.filter(skill__project=project)),
        )
        policy_version_promote(version=candidate, actor=None, actor_label="benchmark")
    project.upstream_base_url = ""
    project.save(update_fields=["upstream_base_url"])
    return services.api_key_create(project=project, name="bench", scopes=["runtime"]).secret


# --- Measuring ----------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(round(p / 100 * (len(data) - 1))))] * 1000


async def sequential_pair(
    direct: tuple[int, Callable] | None, target: tuple[int, Callable], n: int, warmup: int = 200
) -> tuple[list[float], list[float], dict[int, int]]:
    """One client: alternate a direct call and a call through ``target``; latencies in s."""
    conns = {}
    for name, spec in (("direct", direct), ("target", target)):
        if spec is not None:
            conns[name] = await asyncio.open_connection("127.0.0.1", spec[0])
    lat: dict[str, list[float]] = {"direct": [], "target": []}
    statuses: dict[int, int] = {}
    for i in range(warmup + n):
        for name, spec in (("direct", direct), ("target", target)):
            if spec is None:
                continue
            reader, writer = conns[name]
            request = spec[1](i)
            t0 = time.perf_counter()
            writer.write(request)
            status, _, _ = await _read_response(reader)
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                lat[name].append(elapsed)
                if name == "target":
                    statuses[status] = statuses.get(status, 0) + 1
    for _reader, writer in conns.values():
        writer.close()
    return lat["direct"], lat["target"], statuses


def load(port: int, make, concurrency: int, duration: float) -> LoadResult:
    return asyncio.run(
        run_load(
            port,
            lambda w, i: make(10_000_000 + w * 1_000_000 + i),  # queries unseen in (a)
            concurrency=concurrency,
            duration=duration,
            warmup=3.0,
        )
    )


def chat_requests(
    key: str, *, stream: bool = False
) -> tuple[Callable[[int], bytes], Callable[[int], bytes]]:
    """``(via, direct)``: request ``i``'s bytes through the proxy (runtime ``key``, 50 sessions
    in turn) and the same chat completion sent to the upstream directly."""

    def via(i: int) -> bytes:
        return build_request(
            "POST",
            "/v1/chat/completions",
            chat_body(i, stream=stream),
            {
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "X-Session-Id": f"bench-{i % 50}",
            },
        )

    def direct(i: int) -> bytes:
        return build_request(
            "POST",
            "/v1/chat/completions",
            chat_body(i, stream=stream),
            {"Authorization": "Bearer up", "Content-Type": "application/json"},
        )

    return via, direct


def added_latency(direct: list[float], via: list[float], label: str) -> tuple[float, str]:
    """What going through ``label`` adds to calling the upstream directly (latencies in s):
    the added p50 in ms, and the text of both sides' p50 and p99 and of the added ones."""
    added50 = pct(via, 50) - pct(direct, 50)
    added99 = pct(via, 99) - pct(direct, 99)
    return added50, (
        f"upstream direct p50 {pct(direct, 50):.2f} ms p99 {pct(direct, 99):.2f} ms | through "
        f"{label} p50 {pct(via, 50):.2f} ms p99 {pct(via, 99):.2f} ms | added p50 "
        f"{added50:.2f} ms, p99 {added99:.2f} ms"
    )


def measure_proxy(label: str, port: int, key: str, up_port: int, args) -> tuple[float, float]:
    via, direct = chat_requests(key)
    d, p, statuses = asyncio.run(sequential_pair((up_port, direct), (port, via), args.requests))
    added50, figures = added_latency(d, p, label)
    print(f"(a) {label}, 1 client, {args.requests} requests: {figures}   statuses {statuses}")
    result = load(port, via, args.clients, args.duration)
    print(
        f"(b) {label}, {args.clients} clients, {args.duration:.0f} s: {result.rps:.0f} requests/s,"
        f" p50 {result.p50:.2f} ms, p99 {result.pct(99):.2f} ms   statuses {result.statuses}"
    )
    return result.rps, added50


async def _time_to_first_token(reader: asyncio.StreamReader) -> tuple[int, float, float]:
    """Read one streamed (chunked) answer: ``(status, seconds to the first delta, seconds to
    the end)``, both from when this is called (right after the request was written)."""
    t0 = time.perf_counter()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b"\r\n")[0].split()[1])
    first = None
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if first is None and b"data: {" in chunk:
            first = time.perf_counter() - t0
        if size == 0:
            return status, first if first is not None else float("nan"), time.perf_counter() - t0


async def _stream_clients(port: int, make, clients: int, per_client: int) -> list[float]:
    """``clients`` keep-alive connections, each streaming ``per_client`` answers back to back;
    the time to first token of every answer."""
    ttfts: list[float] = []

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(per_client):
                writer.write(make(n * 100_000 + i))
                await writer.drain()
                status, ttft, _ = await _time_to_first_token(reader)
                if status == 200:
                    ttfts.append(ttft)
        finally:
            writer.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    return ttfts


def measure_streaming(label: str, port: int, key: str, up_port: int, args) -> float:
    """(d) ``stream: true``: the time to first token the proxy adds over the upstream called
    directly, one client (alternating, as in (a)) and 32 clients; streamed answers per second."""
    via, direct = chat_requests(key, stream=True)
    n = max(200, args.requests // 4)
    direct_ttft = asyncio.run(_stream_clients(up_port, direct, 1, n))
    via_ttft = asyncio.run(_stream_clients(port, via, 1, n))
    _, figures = added_latency(direct_ttft, via_ttft, label)
    print(
        f"(d) {label}, stream: true, {STREAM_CHUNKS} chunks, 1 client, {n} answers: TTFT {figures}"
    )
    per_client = max(20, args.requests // args.clients)
    started = time.perf_counter()
    many = asyncio.run(_stream_clients(port, via, args.clients, per_client))
    elapsed = time.perf_counter() - started
    print(
        f"(d) {label}, stream: true, {args.clients} clients: {len(many) / elapsed:.0f} streamed "
        f"answers/s, TTFT p50 {pct(many, 50):.2f} ms, p99 {pct(many, 99):.2f} ms"
    )
    return len(many) / elapsed


def measure_api(port: int, key: str, args, skills: int = SKILLS) -> tuple[float, float]:
    auth = {"Authorization": f"Bearer {key}"}
    status, body = asyncio.run(
        _one(port, build_request("GET", "/api/v1/runtime/policy", b"", auth))
    )
    etag = json.loads(body)["etag"]
    size = len(body) / 1024
    print(f"    policy body without ETag: {size:.0f} KiB, {skills:,} skills (status {status})")

    def retrieve(i: int) -> bytes:
        payload = {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})"},
            ],
            "k": 5,
        }
        return build_request(
            "POST",
            "/api/v1/runtime/skills/retrieve",
            json.dumps(payload).encode(),
            {**auth, "Content-Type": "application/json"},
        )

    def policy(i: int) -> bytes:
        return build_request("GET", "/api/v1/runtime/policy", b"", {**auth, "If-None-Match": etag})

    _, r, rs = asyncio.run(sequential_pair(None, (port, retrieve), args.requests))
    _, p, ps = asyncio.run(sequential_pair(None, (port, policy), args.requests))
    print(
        f"(c) retrieve (k=5 of {skills:,}), 1 client: p50 {pct(r, 50):.2f} ms, p99 {pct(r, 99):.2f}"
        f" ms   statuses {rs}"
    )
    print(
        f"(c) policy with If-None-Match, 1 client: p50 {pct(p, 50):.2f} ms, p99 {pct(p, 99):.2f}"
        f" ms   statuses {ps}"
    )
    return pct(r, 50), pct(r, 99)


async def _one(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    status, body, _ = await _read_response(reader)
    writer.close()
    return status, body


def litellm_venv() -> Path | None:
    for candidate in (
        os.environ.get("LITELLM_VENV"),
        ROOT / ".litellm-venv",
        ROOT.parent / "litellm-venv",
    ):
        if candidate and (Path(candidate) / "bin" / "litellm").exists():
            return Path(candidate)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--litellm", action="store_true")
    parser.add_argument(
        "--retrieval-sizes", default="1k,100k",
        help="live skills for (c): the first is the main project's, the others get their own",
    )  # fmt: skip
    parser.add_argument(
        "--door", choices=["fast", "django", "both"], default="fast",
        help="what serves the routes: the ASGI fast lane (production's default), Django's own "
        "async stack (METACLAW_FAST_LANE=0), or both one after the other (an A/B)",
    )  # fmt: skip
    args = parser.parse_args()

    env = django_ready("metaclaw_rt_bench", redis_db=5)
    key = setup_project()
    up_port = free_port()
    upstream = multiprocessing.get_context("spawn").Process(
        target=_upstream_main, args=(up_port,), daemon=True
    )
    upstream.start()
    env["UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{up_port}/v1"
    env["UPSTREAM_API_KEY"] = "up"
    doors = ["fast", "django"] if args.door == "both" else [args.door]
    try:
        for door in doors:
            port = free_port()
            command = [
                sys.executable, "-m", "uvicorn", "metaclaw_site.asgi:application",
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers),
                "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                "--log-level", "warning", "--lifespan", "off",
            ]  # fmt: skip
            env["METACLAW_FAST_LANE"] = "1" if door == "fast" else "0"
            print(
                f"server: uvicorn {args.workers} workers (uvloop, httptools), {door} door; "
                f"PostgreSQL + Redis; {os.cpu_count()} cores shared by server, upstream and "
                f"client; {SKILLS} skills"
            )
            with Server(command, env, port):
                door_rps, _ = measure_proxy(
                    f"MetaClaw proxy ({door} door)", port, key, up_port, args
                )
                door_stream_rps = measure_streaming(
                    f"MetaClaw proxy ({door} door)", port, key, up_port, args
                )
                retrieval = {SKILLS: measure_api(port, key, args)}
                for size in parse_sizes(args.retrieval_sizes):
                    if size == SKILLS:
                        continue
                    print(f"    (loading a project with {size:,} live skills…)", flush=True)
                    big_key = setup_project(skills=size, slug=f"{PROJECT_SLUG}-{size}")
                    retrieval[size] = measure_api(port, big_key, args, skills=size)
                if len(retrieval) > 1:
                    print("    growth of retrieve (k=5), p50 / p99:")
                    for size, (p50, p99) in sorted(retrieval.items()):
                        print(f"      {size:>9,} skills: {p50:7.2f} / {p99:7.2f} ms")
            if door == doors[0]:
                rps, stream_rps = door_rps, door_stream_rps
        if args.litellm:
            venv = litellm_venv()
            if venv is None:
                print("--litellm: no LiteLLM venv found (set LITELLM_VENV); skipped")
                return
            lport = free_port()
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
                cfg.write(
                    "model_list:\n  - model_name: bench-model\n    litellm_params:\n"
                    f"      model: openai/bench-model\n      api_base: http://127.0.0.1:{up_port}/v1\n"
                    "      api_key: up\n"
                )
            lenv = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
            lenv.update(
                LITELLM_MASTER_KEY="sk-metaclaw-bench-0123456789abcdef0123456789abcdef",
                LITELLM_LOCAL_MODEL_COST_MAP="True",
                LITELLM_LOG="ERROR",
            )
            lcmd = [str(venv / "bin" / "litellm"), "--config", cfg.name, "--port", str(lport),
                    "--num_workers", "1"]  # fmt: skip
            with Server(lcmd, lenv, lport):
                time.sleep(3)
                lrps, _ = measure_proxy(
                    "LiteLLM proxy", lport, lenv["LITELLM_MASTER_KEY"], up_port, args
                )
                lstream = measure_streaming(
                    "LiteLLM proxy", lport, lenv["LITELLM_MASTER_KEY"], up_port, args
                )
            print(f"ratio: MetaClaw {rps:.0f} req/s / LiteLLM {lrps:.0f} req/s = {rps / lrps:.1f}x")
            print(
                f"ratio, streaming: MetaClaw {stream_rps:.0f} / LiteLLM {lstream:.0f} streamed "
                f"answers/s = {stream_rps / lstream:.1f}x"
            )
    finally:
        upstream.terminate()


if __name__ == "__main__":
    main()
