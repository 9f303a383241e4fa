"""The slow loop's services: idle detection, readiness, dataset snapshots, and every state
transition of a training run. Views, the API and Celery tasks only call these.

Run states: queued → preparing → training ⇄ paused → evaluating → succeeded | failed | cancelled.
Each transition is its own function that locks the run (or claims it with a conditional update),
checks the starting state and writes an audit event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time as time_module
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from base import counters
from base.models import Project, Role
from base.queue import enqueue_on_commit
from base.redaction import Redactor
from base.selectors import membership_for
from base.services import Conflict, DomainError, NotFound, PermissionDenied, audit_record
from skills.versions.models import PolicyVersion, VersionStatus

from . import idle
from .backends import BackendError, get_backend
from .backends.base import ChatSample, StepReport, TrainConfig, TrainingBackend
from .models import (
    ACTIVE_RUN_STATUSES,
    Backend,
    DatasetSnapshot,
    IdleMode,
    IdleWindowPolicy,
    Objective,
    PauseReason,
    RunStatus,
    TrainingRun,
    Trigger,
)

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# Near duplicates: cosine similarity of the embedded prompt + answer at or above this.
NEAR_DUPLICATE_THRESHOLD = 0.95
# A run improves when the held-out loss falls by at least this fraction.
MIN_IMPROVEMENT = 0.001
SIDE_BY_SIDE_SAMPLES = 3
SAMPLE_MAX_TOKENS = 48


def _now() -> datetime:
    return timezone.now()


def _require_admin(project: Project, actor: Any) -> None:
    """A User must be an admin of the project; ``None`` is a machine actor checked already."""
    if actor is None:
        return
    membership = membership_for(user=actor, project=project)
    if membership is None or not membership.has_role(Role.ADMIN):
        raise PermissionDenied(f"This needs the admin role in {project.name}.")


def _label(actor: Any, actor_label: str) -> str:
    if actor_label:
        return actor_label
    return actor.get_username() if actor is not None else "system"


# --- Idle-window policy ---------------------------------------------------------------------


def idle_policy_get(project: Project) -> IdleWindowPolicy:
    """The project's policy; an unsaved default when it has none yet (nothing is written)."""
    policy = IdleWindowPolicy.objects.filter(project=project).first()
    return policy or IdleWindowPolicy(project=project)


POLICY_FIELDS = {
    "auto_train",
    "mode",
    "timezone",
    "weekly_windows",
    "ical_url",
    "ical_text",
    "traffic_threshold_rpm",
    "traffic_idle_minutes",
    "min_new_samples",
    "max_runs_per_day",
    "max_tokens_per_run",
    "max_sample_tokens",
    "eval_fraction",
    "stale_after_minutes",
    "backend",
    "backend_options",
    "base_model",
    "objective",
    "lora_rank",
    "learning_rate",
    "batch_size",
    "total_steps",
}


@transaction.atomic
def idle_policy_update(
    *, project: Project, actor: Any = None, actor_label: str = "", **changes: Any
) -> IdleWindowPolicy:
    """Create or change the project's idle-window policy. ``weekly_windows`` may be the text
    form (``"mon-fri 01:00-05:00"`` a line). Raises ``DomainError`` naming the bad field."""
    _require_admin(project, actor)
    unknown = set(changes) - POLICY_FIELDS
    if unknown:
        raise DomainError(f"Unknown setting(s): {', '.join(sorted(unknown))}.", field=unknown.pop())
    policy, _ = IdleWindowPolicy.objects.get_or_create(project=project)
    policy = IdleWindowPolicy.objects.select_for_update().get(pk=policy.pk)
    if isinstance(changes.get("weekly_windows"), str):
        try:
            changes["weekly_windows"] = idle.parse_weekly_windows(changes["weekly_windows"])
        except idle.WindowSyntaxError as exc:
            raise DomainError(str(exc), field="weekly_windows") from exc
    _validate_policy_changes(changes)
    before = {name: getattr(policy, name) for name in changes}
    for name, value in changes.items():
        setattr(policy, name, value)
    policy.updated_at = timezone.now()
    policy.save(update_fields=[*changes, "updated_at"])
    audit_record(
        action="training.idle_policy.update",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=policy,
        before=_jsonable(before),
        after=_jsonable({name: getattr(policy, name) for name in changes}),
    )
    return policy


def _jsonable(values: dict) -> dict:
    # Backend options may hold an API key: the audit log keeps the shape, not the secret.
    return Redactor().json(json.loads(json.dumps(values, default=str)))


def _validate_policy_changes(changes: dict) -> None:
    if "timezone" in changes:
        try:
            idle.zone(changes["timezone"])
        except idle.WindowSyntaxError as exc:
            raise DomainError(str(exc), field="timezone") from exc
    if "ical_text" in changes:
        try:
            idle.calendar_intervals(changes["ical_text"], idle.zone("UTC"), timezone.now())
        except (idle.WindowSyntaxError, ValueError) as exc:
            raise DomainError(f"The calendar could not be read: {exc}", field="ical_text") from exc
    choices = {"mode": IdleMode.values, "backend": Backend.values, "objective": Objective.values}
    for name, allowed in choices.items():
        if name in changes and changes[name] not in allowed:
            raise DomainError(f"'{changes[name]}' is not one of {allowed}.", field=name)
    for name in ("traffic_idle_minutes", "batch_size", "total_steps", "lora_rank"):
        if name in changes and not (1 <= int(changes[name]) <= 100_000):
            raise DomainError(f"{name} must be a positive number.", field=name)
    if "traffic_idle_minutes" in changes and int(changes["traffic_idle_minutes"]) > 120:
        raise DomainError(
            "Traffic is counted for at most 120 minutes.", field="traffic_idle_minutes"
        )
    if "eval_fraction" in changes and not (0.0 < float(changes["eval_fraction"]) < 0.9):
        raise DomainError("The held-out fraction must be between 0 and 0.9.", field="eval_fraction")
    if "learning_rate" in changes and not (0.0 < float(changes["learning_rate"]) <= 1.0):
        raise DomainError("The learning rate must be in (0, 1].", field="learning_rate")
    if "base_model" in changes and not str(changes["base_model"]).strip():
        raise DomainError("Name a base model.", field="base_model")
    if "backend_options" in changes and not isinstance(changes["backend_options"], dict):
        raise DomainError("Backend options must be a JSON object.", field="backend_options")


