"""What a run trains on: the dataset snapshot, built, cleaned and frozen when a run starts. Which
policy versions' data may train the current one, per kind of sample, is ``generations``.

A little past 500 lines on purpose: building, cleaning and freezing share one pass over the
samples and its report; the generation rules (``generations``) and the source caps
(``sources``) are apart already.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone

from base.models import Project
from base.redaction import Redactor
from training.datasets.dedup import near_duplicates
from training.datasets.generations import (
    RULES,
    generation_verdict,
    policy_generation,
    rule_for,
    rule_kinds,
)
from training.datasets.models import DatasetSnapshot
from training.datasets.sources import REPORTED_SOURCES, cap_per_source
from training.policy.models import IdleWindowPolicy, Objective
from training.policy.services import idle_policy_get

logger = logging.getLogger(__name__)

# Near duplicates: the last question and its answer share at least this share of their word
# 3-grams (Jaccard, estimated by MinHash: ``dedup``).
NEAR_DUPLICATE_THRESHOLD = 0.8


class DatasetBuildStopped(Exception):
    """The build's ``should_stop`` said so (its run was cancelled): nothing was saved."""


def _now() -> datetime:
    return timezone.now()


# --- Dataset building and cleaning ----------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def conversation_from(
    messages: Any, response: Any, corrected_answer: str
) -> list[dict[str, str]] | None:
    """A text-only chat (system/user/assistant) ending in the assistant answer to learn, or
    None. Tool calls and tool results are left out: the chat templates of small models do not
    render them. A corrected answer replaces the agent's own."""
    chat: list[dict[str, str]] = []
    raw = list(messages or [])
    if isinstance(response, dict):
        message = response
        if "choices" in response:
            choices = response.get("choices") or [{}]
            message = (choices[0] or {}).get("message") or {}
        if isinstance(message, dict) and message.get("role") == "assistant":
            raw.append(message)
    for message in raw:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        text = _text_of(message.get("content")).strip()
        if role in {"system", "user", "assistant"} and text:
            chat.append({"role": role, "content": text})
    if corrected_answer.strip():
        while chat and chat[-1]["role"] == "assistant":
            chat.pop()
        chat.append({"role": "assistant", "content": corrected_answer.strip()})
    while chat and chat[-1]["role"] != "assistant":
        chat.pop()
    if not chat or not any(m["role"] == "user" for m in chat[:-1]):
        return None
    return chat


