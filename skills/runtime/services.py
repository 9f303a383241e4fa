"""Runtime: the policy agents run with, skill retrieval, the runtime scope's admission and turn
recording.

Everything on the request path of ``/v1/chat/completions`` and ``/api/v1/runtime/*`` reads
process-local memory only (requests are counted with ``base.counters.hit_local``, whose
own thread flushes the counts to Redis); Redis and the database are touched by two background
threads of this module:

- the *syncer* (every ``SYNC_INTERVAL`` s) compares each cached policy's generation with the
  per-project counter in Redis, which ``policy_cache_invalidate`` bumps when the active version
  changes. A promotion or rollback therefore reaches every web process within
  ``SYNC_INTERVAL`` seconds, and the process that made it at once;
- the *recorder* writes proxied turns as trajectories in batches, off the response path.

Snapshots of a policy version (its skills, their text and an embedding matrix) are immutable and
built once per version and process.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, transaction
from django.utils import timezone
from pydantic import ValidationError

from base import counters
from base.auth import admit
from base.models import ApiKey, Project
from base.periodic import Periodic
from base.sanitize import clean_json, clean_text
from base.services import (
    DomainError,
    NotFound,
    api_key_authenticate,
    api_key_cache_clear,
)
from skills.library.embeddings import get_embedder, skill_text, top_k
from skills.versions.models import PolicyVersion, VersionStatus

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


def _loads(data: bytes) -> Any:
    # orjson refuses NaN and lone surrogates, which PostgreSQL would refuse too.
    return _orjson.loads(data) if _orjson else json.loads(data)


GENERATION_KEY = "metaclaw:runtime:generation:{project_id}"
SYNC_INTERVAL = 0.25
PINNED_CACHE_SIZE = 64

DEFAULT_TOP_K = 5
DEFAULT_MIN_SCORE = 0.2
DEFAULT_TOKEN_BUDGET = 1500
MAX_QUERY_CHARS = 2000

SKILLS_BEGIN = "<!-- metaclaw:active-skills -->"
SKILLS_END = "<!-- /metaclaw:active-skills -->"
_SECTION_RE = re.compile(re.escape(SKILLS_BEGIN) + r".*?" + re.escape(SKILLS_END), re.S)


# --- Snapshots ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SkillEntry:
    revision_id: int
    slug: str
    name: str
    description: str
    instructions: str
    category: str
    revision: int
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "name": self.name,
            "description": self.description,
            "instructions": self.instructions,
            "category": self.category,
            "revision": self.revision,
            "revision_id": self.revision_id,
            "tokens": self.tokens,
        }

    def injection_text(self) -> str:
        return f"### {self.name}\n_{self.description}_\n\n{self.instructions}"


@dataclass(frozen=True)
class PolicySnapshot:
    """One policy version as agents see it. Immutable; shared between requests."""

    project_id: int
    version_id: int
    number: int
    status: str
    adapter_ref: str
    base_model: str
    skills: tuple[SkillEntry, ...]
    matrix: np.ndarray = field(repr=False)
    etag: str
    body: bytes = field(repr=False)
    generation: int

    @property
    def header_value(self) -> str:
        return str(self.number)


def estimate_tokens(text: str) -> int:
    """About four characters a token: good enough for a budget, and free."""
    return max(1, (len(text) + 3) // 4)


def _build_snapshot(version: PolicyVersion, generation: int) -> PolicySnapshot:
    revisions = list(version.revisions.select_related("skill").order_by("skill__slug", "id"))
    skills = tuple(
        SkillEntry(
            revision_id=r.pk,
            slug=r.skill.slug,
            name=r.name,
            description=r.description,
            instructions=r.instructions,
            category=r.category,
            revision=r.number,
            tokens=estimate_tokens(f"### {r.name}\n_{r.description}_\n\n{r.instructions}"),
        )
        for r in revisions
    )
    matrix = get_embedder().embed(
        [skill_text(s.name, s.description, s.instructions) for s in skills]
    )
    payload = {
        "version": version.number,
        "status": version.status,
        "adapter_ref": version.adapter_ref,
        "base_model": version.base_model,
        "changelog": version.changelog,
        "created_at": version.created_at.isoformat(),
        "skills": [s.as_dict() for s in skills],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    etag = f'"v{version.number}-{digest}"'
    payload["etag"] = etag
    return PolicySnapshot(
        project_id=version.project_id,
        version_id=version.pk,
        number=version.number,
        status=version.status,
        adapter_ref=version.adapter_ref,
        base_model=version.base_model,
        skills=skills,
        matrix=matrix,
        etag=etag,
        body=json.dumps(payload, separators=(",", ":")).encode(),
        generation=generation,
    )


class _PolicyCache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, PolicySnapshot] = {}
        self.pinned: OrderedDict[tuple[int, int], PolicySnapshot] = OrderedDict()
        # Bumped by local invalidation: a build that started before it must not be stored.
        self.epoch: dict[int, int] = {}

    def drop_project(self, project_id: int) -> None:
        with self.lock:
            self.active.pop(project_id, None)
            for key in [k for k in self.pinned if k[0] == project_id]:
                del self.pinned[key]
            self.epoch[project_id] = self.epoch.get(project_id, 0) + 1

    def project_ids(self) -> set[int]:
        with self.lock:
            return set(self.active) | {k[0] for k in self.pinned}

    def generations(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        with self.lock:
            for pid, snap in self.active.items():
                out.setdefault(pid, set()).add(snap.generation)
            for (pid, _), snap in self.pinned.items():
                out.setdefault(pid, set()).add(snap.generation)
        return out

    def clear(self) -> None:
        with self.lock:
            self.active.clear()
            self.pinned.clear()


_policies = _PolicyCache()


def _read_generation(project_id: int) -> int:
    key = GENERATION_KEY.format(project_id=project_id)
    try:
        client = counters.redis_client()
        value = client.get(key) if client is not None else cache.get(key)
    except Exception:  # noqa: BLE001 - a Redis outage serves what the database says
        return -1
    return int(value or 0)


def _read_generations(project_ids: Sequence[int]) -> dict[int, int]:
    keys = [GENERATION_KEY.format(project_id=pid) for pid in project_ids]
    client = counters.redis_client()
    if client is None:
        values = cache.get_many(keys)
        return {pid: int(values.get(k) or 0) for pid, k in zip(project_ids, keys, strict=True)}
    return {pid: int(v or 0) for pid, v in zip(project_ids, client.mget(keys), strict=True)}


def policy_snapshot_cached(*, project_id: int, version: int | None = None) -> PolicySnapshot | None:
    """The snapshot when this process holds a valid one (no I/O), else None."""
    _syncer.ensure_started()
    if version is None:
        return _policies.active.get(project_id)
    return _policies.pinned.get((project_id, version))


def policy_snapshot(*, project_id: int, version: int | None = None) -> PolicySnapshot:
    """The active policy of the project (or version ``version`` of it, any status), cached.

    Raises ``NotFound`` for a version the project does not have. Touches the database only
    when this process has no valid snapshot."""
    _syncer.ensure_started()
    with _policies.lock:
        snap = (
            _policies.active.get(project_id)
            if version is None
            else _policies.pinned.get((project_id, version))
        )
        epoch = _policies.epoch.get(project_id, 0)
    if snap is not None:
        return snap
    # One build per version at a time: a cold process under load must not embed the same
    # thousand skills once per waiting request.
    with _build_lock(project_id, version):
        again = policy_snapshot_cached(project_id=project_id, version=version)
        if again is not None:
            return again
        return _snapshot_build_and_store(project_id, version, epoch)


_build_locks: dict[tuple[int, int | None], threading.Lock] = {}


def _build_lock(project_id: int, version: int | None) -> threading.Lock:
    with _policies.lock:
        if len(_build_locks) > 10_000:  # pins of versions that do not exist add up
            _build_locks.clear()
        return _build_locks.setdefault((project_id, version), threading.Lock())


def _snapshot_build_and_store(project_id: int, version: int | None, epoch: int) -> PolicySnapshot:
    generation = _read_generation(project_id)
    versions = PolicyVersion.objects.filter(project_id=project_id)
    row = (
        versions.filter(status=VersionStatus.ACTIVE).first()
        if version is None
        else versions.filter(number=version).first()
    )
    if row is None:
        if version is None:
            raise NotFound("This project has no active policy version.")
        raise NotFound(f"This project has no policy version {version}.", field="version")
    snap = _build_snapshot(row, generation)
    with _policies.lock:
        if _policies.epoch.get(project_id, 0) == epoch and generation >= 0:
            if version is None:
                _policies.active[project_id] = snap
            else:
                _policies.pinned[(project_id, version)] = snap
                while len(_policies.pinned) > PINNED_CACHE_SIZE:
                    _policies.pinned.popitem(last=False)
    return snap


def policy_cache_invalidate(*, project_id: int) -> None:
    """The active version of the project changed: forget it here now, and make every other
    process forget it within ``SYNC_INTERVAL`` seconds (the generation counter in Redis)."""
    _policies.drop_project(project_id)
    key = GENERATION_KEY.format(project_id=project_id)
    try:
        client = counters.redis_client()
        if client is not None:
            client.incr(key)
        else:
            try:
                cache.incr(key)
            except ValueError:
                cache.set(key, 1, None)
    except Exception:  # noqa: BLE001
        logger.warning("Could not bump the policy generation of project %s.", project_id)


def policy_cache_clear() -> None:
    """Forget every snapshot of this process (tests)."""
    _policies.clear()


# --- Retrieval ----------------------------------------------------------------------------

_FENCED_METADATA = re.compile(
    r"^[^\n]*\((?:untrusted )?(?:metadata|context)\)[^\n]*:\s*\n```.*?```\s*", re.S | re.M | re.I
)
# The opening tag of a wrapper block; its closing tag is found with ``str.find`` (a lazy
# ``<tag>.*?</tag>`` regex is quadratic on input full of unclosed tags).
_WRAPPER_OPEN = re.compile(
    r"<(system[-_]reminder|environment[-_]details|env|metadata|context|system|"
    r"session[-_]info)\b[^<>]{0,500}>",
    re.I,
)
# Each message is cut to its last MAX_CLEAN_CHARS characters before cleaning, and at most
# MAX_QUERY_MESSAGES user messages are looked at: retrieval cost stays bounded per request.
MAX_CLEAN_CHARS = MAX_QUERY_CHARS * 4
MAX_QUERY_MESSAGES = 16
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# ``[ \t]*`` rather than ``\s*`` after ``^``: with re.M, ``^\s*`` is quadratic on blank lines.
_BRACKET_PREFIX = re.compile(r"^[ \t]*\[[^\]\n]{1,120}\]\s*", re.M)
_HEADER_LINE = re.compile(
    r"^[ \t]*(?:current (?:date|time)|date|time|timestamp|now|session(?: id)?|user(?: id)?|"
    r"channel|sender|conversation(?: id)?|message id|timezone|locale|cwd|working directory)"
    r"\s*[:=][^\n]*$\n?",
    re.M | re.I,
)


def content_text(content: Any) -> str:
    """The text of an OpenAI message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict)
            and part.get("type") in ("text", "input_text")
            and isinstance(part.get("text"), str)
        )
    return ""