def idle_policy_calendar_refresh(
    *, policy: IdleWindowPolicy, fetch: Callable[[str], str] | None = None
) -> IdleWindowPolicy:
    """Fetch the iCalendar feed into ``ical_text`` (kept as it was when the fetch fails)."""
    if not policy.ical_url:
        return policy

    def default_fetch(url: str) -> str:
        import urllib.request

        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - admin's URL
            return response.read(2_000_000).decode("utf-8", "replace")

    try:
        text = (fetch or default_fetch)(policy.ical_url)
        idle.calendar_intervals(text, idle.zone(policy.timezone), timezone.now())
        policy.ical_text, policy.ical_error = text, ""
    except Exception as exc:  # noqa: BLE001 - a bad feed is shown, not raised
        policy.ical_error = str(exc)[:300]
    policy.ical_fetched_at = timezone.now()
    policy.save(update_fields=["ical_text", "ical_error", "ical_fetched_at"])
    return policy


# --- Idle detection -------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleStatus:
    idle: bool
    reasons: list[str]
    in_window: bool
    window_label: str = ""
    window_ends_at: datetime | None = None
    traffic_quiet: bool | None = None
    traffic: list[int] = field(default_factory=list)
    next_window_at: datetime | None = None
    next_window_label: str = ""


def project_idle_status(
    *, project: Project, now: datetime | None = None, policy: IdleWindowPolicy | None = None
) -> IdleStatus:
    """Whether the project may train at ``now`` (an injectable clock), why, and when the next
    calendar window opens. Reads the Redis traffic counters; writes nothing."""
    now = now or _now()
    policy = policy or idle_policy_get(project)
    tz = idle.zone(policy.timezone)
    reasons: list[str] = []

    intervals = idle.weekly_intervals(policy.weekly_windows or [], tz, now)
    try:
        intervals += idle.calendar_intervals(policy.ical_text, tz, now)
    except (idle.WindowSyntaxError, ValueError) as exc:
        reasons.append(f"The calendar feed could not be read ({exc}).")
    has_calendar = bool(intervals)
    current = idle.open_interval(intervals, now)
    upcoming = idle.next_opening(intervals, now)
    if current is not None:
        ends = current.end.astimezone(tz)
        reasons.append(f"Inside the quiet window “{current.label}” until {ends:%a %H:%M %Z}.")
    elif has_calendar:
        reasons.append("Outside every calendar window.")
    else:
        reasons.append("No calendar windows are configured.")

    minutes = max(1, policy.traffic_idle_minutes)
    traffic = counters.traffic_per_minute(
        project_id=project.pk, minutes=minutes + 1, now=now.timestamp()
    )
    peak = max(traffic) if traffic else 0
    quiet = peak < policy.traffic_threshold_rpm
    if quiet:
        reasons.append(
            f"Traffic stayed below {policy.traffic_threshold_rpm} requests/min for the last "
            f"{minutes} minutes (peak {peak})."
        )
    else:
        reasons.append(
            f"Traffic reached {peak} requests/min in the last {minutes} minutes "
            f"(quiet means below {policy.traffic_threshold_rpm})."
        )

    in_window = current is not None
    mode = policy.mode
    if mode == IdleMode.CALENDAR:
        is_idle = in_window
    elif mode == IdleMode.TRAFFIC:
        is_idle = quiet
    elif mode == IdleMode.BOTH:
        is_idle = in_window and quiet
    else:
        is_idle = in_window or quiet
    reasons.append(f"Rule: {IdleMode(mode).label.lower()}.")
    return IdleStatus(
        idle=is_idle,
        reasons=reasons,
        in_window=in_window,
        window_label=current.label if current else "",
        window_ends_at=current.end if current else None,
        traffic_quiet=quiet,
        traffic=traffic,
        next_window_at=upcoming.start if upcoming else None,
        next_window_label=upcoming.label if upcoming else "",
    )


# --- Data hygiene: which versions' data may train the current policy ------------------------


@dataclass(frozen=True)
class Generation:
    """The policy version that introduced the active skill set, and the version numbers whose
    trajectories count as gathered under it."""

    version: int | None
    allowed: frozenset[int]
    rolled_back: frozenset[int]
    accept_unversioned: bool


def policy_generation(project: Project) -> Generation:
    versions = list(
        PolicyVersion.objects.filter(project=project).values(
            "id", "number", "parent_id", "status", "rolled_back_at"
        )
    )
    links = PolicyVersion.revisions.through.objects.filter(
        policyversion__project=project
    ).values_list("policyversion_id", "skillrevision_id")
    revsets: dict[int, set[int]] = {v["id"]: set() for v in versions}
    for version_id, revision_id in links:
        revsets[version_id].add(revision_id)
    rolled_back = frozenset(v["number"] for v in versions if v["rolled_back_at"] is not None)
    active = next((v for v in versions if v["status"] == VersionStatus.ACTIVE), None)
    if active is None:
        return Generation(None, frozenset(), rolled_back, True)
    by_id = {v["id"]: v for v in versions}
    skills = revsets[active["id"]]
    first = active
    # Walk back while the skill set stays the same (adapter-only changes keep the generation).
    while first["parent_id"] in by_id and revsets[first["parent_id"]] == skills:
        first = by_id[first["parent_id"]]
    allowed = frozenset(
        v["number"]
        for v in versions
        if v["number"] >= first["number"]
        and revsets[v["id"]] == skills
        and v["rolled_back_at"] is None
    )
    # Before any skill change there is nothing a version number could separate.
    accept_unversioned = first["number"] == 1
    return Generation(first["number"], allowed, rolled_back, accept_unversioned)


