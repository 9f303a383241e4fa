"""The policy agents run with, served from process memory.

Snapshots of a policy version (its skills, their text and an embedding matrix) are immutable and
built once per version and process. Everything on the request path reads process-local memory
only; a background *syncer* (every ``SYNC_INTERVAL`` s) compares each cached policy's generation
with the per-project counter in Redis, which ``policy_cache_invalidate`` bumps when the active
version changes. A promotion or rollback therefore reaches every web process within
``SYNC_INTERVAL`` seconds, and the process that made it at once."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.core.cache import cache

from base import counters, redis_cluster
from base.errors import NotFound
from base.periodic import Periodic
from skills.canary import selectors as canary_selectors
from skills.canary.signals import canary_changed
from skills.library.embeddings import get_embedder, skill_text
from skills.versions.models import PolicyVersion, VersionStatus

logger = logging.getLogger(__name__)

GENERATION_KEY = "metaclaw:runtime:generation:{project_id}"
SYNC_INTERVAL = 0.25
PINNED_CACHE_SIZE = 64

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
        # The running canary of each project (None: none runs), dropped with the project.
        # (generation, canary) per project.
        self.canary: dict[int, tuple[int, canary_selectors.ServingCanary | None]] = {}

    def drop_project(self, project_id: int) -> None:
        with self.lock:
            self.active.pop(project_id, None)
            self.canary.pop(project_id, None)
            for key in [k for k in self.pinned if k[0] == project_id]:
                del self.pinned[key]
            self.epoch[project_id] = self.epoch.get(project_id, 0) + 1

    def project_ids(self) -> set[int]:
        with self.lock:
            return set(self.active) | set(self.canary) | {k[0] for k in self.pinned}

    def generations(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        with self.lock:
            for pid, snap in self.active.items():
                out.setdefault(pid, set()).add(snap.generation)
            for (pid, _), snap in self.pinned.items():
                out.setdefault(pid, set()).add(snap.generation)
            for pid, (generation, _) in self.canary.items():
                out.setdefault(pid, set()).add(generation)
        return out

    def clear(self) -> None:
        with self.lock:
            self.active.clear()
            self.pinned.clear()
            self.canary.clear()


_policies = _PolicyCache()


class _RedisState:
    """Whether this process last found Redis down (the syncer's reads and snapshot builds)."""

    def __init__(self) -> None:
        self.down_since: float | None = None

    def down(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning("Redis is unreachable: serving this process's policy copies.")

    def up(self) -> None:
        self.down_since = None


_redis_state = _RedisState()


def policy_stale_headers(snapshot: PolicySnapshot) -> list[tuple[str, str]]:
    """``X-MetaClaw-Policy-Stale`` when this process serves its own copy because Redis is
    down (a promotion elsewhere may not have reached it); empty otherwise."""
    if _redis_state.down_since is None and snapshot.generation >= 0:
        return []
    return [("x-metaclaw-policy-stale", "redis-unavailable")]


def _read_generation(project_id: int) -> int:
    key = GENERATION_KEY.format(project_id=project_id)
    try:
        client = counters.redis_client()
        value = client.get(key) if client is not None else cache.get(key)
    except Exception:  # noqa: BLE001 - a Redis outage serves what the database says
        _redis_state.down()
        return -1
    _redis_state.up()
    return int(value or 0)


def _read_generations(project_ids: Sequence[int]) -> dict[int, int]:
    keys = [GENERATION_KEY.format(project_id=pid) for pid in project_ids]
    client = counters.redis_client()
    if client is None:
        values = cache.get_many(keys)
        return {pid: int(values.get(k) or 0) for pid, k in zip(project_ids, keys, strict=True)}
    values = redis_cluster.mget(client, keys)
    return {pid: int(v or 0) for pid, v in zip(project_ids, values, strict=True)}


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
        # Built while Redis was down (generation -1), the snapshot is kept all the same: every
        # request would otherwise rebuild it (re-embedding every skill, waiting on Redis's
        # timeout). The syncer drops it once Redis answers, as any generation that differs.
        if _policies.epoch.get(project_id, 0) == epoch:
            if version is None:
                _policies.active[project_id] = snap
            else:
                _policies.pinned[(project_id, version)] = snap
                while len(_policies.pinned) > PINNED_CACHE_SIZE:
                    _policies.pinned.popitem(last=False)
    return snap


# --- Canary: which version serves a session --------------------------------------------

CANARY_UNKNOWN = object()


def canary_cached(*, project_id: int) -> Any:
    """The project's running canary as this process knows it (None: none runs), or
    ``CANARY_UNKNOWN`` when it must be read (``canary_load``). No I/O."""
    cached = _policies.canary.get(project_id)
    return CANARY_UNKNOWN if cached is None else cached[1]


def canary_load(*, project_id: int) -> canary_selectors.ServingCanary | None:
    """Read the running canary and keep it until the project's generation changes (a canary
    started or ended: ``canary_changed``; a promotion)."""
    with _policies.lock:
        epoch = _policies.epoch.get(project_id, 0)
    generation = _read_generation(project_id)
    serving = canary_selectors.serving_canary(project_id)
    with _policies.lock:
        if _policies.epoch.get(project_id, 0) == epoch and generation >= 0:
            _policies.canary[project_id] = (generation, serving)
    return serving


def session_arm(
    canary: canary_selectors.ServingCanary | None, session_id: str
) -> tuple[int | None, str]:
    """(the version number to pin, the arm) for a session: the canary's version for the
    sessions hashed into its share, else None (the active version). No session id, no arm."""
    if canary is None or not session_id:
        return None, ""
    if canary.serves(session_id):
        return canary.version, "canary"
    return None, "control"


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
        _redis_state.down()
        return
    _redis_state.up()
    for project_id, generations in cached.items():
        if any(g != latest.get(project_id, 0) for g in generations):
            _policies.drop_project(project_id)


def _canary_changed(sender: Any, project_id: int, **kwargs: Any) -> None:
    policy_cache_invalidate(project_id=project_id)


# Connected here rather than in ``receivers.py``: whoever serves from this cache must hear of a
# canary that starts or ends, and every process that serves imports this module.
canary_changed.connect(_canary_changed, dispatch_uid="skills.runtime.policy.canary_changed")