def estimate_tokens(chat: list[dict[str, str]]) -> int:
    """Roughly four characters a token plus the template's few per message; the backends cut
    at their real tokenizer's count, this only has to be close and fast."""
    return sum(len(m["content"]) // 4 + 4 for m in chat)


def cut_to_fit(chat: list[dict[str, str]], limit: int) -> list[dict[str, str]] | None:
    """Drop the oldest turns (keeping the system message and the last exchange) until the chat
    fits ``limit`` tokens; None when even the last exchange does not fit."""
    if estimate_tokens(chat) <= limit:
        return chat
    system = [chat[0]] if chat[0]["role"] == "system" else []
    rest = chat[len(system) :]
    while len(rest) > 2 and estimate_tokens(system + rest) > limit:
        rest = rest[1:]
        while len(rest) > 2 and rest[0]["role"] != "user":
            rest = rest[1:]
    if rest[0]["role"] != "user" or estimate_tokens(system + rest) > limit:
        return None
    return system + rest


def _split_of(project_id: int, session: str, eval_fraction: float) -> str:
    digest = hashlib.sha256(f"{project_id}:{session}".encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction else "train"


@dataclass
class _Candidate:
    trajectory_id: str | None
    session: str
    kind: str
    rule: str
    chat: list[dict[str, str]]
    reward: float | None
    tokens: int
    received_at: datetime
    occurred_at: datetime | None = None
    incident_id: str | None = None
    # Kept although gathered under an older skill generation (a target).
    older_generation: bool = False
    # Where it came from (``report["sources"]``): the cap counts by ``source``.
    end_user: str = ""
    api_key_id: int | None = None
    agent: str = ""

    @property
    def source(self) -> str:
        """The end user, else the session; a sample with neither is a source of its own."""
        if self.end_user:
            return f"user:{self.end_user}"
        if self.session.startswith(("trajectory:", "incident-group:")):
            return f"sample:{self.trajectory_id or self.incident_id}"
        return f"session:{self.session}"


# The columns of either table (trajectories, incidents) that every sample reads.
_SAMPLE_COLUMNS = ("id", "session_id", "policy_version", "messages", "reward", "received_at",
                   "occurred_at", "end_user", "api_key_id", "agent_name")  # fmt: skip


def _origin(row: dict[str, Any]) -> dict[str, Any]:
    """Where and when a sample came from, in ``_Candidate``'s names."""
    return {
        "received_at": row["received_at"],
        "occurred_at": row["occurred_at"],
        "end_user": row["end_user"],
        "api_key_id": row["api_key_id"],
        "agent": row["agent_name"],
    }


# An incident is a failure: without a reward of its own it counts as this for the RL objective.
INCIDENT_DEFAULT_REWARD = -1.0


class _Tally:
    """Why samples were dropped, overall and per generation rule (the report's "dropped" and
    "rules")."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.considered: Counter[str] = Counter()
        self.rule_dropped: dict[str, Counter[str]] = {r.name: Counter() for r in RULES}

    def drop(self, reason: str, rule: str | None = None) -> None:
        self.dropped[reason] += 1
        if rule is not None:
            self.rule_dropped[rule][reason] += 1

    def rules_report(self, kept: list[_Candidate], objective: str) -> dict[str, Any]:
        return {
            r.name: {
                "label": r.label,
                "description": r.description,
                "kinds": rule_kinds(r, objective),
                "considered": self.considered[r.name],
                "kept": sum(1 for c in kept if c.rule == r.name),
                "from_older_generations": sum(
                    1 for c in kept if c.rule == r.name and c.older_generation
                ),
                "dropped": dict(sorted(self.rule_dropped[r.name].items())),
            }
            for r in RULES
        }


def dataset_build(
    *,
    project: Project,
    policy: IdleWindowPolicy | None = None,
    now: datetime | None = None,
    chunk_size: int = 2000,
    should_stop: Callable[[], bool] | None = None,
    check_every_seconds: float = 1.0,
) -> DatasetSnapshot:
    """Snapshot and clean the project's usable trajectories and incidents into a new
    ``DatasetSnapshot``.

    Each sample gets a kind (``corrected``, ``sft``, ``rl``, ``incident``) and the generation
    rule of its kind (``generations.rule_for``): targets (corrected answers; successful turns
    under SFT) are kept across skill generations, rewards only from the current one. Drops,
    counted in ``report["dropped"]`` and per rule in ``report["rules"]``: ignored incidents,
    answers with no signal for the objective, data from rolled-back versions, rewards from an
    older skill generation (support/query separation), conversations with no answer to learn,
    over-long samples that cannot be cut, exact and near duplicates, and the oldest samples
    beyond the token budget. Secrets and personal data are redacted. The split into train/eval
    is by session.

    Incidents are failures and pass the same cleaning. An incident whose ``metadata`` holds a
    person's ``"corrected_answer"`` (a non-empty string) is a ``corrected`` sample for either
    objective (reward 1.0: the corrected answer is the one to imitate). Otherwise it is used
    only by the RL objective, as an ``incident`` sample with a negative reward (its own
    ``reward`` when set, else ``INCIDENT_DEFAULT_REWARD``); SFT skips it, counted as
    ``incident_not_corrected``. Ignored incidents (a person said they are no failure) are left
    out. An incident without a session is split with the rest of its incident group, so one
    failure's repeats never sit on both sides of the split. Readiness counts by the same
    rules.

    ``should_stop`` is asked at most every ``check_every_seconds`` while the build runs (a long
    one reads the whole history); when it answers True the build raises
    ``DatasetBuildStopped`` and saves nothing."""
    from incidents.models import AbusiveSourceKind, Incident, IncidentStatus, Trajectory
    from incidents.provenance import abusive_values

    now = now or _now()
    policy = policy or idle_policy_get(project)
    check = _StopCheck(should_stop, check_every_seconds)
    generation = policy_generation(project)
    objective = policy.objective
    tally = _Tally()
    redactor = Redactor()
    cut = 0
    considered = 0
    incidents_considered = 0
    candidates: list[_Candidate] = []

    def rows_of(model: Any, *own: str) -> Iterator[dict[str, Any]]:
        """The project's rows received by the cutoff, oldest first (trajectories and incidents
        share one timeline), each by column: its ``own`` and ``_SAMPLE_COLUMNS``. Asks ``check``
        before each row."""
        columns = (*own, *_SAMPLE_COLUMNS)
        rows = model.objects.filter(project=project, received_at__lte=now).order_by(
            "occurred_at", "received_at", "id"
        )
        for values in rows.values_list(*columns).iterator(chunk_size=chunk_size):
            check()
            yield dict(zip(columns, values, strict=True))

    def admitted(version: int | None, kind: str) -> dict[str, Any] | None:
        """The candidate's generation fields when the rule of ``kind`` admits data gathered
        under ``version``; None (the drop counted) when it does not."""
        rule = rule_for(kind, objective)
        tally.considered[rule.name] += 1
        reason, older = generation_verdict(version, generation, rule)
        if reason:
            tally.drop(reason, rule.name)
            return None
        return {"kind": kind, "rule": rule.name, "older_generation": older}

    def keep(messages: Any, response: Any, corrected: str, **candidate: Any) -> None:
        """Cut and redact the chat and keep it as a candidate, or count why it is dropped."""
        nonlocal cut
        chat = conversation_from(messages, response, corrected)
        if chat is None:
            tally.drop("no_answer_to_learn", candidate["rule"])
            return
        fitted = cut_to_fit(chat, policy.max_sample_tokens)
        if fitted is None:
            tally.drop("too_long", candidate["rule"])
            return
        if fitted is not chat:
            cut += 1
        redacted = [{"role": m["role"], "content": redactor.text(m["content"])} for m in fitted]
        candidates.append(_Candidate(chat=redacted, tokens=estimate_tokens(redacted), **candidate))

    marked = abusive_values(project)
    abusive_dropped: Counter[str] = Counter()

    def abusive(session: str, end_user: str) -> bool:
        """Whether the sample's session or end user is marked abusive (counted when so)."""
        if session and session in marked[AbusiveSourceKind.SESSION]:
            abusive_dropped[f"session:{session}"] += 1
        elif end_user and end_user in marked[AbusiveSourceKind.END_USER]:
            abusive_dropped[f"user:{end_user}"] += 1
        else:
            return False
        tally.drop("abusive_source")
        return True

    for row in rows_of(Trajectory, "response", "outcome", "corrected_answer"):
        tid, session, reward, corrected = (
            row["id"], row["session_id"], row["reward"], row["corrected_answer"]
        )  # fmt: skip
        considered += 1
        if abusive(session, row["end_user"]):
            continue
        if corrected:
            kind = "corrected"
        elif (reward is not None and reward > 0) or row["outcome"] == "success":
            kind = "sft"
        elif objective == Objective.RL and reward is not None:
            kind = "rl"
        else:
            tally.drop("no_positive_signal")
            continue
        if (fields := admitted(row["policy_version"], kind)) is None:
            continue
        keep(
            row["messages"],
            row["response"],
            corrected,
            trajectory_id=str(tid),
            session=session or f"trajectory:{tid}",
            reward=(1.0 if kind == "corrected" and reward is None else reward),
            **fields,
            **_origin(row),
        )

    for row in rows_of(Incident, "group_id", "status", "metadata"):
        session, reward, metadata = row["session_id"], row["reward"], row["metadata"]
        incidents_considered += 1
        if abusive(session, row["end_user"]):
            continue
        if row["status"] == IncidentStatus.IGNORED:
            tally.drop("ignored_incident")
            continue
        corrected = (metadata or {}).get("corrected_answer") if isinstance(metadata, dict) else ""
        corrected = corrected.strip() if isinstance(corrected, str) else ""
        if corrected:
            kind, sample_reward = "corrected", 1.0
        elif objective == Objective.RL:
            kind = "incident"
            sample_reward = reward if reward is not None else INCIDENT_DEFAULT_REWARD
        else:
            tally.drop("incident_not_corrected")
            continue
        if (fields := admitted(row["policy_version"], kind)) is None:
            continue
        keep(
            row["messages"],
            None,
            corrected,
            trajectory_id=None,
            incident_id=str(row["id"]),
            session=session or f"incident-group:{row['group_id']}",
            reward=sample_reward,
            **fields,
            **_origin(row),
        )
    # One timeline, so the token budget below keeps the newest of both.
    candidates.sort(key=lambda c: (c.occurred_at or c.received_at, c.received_at))

    # Exact duplicates: the same conversation (after redaction) counts once.
    seen: set[str] = set()
    unique: list[_Candidate] = []
    for c in candidates:
        key = hashlib.sha256(json.dumps(c.chat, sort_keys=True).encode()).hexdigest()
        if key in seen:
            tally.drop("exact_duplicate", c.rule)
            continue
        seen.add(key)
        unique.append(c)
    # Near duplicates: the last question and its answer.
    texts = [_dedup_text(c.chat) for c in unique]
    near = near_duplicates(texts, NEAR_DUPLICATE_THRESHOLD, check)
    kept: list[_Candidate] = []
    for c, is_dup in zip(unique, near, strict=True):
        if is_dup:
            tally.drop("near_duplicate", c.rule)
        else:
            kept.append(c)

    kept, sources = cap_per_source(
        kept, source=lambda c: c.source, drop=lambda c: tally.drop("source_cap", c.rule)
    )
    sources["abusive_dropped"] = dict(abusive_dropped.most_common(REPORTED_SOURCES))

    # Token budget: the newest data wins.
    budget = policy.max_tokens_per_run
    total = 0
    within: list[_Candidate] = []
    for c in reversed(kept):
        if budget and total + c.tokens > budget:
            tally.drop("over_token_budget", c.rule)
            continue
        total += c.tokens
        within.append(c)
    within.reverse()

    samples = _split_and_group(project.pk, within, policy.eval_fraction)
    content_hash = hashlib.sha256(
        json.dumps(
            [
                [s["trajectory_id"] or s["incident_id"], s["split"], s["messages"], s["reward"]]
                for s in samples
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    train = [s for s in samples if s["split"] == "train"]
    evaluation = [s for s in samples if s["split"] == "eval"]
    kinds = Counter(s["kind"] for s in samples)
    incident_ids = [s["incident_id"] for s in samples if s["incident_id"]]
    report = {
        "considered": considered,
        "incidents_considered": incidents_considered,
        "incidents": len(incident_ids),
        "kept": len(samples),
        "train": len(train),
        "eval": len(evaluation),
        "sessions": len({s["session"] for s in samples}),
        "tokens": total,
        "dropped": {k: v for k, v in sorted(tally.dropped.items()) if v},
        "cut_to_fit": cut,
        "redactions": redactor.report(),
        "kinds": dict(sorted(kinds.items())),
        "rules": tally.rules_report(within, objective),
        "generation_version": generation.version,
        "objective": objective,
        "near_duplicate_threshold": NEAR_DUPLICATE_THRESHOLD,
        "sources": sources,
    }
    check(now=True)
    return DatasetSnapshot.objects.create(
        project=project,
        objective=objective,
        trajectory_ids=[s["trajectory_id"] for s in samples if s["trajectory_id"]],
        incident_ids=incident_ids,
        samples=samples,
        content_hash=content_hash,
        report=report,
        generation_version=generation.version,
        cutoff_at=now,
        train_count=len(train),
        eval_count=len(evaluation),
    )


class _StopCheck:
    """Calls ``should_stop`` at most every ``every_seconds`` (a clock read otherwise, cheap
    enough for every row) and raises ``DatasetBuildStopped`` when it answers True."""

    def __init__(self, should_stop: Callable[[], bool] | None, every_seconds: float) -> None:
        self.should_stop = should_stop
        self.every = every_seconds
        self.next_at = time.monotonic() + every_seconds

    def __call__(self, *, now: bool = False) -> None:
        if self.should_stop is None or (not now and time.monotonic() < self.next_at):
            return
        self.next_at = time.monotonic() + self.every
        if self.should_stop():
            raise DatasetBuildStopped


def _dedup_text(chat: list[dict[str, str]]) -> str:
    question = next((m["content"] for m in reversed(chat[:-1]) if m["role"] == "user"), "")
    return f"{question[:500]}\n{chat[-1]['content'][:500]}"


def _split_and_group(
    project_id: int, kept: list[_Candidate], eval_fraction: float
) -> list[dict[str, Any]]:
    sessions = sorted({c.session for c in kept})
    split = {s: _split_of(project_id, s, eval_fraction) for s in sessions}
    # Both sides need at least one session when there are two.
    if len(sessions) >= 2:
        if all(v == "train" for v in split.values()):
            split[sessions[0]] = "eval"
        elif all(v == "eval" for v in split.values()):
            split[sessions[0]] = "train"
    # A run is judged by outcomes on held-out corrected answers (training.runs.outcomes): when
    # two sessions or more carry one, each side gets one, whatever the hash gave. Without this
    # a small project's split left no corrected answer to judge by for about a third of ids.
    judged = sorted({c.session for c in kept if c.kind == "corrected"})
    if len(judged) >= 2:
        if all(split[s] == "train" for s in judged):
            split[judged[0]] = "eval"
        elif all(split[s] == "eval" for s in judged):
            split[judged[0]] = "train"
    # RL baseline: samples answering the same prompt form a group (when there are several).
    prompt_keys = [
        hashlib.sha256(json.dumps(c.chat[:-1], sort_keys=True).encode()).hexdigest()[:16]
        for c in kept
    ]
    sizes = Counter(prompt_keys)
    return [
        {
            "trajectory_id": c.trajectory_id,
            "incident_id": c.incident_id,
            "session": c.session,
            "split": split[c.session],
            "kind": c.kind,
            "messages": c.chat,
            "reward": c.reward,
            "group": key if sizes[key] > 1 else None,
            "tokens": c.tokens,
            "source": {
                "session": c.session,
                "end_user": c.end_user,
                "api_key_id": c.api_key_id,
                "agent": c.agent,
            },
        }
        for c, key in zip(kept, prompt_keys, strict=True)
    ]