def _version_filter(generation: Generation) -> Q:
    q = Q(policy_version__in=generation.allowed)
    if generation.accept_unversioned:
        q |= Q(policy_version__isnull=True)
    return q


def _signal_filter(objective: str) -> Q:
    q = Q(reward__gt=0) | Q(outcome="success") | ~Q(corrected_answer="")
    if objective == Objective.RL:
        q |= Q(reward__isnull=False)
    return q


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


def _near_duplicates(texts: list[str], threshold: float) -> list[bool]:
    """For each text, whether an earlier text is at least ``threshold`` similar."""
    from skills.library.embeddings import get_embedder

    if len(texts) < 2:
        return [False] * len(texts)
    vectors = get_embedder().embed(texts)
    flags = [False] * len(texts)
    block = 1024
    for start in range(0, len(texts), block):
        stop = min(start + block, len(texts))
        sims = vectors[start:stop] @ vectors[:stop].T
        # Only compare with earlier rows.
        mask = np.tril(np.ones((stop - start, stop), dtype=bool), k=start - 1)
        hits = np.any((sims >= threshold) & mask, axis=1)
        for offset, hit in enumerate(hits):
            flags[start + offset] = bool(hit)
    return flags


@dataclass
class _Candidate:
    trajectory_id: str | None
    session: str
    kind: str
    chat: list[dict[str, str]]
    reward: float | None
    tokens: int
    received_at: datetime
    occurred_at: datetime | None = None
    incident_id: str | None = None


# An incident is a failure: without a reward of its own it counts as this for the RL objective.
INCIDENT_DEFAULT_REWARD = -1.0


def dataset_build(
    *,
    project: Project,
    policy: IdleWindowPolicy | None = None,
    now: datetime | None = None,
    chunk_size: int = 2000,
) -> DatasetSnapshot:
    """Snapshot and clean the project's usable trajectories and incidents into a new
    ``DatasetSnapshot``.

    Drops, in this order and counted in ``report["dropped"]``: data from rolled-back versions,
    data from an older skill generation (support/query separation), conversations with no
    answer to learn, answers with no positive signal (SFT), over-long samples that cannot be
    cut, exact and near duplicates, and the oldest samples beyond the token budget. Secrets and
    personal data are redacted. The split into train/eval is by session.

    Incidents are failures and pass the same cleaning. An incident whose ``metadata`` holds a
    person's ``"corrected_answer"`` (a non-empty string) is a ``corrected`` sample for either
    objective (reward 1.0: the corrected answer is the one to imitate). Otherwise it is used
    only by the RL objective, as an ``incident`` sample with a negative reward (its own
    ``reward`` when set, else ``INCIDENT_DEFAULT_REWARD``); SFT skips it, counted as
    ``incident_not_corrected``. Ignored incidents (a person said they are no failure) are left
    out. An incident without a session is split with the rest of its incident group, so one
    failure's repeats never sit on both sides of the split. Readiness counts incidents by the
    same rule."""
    from incidents.models import Incident, IncidentStatus, Trajectory

    now = now or _now()
    policy = policy or idle_policy_get(project)
    generation = policy_generation(project)
    objective = policy.objective
    dropped: Counter[str] = Counter()
    redactor = Redactor()
    cut = 0
    considered = 0
    incidents_considered = 0
    candidates: list[_Candidate] = []

    def admit(messages: Any, response: Any, corrected: str) -> list[dict[str, str]] | str:
        """The cut and redacted chat, or the reason it is dropped."""
        nonlocal cut
        chat = conversation_from(messages, response, corrected)
        if chat is None:
            return "no_answer_to_learn"
        fitted = cut_to_fit(chat, policy.max_sample_tokens)
        if fitted is None:
            return "too_long"
        if fitted is not chat:
            cut += 1
        return [{"role": m["role"], "content": redactor.text(m["content"])} for m in fitted]

    rows = (
        Trajectory.objects.filter(project=project, received_at__lte=now)
        .order_by("occurred_at", "received_at", "id")
        .values_list(
            "id",
            "session_id",
            "policy_version",
            "messages",
            "response",
            "reward",
            "outcome",
            "corrected_answer",
            "received_at",
            "occurred_at",
        )
    )
    for row in rows.iterator(chunk_size=chunk_size):
        tid, session, version, messages, response, reward, outcome, corrected, received, at = row
        considered += 1
        stale = _stale_reason(version, generation)
        if stale:
            dropped[stale] += 1
            continue
        if corrected:
            kind = "corrected"
        elif (reward is not None and reward > 0) or outcome == "success":
            kind = "sft"
        elif objective == Objective.RL and reward is not None:
            kind = "rl"
        else:
            dropped["no_positive_signal"] += 1
            continue
        chat = admit(messages, response, corrected)
        if isinstance(chat, str):
            dropped[chat] += 1
            continue
        candidates.append(
            _Candidate(
                trajectory_id=str(tid),
                session=session or f"trajectory:{tid}",
                kind=kind,
                chat=chat,
                reward=(1.0 if kind == "corrected" and reward is None else reward),
                tokens=estimate_tokens(chat),
                received_at=received,
                occurred_at=at,
            )
        )

    incident_rows = (
        Incident.objects.filter(project=project, received_at__lte=now)
        .order_by("occurred_at", "received_at", "id")
        .values_list(
            "id",
            "session_id",
            "group_id",
            "policy_version",
            "messages",
            "reward",
            "status",
            "metadata",
            "received_at",
            "occurred_at",
        )
    )
    for row in incident_rows.iterator(chunk_size=chunk_size):
        iid, session, group_id, version, messages, reward, status, metadata, received, at = row
        incidents_considered += 1
        if status == IncidentStatus.IGNORED:
            dropped["ignored_incident"] += 1
            continue
        stale = _stale_reason(version, generation)
        if stale:
            dropped[stale] += 1
            continue
        corrected = (metadata or {}).get("corrected_answer") if isinstance(metadata, dict) else ""
        corrected = corrected.strip() if isinstance(corrected, str) else ""
        if corrected:
            kind, sample_reward = "corrected", 1.0
        elif objective == Objective.RL:
            kind = "incident"
            sample_reward = reward if reward is not None else INCIDENT_DEFAULT_REWARD
        else:
            dropped["incident_not_corrected"] += 1
            continue
        chat = admit(messages, None, corrected)
        if isinstance(chat, str):
            dropped[chat] += 1
            continue
        candidates.append(
            _Candidate(
                trajectory_id=None,
                incident_id=str(iid),
                session=session or f"incident-group:{group_id}",
                kind=kind,
                chat=chat,
                reward=sample_reward,
                tokens=estimate_tokens(chat),
                received_at=received,
                occurred_at=at,
            )
        )
    # One timeline, so the token budget below keeps the newest of both.
    candidates.sort(key=lambda c: (c.occurred_at or c.received_at, c.received_at))

    # Exact duplicates: the same conversation (after redaction) counts once.
    seen: set[str] = set()
    unique: list[_Candidate] = []
    for c in candidates:
        key = hashlib.sha256(json.dumps(c.chat, sort_keys=True).encode()).hexdigest()
        if key in seen:
            dropped["exact_duplicate"] += 1
            continue
        seen.add(key)
        unique.append(c)
    # Near duplicates: the last question and its answer, embedded.
    texts = [_dedup_text(c.chat) for c in unique]
    near = _near_duplicates(texts, NEAR_DUPLICATE_THRESHOLD)
    kept = [c for c, is_dup in zip(unique, near, strict=True) if not is_dup]
    dropped["near_duplicate"] += sum(near)

    # Token budget: the newest data wins.
    budget = policy.max_tokens_per_run
    total = 0
    within: list[_Candidate] = []
    for c in reversed(kept):
        if budget and total + c.tokens > budget:
            dropped["over_token_budget"] += 1
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
        "dropped": {k: v for k, v in sorted(dropped.items()) if v},
        "cut_to_fit": cut,
        "redactions": redactor.report(),
        "kinds": dict(sorted(kinds.items())),
        "generation_version": generation.version,
        "objective": objective,
        "near_duplicate_threshold": NEAR_DUPLICATE_THRESHOLD,
    }
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


