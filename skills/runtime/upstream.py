"""Where a project's proxy forwards: its own upstream (base URL, key, model map) or the site's."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from base.models import Project
from base.selectors import project_upstream_api_key
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
    api_key = project_upstream_api_key(project)  # stored encrypted; this decrypts it
    if not api_key and base_url == global_url:
        api_key = settings.UPSTREAM["API_KEY"] or ""
    return Upstream(
        base_url=base_url,
        api_key=api_key,
        model_map=project.upstream_model_map
        if isinstance(project.upstream_model_map, dict)
        else {},
    )


def adapter_model_name(adapter_ref: str) -> str:
    """The model name of a policy version's adapter: a Tinker sampler path as is; a local
    adapter folder by its name, or by its run's folder when it is called ``adapter`` (the local
    backend writes ``<runs>/<run id>/adapter``, so run 7's adapter is ``"7"``). ``serve_adapter``
    names its server with this, so the name the proxy sends is the one the server reports."""
    if "://" in adapter_ref:
        return adapter_ref
    parts = [p for p in adapter_ref.replace("\\", "/").split("/") if p]
    if len(parts) >= 2 and parts[-1] == "adapter":
        return parts[-2]
    return parts[-1] if parts else adapter_ref


def upstream_model(*, requested: str, snapshot: PolicySnapshot, model_map: dict[str, Any]) -> str:
    """The model name to send upstream: the active adapter's when the version has one
    (``adapter_model_name``), else the requested one; either goes through the project's model
    map (``"*"`` matches any name)."""
    if snapshot.adapter_ref:
        ref = snapshot.adapter_ref
        name = adapter_model_name(ref)
        mapped = model_map.get(ref) or model_map.get(name)
        return str(mapped or name)
    mapped = model_map.get(requested) or model_map.get("*")
    return str(mapped) if mapped else requested
