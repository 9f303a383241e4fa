"""skills.synthesis.llm against our OpenAI-compatible loopback server, through the real openai client."""

from __future__ import annotations

import json
import socket
import time

import pytest

from skills.synthesis import llm
from tests.fakes.openai_server import Reply

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
MESSAGES = [{"role": "user", "content": 'Answer {"ok": true}'}]


def test_a_valid_answer_returns_the_object_usage_and_model(llm_server):
    llm_server.enqueue(
        Reply(content='{"ok": true}', usage={"prompt_tokens": 12, "completion_tokens": 3})
    )

    result = llm.complete_json(MESSAGES, SCHEMA, schema_name="check")

    assert result.parsed == {"ok": True}
    assert result.usage == llm.Usage(12, 3)
    assert result.model == "loopback-model"
    (request,) = llm_server.chat_requests()
    assert request.body["response_format"]["json_schema"]["name"] == "check"
    assert request.body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert {k.lower(): v for k, v in request.headers.items()}["authorization"] == "Bearer test-key"


def test_the_sdk_does_the_in_process_retries(llm_server):
    # Retries live in the maintained SDK (its backoff, Retry-After honoured up to a bound),
    # not in a loop of ours; what outlasts them is the Celery task's business.
    llm_server.enqueue(Reply(content='{"ok": true}'))
    llm.complete_json(MESSAGES, SCHEMA)
    (client,) = [c for key, c in llm._clients.items() if key[1] == llm_server.base_url]
    assert client.max_retries == llm.MAX_ATTEMPTS - 1 > 0


def test_without_configuration_it_says_so(settings):
    settings.LLM = {"BASE_URL": "", "API_KEY": "", "MODEL": "", "TIMEOUT_SECONDS": 1}
    assert not llm.is_configured()
    with pytest.raises(llm.LlmNotConfigured):
        llm.complete_json(MESSAGES, SCHEMA)


@pytest.mark.parametrize(
    "content",
    [
        '```json\n{"ok": true}\n```',
        'Here it is: {"ok": true} — anything else?',
        'Thinking... {not json} then {"ok": true}',
        '```\n{"ok": true}\n```',
    ],
)
def test_the_tolerant_parser_finds_the_first_json_object(content):
    assert llm.parse_json_object(content) == {"ok": True}


@pytest.mark.parametrize("content", ["", "no json here", "[1, 2]", '{"unterminated": '])
def test_the_tolerant_parser_gives_none_when_there_is_no_object(content):
    assert llm.parse_json_object(content) is None


def test_an_answer_without_json_raises_invalid_output_with_the_content_and_usage(llm_server):
    llm_server.enqueue(
        Reply(
            content="I cannot help with that.", usage={"prompt_tokens": 5, "completion_tokens": 6}
        )
    )

    with pytest.raises(llm.LlmInvalidOutput) as caught:
        llm.complete_json(MESSAGES, SCHEMA)

    assert caught.value.content == "I cannot help with that."
    assert caught.value.usage == llm.Usage(5, 6)


def test_malformed_bytes_from_the_server_are_invalid_output_not_a_crash(llm_server):
    llm_server.enqueue(
        Reply(raw=b"{this is not json", headers={"Content-Type": "application/json"})
    )

    with pytest.raises(llm.LlmError):
        llm.complete_json(MESSAGES, SCHEMA)


def test_a_429_waits_for_retry_after_then_succeeds(llm_server):
    llm_server.enqueue(
        Reply(status=429, headers={"Retry-After": "1"}), Reply(content='{"ok": true}')
    )

    started = time.monotonic()
    result = llm.complete_json(MESSAGES, SCHEMA)

    assert result.parsed == {"ok": True}
    assert time.monotonic() - started >= 0.9
    assert len(llm_server.chat_requests()) == 2


def test_a_retry_after_too_long_to_wait_in_the_worker_is_handed_to_the_task(llm_server):
    llm_server.enqueue(Reply(status=429, headers={"Retry-After": "120"}))

    started = time.monotonic()
    with pytest.raises(llm.LlmTransientError) as caught:
        llm.complete_json(MESSAGES, SCHEMA)

    assert caught.value.retry_after == 120
    assert time.monotonic() - started < 5
    assert len(llm_server.chat_requests()) == 1


def test_5xx_errors_are_retried_with_backoff_then_reported_as_transient(llm_server):
    llm_server.default = Reply(status=502)

    with pytest.raises(llm.LlmTransientError, match="server error \\(502\\)"):
        llm.complete_json(MESSAGES, SCHEMA)

    assert len(llm_server.chat_requests()) == llm.MAX_ATTEMPTS


def test_a_slow_answer_past_the_timeout_is_transient(llm_server, settings, monkeypatch):
    settings.LLM = {**settings.LLM, "TIMEOUT_SECONDS": 0.3}
    monkeypatch.setattr(llm, "MAX_ATTEMPTS", 2)
    llm_server.default = Reply(content='{"ok": true}', delay=1.0)

    with pytest.raises(llm.LlmTransientError, match="timed out"):
        llm.complete_json(MESSAGES, SCHEMA)
    assert len(llm_server.chat_requests()) == 2


def test_a_connection_refused_is_transient(settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.LLM = {
        "BASE_URL": f"http://127.0.0.1:{port}/v1",
        "API_KEY": "k",
        "MODEL": "m",
        "TIMEOUT_SECONDS": 1,
        # Room for the SDK's retries and their backoff on a busy machine: with the default
        # (1.5 x the timeout) the deadline could end the call first, a different error.
        "DEADLINE_SECONDS": 30,
    }

    with pytest.raises(llm.LlmTransientError, match="Could not reach"):
        llm.complete_json(MESSAGES, SCHEMA)


def test_a_bad_key_is_a_permanent_error_without_retries(llm_server):
    llm_server.default = Reply(status=401)

    with pytest.raises(llm.LlmPermanentError, match="401"):
        llm.complete_json(MESSAGES, SCHEMA)
    assert len(llm_server.chat_requests()) == 1


def test_an_endpoint_refusing_structured_output_is_asked_in_plain_mode_from_then_on(llm_server):
    llm_server.enqueue(
        Reply(status=400, body={"error": {"message": "Unknown parameter: response_format"}}),
        Reply(content='```json\n{"ok": true}\n```'),
        Reply(content='{"ok": false}'),
    )

    assert llm.complete_json(MESSAGES, SCHEMA).parsed == {"ok": True}
    assert llm.complete_json(MESSAGES, SCHEMA).parsed == {"ok": False}

    bodies = [r.body for r in llm_server.chat_requests()]
    assert ["response_format" in b for b in bodies] == [True, False, False]
    assert json.dumps(bodies[1]["messages"]) == json.dumps(MESSAGES)