def _stale_reason(version: int | None, generation: Generation) -> str:
    """Why data gathered under ``version`` may not train the current generation ("" if it may)."""
    if version is not None and version in generation.rolled_back:
        return "rolled_back_version"
    if version is None and not generation.accept_unversioned:
        return "stale_generation"
    if version is not None and version not in generation.allowed:
        return "stale_generation"
    return ""


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
        }
        for c, key in zip(kept, prompt_keys, strict=True)
    ]


# --- Readiness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: list[str]
    new_samples: int
    runs_last_day: int


def _last_cutoff(project: Project) -> datetime | None:
    run = (
        TrainingRun.objects.filter(project=project, status=RunStatus.SUCCEEDED)
        .exclude(dataset=None)
        .select_related("dataset")
        .order_by("-created_at")
        .first()
    )
    return run.dataset.cutoff_at if run else None


def project_training_readiness(
    *, project: Project, now: datetime | None = None, policy: IdleWindowPolicy | None = None
) -> Readiness:
    """Enough new usable samples (trajectories and incidents, counted as ``dataset_build``
    would use them, before deduplication) since the last successful run, and within the daily
    budget."""
    from incidents.models import Incident, IncidentStatus, Trajectory

    now = now or _now()
    policy = policy or idle_policy_get(project)
    generation = policy_generation(project)
    qs = Trajectory.objects.filter(project=project, received_at__lte=now).filter(
        _version_filter(generation), _signal_filter(policy.objective)
    )
    incidents = (
        Incident.objects.filter(project=project, received_at__lte=now)
        .filter(_version_filter(generation))
        .exclude(status=IncidentStatus.IGNORED)
    )
    if policy.objective != Objective.RL:
        incidents = incidents.filter(metadata__has_key="corrected_answer").exclude(
            metadata__corrected_answer=""
        )
    cutoff = _last_cutoff(project)
    if cutoff is not None:
        qs = qs.filter(received_at__gt=cutoff)
        incidents = incidents.filter(received_at__gt=cutoff)
    new_samples = qs.count() + incidents.count()
    runs_last_day = (
        TrainingRun.objects.filter(project=project, created_at__gt=now - timedelta(days=1))
        .exclude(status=RunStatus.CANCELLED)
        .count()
    )
    reasons = []
    ready = True
    if new_samples < policy.min_new_samples:
        ready = False
        reasons.append(
            f"{new_samples} new usable samples since the last run; {policy.min_new_samples} needed."
        )
    else:
        reasons.append(f"{new_samples} new usable samples since the last run.")
    if runs_last_day >= policy.max_runs_per_day:
        ready = False
        reasons.append(
            f"{runs_last_day} run(s) in the last 24 hours; the budget is {policy.max_runs_per_day}."
        )
    if TrainingRun.objects.filter(project=project, status__in=ACTIVE_RUN_STATUSES).exists():
        ready = False
        reasons.append("A run is in progress.")
    return Readiness(ready, reasons, new_samples, runs_last_day)


# --- Run transitions ------------------------------------------------------------------------


