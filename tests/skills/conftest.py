"""Fixtures the skills tests share: the LLM, played by our OpenAI-compatible loopback server,
and runtime caches that no test inherits from another."""

from __future__ import annotations

import pytest

from skills.runtime import admission
from skills.runtime import policy as runtime_policy
from skills.synthesis import llm
from tests.fakes.openai_server import OpenAIServer


@pytest.fixture
def fast_llm_retries(monkeypatch):
    """LLM retries back off for milliseconds, and no endpoint is remembered from an earlier
    test as one that refuses structured output."""
    monkeypatch.setattr(llm, "BACKOFF_BASE_SECONDS", 0.01)
    llm._no_structured_output.clear()


@pytest.fixture
def llm_server(settings, fast_llm_retries):
    """The loopback server, configured as the LLM (model ``loopback-model``, key ``test-key``)."""
    with OpenAIServer(model="loopback-model") as server:
        settings.LLM = {
            "BASE_URL": server.base_url,
            "API_KEY": "test-key",
            "MODEL": "loopback-model",
            "TIMEOUT_SECONDS": 2,
        }
        yield server


@pytest.fixture
def fresh_runtime_caches():
    """The runtime's caches of policies and keys start and end empty."""
    runtime_policy.policy_cache_clear()
    admission.runtime_key_cache_clear()
    yield
    runtime_policy.policy_cache_clear()
    admission.runtime_key_cache_clear()
