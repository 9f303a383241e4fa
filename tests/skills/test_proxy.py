"""The OpenAI-compatible proxy, driven by the real ``openai`` client.

The production ASGI app runs under uvicorn in a thread on a loopback port, against the test
database; the upstream model is our loopback OpenAI-compatible server, which records what it
received."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from base import counters
from incidents.models import Trajectory
from skills.runtime import admission, recording, retrieval
from skills.runtime import policy as runtime_policy
from skills.runtime import upstream as runtime_upstream
from skills.versions.models import PolicyVersion, VersionStatus
from skills.versions.services import (
    policy_version_create_candidate,
    policy_version_promote,
    policy_version_rollback,
    skill_revision_approve,
)
from tests import factories
from tests.asgi_server import asgi_server
from tests.fakes.openai_server import OpenAIServer, Reply

pytestmark = pytest.mark.django_db(transaction=True)

REFUNDS = (
    "refund-policy",
    "Check refund eligibility",
    "When a customer asks for a refund or their money back.",
    "Look up the order age first: refunds are possible within 30 days.",
)


@pytest.fixture(scope="module")
def proxy_url():
    """The production ASGI application (``metaclaw_site.asgi``) under uvicorn."""
    with asgi_server() as url:
        yield url


@pytest.fixture
def upstream():
    with OpenAIServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _recordings_finished(fresh_runtime_caches):
    """Recordings still being written at the end of a test finish before the caches are reset."""
    yield
    recording.recordings_wait(5)


@pytest.fixture
def project(db, upstream):
    return factories.make_project(upstream_base_url=upstream.base_url, upstream_api_key="up-key")


@pytest.fixture
def key(project):
    return factories.make_key(project, scopes=["runtime"])


@pytest.fixture
def client(proxy_url, key):
    return openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=key, max_retries=0)


def approve(project, skill):
    revision = factories.make_human_revision(project, skill)
    skill_revision_approve(revision=revision, actor=None, actor_label="test")
    return revision


@pytest.fixture
def skills(project):
    """v2: dates; v3 (active): dates + refunds."""
    return [approve(project, factories.SEARCH_ORDERS_DATES), approve(project, REFUNDS)]


def system_text(recorded) -> str:
    first = recorded.body["messages"][0]
    assert first["role"] == "system"
    return first["content"]


def test_relevant_skills_are_appended_to_the_agents_system_message(client, upstream, skills):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "You are the support bot of Example Shop."},
            {"role": "user", "content": factories.REFUND_QUESTION},
        ],
    )

    completion = raw.parse()
    assert completion.choices[0].message.content == "ok"
    assert raw.headers["X-MetaClaw-Policy-Version"] == "3"
    sent = upstream.chat_requests()[-1]
    system = system_text(sent)
    assert system.startswith("You are the support bot of Example Shop.\n\n")
    assert retrieval.SKILLS_BEGIN in system and system.rstrip().endswith(retrieval.SKILLS_END)
    section = system.split(retrieval.SKILLS_BEGIN, 1)[1]
    assert "## Active skills" in section
    assert "### Check refund eligibility" in section
    assert REFUNDS[3] in section
    assert "Search orders with ISO dates" not in section  # not relevant to this request
    assert sent.body["messages"][1] == {"role": "user", "content": factories.REFUND_QUESTION}
    assert {k.lower(): v for k, v in sent.headers.items()}["authorization"] == "Bearer up-key"
    assert sent.body["model"] == "gpt-test"


def test_a_system_message_is_created_when_the_agent_sends_none(client, upstream, skills):
    client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": factories.DATE_QUESTION}]
    )

    sent = upstream.chat_requests()[-1].body["messages"]
    assert len(sent) == 2
    assert sent[0]["role"] == "system"
    assert sent[0]["content"].startswith(retrieval.SKILLS_BEGIN)
    assert "### Search orders with ISO dates" in sent[0]["content"]
    assert sent[1] == {"role": "user", "content": factories.DATE_QUESTION}


def test_no_section_is_added_when_no_skill_is_relevant(client, upstream, skills):
    messages = [{"role": "user", "content": "hello"}]

    client.chat.completions.create(model="gpt-test", messages=messages)

    assert upstream.chat_requests()[-1].body["messages"] == messages


def test_tools_tool_calls_response_format_images_and_extra_fields_pass_through(
    client, upstream, skills
):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "search_orders",
                "description": "Search orders",
                "parameters": {"type": "object", "properties": {"since": {"type": "string"}}},
            },
        }
    ]
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "search_orders", "arguments": '{"since": "2026-11-18"}'},
    }
    upstream.enqueue(Reply(content=None, tool_calls=[tool_call]))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    history = [
        {"role": "user", "content": [{"type": "text", "text": factories.DATE_QUESTION}, image]},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "error: invalid date"},
    ]

    completion = client.chat.completions.create(
        model="gpt-test",
        messages=history,
        tools=tools,
        tool_choice="auto",
        response_format={"type": "json_object"},
        temperature=0.2,
        extra_body={"vendor_option": {"keep": [1, 2]}, "top_k": 3},
    )

    assert completion.choices[0].message.tool_calls[0].function.name == "search_orders"
    assert completion.choices[0].finish_reason == "tool_calls"
    body = upstream.chat_requests()[-1].body
    assert body["tools"] == tools
    assert body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0.2
    assert body["vendor_option"] == {"keep": [1, 2]}
    assert body["top_k"] == 3
    assert body["messages"][1:] == history
    assert "Search orders with ISO dates" in body["messages"][0]["content"]


def test_streaming_is_relayed_chunk_by_chunk(client, upstream, skills):
    upstream.enqueue(Reply(stream_chunks=["one", " two", " three"], delay=0.3))
    arrivals: list[tuple[float, str]] = []
    started = time.monotonic()

    stream = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": factories.DATE_QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic() - started, chunk.choices[0].delta.content))

    assert "".join(text for _, text in arrivals) == "one two three"
    # The upstream waits 0.3 s after each chunk: a buffering proxy would deliver them together.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.45
    assert upstream.chat_requests()[-1].body["stream"] is True
    assert upstream.chat_requests()[-1].body["stream_options"] == {"include_usage": True}


def test_upstream_errors_keep_their_status_and_body(client, upstream, skills):
    upstream.enqueue(
        Reply(
            status=400,
            body={
                "error": {
                    "message": "max_tokens is too large",
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": None,
                }
            },
        ),
        Reply(status=429, headers={"Retry-After": "7"}),
    )

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], max_tokens=10**9
        )
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )

    assert bad.value.status_code == 400
    assert bad.value.body["message"] == "max_tokens is too large"
    assert bad.value.body["param"] == "max_tokens"
    assert limited.value.status_code == 429
    assert limited.value.response.headers["Retry-After"] == "7"
    assert limited.value.response.headers["X-MetaClaw-Policy-Version"] == "3"


def test_a_streaming_request_refused_upstream_keeps_its_status(client, upstream, skills):
    upstream.enqueue(Reply(status=400, body={"error": {"message": "bad stream request"}}))

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        )

    assert bad.value.status_code == 400
    assert "bad stream request" in str(bad.value)


def test_each_turn_is_recorded_as_a_trajectory_off_the_response_path(
    client, upstream, project, skills
):
    client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": factories.REFUND_QUESTION}],
        extra_headers={"X-Session-Id": "sess-42", "X-Turn-Type": "side", "X-Agent-Name": "bot"},
    )
    stream = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": factories.DATE_QUESTION}],
        stream=True,
        extra_headers={"X-Session-Id": "sess-42"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "ok"

    assert recording.recordings_wait(10)
    turns = list(Trajectory.objects.filter(project=project).order_by("occurred_at"))
    assert len(turns) == 2
    side, main = turns
    assert (side.session_id, side.turn_type, side.agent_name) == ("sess-42", "side", "bot")
    assert side.source == "proxy"
    assert side.policy_version == 3
    assert [s["slug"] for s in side.skills_injected] == [REFUNDS[0]]
    assert side.skills_injected[0]["score"] > 0
    assert side.messages == [{"role": "user", "content": factories.REFUND_QUESTION}]
    assert side.response == {"role": "assistant", "content": "ok"}
    assert (side.prompt_tokens, side.completion_tokens, side.status_code) == (10, 1, 200)
    assert side.latency_ms > 0
    assert side.model == "gpt-test"
    assert main.turn_type == "main"
    assert main.response["content"] == "ok"
    assert main.metadata["stream"] is True
    assert [s["slug"] for s in main.skills_injected] == [factories.SEARCH_ORDERS_DATES[0]]


def test_the_proxy_hands_pooled_database_connections_back_after_each_use(
    client, upstream, project, skills
):
    from django.db import connection

    pool = connection.pool
    if pool is None:
        pytest.skip("the connection pool is turned off (METACLAW_DB_POOL=0)")
    for _ in range(5):
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": factories.REFUND_QUESTION}]
        )
    assert recording.recordings_wait(10)
    time.sleep(0.2)  # the recorder returns its connection right after the batch it wrote

    stats = pool.get_stats()
    # Only this test's own connection is out; the server's threads and the recorder hold none
    # between uses (more executor threads than pooled connections would starve the pool).
    assert stats["pool_size"] - stats["pool_available"] <= 1, stats


def test_a_pinned_version_is_served_and_named_in_the_header(client, upstream, skills):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": factories.REFUND_QUESTION}],
        extra_headers={"X-MetaClaw-Policy-Version": "2"},
    )

    assert raw.headers["X-MetaClaw-Policy-Version"] == "2"
    assert "Check refund eligibility" not in str(upstream.chat_requests()[-1].body["messages"])

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-MetaClaw-Policy-Version": "99"},
        )


def test_a_rollback_changes_what_the_next_request_gets(client, upstream, project, skills):
    ask = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": factories.REFUND_QUESTION}],
    }
    before = client.chat.completions.with_raw_response.create(**ask)
    assert "Check refund eligibility" in system_text(upstream.chat_requests()[-1])

    policy_version_rollback(
        to_version=PolicyVersion.objects.get(project=project, number=2),
        actor=None,
        actor_label="test",
        reason="refund skill confuses the bot",
    )
    after = client.chat.completions.with_raw_response.create(**ask)

    assert before.headers["X-MetaClaw-Policy-Version"] == "3"
    assert after.headers["X-MetaClaw-Policy-Version"] == "2"
    assert "Check refund eligibility" not in str(upstream.chat_requests()[-1].body["messages"])


def test_a_version_with_an_adapter_sends_the_adapters_model(client, upstream, project, skills):
    adapter = "tinker://run-7/sampler_weights/step-40"
    candidate = policy_version_create_candidate(
        project=project, adapter_ref=adapter, base_model="Qwen/Qwen3-8B", changelog="LoRA"
    )
    policy_version_promote(version=candidate, actor=None, actor_label="test")

    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])

    assert upstream.chat_requests()[-1].body["model"] == adapter


def test_the_projects_model_map_renames_the_requested_model(client, upstream, project):
    project.upstream_model_map = {"gpt-test": "real-model-b", "*": "fallback"}
    project.save(update_fields=["upstream_model_map"])
    admission.runtime_key_cache_clear()

    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])

    assert [r.body["model"] for r in upstream.chat_requests()] == ["real-model-b", "fallback"]


def test_bad_keys_are_refused_in_openai_shape(proxy_url, project):
    ingest_only = factories.make_key(project, scopes=["ingest"])
    messages = [{"role": "user", "content": "hi"}]

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{proxy_url}/v1", api_key="mc_bad_key", max_retries=0
        ).chat.completions.create(model="m", messages=messages)
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(
            base_url=f"{proxy_url}/v1", api_key=ingest_only, max_retries=0
        ).chat.completions.create(model="m", messages=messages)


def test_an_unreachable_upstream_answers_502_and_is_recorded(client, project):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    project.upstream_base_url = dead
    project.save(update_fields=["upstream_base_url"])
    admission.runtime_key_cache_clear()

    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

    assert exc.value.status_code == 502
    assert recording.recordings_wait(10)
    assert Trajectory.objects.get(project=project).status_code == 502


def test_invalid_json_is_a_400_naming_the_problem(proxy_url, key):
    response = httpx.post(
        f"{proxy_url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    no_messages = httpx.post(
        f"{proxy_url}/v1/chat/completions",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {key}"},
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["param"] == "messages"


def test_proxied_requests_count_as_project_traffic(client, project):
    for _ in range(3):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    runtime_policy.sync_now()

    assert counters.traffic_per_minute(project_id=project.pk, minutes=1)[-1] == 3


def test_the_django_view_serves_the_same_proxy(upstream, key, skills):
    """The URL mounted in urls.py (what runs when the fast lane is not in front)."""
    response = async_to_sync(AsyncClient().post)(
        "/v1/chat/completions",
        data={
            "model": "gpt-test",
            "messages": [{"role": "user", "content": factories.REFUND_QUESTION}],
        },
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}", "X-Session-Id": "django-door"},
    )

    assert response.status_code == 200
    assert response["X-MetaClaw-Policy-Version"] == "3"
    assert response.json()["choices"][0]["message"]["content"] == "ok"
    assert "Check refund eligibility" in system_text(upstream.chat_requests()[-1])
    assert recording.recordings_wait(10)
    assert Trajectory.objects.filter(session_id="django-door").exists()
    assert PolicyVersion.objects.filter(status=VersionStatus.ACTIVE).count() >= 1


def test_the_production_app_serves_policy_and_retrieval_like_the_api(proxy_url, key, skills):
    """The ASGI fast lane answers the agent-facing API paths with the NinjaAPI's behaviour."""
    auth = {"Authorization": f"Bearer {key}"}
    policy = httpx.get(f"{proxy_url}/api/v1/runtime/policy", headers=auth)
    unchanged = httpx.get(
        f"{proxy_url}/api/v1/runtime/policy",
        headers={**auth, "If-None-Match": policy.headers["ETag"]},
    )
    pinned = httpx.get(f"{proxy_url}/api/v1/runtime/policy?version=2", headers=auth)
    missing = httpx.get(f"{proxy_url}/api/v1/runtime/policy?version=42", headers=auth)
    bad = httpx.get(f"{proxy_url}/api/v1/runtime/policy?version=zero", headers=auth)
    anonymous = httpx.get(f"{proxy_url}/api/v1/runtime/policy")
    found = httpx.post(
        f"{proxy_url}/api/v1/runtime/skills/retrieve",
        json={"messages": [{"role": "user", "content": factories.REFUND_QUESTION}], "k": 1},
        headers=auth,
    )
    no_task = httpx.post(f"{proxy_url}/api/v1/runtime/skills/retrieve", json={}, headers=auth)

    assert policy.status_code == 200
    assert policy.json()["version"] == 3
    assert policy.headers["X-MetaClaw-Policy-Version"] == "3"
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert pinned.json()["version"] == 2
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["field"] == "version"
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "version"
    assert anonymous.status_code == 401
    assert found.status_code == 200
    assert [s["slug"] for s in found.json()["skills"]] == [REFUNDS[0]]
    assert no_task.status_code == 422
    assert no_task.json()["code"] == "invalid"


