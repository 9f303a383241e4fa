from __future__ import annotations

from incidents.fingerprint import (
    FINGERPRINT_VERSION,
    fingerprint,
    normalize_message,
    tool_from_messages,
)


def fp(message: str, **kw) -> str:
    args = {
        "agent": "bot",
        "kind": "tool_error",
        "error_type": "E",
        "message": message,
        "tool": "t",
    }
    args.update(kw)
    return fingerprint(**args)[0]


def test_numbers_ids_paths_urls_emails_and_quoted_values_are_stripped():
    assert (
        normalize_message(
            "file '/tmp/a1.csv' not found for jane@example.com at https://x.io/a?b=1 "
            "(id 550e8400-e29b-41d4-a716-446655440000, req 4411, hash deadbeef42)"
        )
        == "file <value> not found for <email> at <url> (id <uuid>, req <n>, hash <hex>)"
    )


def test_same_failure_with_different_values_shares_a_fingerprint():
    assert fp("timeout after 3000 ms on /data/x.csv") == fp("timeout after 12 ms on /srv/y/z.csv")


def test_agent_kind_error_type_and_tool_each_split_groups():
    base = fp("boom")
    assert len({base, fp("boom", agent="other"), fp("boom", kind="timeout"),
                fp("boom", error_type="F"), fp("boom", tool="u")}) == 5  # fmt: skip


def test_fingerprint_is_versioned():
    assert FINGERPRINT_VERSION == 1
    assert (
        fp("x")
        == fingerprint(agent="bot", kind="tool_error", error_type="E", message="x", tool="t")[0]
    )


def test_tool_is_the_last_tool_called():
    messages = [
        {"role": "assistant", "tool_calls": [{"function": {"name": "first"}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "second"}}]},
        {"role": "tool", "content": "error"},
    ]
    assert tool_from_messages(messages) == "second"
    assert tool_from_messages([{"role": "user", "content": "hi"}]) == ""
    assert tool_from_messages(["junk", {"role": "assistant", "tool_calls": ["junk"]}]) == ""
