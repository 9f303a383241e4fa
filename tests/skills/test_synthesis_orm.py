"""The synthesis path's writes that run concurrently (token usage, a new skill's first
revisions, a revision's sources) keep their guarantees when two workers meet."""

from __future__ import annotations

import threading

import pytest
from django.db import transaction
from django.utils import timezone

from incidents.ingest import incidents_ingest
from incidents.models import Incident, IncidentGroup
from incidents.schemas import IncidentIn
from skills.library.models import Skill, SkillRevision
from skills.synthesis import budget, llm
from skills.synthesis.models import LlmUsage
from tests import factories
from tests.skills.test_services_versions import _race


@pytest.mark.django_db(transaction=True)
def test_tokens_of_a_worker_that_loses_the_race_to_start_the_day_still_count():
    project = factories.make_project()
    inserted, release = threading.Event(), threading.Event()

    def first_worker() -> None:
        # Its row for the day exists, uncommitted, until ``release``: the second worker finds
        # nothing to add to, and its own insert waits for this one's, then fails.
        with transaction.atomic():
            budget.usage_record(project, llm.Usage(tokens_in=700, tokens_out=120))
            inserted.set()
            release.wait(timeout=10)

    def second_worker() -> None:
        inserted.wait(timeout=10)
        threading.Timer(0.3, release.set).start()
        budget.usage_record(project, llm.Usage(tokens_in=300, tokens_out=80))

    results = _race([first_worker, second_worker])

    assert not [r for r in results if isinstance(r, Exception)], results
    usage = LlmUsage.objects.get(project=project, day=timezone.localdate())
    assert (usage.calls, usage.tokens_in, usage.tokens_out) == (2, 1000, 200)


@pytest.mark.django_db(transaction=True)
def test_two_first_proposals_of_a_new_skill_at_once_get_revisions_1_and_2():
    project = factories.make_project()

    results = _race([lambda: factories.make_revision(project, slug="brand-new")] * 2)

    assert not [r for r in results if isinstance(r, Exception)], results
    assert Skill.objects.filter(project=project, slug="brand-new").count() == 1
    numbers = SkillRevision.objects.filter(skill__slug="brand-new").values_list("number", flat=True)
    assert sorted(numbers) == [1, 2]


@pytest.mark.django_db
def test_a_proposal_links_each_of_its_sources_once_and_a_new_category_sticks(project):
    (stored,) = incidents_ingest(
        project=project, items=[IncidentIn(**factories.incident_payload())]
    )
    group = IncidentGroup.objects.get(pk=stored.group_id)
    incident = Incident.objects.get(pk=stored.incident_id)
    first = factories.make_revision(project)

    revision = factories.make_revision(
        project,
        category="coding",
        source_groups=[group, group],
        source_incidents=[incident, incident],
    )

    assert revision.number == first.number + 1
    assert list(revision.source_groups.all()) == [group]
    assert list(revision.source_incidents.all()) == [incident]
    assert Skill.objects.get(pk=revision.skill_id).category == "coding"
