"""Pages with a region that htmx swaps: a plain request gets the whole page, an htmx request
only the region's ``{% partialdef %}`` block (STYLE 13)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.http import HttpResponse
from django.shortcuts import render

from base.requests import SiteRequest


def render_page(
    request: SiteRequest,
    template: str,
    partial: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> HttpResponse:
    """``template`` rendered with ``context``, or only its ``partial`` for an htmx request."""
    name = f"{template}#{partial}" if request.htmx else template
    return render(request, name, context, status=status)