def clean_request_text(text: str) -> str:
    """Strip what agent frameworks wrap around a user's words (metadata blocks, reminders,
    timestamps, header lines), which would otherwise pull the same skills every turn."""
    text = text[-MAX_CLEAN_CHARS:]
    text = _FENCED_METADATA.sub("", text)
    text = _strip_wrapper_blocks(text)
    text = _SECTION_RE.sub("", text)
    text = _HEADER_LINE.sub("", text)
    text = _BRACKET_PREFIX.sub("", text)
    return text.strip()


def _strip_wrapper_blocks(text: str) -> str:
    """Remove ``<tag ...>...</tag>`` wrapper blocks (case-insensitive tag names), in time
    linear in the text: the next closing tag of each name is searched for at most once per
    position it can be at."""
    lower = text.translate(_ASCII_LOWER)  # same length as ``text``, unlike str.lower()
    next_close: dict[str, int] = {}  # tag name -> position of its next closing tag, or -1
    out: list[str] = []
    kept_from = 0
    pos = 0
    while True:
        match = _WRAPPER_OPEN.search(text, pos)
        if match is None:
            break
        name = match.group(1).translate(_ASCII_LOWER)
        closing = f"</{name}>"
        close = next_close.get(name)
        if close is None or (close != -1 and close < match.end()):
            close = lower.find(closing, match.end())
            next_close[name] = close
        if close == -1:  # never closed from here on: not a block
            pos = match.start() + 1
            continue
        out.append(text[kept_from : match.start()])
        kept_from = pos = close + len(closing)
    out.append(text[kept_from:])
    return "".join(out)


