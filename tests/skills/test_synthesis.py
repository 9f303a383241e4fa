"""The fast loop end to end: ingest over HTTP → propose_skill (eager) → what the DB holds.

The LLM is our OpenAI-compatible loopback server, talked to by the real ``openai`` client."""

from __future__ import annotations

import json

import pytest
from django.utils import timezone

from base.errors import PermissionDenied
from base.models import AuditEvent
from incidents.models import GroupStatus, IncidentGroup, IncidentStatus, SynthesisStatus
from skills.library.models import Origin, RevisionStatus, SkillRevision
from skills.library.services import RevisionDraft, skill_revision_propose
from skills.synthesis import llm, similar
from skills.synthesis import services as synthesis
from skills.synthesis.models import LlmUsage
from skills.versions.models import PolicyVersion, VersionStatus
from tests import factories
from tests.fakes.openai_server import Reply, judge_answer

# Every test, with the loopback LLM (``llm_server``) or without, retries without waiting.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_llm_retries")]


def answer(
    decision: str = "new_skill",
    slug: str = "iso-dates-for-order-search",
    instructions: str = (
        "Convert relative dates such as 'last week' to an ISO 8601 date (YYYY-MM-DD) "
        "before calling `search_orders`. Never pass the user's words as the `since` value."
    ),
    **overrides,
) -> str:
    body = {
        "diagnosis": "The agent passed a relative date where search_orders needs ISO 8601.",
        "decision": decision,
        "reason": "",
        "skill": {
            "slug": slug,
            "name": "ISO dates for order search",
            "description": "When calling search_orders with a date the user gave in words.",
            "instructions": instructions,
            "category": "common_mistakes",
            "examples": ["'last week' → since=2026-11-18"],
        },
    }
    if decision == "no_skill":
        body["skill"] = None
        body["reason"] = "The warehouse was down; no instruction can fix an outage."
    body.update(overrides)
    return json.dumps(body)


USAGE = {"prompt_tokens": 700, "completion_tokens": 120, "total_tokens": 820}


def ingest(api, key, django_capture_on_commit_callbacks, *payloads) -> IncidentGroup:
    """Ingest ``payloads`` (else one default incident) over the API, running what the commits
    enqueue (synthesis among it); the group of the last incident, as synthesis left it."""
    with django_capture_on_commit_callbacks(execute=True):
        for payload in payloads or [factories.incident_payload()]:
            response = api.post("/api/v1/incidents", payload, key=key)
            assert response.status_code in (200, 202), response.content
    return IncidentGroup.objects.get(pk=response.json()["group_id"])


def assert_failed_because(group: IncidentGroup, *reasons: str) -> None:
    """Synthesis of ``group`` failed, and its recorded error names every one of ``reasons``."""
    assert group.synthesis_status == SynthesisStatus.FAILED
    for reason in reasons:
        assert reason in group.synthesis_error


def test_an_incident_becomes_a_proposed_skill_written_by_the_llm(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(content=answer(), usage=USAGE))

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert group.synthesis_status == SynthesisStatus.PROPOSED
    assert group.incidents.get().status == IncidentStatus.PROPOSED
    revision = SkillRevision.objects.get()
    assert revision.skill.slug == "iso-dates-for-order-search"
    assert revision.status == RevisionStatus.PROPOSED
    assert revision.origin == Origin.LIVE_LLM
    assert revision.author == "llm"
    assert revision.llm_model == "loopback-model"
    assert revision.prompt_version == synthesis.PROMPT_VERSION
    assert (revision.tokens_in, revision.tokens_out) == (700, 120)
    assert revision.diagnosis.startswith("The agent passed a relative date")
    assert list(revision.source_groups.all()) == [group]
    assert revision.source_incidents.count() == 1
    assert revision.embedding and len(revision.embedding) > 0
    # The project's day counts the writer's call and the judge's (the loopback judge reports
    # 10 tokens in and a token a word out).
    judged = judge_answer()
    usage = LlmUsage.objects.get(project=project, day=timezone.localdate())
    assert (usage.calls, usage.tokens_in, usage.tokens_out) == (
        1 + 1,
        700 + 10,
        120 + len(judged.split()),
    )
    # The request asked for structured output and carried the evidence.
    (request,) = llm_server.chat_requests()
    assert request.body["response_format"]["type"] == "json_schema"
    prompt = request.body["messages"][1]["content"]
    assert "search_orders" in prompt and "It failed" in prompt