# --- Hardening ------------------------------------------------------------------------------


def _asgi_call(path, headers, body=b"", method="POST"):
    """Call the fast lane directly: (status, json body, how many body messages it read)."""
    import json

    from skills.runtime.proxy import fast_lane

    async def django_app(scope, receive, send):  # never reached on the fast lane's paths
        raise AssertionError("served by Django")

    reads = []
    sent = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": ("127.0.0.1", 8000),
    }
    async_to_sync(fast_lane(django_app))(scope, receive, send)
    status = sent[0]["status"]
    payload = json.loads(sent[1]["body"]) if sent[1]["body"] else None
    return status, payload, len(reads)


def test_the_fast_lane_refuses_unknown_keys_before_reading_the_body(key):
    for path in ("/v1/chat/completions", "/api/v1/runtime/skills/retrieve"):
        status, body, reads = _asgi_call(
            path, {"host": "127.0.0.1", "authorization": "Bearer mc_nope"}, b"{}"
        )
        assert (status, reads) == (401, 0), path
    assert body["code"] == "unauthorized"


def test_the_fast_lane_applies_djangos_body_limits(key, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    settings.METACLAW = {**settings.METACLAW, "INGEST_MAX_BODY_BYTES": 500}
    auth = {"host": "127.0.0.1", "authorization": f"Bearer {key}"}

    declared = _asgi_call("/v1/chat/completions", {**auth, "content-length": "1001"}, b"x")
    streamed = _asgi_call("/v1/chat/completions", auth, b"x" * 1001)
    api_declared = _asgi_call(
        "/api/v1/runtime/skills/retrieve", {**auth, "content-length": "501"}, b"x"
    )
    api_streamed = _asgi_call("/api/v1/runtime/skills/retrieve", auth, b" " * 501)
    fits = _asgi_call("/api/v1/runtime/skills/retrieve", auth, b'{"query": "x"}')

    assert declared[0] == 413 and declared[2] == 0
    assert declared[1]["error"]["code"] == "payload_too_large"
    assert streamed[0] == 413
    assert api_declared[0] == 413 and api_declared[2] == 0
    assert api_declared[1]["code"] == "payload_too_large"
    assert api_streamed[0] == 413
    assert fits[0] != 413


def test_the_fast_lane_checks_the_host_against_allowed_hosts(proxy_url, key, settings):
    settings.ALLOWED_HOSTS = ["metaclaw.example"]
    auth = {"Authorization": f"Bearer {key}"}

    bad = httpx.get(f"{proxy_url}/api/v1/runtime/policy", headers={**auth, "Host": "evil.test"})
    chat = httpx.post(
        f"{proxy_url}/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={**auth, "Host": "evil.test"},
    )
    good = _asgi_call(
        "/api/v1/runtime/policy", {"host": "metaclaw.example:443", **auth}, method="GET"
    )

    assert bad.status_code == 400
    assert bad.json()["code"] == "bad_request"
    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "bad_request"
    assert good[0] == 200  # an allowed host, with its port


def test_a_projects_own_upstream_never_gets_the_global_key(settings):
    from base.models import Project

    settings.UPSTREAM = {"BASE_URL": "https://global.example/v1/", "API_KEY": "global-secret"}

    def upstream(url, key=""):
        return runtime_upstream.upstream_for(
            Project(upstream_base_url=url, upstream_api_key=key, upstream_model_map={})
        )

    assert upstream("").api_key == "global-secret"
    assert upstream("").base_url == "https://global.example/v1"
    assert upstream("https://global.example/v1").api_key == "global-secret"
    assert upstream("https://attacker.example/v1").api_key == ""
    assert upstream("https://attacker.example/v1", "own").api_key == "own"
    assert upstream("", "own").api_key == "own"


def test_skills_go_in_a_new_system_message_when_the_existing_content_is_odd():
    section = "<!-- metaclaw:active-skills -->x<!-- /metaclaw:active-skills -->"
    for odd in (123, {"text": "hi"}, True):
        messages = [{"role": "system", "content": odd}, {"role": "user", "content": "hi"}]
        out = retrieval.messages_with_skills(messages, section)
        assert out[0] == {"role": "system", "content": section}
        assert out[1:] == messages
    assert retrieval.messages_with_skills([{"role": "system", "content": None}], section) == [
        {"role": "system", "content": section}
    ]


def _turn(project, body, *, stream):
    return recording.Turn(
        project_id=project.pk,
        session_id="odd-upstream",
        turn_type="main",
        agent_name="",
        policy_version=1,
        requested_model="m",
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        tools=[],
        skills=[],
        status_code=200,
        latency_ms=1.0,
        response_body=body,
        stream=stream,
    )


def test_malformed_upstream_answers_are_recorded_without_losing_other_turns(project):
    odd = [
        _turn(project, b"data: 1\n\ndata: [DONE]\n", stream=True),
        _turn(project, b'data: {"choices": [null, {"delta": 5}], "usage": 3}\n', stream=True),
        _turn(
            project,
            b'data: {"choices": [{"delta": {"content": "ok", "tool_calls": [null, '
            b'{"index": [1], "function": {"name": 7, "arguments": "{}"}}]}}]}\n',
            stream=True,
        ),
        _turn(project, b'{"choices": [null], "usage": []}', stream=False),
        _turn(project, b'{"choices": "nope"}', stream=False),
        _turn(project, b'data: {"choices": [{"delta": {"content": "fine"}}]}\n', stream=True),
    ]

    assert recording.proxy_turns_record(turns=odd) == len(odd)

    responses = list(
        Trajectory.objects.filter(session_id="odd-upstream")
        .order_by("occurred_at")
        .values_list("response", flat=True)
    )
    assert len(responses) == len(odd)
    assert {"role": "assistant", "content": "fine"} in responses
    parsed, _, _ = recording._parse_response(odd[2])
    assert parsed["content"] == "ok"
    assert parsed["tool_calls"][0]["function"] == {"name": "", "arguments": "{}"}