def _append_log(run: TrainingRun, line: str, now: datetime | None = None) -> None:
    stamp = (now or _now()).strftime("%Y-%m-%d %H:%M:%S")
    run.log = (run.log + f"{stamp} {line}\n")[-20_000:]


def _locked(run_id: int) -> TrainingRun:
    try:
        return TrainingRun.objects.select_for_update().get(pk=run_id)
    except TrainingRun.DoesNotExist as exc:
        raise NotFound("No such training run.") from exc


def _enqueue_execute(run_id: int) -> None:
    # A broker outage leaves the run QUEUED; the idle check (beat) sends it again.
    enqueue_on_commit("training.tasks.training_run_execute", (run_id,))


@transaction.atomic
def training_run_create(
    *,
    project: Project,
    actor: Any = None,
    actor_label: str = "",
    trigger: str = Trigger.MANUAL,
) -> TrainingRun:
    """Queue a run with the project's current backend and hyperparameters and enqueue it after
    commit. One run in flight per project (a partial unique constraint settles races)."""
    _require_admin(project, actor)
    policy = idle_policy_get(project)
    if TrainingRun.objects.filter(project=project, status__in=ACTIVE_RUN_STATUSES).exists():
        raise Conflict("A training run is already in progress for this project.")
    hyper = policy.hyperparameters()
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                project=project,
                trigger=trigger,
                requested_by=actor if getattr(actor, "is_authenticated", False) else None,
                actor_label=_label(actor, actor_label),
                backend=policy.backend,
                backend_options=policy.backend_options or {},
                base_model=policy.base_model,
                hyperparameters=hyper,
                total_steps=hyper["total_steps"],
                status=RunStatus.QUEUED,
                status_changed_at=timezone.now(),
            )
    except IntegrityError as exc:
        raise Conflict("A training run is already in progress for this project.") from exc
    _append_log(run, f"Queued ({Trigger(trigger).label}) by {run.actor_label}.")
    run.save(update_fields=["log"])
    audit_record(
        action="training_run.create",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=run,
        after={"trigger": trigger, "backend": run.backend, "base_model": run.base_model},
    )
    _enqueue_execute(run.pk)
    return run


def training_run_claim(*, run_id: int, now: datetime | None = None) -> bool:
    """QUEUED → PREPARING, exactly once: the conditional update is the claim."""
    now = now or _now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(
        status=RunStatus.PREPARING, status_changed_at=now, heartbeat_at=now, pause_reason=""
    )
    return claimed == 1


@transaction.atomic
def training_run_prepare(*, run_id: int, now: datetime | None = None) -> TrainingRun:
    """Freeze the dataset of a PREPARING run (once: a resumed run keeps its snapshot)."""
    run = _locked(run_id)
    if run.status != RunStatus.PREPARING:
        raise Conflict(f"The run is {run.status}, not preparing.")
    if run.dataset_id is None:
        dataset = dataset_build(project=run.project, now=now)
        run.dataset = dataset
        report = dataset.report
        _append_log(
            run,
            f"Dataset {dataset.content_hash[:10]}: {report['train']} train / {report['eval']} eval "
            f"samples of {report['considered']} trajectories.",
        )
        run.save(update_fields=["dataset", "log"])
        audit_record(
            action="training_run.dataset",
            project=run.project,
            obj=run,
            after={"dataset": dataset.pk, "hash": dataset.content_hash, **report["dropped"]},
        )
    return run


def _transition(
    *,
    run_id: int,
    allowed: Iterable[str],
    to: str,
    action: str,
    actor: Any = None,
    actor_label: str = "",
    message: str = "",
    updates: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> TrainingRun:
    """Lock, check the starting state, set the new one with ``updates``, log and audit."""
    now = now or _now()
    run = _locked(run_id)
    allowed = tuple(allowed)
    if run.status not in allowed:
        raise Conflict(
            f"The run is {run.get_status_display().lower()}; this needs it to be "
            + " or ".join(RunStatus(s).label.lower() for s in allowed)
            + "."
        )
    before = run.status
    run.status = to
    run.status_changed_at = now
    fields = ["status", "status_changed_at", "log"]
    for name, value in (updates or {}).items():
        setattr(run, name, value)
        fields.append(name)
    if message:
        _append_log(run, message, now)
    run.save(update_fields=fields)
    audit_record(
        action=action,
        project=run.project,
        actor=actor,
        actor_label=actor_label,
        obj=run,
        before={"status": before},
        after={"status": to},
        message=message,
    )
    return run


@transaction.atomic
def training_run_start_training(*, run_id: int, now: datetime | None = None) -> TrainingRun:
    """PREPARING → TRAINING."""
    now = now or _now()
    run = TrainingRun.objects.only("started_at", "attempts").get(pk=run_id)
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.PREPARING],
        to=RunStatus.TRAINING,
        action="training_run.train",
        message="Training started." if not run.attempts else "Training resumed.",
        updates={
            "heartbeat_at": now,
            "started_at": run.started_at or now,
            "attempts": run.attempts + 1,
        },
        now=now,
    )


@transaction.atomic
def training_run_record_step(*, run_id: int, report: StepReport) -> bool:
    """Progress, the step's metrics and a heartbeat. False when the run left TRAINING
    (cancelled, or marked stale), which tells the worker to stop."""
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None or run.status != RunStatus.TRAINING:
        return False
    entry = {"step": report.step, **{k: _finite(v) for k, v in report.metrics.items()}}
    run.metrics = [m for m in run.metrics if m.get("step", 0) < report.step] + [entry]
    run.step = report.step
    run.total_steps = report.total_steps
    run.heartbeat_at = _now()
    run.save(update_fields=["metrics", "step", "total_steps", "heartbeat_at"])
    return True


