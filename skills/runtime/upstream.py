"""Where a project's proxy forwards: its own upstream (base URL, key, model map) or the site's."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from base.models import Project
from skills.runtime.policy import PolicySnapshot

logger = logging.getLogger(__name__)

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
