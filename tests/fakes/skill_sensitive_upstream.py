"""An upstream model whose failure rate depends on the skills injected into its system prompt,
and an LLM judge that prefers the answer that did not fail: deterministic traffic for the
replay gate and the canary.

    upstream = SkillSensitiveUpstream(base_rate=0.1, rates={"Never pass dates": 0.6})

A request fails when a stable hash of its last user message (and its session, when the proxy's
caller names one) falls under the rate of the first marker found in the system prompt (else
``base_rate``): the same conversation always gets the same answer, so tests count exactly."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from tests.fakes.openai_server import OpenAIServer, Reply

FAILED = "FAILED: the tool call was rejected"
DONE = "DONE: the order was found"


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def bucket(text: str) -> int:
    """0..99, stable for ``text``."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100


class SkillSensitiveUpstream(OpenAIServer):
    def __init__(self, *, base_rate: float, rates: dict[str, float] | None = None) -> None:
        super().__init__(default=self.answer)
        self.base_rate = base_rate
        self.rates = dict(rates or {})

    def rate_for(self, system: str) -> float:
        for marker, rate in self.rates.items():
            if marker in system:
                return rate
        return self.base_rate

    def answer(self, body: dict) -> Reply:
        messages = [m for m in (body or {}).get("messages", []) if isinstance(m, dict)]
        system = " ".join(_text(m) for m in messages if m.get("role") == "system")
        users = [_text(m) for m in messages if m.get("role") == "user"]
        failed = bucket(users[-1] if users else "") < round(self.rate_for(system) * 100)
        return Reply(
            content=FAILED if failed else DONE, usage={"prompt_tokens": 40, "completion_tokens": 8}
        )


_BLOCK = re.compile(r"Answer (A|B):\n<<<(ANSWER-\w+)>>>\n(.*?)\n<<<END-\2>>>", re.S)


def judging(body: dict) -> Reply:
    """The judge: prefers the answer that did not fail; a tie when both did or neither did.
    It reads the answers only between the request's delimiters, as the rubric says."""
    user = _text(body["messages"][-1])
    answers = {label: text for label, _token, text in _BLOCK.findall(user)}
    a_failed, b_failed = FAILED in answers.get("A", ""), FAILED in answers.get("B", "")
    better = "tie" if a_failed == b_failed else ("B" if a_failed else "A")
    return Reply(
        content=f'{{"better": "{better}", "reason": "The other answer failed."}}',
        usage={"prompt_tokens": 120, "completion_tokens": 12},
    )


class JudgeServer(OpenAIServer):
    def __init__(self) -> None:
        super().__init__(default=judging, model="judge-model")