def _finite(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return round(number, 6) if np.isfinite(number) else None


def training_run_heartbeat(*, run_id: int) -> None:
    TrainingRun.objects.filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES).update(
        heartbeat_at=_now()
    )


@transaction.atomic
def training_run_request_pause(
    *, run: TrainingRun, actor: Any = None, actor_label: str = ""
) -> TrainingRun:
    """A person pauses: a queued run pauses at once; a running one saves its state and pauses
    after the current step (the worker reads ``pause_requested``)."""
    _require_admin(run.project, actor)
    current = _locked(run.pk)
    if current.status == RunStatus.QUEUED:
        return _transition(
            run_id=run.pk,
            allowed=[RunStatus.QUEUED],
            to=RunStatus.PAUSED,
            action="training_run.pause",
            actor=actor,
            actor_label=actor_label,
            message=f"Paused by {_label(actor, actor_label)} before it started.",
            updates={"pause_reason": PauseReason.REQUESTED, "pause_requested": False},
        )
    if current.status not in (RunStatus.PREPARING, RunStatus.TRAINING):
        raise Conflict(f"A {current.get_status_display().lower()} run cannot be paused.")
    if current.pause_requested:
        raise Conflict("A pause was requested already.")
    current.pause_requested = True
    _append_log(current, f"Pause requested by {_label(actor, actor_label)}.")
    current.save(update_fields=["pause_requested", "log"])
    audit_record(
        action="training_run.pause_request",
        project=current.project,
        actor=actor,
        actor_label=actor_label,
        obj=current,
    )
    return current


@transaction.atomic
def training_run_mark_paused(
    *, run_id: int, state_ref: str | None, step: int, reason: str, now: datetime | None = None
) -> TrainingRun:
    """TRAINING → PAUSED with the resumable checkpoint the backend saved."""
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.TRAINING],
        to=RunStatus.PAUSED,
        action="training_run.paused",
        message=f"Paused after step {step}: {PauseReason(reason).label.lower()}.",
        updates={
            "state_ref": state_ref or "",
            "state_step": step if state_ref else 0,
            "pause_reason": reason,
            "pause_requested": False,
        },
        now=now,
    )


@transaction.atomic
def training_run_resume(
    *, run: TrainingRun, actor: Any = None, actor_label: str = ""
) -> TrainingRun:
    """PAUSED → QUEUED; the worker continues from the last checkpoint."""
    _require_admin(run.project, actor)
    resumed = _transition(
        run_id=run.pk,
        allowed=[RunStatus.PAUSED],
        to=RunStatus.QUEUED,
        action="training_run.resume",
        actor=actor,
        actor_label=actor_label,
        message=f"Resume requested by {_label(actor, actor_label)}.",
        updates={"pause_requested": False},
    )
    _enqueue_execute(resumed.pk)
    return resumed


@transaction.atomic
def training_run_cancel(
    *, run: TrainingRun, actor: Any = None, actor_label: str = "", reason: str = ""
) -> TrainingRun:
    """Any run in flight → CANCELLED. A worker still training notices at its next step."""
    _require_admin(run.project, actor)
    return _transition(
        run_id=run.pk,
        allowed=ACTIVE_RUN_STATUSES,
        to=RunStatus.CANCELLED,
        action="training_run.cancel",
        actor=actor,
        actor_label=actor_label,
        message=f"Cancelled by {_label(actor, actor_label)}." + (f" {reason}" if reason else ""),
        updates={"finished_at": _now(), "pause_requested": False},
    )


@transaction.atomic
def training_run_start_evaluating(
    *, run_id: int, adapter_ref: str, summary: dict, now: datetime | None = None
) -> TrainingRun:
    """TRAINING (finished) or PREPARING (resumed after training) → EVALUATING."""
    now = now or _now()
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.TRAINING, RunStatus.PREPARING],
        to=RunStatus.EVALUATING,
        action="training_run.evaluate",
        message="Training finished; evaluating on the held-out split.",
        updates={"adapter_ref": adapter_ref, "summary": summary, "heartbeat_at": now},
        now=now,
    )


@transaction.atomic
def training_run_succeed(
    *,
    run_id: int,
    eval_after: dict,
    sample_answers: list[dict],
    candidate: PolicyVersion | None,
    improved: bool,
) -> TrainingRun:
    """EVALUATING → SUCCEEDED. A run that did not improve is flagged and offers no candidate."""
    if improved:
        message = f"Held-out loss improved; candidate {candidate} offered for promotion."
    else:
        message = "Held-out loss did not improve: flagged, no candidate offered."
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.EVALUATING],
        to=RunStatus.SUCCEEDED,
        action="training_run.succeed",
        message=message,
        updates={
            "eval_after": eval_after,
            "sample_answers": sample_answers,
            "candidate_version": candidate,
            "improved": improved,
            "flagged_no_improvement": not improved,
            "finished_at": _now(),
        },
    )


@transaction.atomic
def training_run_fail(*, run_id: int, error: str) -> TrainingRun | None:
    """Any run in flight → FAILED with the reason shown in the UI. None when it already ended."""
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None or run.status not in ACTIVE_RUN_STATUSES:
        return None
    return _transition(
        run_id=run_id,
        allowed=ACTIVE_RUN_STATUSES,
        to=RunStatus.FAILED,
        action="training_run.fail",
        message=f"Failed: {error}",
        updates={"error": error[:5000], "finished_at": _now(), "pause_requested": False},
    )


