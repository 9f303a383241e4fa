"""The abusive marks on the sessions and end users of the incidents a page shows."""

from __future__ import annotations

from typing import Any

from django import template

from base.models import Role
from incidents.models import AbusiveSourceKind
from incidents.provenance import abusive_marks_of

register = template.Library()


@register.simple_tag(takes_context=True)
def abusive_marks_attach(context: template.Context, incidents: list[Any]) -> str:
    """Hang ``abusive_sources`` on each of ``incidents`` (as pages show them): its session and
    its end user, each with the mark on it (or None) and whether the person looking may mark
    (admins, ``incidents.services.abusive_source_mark``). An end user is named only to those who
    see personal data. One query for all; renders nothing."""
    request = context["request"]
    project = request.project
    can_mark = request.membership.has_role(Role.ADMIN)
    marks = abusive_marks_of(
        project,
        sessions=(i.session_id for i in incidents),
        end_users=(i.end_user for i in incidents),
    )
    back = request.get_full_path()
    for incident in incidents:
        sources = []
        for kind, value in (
            (AbusiveSourceKind.SESSION, incident.session_id),
            (AbusiveSourceKind.END_USER, incident.end_user),
        ):
            if not value:
                continue
            hidden = kind == AbusiveSourceKind.END_USER and not getattr(
                incident, "personal_data_shown", False
            )
            sources.append(
                {
                    "kind": str(kind),
                    "value": value,
                    "shown": "" if hidden else value,
                    "mark": marks.get((kind, value)),
                    "can_mark": can_mark,
                    "back": back,
                }
            )
        incident.abusive_sources = sources
    return ""
