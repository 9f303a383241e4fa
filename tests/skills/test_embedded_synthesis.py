"""The fast loop in the embedded mode (SQLite), end to end: the synthesis has SQL of its own.

The suite's database is PostgreSQL, so this runs a short script in a fresh process with no
DATABASE_URL, against a SQLite file in a temporary directory, with our loopback LLM, and checks
what it reports: a new skill, a near-duplicate that becomes a revision of it, the related
groups, the sources of each revision, the token usage, and the draft made without an LLM."""

from __future__ import annotations

from tests.embedded import run_embedded

SCRIPT = r"""
import json

import django
from django.conf import settings

django.setup()

from django.core.management import call_command
from django.db import connection

from incidents import ingest as incident_ingest
from incidents.models import IncidentGroup
from incidents.schemas import IncidentIn
from base import services
from metaclaw_site.projects import project_create
from skills.synthesis.models import LlmUsage
from skills.library.models import SkillRevision
from skills.synthesis.services import group_synthesize
from tests import factories
from tests.fakes.openai_server import OpenAIServer, Reply

call_command("migrate", verbosity=0)
project = project_create(name="Embedded")


def ingest(client_id, message, tool="search_orders"):
    payload = factories.incident_payload(client_id)
    payload["error"] = {"type": "ToolArgumentError", "message": message, "tool": tool}
    (result,) = incident_ingest.incidents_ingest(project=project, items=[IncidentIn(**payload)])
    return result.group_id


first = ingest("a1", "search_orders: invalid value 'last week' for 'since'")
ingest("a2", "search_orders: invalid value 'yesterday' for 'since'")
second = ingest("b1", "search_orders rejected the since argument: not an ISO date")
third = ingest("c1", "list_refunds: unknown column 'owner' in result set", tool="list_refunds")

INSTRUCTIONS = (
    "Convert relative dates such as 'last week' to an ISO 8601 date (YYYY-MM-DD) before "
    "calling `search_orders`. Never pass the user's words as the `since` value."
)


def answer(slug, instructions):
    return Reply(
        content=json.dumps({
            "diagnosis": "The agent passed a relative date where an ISO date is needed.",
            "decision": "new_skill",
            "skill": {
                "slug": slug, "name": "ISO dates for order search",
                "description": "When calling search_orders with a date given in words.",
                "instructions": instructions, "category": "common_mistakes",
            },
        }),
        usage={"prompt_tokens": 700, "completion_tokens": 120},
    )


with OpenAIServer(model="loopback-model") as server:
    settings.LLM = {"BASE_URL": server.base_url, "API_KEY": "k", "MODEL": "loopback-model"}
    server.enqueue(
        answer("iso-dates-for-order-search", INSTRUCTIONS),
        answer("iso-date-arguments", INSTRUCTIONS + " Ask the user when no date is given."),
    )
    outcomes = [group_synthesize(group_id=first), group_synthesize(group_id=second)]
settings.LLM = {}
outcomes.append(group_synthesize(group_id=third))

revisions = []
for revision in SkillRevision.objects.select_related("skill", "parent").order_by("id"):
    revisions.append({
        "slug": revision.skill.slug, "number": revision.number, "origin": revision.origin,
        "parent": revision.parent.number if revision.parent else None,
        "groups": sorted(g.pk for g in revision.source_groups.all()),
        "incidents": sorted(i.client_id for i in revision.source_incidents.all()),
        "duplicate_note": "offered as a revision" in revision.diagnosis,
    })
usage = LlmUsage.objects.get(project=project)
print(json.dumps({
    "vendor": connection.vendor,
    "groups": {"first": first, "second": second, "third": third},
    "outcomes": outcomes,
    "statuses": {g.pk: g.synthesis_status for g in IncidentGroup.objects.all()},
    "related": sorted(r.pk for r in IncidentGroup.objects.get(pk=second).related_groups.all()),
    "revisions": revisions,
    "usage": [usage.calls, usage.tokens_in, usage.tokens_out],
}))
"""


def test_embedded_mode_synthesises_on_sqlite(tmp_path):
    out = run_embedded(SCRIPT, tmp_path, CELERY_TASK_ALWAYS_EAGER="0")
    assert out["vendor"] == "sqlite"
    first, second, third = (out["groups"][k] for k in ("first", "second", "third"))

    assert out["outcomes"] == ["proposed", "proposed", "needs_skill"]
    assert out["statuses"] == {str(first): "proposed", str(second): "proposed",
                               str(third): "needs_skill"}  # fmt: skip
    assert out["related"] == [first]
    new, duplicate, draft = out["revisions"]
    assert new == {
        "slug": "iso-dates-for-order-search", "number": 1, "origin": "live_llm", "parent": None,
        "groups": [first], "incidents": ["a1", "a2"], "duplicate_note": False,
    }  # fmt: skip
    # Too close to the first: offered as its revision 2, not as a skill of its own.
    assert duplicate == {
        "slug": "iso-dates-for-order-search", "number": 2, "origin": "live_llm", "parent": 1,
        "groups": [second], "incidents": ["b1"], "duplicate_note": True,
    }  # fmt: skip
    assert draft["origin"] == "evidence_draft"
    assert (draft["groups"], draft["incidents"]) == ([third], ["c1"])
    assert out["usage"] == [2, 1400, 240]