def training_runs_mark_stale(*, now: datetime | None = None) -> list[int]:
    """Runs whose worker stopped reporting (heartbeat older than the project's limit) become
    PAUSED with reason STALE, resumable from their last checkpoint. Never "training" forever."""
    now = now or _now()
    marked = []
    candidates = TrainingRun.objects.filter(
        status__in=[RunStatus.PREPARING, RunStatus.TRAINING, RunStatus.EVALUATING],
        heartbeat_at__lt=now - timedelta(minutes=1),
    ).select_related("project")
    for run in candidates:
        limit = idle_policy_get(run.project).stale_after_minutes
        if run.heartbeat_at and run.heartbeat_at >= now - timedelta(minutes=limit):
            continue
        with transaction.atomic():
            locked = _locked(run.pk)
            if locked.status not in (
                RunStatus.PREPARING,
                RunStatus.TRAINING,
                RunStatus.EVALUATING,
            ) or (locked.heartbeat_at and locked.heartbeat_at >= now - timedelta(minutes=limit)):
                continue
            _transition(
                run_id=run.pk,
                allowed=[locked.status],
                to=RunStatus.PAUSED,
                action="training_run.stale",
                message=(
                    f"No heartbeat for {limit} minutes while {locked.status}: marked stale; "
                    f"resumable from step {locked.state_step}."
                ),
                updates={"pause_reason": PauseReason.STALE, "pause_requested": False},
                now=now,
            )
        marked.append(run.pk)
    return marked


# --- Executing a run (the worker's side) ----------------------------------------------------


def _samples(dataset: DatasetSnapshot, split: str, *, objective: str) -> list[ChatSample]:
    rows = [s for s in dataset.samples if s["split"] == split]
    if split == "eval" or objective != Objective.RL:
        # Loss on answers worth imitating: good and corrected ones.
        rows = [s for s in rows if s["kind"] in ("sft", "corrected")] or rows
    return [
        ChatSample(messages=s["messages"], reward=s.get("reward"), group=s.get("group"))
        for s in rows
    ]


def _output_dir(run: TrainingRun) -> str:
    root = getattr(settings, "METACLAW_TRAINING_DIR", None) or os.environ.get(
        "METACLAW_TRAINING_DIR", ""
    )
    base = Path(root) if root else Path(settings.VAR_DIR) / "training"
    return str(base / "runs" / str(run.pk))


def run_config(run: TrainingRun) -> TrainConfig:
    hyper = run.hyperparameters
    return TrainConfig(
        base_model=run.base_model,
        objective=hyper.get("objective", "sft"),
        lora_rank=int(hyper.get("lora_rank", 8)),
        learning_rate=float(hyper.get("learning_rate", 1e-4)),
        batch_size=int(hyper.get("batch_size", 4)),
        total_steps=int(hyper.get("total_steps", 20)),
        max_tokens=int(hyper.get("max_tokens", 1024)),
        seed=int(hyper.get("seed", 0)),
        output_dir=_output_dir(run),
        resume_from=run.state_ref or None,
        start_step=run.state_step if run.state_ref else 0,
    )


class _PauseCheck:
    """``should_pause`` for a backend: a pause request, a cancel, the end of the idle window
    (scheduled runs only) or the worker's time slice. Remembers why."""

    def __init__(
        self, run: TrainingRun, *, clock: Clock, deadline: float | None, every_seconds: float
    ) -> None:
        self.run_id = run.pk
        self.project = run.project
        self.scheduled = run.trigger == Trigger.SCHEDULE
        self.clock = clock
        self.deadline = deadline
        self.every = every_seconds
        self.last_idle_check = 0.0
        self.reason = ""

    def __call__(self) -> bool:
        if self.deadline is not None and time_module.monotonic() >= self.deadline:
            self.reason = PauseReason.TIME_SLICE
            return True
        row = TrainingRun.objects.filter(pk=self.run_id).values("status", "pause_requested").first()
        if row is None or row["status"] != RunStatus.TRAINING:
            self.reason = "stopped"
            return True
        if row["pause_requested"]:
            self.reason = PauseReason.REQUESTED
            return True
        if self.scheduled and time_module.monotonic() - self.last_idle_check >= self.every:
            self.last_idle_check = time_module.monotonic()
            if not project_idle_status(project=self.project, now=self.clock()).idle:
                self.reason = PauseReason.NOT_IDLE
                return True
        return False