def query_from_messages(messages: Iterable[Any]) -> str:
    """The retrieval query: the user's latest request, not the system prompt or boilerplate.

    A terse latest message ("yes, go ahead") takes the previous user message as context."""
    texts: list[str] = []
    looked_at = 0
    for message in reversed(list(messages)):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        looked_at += 1
        if looked_at > MAX_QUERY_MESSAGES:
            break
        text = clean_request_text(content_text(message.get("content"))[-MAX_CLEAN_CHARS:])
        if not text:
            continue
        texts.append(text)
        if len(texts) >= 2 or len(text.split()) >= 4:
            break
    return "\n".join(reversed(texts))[-MAX_QUERY_CHARS:]


@dataclass(frozen=True)
class Retrieved:
    skill: SkillEntry
    score: float


def skills_retrieve(
    *,
    snapshot: PolicySnapshot,
    query: str,
    k: int = DEFAULT_TOP_K,
    min_score: float = DEFAULT_MIN_SCORE,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> list[Retrieved]:
    """The ``k`` skills of the version most relevant to ``query`` scoring at least
    ``min_score``, best first, whose texts fit ``token_budget`` together (a skill too long for
    what is left is skipped, a shorter one after it may still fit)."""
    if not snapshot.skills or not query.strip() or k <= 0:
        return []
    vector = _query_vector(query)
    ranked = top_k(vector, snapshot.matrix, min(len(snapshot.skills), k * 3))
    chosen: list[Retrieved] = []
    left = token_budget
    for index, score in ranked:
        if score < min_score or len(chosen) >= k:
            break
        entry = snapshot.skills[index]
        if entry.tokens > left:
            continue
        chosen.append(Retrieved(entry, round(score, 4)))
        left -= entry.tokens
    return chosen


@functools.lru_cache(maxsize=4096)
def _query_vector(query: str) -> np.ndarray:
    """An agent's tool loop sends the same latest request several times: embed it once."""
    vector = get_embedder().embed_one(query)
    vector.setflags(write=False)
    return vector


def skills_section(retrieved: Sequence[Retrieved], *, version: int) -> str:
    parts = [
        SKILLS_BEGIN,
        "## Active skills",
        f"Skills learned from earlier runs (MetaClaw policy v{version}). Apply the ones that fit "
        "this request; ignore the rest.",
    ]
    parts.extend(r.skill.injection_text() for r in retrieved)
    parts.append(SKILLS_END)
    return "\n\n".join(parts)


def messages_with_skills(messages: list[Any], section: str) -> list[Any]:
    """A copy of ``messages`` whose first system message ends with ``section`` (one is created
    at the top when there is none). Other messages are passed by reference, untouched; a
    section left from an earlier turn is replaced, not repeated."""
    out = list(messages)
    for index, message in enumerate(out):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
            continue
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            break  # content we cannot extend (a number, an object): add a message of our own
        if isinstance(content, list):
            kept = [
                p
                for p in content
                if not (isinstance(p, dict) and SKILLS_BEGIN in str(p.get("text", "")))
            ]
            new_content: Any = kept + [{"type": "text", "text": section}]
        else:
            base = _SECTION_RE.sub("", content or "").rstrip()
            new_content = f"{base}\n\n{section}" if base else section
        out[index] = {**message, "content": new_content}
        return out
    return [{"role": "system", "content": section}, *out]


# --- API keys and request counting ----------------------------------------------------------

# API keys are cached once, in base.services (shared with ingestion).
runtime_key_cache_clear = api_key_cache_clear


def runtime_authenticate(secret: str) -> ApiKey | None:
    """Authenticate a runtime-scoped key (sync; cached), count the request and apply the rate
    limit. Raises ``ScopeDenied`` / ``RateLimited``; None for an unknown key."""
    secret = secret.strip()
    api_key = api_key_authenticate(secret)
    if api_key is None:
        return None
    runtime_admit(api_key)
    return api_key


def runtime_admit(api_key: ApiKey) -> None:
    """The runtime scope and the rate limit, counted in process (the event loop never waits
    on Redis). Raises ``ScopeDenied`` / ``RateLimited``."""
    admit(api_key, ("runtime",), count=counters.hit_local)


_syncer = Periodic("metaclaw-runtime-sync", SYNC_INTERVAL, lambda: sync_now())


def sync_now() -> None:
    """One round of the syncer, after flushing this process's request counts to Redis
    (``counters.flush_local``, which a thread of its own also runs); called by tests."""
    counters.flush_local()
    cached = _policies.generations()
    if not cached:
        return
    try:
        latest = _read_generations(list(cached))
    except Exception:  # noqa: BLE001
        return
    for project_id, generations in cached.items():
        if any(g != latest.get(project_id, 0) for g in generations):
            _policies.drop_project(project_id)


# --- Upstream -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    base_url: str
    api_key: str
    model_map: dict[str, str]


def upstream_for(project: Project) -> Upstream:
    """The project's upstream, else the global one. The global API key is only ever sent to
    the global base URL: a project with a URL of its own and no key of its own gets no key."""
    global_url = (settings.UPSTREAM["BASE_URL"] or "").rstrip("/")
    base_url = (project.upstream_base_url or "").rstrip("/") or global_url
    api_key = project.upstream_api_key or ""
    if not api_key and base_url == global_url:
        api_key = settings.UPSTREAM["API_KEY"] or ""
    return Upstream(
        base_url=base_url,
        api_key=api_key,
        model_map=project.upstream_model_map
        if isinstance(project.upstream_model_map, dict)
        else {},
    )


def upstream_model(*, requested: str, snapshot: PolicySnapshot, model_map: dict[str, Any]) -> str:
    """The model name to send upstream: the active adapter's when the version has one (a
    Tinker sampler path as is, a local adapter folder by its name, as the local server names
    it), else the requested one; either goes through the project's model map (``"*"`` matches
    any name)."""
    if snapshot.adapter_ref:
        ref = snapshot.adapter_ref
        name = ref if "://" in ref else ref.rstrip("/").rsplit("/", 1)[-1]
        mapped = model_map.get(ref) or model_map.get(name)
        return str(mapped or name)
    mapped = model_map.get(requested) or model_map.get("*")
    return str(mapped) if mapped else requested


# --- Recording turns ----------------------------------------------------------------------


@dataclass
class Turn:
    """One proxied turn, as the proxy saw it. The recorder parses the response, not the
    request path."""

    project_id: int
    session_id: str
    turn_type: str
    agent_name: str
    policy_version: int
    requested_model: str
    model: str
    messages: list[Any]
    tools: list[Any]
    skills: list[dict[str, Any]]
    status_code: int
    latency_ms: float
    response_body: bytes = b""
    stream: bool = False
    # The request body held an escaped NUL character: clean messages before storing them.
    needs_cleaning: bool = False
    error: str = ""
    occurred_at: Any = None


def _parse_response(turn: Turn) -> tuple[Any, int | None, int | None]:
    """(assistant message or error body, prompt tokens, completion tokens)."""
    if turn.error:
        return {"error": turn.error}, None, None
    if not turn.stream:
        try:
            body = _loads(turn.response_body or b"null")
        except ValueError:
            return {"raw": turn.response_body[:2000].decode("utf-8", "replace")}, None, None
        if turn.status_code >= 400 or not isinstance(body, dict):
            return body, None, None
        usage = _dict(body.get("usage"))
        choices = body.get("choices")
        first = _dict(choices[0]) if isinstance(choices, list) and choices else {}
        return first.get("message"), usage.get("prompt_tokens"), usage.get("completion_tokens")
    content: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    for line in turn.response_body.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            chunk = _loads(data)
        except ValueError:
            continue
        if not isinstance(chunk, dict):  # a malformed line (``data: 1``) is skipped
            continue
        usage = _dict(chunk.get("usage")) or usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = _dict(_dict(choice).get("delta"))
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if not isinstance(call, dict):
                    continue
                index = call.get("index", 0)
                slot = tool_calls.setdefault(
                    index if isinstance(index, int) else 0,
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if isinstance(call.get("id"), str) and call["id"]:
                    slot["id"] = call["id"]
                fn = _dict(call.get("function"))
                for part in ("name", "arguments"):
                    if isinstance(fn.get(part), str):
                        slot["function"][part] += fn[part]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if tool_calls:
        message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    return message, usage.get("prompt_tokens"), usage.get("completion_tokens")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def proxy_turns_record(*, turns: Sequence[Turn]) -> int:
    """Store proxied turns as trajectories (source=proxy), stamped with their policy version.
    Returns how many were stored.

    The rows are written by ``incidents.services.trajectories_store`` (one ``COPY`` on
    PostgreSQL)."""
    from incidents import services as incident_services
    from incidents.models import Trajectory, TrajectorySource

    rows = []
    now = timezone.now()
    for turn in turns:
        try:
            response, prompt_tokens, completion_tokens = _parse_response(turn)
        except Exception:  # noqa: BLE001 - one odd answer must not lose the other turns
            logger.exception("Could not parse the upstream answer of a proxied turn.")
            raw = (turn.response_body or b"")[:2000].decode("utf-8", "replace")
            response, prompt_tokens, completion_tokens = {"raw": raw}, None, None
        # Messages parsed by a strict JSON parser hold no NaN and no lone surrogates; only
        # NUL characters, which PostgreSQL refuses, need cleaning (the proxy flags those).
        clean = clean_json if turn.needs_cleaning else _identity
        rows.append(
            Trajectory(
                id=uuid.uuid4(),
                project_id=turn.project_id,
                session_id=clean_text(turn.session_id)[:200],
                turn_type=turn.turn_type,
                source=TrajectorySource.PROXY,
                agent_name=clean_text(turn.agent_name)[:200],
                policy_version=turn.policy_version,
                model=clean_text(turn.model)[:200],
                messages=clean(turn.messages),
                response=clean_json(response),
                tools=clean(turn.tools),
                skills_injected=turn.skills,
                latency_ms=round(turn.latency_ms, 3),
                prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
                completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
                status_code=turn.status_code,
                metadata={
                    "requested_model": clean_text(turn.requested_model),
                    "stream": turn.stream,
                },
                occurred_at=turn.occurred_at or now,
                received_at=now,
            )
        )
    return incident_services.trajectories_store(trajectories=rows)


def _identity(value: Any) -> Any:
    return value


class _Recorder:
    """Writes turns from a queue in batches on its own thread: the answer never waits for the
    database, and a database outage drops recordings (logged), never answers."""

    MAX_QUEUE = 50_000
    MAX_BATCH = 500
    CHUNK = 25

    def __init__(self) -> None:
        self.queue: queue.Queue[Turn] = queue.Queue(maxsize=self.MAX_QUEUE)
        self.pending = 0
        self.cond = threading.Condition()
        self.started = False
        self.dropped = 0

    def hold(self) -> None:
        """Count a turn that will be submitted later (a stream being relayed), so ``wait``
        cannot return before it is written."""
        with self.cond:
            self.pending += 1

    def submit(self, turn: Turn, *, held: bool = False) -> None:
        if not self.started:
            with self.cond:
                if not self.started:
                    threading.Thread(
                        target=self._run, name="metaclaw-runtime-recorder", daemon=True
                    ).start()
                    self.started = True
        if not held:
            with self.cond:
                self.pending += 1
        try:
            self.queue.put_nowait(turn)
        except queue.Full:
            self.dropped += 1
            self._done(1)
            logger.warning("Recorder queue full: a proxied turn was not recorded.")

    def _done(self, n: int) -> None:
        with self.cond:
            self.pending -= n
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self.queue.get(timeout=0.02))
                except queue.Empty:
                    break
            try:
                close_old_connections()
                # Small chunks, yielding the GIL between them: the event loop serving
                # requests must not wait a whole switch interval behind a big batch.
                for start in range(0, len(batch), self.CHUNK):
                    chunk = batch[start : start + self.CHUNK]
                    try:
                        proxy_turns_record(turns=chunk)
                    except Exception:  # noqa: BLE001 - recording must never take the proxy down
                        logger.exception("Could not record %d proxied turns.", len(chunk))
                    time.sleep(0)
            finally:
                close_old_connections()  # with the pool: back to it until the next batch
                self._done(len(batch))

    def wait(self, timeout: float = 10.0) -> bool:
        """Block until every submitted turn is written (tests, shutdown). True when drained."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


recorder = _Recorder()
atexit.register(lambda: recorder.wait(5.0))


def recordings_wait(timeout: float = 10.0) -> bool:
    """Wait for pending recordings of this process to be written."""
    return recorder.wait(timeout)


# --- Feedback -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackResult:
    session_id: str
    trajectories_updated: int
    incident_id: uuid.UUID | None
    group_id: int | None
    duplicate: bool


def session_feedback_record(
    *,
    project: Project,
    session_id: str,
    outcome: str | None = None,
    reward: float | None = None,
    failure: dict[str, Any] | None = None,
    actor_label: str = "",
) -> FeedbackResult:
    """Record how a proxied session ended: the outcome and reward on its trajectories, and for
    a failure an incident of the fast loop (idempotent per session unless the failure carries
    its own ``id``) with the session's last main turn as evidence."""
    if failure is not None:
        from incidents.models import Outcome

        outcome = Outcome.FAILURE
    if outcome is None and reward is None:
        raise DomainError("Give an outcome, a reward or a failure.", field="outcome")
    recordings_wait(2.0)
    # One transaction: an incident that cannot be made leaves the turns' outcome unchanged.
    with transaction.atomic():
        return _session_feedback_apply(
            project=project,
            session_id=session_id,
            outcome=outcome,
            reward=reward,
            failure=failure,
            actor_label=actor_label,
        )


def session_incident_id(session_id: str) -> str:
    """The external id of a session's failure incident: bounded and printable, whatever the
    session id is."""
    return "session:" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _session_feedback_apply(
    *,
    project: Project,
    session_id: str,
    outcome: str | None,
    reward: float | None,
    failure: dict[str, Any] | None,
    actor_label: str,
) -> FeedbackResult:
    from incidents.models import Trajectory
    from incidents.schemas import IncidentIn
    from incidents.services import incidents_ingest, session_outcome_record

    updated = session_outcome_record(
        project=project, session_id=session_id, outcome=outcome, reward=reward
    )
    turns = Trajectory.objects.filter(project=project, session_id=session_id)
    if failure is None:
        return FeedbackResult(session_id, updated, None, None, False)

    last = (
        turns.filter(turn_type="main").order_by("-occurred_at").first()
        or turns.order_by("-occurred_at").first()
    )
    messages: list[Any] = []
    tools: list[Any] = []
    if last is not None:
        messages = list(last.messages or [])
        if isinstance(last.response, dict) and last.response.get("role") == "assistant":
            messages.append(last.response)
        tools = list(last.tools or [])
    payload = {
        "id": failure.get("id") or session_incident_id(session_id),
        "agent": {"name": failure.get("agent") or (last.agent_name if last else "") or "proxy"},
        "policy_version": last.policy_version if last else None,
        "kind": failure.get("kind") or "wrong_answer",
        "severity": failure.get("severity") or "medium",
        "error": failure.get("error") or {},
        "messages": messages[-100:],
        "tools": tools,
        "feedback": {"text": failure.get("feedback") or "", "reward": reward},
        "metadata": {"source": "runtime.feedback", "trajectory_id": str(last.pk) if last else ""},
        "session_id": session_id,
    }
    try:
        item = IncidentIn.model_validate(payload)
    except ValidationError:  # recorded messages an incident cannot hold: keep the rest
        payload["messages"] = []
        payload["tools"] = []
        try:
            item = IncidentIn.model_validate(payload)
        except ValidationError as exc:
            first = (exc.errors(include_url=False) or [{}])[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise DomainError(
                f"The failure cannot be recorded as an incident ({where}: {first.get('msg', '')}).",
                code="invalid",
                field="failure",
            ) from exc
    result = incidents_ingest(project=project, items=[item], actor_label=actor_label)[0]
    return FeedbackResult(
        session_id, updated, result.incident_id, result.group_id, result.duplicate
    )