def test_secrets_and_personal_data_are_redacted_before_the_prompt_leaves(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(content=answer()))
    payload = factories.incident_payload(
        messages=[
            {"role": "user", "content": "I'm jane.doe@example.com, card 4242 4242 4242 4242"}
        ],
        metadata={"api_key": "abc-secret-value", "note": "token=sk-live-51H8abcdefghijklmnop"},
    )

    ingest(api, ingest_key, django_capture_on_commit_callbacks, payload)

    prompt = json.dumps(llm_server.chat_requests()[0].body)
    assert "jane.doe@example.com" not in prompt
    assert "4242 4242 4242 4242" not in prompt
    assert "abc-secret-value" not in prompt and "sk-live-51H8" not in prompt
    assert "[REDACTED:email]" in prompt
    kinds = {r["kind"] for r in SkillRevision.objects.get().redactions}
    assert {"email", "card_number", "secret_field"} <= kinds


def test_malformed_json_is_retried_once_with_the_error_then_proposed(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(
        Reply(content="Sure! Here is {not json at all", usage=USAGE),
        Reply(content=answer(), usage=USAGE),
    )

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert group.synthesis_status == "proposed"
    first, second = llm_server.chat_requests()
    assert "invalid" in second.body["messages"][-1]["content"]
    revision = SkillRevision.objects.get()
    assert (revision.tokens_in, revision.tokens_out) == (1400, 240)
    # The writer's two calls and the judge's.
    assert LlmUsage.objects.get(project=project).calls == 2 + 1


def test_an_answer_invalid_twice_fails_the_group_with_the_reason(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    bad = answer(slug="Not A Slug!")
    llm_server.enqueue(Reply(content=bad), Reply(content=bad))

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert_failed_because(group, "invalid twice", "slug")
    assert group.incidents.get().status == IncidentStatus.FAILED
    assert not SkillRevision.objects.exists()
    assert len(llm_server.chat_requests()) == 2
    assert "skill.slug" in llm_server.chat_requests()[1].body["messages"][-1]["content"]


def test_an_unknown_category_or_empty_instructions_is_sent_back_for_correction(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    wrong = json.loads(answer())
    wrong["skill"]["category"] = "astrology"
    wrong["skill"]["instructions"] = "   "
    llm_server.enqueue(Reply(content=json.dumps(wrong)), Reply(content=answer()))

    ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert SkillRevision.objects.get().category == "common_mistakes"
    assert "skill.instructions" in llm_server.chat_requests()[1].body["messages"][-1]["content"]


def test_an_endpoint_without_structured_output_is_read_by_the_tolerant_parser(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(
        Reply(status=400, body={"error": {"message": "response_format json_schema unsupported"}}),
        Reply(content="Here you go:\n```json\n" + answer() + "\n```\nHope it helps."),
    )

    ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert SkillRevision.objects.get().skill.slug == "iso-dates-for-order-search"
    first, second = llm_server.chat_requests()
    assert "response_format" in first.body and "response_format" not in second.body


def test_a_rate_limit_is_retried_after_the_servers_retry_after(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(
        Reply(status=429, headers={"Retry-After": "0"}),
        Reply(status=503),
        Reply(content=answer()),
    )

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert group.synthesis_status == "proposed"
    assert len(llm_server.chat_requests()) == 3


@pytest.mark.parametrize(
    ("status", "reason", "attempts", "requests"),
    [
        pytest.param(
            500,
            "server error (500)",
            synthesis.MAX_ATTEMPTS,
            synthesis.MAX_ATTEMPTS * llm.MAX_ATTEMPTS,
            id="server-errors-that-never-stop-are-retried",
        ),
        pytest.param(401, "refused the request (401)", 1, 1, id="a-refusal-is-not-retried"),
    ],
)
def test_an_llm_that_keeps_answering_an_error_fails_the_group_with_the_reason(
    api,
    project,
    ingest_key,
    llm_server,
    django_capture_on_commit_callbacks,
    status,
    reason,
    attempts,
    requests,
):
    llm_server.default = Reply(status=status)

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert_failed_because(group, reason)
    assert group.synthesis_attempts == attempts
    assert len(llm_server.chat_requests()) == requests
    assert not SkillRevision.objects.exists()


def test_a_slow_answer_past_the_timeout_fails_the_group_as_a_timeout(
    api, project, ingest_key, llm_server, settings, monkeypatch, django_capture_on_commit_callbacks
):
    settings.LLM = {**settings.LLM, "TIMEOUT_SECONDS": 0.3}
    monkeypatch.setattr(llm, "MAX_ATTEMPTS", 1)
    monkeypatch.setattr(synthesis, "MAX_ATTEMPTS", 2)
    llm_server.default = Reply(content=answer(), delay=1.0)

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert_failed_because(group, "timed out")
    assert len(llm_server.chat_requests()) == 2


def test_more_incidents_in_a_group_with_a_pending_proposal_make_no_more_llm_calls(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(content=answer()))
    payloads = [factories.incident_payload(f"more-{i}") for i in range(5)]

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks, *payloads)

    assert group.event_count == 5
    assert group.synthesis_status == SynthesisStatus.PROPOSED
    assert len(llm_server.chat_requests()) == 1
    assert SkillRevision.objects.count() == 1


def test_a_second_worker_cannot_synthesise_a_group_already_claimed(project, llm_server):
    group = _waiting_group(project)
    assert synthesis.incident_services.group_synthesis_claim(group_id=group.pk)

    assert synthesis.group_synthesize(group_id=group.pk) is None
    assert llm_server.chat_requests() == []


def test_no_skill_answers_record_the_reason_on_the_group(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(content=answer("no_skill")))

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert group.synthesis_status == SynthesisStatus.NO_SKILL
    assert "warehouse was down" in group.synthesis_error
    assert group.incidents.get().status == IncidentStatus.NO_SKILL
    assert not SkillRevision.objects.exists()


def test_without_an_llm_the_group_needs_a_skill_with_a_draft_from_its_evidence(
    api, project, ingest_key, settings, django_capture_on_commit_callbacks
):
    settings.LLM = {"BASE_URL": "", "API_KEY": "", "MODEL": "", "TIMEOUT_SECONDS": 1}
    payload = factories.incident_payload(
        feedback={"text": "Mail me at bob@example.org", "score": 1}
    )

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks, payload)

    assert group.synthesis_status == SynthesisStatus.NEEDS_SKILL
    draft = SkillRevision.objects.get()
    assert draft.origin == Origin.EVIDENCE_DRAFT
    assert draft.status == RevisionStatus.PROPOSED
    assert "search_orders" in draft.instructions and "TODO" in draft.instructions
    assert "bob@example.org" not in draft.instructions
    assert "[REDACTED:email]" in draft.instructions
    assert list(draft.source_groups.all()) == [group]
    # Where its evidence came from, stored with the draft as with an LLM's proposal.
    assert draft.provenance["incidents"] == 1 and draft.provenance["single_source"] is True
    assert not LlmUsage.objects.exists()


def test_a_spent_daily_budget_holds_the_group_until_the_sweep_finds_budget_again(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    project.llm_daily_token_budget = 1000
    project.save(update_fields=["llm_daily_token_budget"])
    LlmUsage.objects.create(
        project=project, day=timezone.localdate(), calls=3, tokens_in=900, tokens_out=100
    )

    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert group.synthesis_status == SynthesisStatus.BUDGET
    assert llm_server.chat_requests() == []

    # The next day: yesterday's usage no longer counts.
    LlmUsage.objects.update(day=timezone.localdate() - timezone.timedelta(days=1))
    llm_server.enqueue(Reply(content=answer()))
    from skills.synthesis.tasks import sweep_waiting_groups

    with django_capture_on_commit_callbacks(execute=True):
        sweep_waiting_groups()

    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.PROPOSED
    assert len(llm_server.chat_requests()) == 1


def test_a_new_skill_too_close_to_an_existing_one_becomes_its_revision(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    existing = _approved(
        project,
        slug="iso-dates",
        name="ISO dates for order search",
        description="When calling search_orders with a date the user gave in words.",
        instructions="Convert relative dates such as 'last week' to an ISO 8601 date "
        "(YYYY-MM-DD) before calling `search_orders`.",
    )
    llm_server.enqueue(Reply(content=answer(slug="relative-dates-to-iso")))

    ingest(api, ingest_key, django_capture_on_commit_callbacks)

    proposal = SkillRevision.objects.get(status=RevisionStatus.PROPOSED)
    assert proposal.skill_id == existing.skill_id
    assert proposal.parent_id == existing.pk
    assert proposal.number == 2
    assert "relative-dates-to-iso" in proposal.diagnosis
    # The existing skill was shown to the LLM as similar.
    assert "`iso-dates`" in llm_server.chat_requests()[0].body["messages"][1]["content"]


def test_revise_skill_naming_an_unknown_slug_is_sent_back(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(
        Reply(content=answer("revise_skill", slug="no-such-skill")), Reply(content=answer())
    )

    ingest(api, ingest_key, django_capture_on_commit_callbacks)

    assert SkillRevision.objects.get().skill.slug == "iso-dates-for-order-search"
    assert "not an existing skill" in llm_server.chat_requests()[1].body["messages"][-1]["content"]


def test_a_rolled_back_text_is_not_proposed_again_unchanged(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    from skills.versions.services import policy_version_rollback

    first = _approved(
        project,
        slug="iso-dates-for-order-search",
        name="Dates",
        description="When dates.",
        instructions="Use ISO dates.",
    )
    first_version = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    bad_text = "Always pass dates exactly as the user wrote them."
    _approved(
        project,
        slug="iso-dates-for-order-search",
        name="Dates",
        description="When dates.",
        instructions=bad_text,
    )
    policy_version_rollback(
        to_version=first_version, actor=None, actor_label="test", reason="made it worse"
    )
    assert SkillRevision.objects.filter(rolled_back_at__isnull=False).count() == 1
    llm_server.enqueue(
        Reply(content=answer("revise_skill", instructions=bad_text)),
        Reply(content=answer("revise_skill")),
    )

    ingest(api, ingest_key, django_capture_on_commit_callbacks)

    proposal = SkillRevision.objects.get(status=RevisionStatus.PROPOSED)
    assert "ISO 8601" in proposal.instructions
    assert proposal.skill_id == first.skill_id
    assert (
        "do not propose again unchanged"
        in (llm_server.chat_requests()[0].body["messages"][1]["content"])
    )
    assert "rolled back" in llm_server.chat_requests()[1].body["messages"][-1]["content"]


def test_groups_with_the_same_problem_in_other_words_are_linked(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.default = Reply(content=answer())
    first = factories.incident_payload(
        "w-1",
        error={"type": "ToolArgumentError", "message": "search_orders: invalid value for since"},
    )
    second = factories.incident_payload(
        "w-2",
        agent={"name": "support-bot-eu", "version": "1"},
        error={"type": "ToolArgumentError", "message": "search_orders: since value is invalid"},
    )
    unrelated = factories.incident_payload(
        "w-3",
        kind="timeout",
        error={"type": "QueryTimeout", "message": "warehouse slow"},
        messages=[],
    )

    ingest(api, ingest_key, django_capture_on_commit_callbacks, first, second, unrelated)

    g1, g2, g3 = IncidentGroup.objects.order_by("id")
    assert g2 in g1.related_groups.all()
    assert g1 in g2.related_groups.all()
    assert g3 not in g1.related_groups.all()


def test_an_incident_despite_an_active_skill_regresses_the_group_and_asks_for_a_revision(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(content=answer()))
    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)
    revision = SkillRevision.objects.get()
    from skills.versions.services import skill_revision_approve

    with django_capture_on_commit_callbacks(execute=True):
        skill_revision_approve(revision=revision, actor=None, actor_label="test")
    active = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    llm_server.enqueue(
        Reply(
            content=answer(
                "revise_skill",
                instructions="Convert relative dates to ISO 8601 before calling search_orders; "
                "if the user gives no date, ask for one instead of guessing.",
            )
        )
    )

    ingest(
        api,
        ingest_key,
        django_capture_on_commit_callbacks,
        factories.incident_payload("again", policy_version=active.number),
    )

    group.refresh_from_db()
    assert group.status == GroupStatus.REGRESSED
    assert group.synthesis_status == SynthesisStatus.PROPOSED
    prompt = llm_server.chat_requests()[1].body["messages"][1]["content"]
    assert "is in the active policy" in prompt and "while the skill was active" in prompt
    new = SkillRevision.objects.get(status=RevisionStatus.PROPOSED)
    assert new.skill_id == revision.skill_id and new.parent_id == revision.pk
    assert "ask for one" in new.instructions
    assert AuditEvent.objects.filter(action="incident_group.regressed").exists()

    # A third incident while that revision is pending is just more evidence.
    ingest(
        api,
        ingest_key,
        django_capture_on_commit_callbacks,
        factories.incident_payload("third", policy_version=active.number),
    )
    assert len(llm_server.chat_requests()) == 2


def test_retry_puts_a_failed_group_back_in_the_queue(
    api, project, ingest_key, admin_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(status=401))
    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)
    assert group.synthesis_status == "failed"
    llm_server.enqueue(Reply(content=answer()))

    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"/api/v1/groups/{group.pk}/retry-synthesis", {}, key=admin_key)

    assert response.status_code == 202, response.content
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.PROPOSED
    assert group.synthesis_error == ""
    assert AuditEvent.objects.filter(action="incident_group.synthesis_retry").count() == 1


def test_retry_refuses_a_group_that_is_not_failed_and_changes_nothing(
    api, project, admin_key, other_project
):
    group = _waiting_group(project)

    response = api.post(f"/api/v1/groups/{group.pk}/retry-synthesis", {}, key=admin_key)
    assert response.status_code == 409
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.WAITING

    elsewhere = _waiting_group(other_project)
    response = api.post(f"/api/v1/groups/{elsewhere.pk}/retry-synthesis", {}, key=admin_key)
    assert response.status_code == 404


def test_retry_needs_an_admin_key(api, project, ingest_key):
    group = _waiting_group(project)
    response = api.post(f"/api/v1/groups/{group.pk}/retry-synthesis", {}, key=ingest_key)
    assert response.status_code == 403


def test_retry_service_refuses_a_viewer(project):
    group = _waiting_group(project)
    IncidentGroup.objects.filter(pk=group.pk).update(synthesis_status=SynthesisStatus.FAILED)
    viewer = factories.make_member(project, role="viewer")

    with pytest.raises(PermissionDenied):
        synthesis.group_synthesis_retry(group=group, actor=viewer)
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.FAILED


# --- helpers ---------------------------------------------------------------------------------


def _waiting_group(project) -> IncidentGroup:
    from incidents.ingest import incidents_ingest
    from incidents.schemas import IncidentIn

    (result,) = incidents_ingest(
        project=project, items=[IncidentIn.model_validate(factories.incident_payload())]
    )
    return IncidentGroup.objects.get(pk=result.group_id)


def _approved(project, **content) -> SkillRevision:
    from skills.versions.services import skill_revision_approve

    draft = RevisionDraft(
        origin=Origin.HUMAN, author="human", category="common_mistakes", **content
    )
    revision = skill_revision_propose(project=project, draft=draft)
    return skill_revision_approve(revision=revision, actor=None, actor_label="test")


# --- The group page ------------------------------------------------------------------------------


def test_the_group_page_shows_the_proposal_its_diagnosis_and_the_redactions(
    client, api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(content=answer(), usage=USAGE))
    payload = factories.incident_payload(
        messages=[{"role": "user", "content": "I'm jane.doe@example.com"}]
    )
    group = ingest(api, ingest_key, django_capture_on_commit_callbacks, payload)
    client.force_login(factories.make_member(project, role="viewer"))

    page = client.get(f"/p/{project.slug}/groups/{group.pk}/")

    assert page.status_code == 200
    html = page.content.decode()
    assert "iso-dates-for-order-search" in html
    assert "The agent passed a relative date" in html
    assert 'class="redacted">email</span> ×1' in html
    assert "Written by the configured LLM" in html
    assert "Retry synthesis" not in html


def test_a_reviewer_retries_a_failed_group_from_its_page(
    client, api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(status=401))
    group = ingest(api, ingest_key, django_capture_on_commit_callbacks)
    url = f"/p/{project.slug}/groups/{group.pk}/"
    client.force_login(factories.make_member(project, role="reviewer"))
    html = client.get(url).content.decode()
    assert "Synthesis failed" in html and "Retry synthesis" in html
    llm_server.enqueue(Reply(content=answer()))

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url + "retry-synthesis/")

    assert response.status_code == 302 and response["Location"] == url
    group.refresh_from_db()
    assert group.synthesis_status == "proposed"


def test_a_viewer_cannot_retry_a_failed_group(client, project):
    group = _waiting_group(project)
    IncidentGroup.objects.filter(pk=group.pk).update(synthesis_status=SynthesisStatus.FAILED)
    client.force_login(factories.make_member(project, role="viewer"))

    response = client.post(f"/p/{project.slug}/groups/{group.pk}/retry-synthesis/")

    assert response.status_code == 403
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.FAILED


def test_demo_proposals_are_labelled_as_fixtures_and_load_once(project, settings):
    from skills.demo import demo_incidents_load, demo_proposals_load

    settings.LLM = {"BASE_URL": "", "API_KEY": "", "MODEL": "", "TIMEOUT_SECONDS": 1}
    demo_incidents_load(project=project)

    assert demo_proposals_load(project=project) == 5
    assert demo_proposals_load(project=project) == 5

    revisions = SkillRevision.objects.filter(skill__project=project)
    assert revisions.count() == 5
    assert set(revisions.values_list("origin", flat=True)) == {Origin.DEMO_FIXTURE}
    assert all("not by a live LLM" in r.diagnosis for r in revisions)
    assert IncidentGroup.objects.filter(project=project, synthesis_status="proposed").count() == 5


def test_the_sweep_takes_back_a_group_whose_worker_died_mid_synthesis(
    project, llm_server, django_capture_on_commit_callbacks
):
    group = _waiting_group(project)
    assert synthesis.incident_services.group_synthesis_claim(group_id=group.pk)  # then it died
    two_hours_ago = timezone.now() - timezone.timedelta(hours=2)
    IncidentGroup.objects.filter(pk=group.pk).update(
        synthesis_requested_at=two_hours_ago, synthesis_claimed_at=two_hours_ago
    )
    llm_server.enqueue(Reply(content=answer()))
    from skills.synthesis.tasks import sweep_waiting_groups

    with django_capture_on_commit_callbacks(execute=True):
        sweep_waiting_groups()

    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.PROPOSED
    assert SkillRevision.objects.filter(source_groups=group).count() == 1


def test_a_running_synthesis_is_left_alone_by_the_sweep(project, llm_server):
    group = _waiting_group(project)
    assert synthesis.incident_services.group_synthesis_claim(group_id=group.pk)
    from skills.synthesis.tasks import sweep_waiting_groups

    sweep_waiting_groups()

    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.RUNNING
    assert llm_server.chat_requests() == []


def test_demo_proposals_join_a_draft_a_worker_made_first_and_say_what_they_are(
    project, settings, django_capture_on_commit_callbacks
):
    from skills.demo import demo_incidents_load, demo_proposals_load

    settings.LLM = {"BASE_URL": "", "API_KEY": "", "MODEL": "", "TIMEOUT_SECONDS": 1}
    with django_capture_on_commit_callbacks(execute=True):  # the worker drafts every group
        demo_incidents_load(project=project)
    assert SkillRevision.objects.filter(origin=Origin.EVIDENCE_DRAFT).count() == 5

    assert demo_proposals_load(project=project) == 5

    for group in IncidentGroup.objects.filter(project=project):
        origins = sorted(group.skill_revisions.values_list("origin", flat=True))
        assert origins == [Origin.DEMO_FIXTURE, Origin.EVIDENCE_DRAFT]


def test_a_group_that_waited_long_before_its_claim_is_not_taken_from_its_worker(
    project, llm_server
):
    group = _waiting_group(project)
    # Requested two hours ago (the broker was down), claimed just now by a live worker.
    IncidentGroup.objects.filter(pk=group.pk).update(
        synthesis_requested_at=timezone.now() - timezone.timedelta(hours=2)
    )
    before = timezone.now()
    assert synthesis.incident_services.group_synthesis_claim(group_id=group.pk)
    group.refresh_from_db()
    assert group.synthesis_claimed_at is not None and group.synthesis_claimed_at >= before
    from skills.synthesis.tasks import sweep_waiting_groups

    sweep_waiting_groups()

    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.RUNNING
    assert llm_server.chat_requests() == []


def test_a_running_group_claimed_before_the_stamp_existed_is_released_by_its_request_time(
    project,
):
    group = _waiting_group(project)
    assert synthesis.incident_services.group_synthesis_claim(group_id=group.pk)
    IncidentGroup.objects.filter(pk=group.pk).update(
        synthesis_requested_at=timezone.now() - timezone.timedelta(hours=2),
        synthesis_claimed_at=None,
    )

    assert synthesis.groups_stale_running_release(older_than_seconds=600) == 1

    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.WAITING


def _release_during_propose(monkeypatch, group):
    """A sweep puts the group back to WAITING while the worker synthesises (after its claim,
    before it writes the proposal)."""
    real = similar.similar_skills

    def racing(*args, **kwargs):
        IncidentGroup.objects.filter(pk=group.pk).update(synthesis_status=SynthesisStatus.WAITING)
        return real(*args, **kwargs)

    monkeypatch.setattr(similar, "similar_skills", racing)


def test_a_proposal_is_rolled_back_when_the_group_was_released_meanwhile(
    project, llm_server, monkeypatch
):
    group = _waiting_group(project)
    llm_server.enqueue(Reply(content=answer(), usage=USAGE))
    _release_during_propose(monkeypatch, group)

    assert synthesis.group_synthesize(group_id=group.pk) is None

    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.WAITING  # for the worker that claims it
    assert not SkillRevision.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="skill_revision").exists()


def test_an_evidence_draft_is_rolled_back_when_the_group_was_released_meanwhile(
    project, settings, monkeypatch
):
    settings.LLM = {"BASE_URL": "", "API_KEY": "", "MODEL": "", "TIMEOUT_SECONDS": 1}
    group = _waiting_group(project)
    _release_during_propose(monkeypatch, group)

    assert synthesis.group_synthesize(group_id=group.pk) is None

    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.WAITING
    assert not SkillRevision.objects.exists()


def test_each_skill_stands_once_for_ranking_by_its_newest_approved_or_proposed_revision(project):
    from skills.versions.services import skill_revision_reject

    content = {"description": "When dates fail.", "instructions": "Send ISO 8601 dates."}
    first = _approved(project, slug="iso-dates", name="ISO dates", **content)
    edited = skill_revision_propose(
        project=project,
        draft=RevisionDraft(
            slug="iso-dates", name="ISO dates", origin=Origin.HUMAN, parent=first, **content
        ),
    )
    rejected = skill_revision_propose(
        project=project,
        draft=RevisionDraft(
            slug="iso-dates", name="ISO dates, again", origin=Origin.HUMAN, parent=edited, **content
        ),
    )
    skill_revision_reject(revision=rejected, actor=None, reason="worse", actor_label="test")
    other = _approved(project, slug="retry-later", name="Retry later", **content)

    standing = similar.latest_revisions(project)

    assert sorted((s.slug, s.revision_id) for s in standing) == [
        ("iso-dates", edited.pk),
        ("retry-later", other.pk),
    ]