def training_run_execute(
    *,
    run_id: int,
    backend: TrainingBackend | None = None,
    clock: Clock | None = None,
    deadline: float | None = None,
    idle_check_every_seconds: float = 5.0,
) -> TrainingRun | None:
    """The whole slow loop for one queued run: claim, snapshot, train (pausing when asked),
    evaluate before/after, and offer a candidate version when the held-out loss improved.

    ``clock`` is what the idle checks read (a test freezes it); records use the real time.
    Idempotent: a run that is not QUEUED is left alone (returns None). ``deadline`` is a
    ``time.monotonic()`` moment at which training pauses itself (the task's time slice)."""
    clock = clock or _now
    if not training_run_claim(run_id=run_id):
        return None
    try:
        run = training_run_prepare(run_id=run_id)
        dataset = run.dataset
        assert dataset is not None
        objective = run.hyperparameters.get("objective", "sft")
        train = _samples(dataset, "train", objective=objective)
        held_out = _samples(dataset, "eval", objective=objective)
        if not train or not held_out:
            return training_run_fail(
                run_id=run_id,
                error=(
                    f"Not enough clean data: {len(train)} train and {len(held_out)} held-out "
                    "samples (both sides need at least one; see the dataset report)."
                ),
            )
        backend = backend or get_backend(run.backend, **(run.backend_options or {}))
        config = run_config(run)
        if not run.adapter_ref:
            run = training_run_start_training(run_id=run_id)
            if run.eval_before is None:
                before = backend.evaluate(samples=held_out, config=config, adapter_ref=None)
                TrainingRun.objects.filter(pk=run_id).update(
                    eval_before=_clean_metrics(before), heartbeat_at=_now()
                )
            pause_check = _PauseCheck(
                run, clock=clock, deadline=deadline, every_seconds=idle_check_every_seconds
            )

            def on_step(report: StepReport) -> None:
                training_run_record_step(run_id=run_id, report=report)

            result = backend.train(
                samples=train, config=config, on_step=on_step, should_pause=pause_check
            )
            if result.status == "paused":
                reason = pause_check.reason or PauseReason.REQUESTED
                if reason == "stopped":
                    logger.info("Run %s stopped (cancelled or stale) after a step.", run_id)
                    return TrainingRun.objects.get(pk=run_id)
                return training_run_mark_paused(
                    run_id=run_id,
                    state_ref=result.state_ref,
                    step=result.steps_done,
                    reason=reason,
                )
            run = training_run_start_evaluating(
                run_id=run_id,
                adapter_ref=result.adapter_ref or "",
                summary=_clean_metrics(result.metrics),
            )
        else:
            run = training_run_start_evaluating(
                run_id=run_id, adapter_ref=run.adapter_ref, summary=run.summary
            )
        return _evaluate_and_offer(run, backend, config, held_out)
    except BackendError as exc:
        return training_run_fail(run_id=run_id, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the UI must show why, not "training" forever
        logger.exception("Training run %s failed.", run_id)
        return training_run_fail(run_id=run_id, error=f"{type(exc).__name__}: {exc}")


def _clean_metrics(metrics: dict) -> dict:
    return {k: _finite(v) for k, v in metrics.items()}


def _evaluate_and_offer(
    run: TrainingRun, backend: TrainingBackend, config: TrainConfig, held_out: list[ChatSample]
) -> TrainingRun:
    from skills.versions import services as skill_services

    run.refresh_from_db()
    after = _clean_metrics(
        backend.evaluate(samples=held_out, config=config, adapter_ref=run.adapter_ref)
    )
    training_run_heartbeat(run_id=run.pk)
    before = run.eval_before or {}
    shown = held_out[:SIDE_BY_SIDE_SAMPLES]
    prompts = [s.messages[:-1] for s in shown]
    answers_before = backend.sample(
        prompts=prompts, config=config, adapter_ref=None, max_tokens=SAMPLE_MAX_TOKENS
    )
    answers_after = backend.sample(
        prompts=prompts, config=config, adapter_ref=run.adapter_ref, max_tokens=SAMPLE_MAX_TOKENS
    )
    side_by_side = [
        {
            "prompt": prompt,
            "reference": sample.messages[-1]["content"],
            "before": b,
            "after": a,
        }
        for prompt, sample, b, a in zip(prompts, shown, answers_before, answers_after, strict=True)
    ]
    before_loss, after_loss = before.get("loss"), after.get("loss")
    improved = (
        before_loss is not None
        and after_loss is not None
        and after_loss < before_loss * (1 - MIN_IMPROVEMENT)
    )
    candidate = None
    if improved:
        dataset = run.dataset
        candidate = skill_services.policy_version_create_candidate(
            project=run.project,
            adapter_ref=run.adapter_ref,
            base_model=run.base_model,
            changelog=(
                f"LoRA adapter from training run #{run.pk} ({run.backend}, {run.step} steps) on "
                f"dataset {dataset.content_hash[:12] if dataset else '?'} "
                f"({dataset.train_count if dataset else 0} samples): held-out loss "
                f"{before_loss:.4f} → {after_loss:.4f}."
            ),
            actor=None,
            actor_label=f"training-run:{run.pk}",
        )
    return training_run_succeed(
        run_id=run.pk,
        eval_after=after,
        sample_answers=side_by_side,
        candidate=candidate,
        improved=improved,
    )


# --- The beat task's decision ---------------------------------------------------------------


def training_schedule_tick(*, project: Project, now: datetime | None = None) -> TrainingRun | None:
    """Once a minute per project with automatic training: when idle, resume a run that paused
    on its own (window, time slice, stale worker), or start one when the project is ready."""
    now = now or _now()
    policy = idle_policy_get(project)
    if policy.pk is None or not policy.auto_train:
        return None
    if not project_idle_status(project=project, now=now, policy=policy).idle:
        return None
    paused = (
        TrainingRun.objects.filter(project=project, status=RunStatus.PAUSED)
        .exclude(pause_reason=PauseReason.REQUESTED)
        .first()
    )
    if paused is not None:
        return training_run_resume(run=paused, actor=None, actor_label="schedule")
    if not project_training_readiness(project=project, now=now, policy=policy).ready:
        return None
    try:
        return training_run_create(
            project=project, actor=None, actor_label="schedule", trigger=Trigger.SCHEDULE
        )
    except Conflict:
        return None


# --- Closing the loop offline: the proxy forwards to our own adapter server -----------------


@transaction.atomic
def project_upstream_set(
    *, project: Project, base_url: str, actor: Any = None, actor_label: str = ""
) -> Project:
    """Point the project's proxy (``/v1/chat/completions``) at ``base_url``, an
    OpenAI-compatible endpoint such as ``serve_adapter``'s; ``""`` falls back to the site-wide
    upstream. Locks the project row so two commands cannot interleave their audit events."""
    from django.core.exceptions import ValidationError
    from django.core.validators import URLValidator

    _require_admin(project, actor)
    base_url = base_url.strip().rstrip("/")
    if base_url:
        try:
            URLValidator(schemes=["http", "https"])(base_url)
        except ValidationError as exc:
            raise DomainError(
                f"'{base_url}' is not an http(s) URL.", field="upstream_base_url"
            ) from exc
    locked = Project.objects.select_for_update().get(pk=project.pk)
    before = locked.upstream_base_url
    if before == base_url:
        return locked
    locked.upstream_base_url = base_url
    locked.save(update_fields=["upstream_base_url"])
    audit_record(
        action="project.upstream.update",
        project=locked,
        actor=actor,
        actor_label=actor_label,
        obj=locked,
        before={"upstream_base_url": before},
        after={"upstream_base_url": base_url},
    )
    project.upstream_base_url = base_url
    return locked
