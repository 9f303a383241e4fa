from __future__ import annotations

from incidents.fingerprint import (
    FINGERPRINT_VERSION,
    decisive_tool,
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
    assert FINGERPRINT_VERSION == 2
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


def test_ids_codes_and_amounts_that_vary_between_occurrences_are_stripped():
    first = "Cancelled reservation ZFA04Y (flight HAT123, JFK to SFO) for $425 by mei_brown_1234"
    second = "Cancelled reservation 8KD3LQ (flight HAT007, ORD to LAX) for $1,100 by omar_kim_77"
    assert normalize_message(first) == normalize_message(second)
    assert normalize_message(first) == (
        "Cancelled reservation <id> (flight <id>, <code> to <code>) for $<n> by <id>"
    )


def _call(name: str) -> list[dict]:
    return [
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": name}}]},
        {"role": "tool", "name": name, "content": "ok"},
    ]


def test_the_decisive_tool_skips_hand_offs_calculators_and_thinking():
    cancel = _call("get_reservation_details") + _call("cancel_reservation")
    assert decisive_tool(cancel) == "cancel_reservation"
    for incidental in ("transfer_to_human_agents", "calculate", "think", "escalate_ticket"):
        assert decisive_tool(cancel + _call(incidental)) == "cancel_reservation"
    # A project's own incidental tools, wildcards allowed.
    assert decisive_tool(cancel + _call("notify_slack"), ["notify_*"]) == "cancel_reservation"
    assert decisive_tool(cancel + _call("notify_slack")) == "notify_slack"
    # Only incidental calls: the last one still says something.
    assert decisive_tool(_call("think") + _call("transfer_to_human_agents")) == (
        "transfer_to_human_agents"
    )
