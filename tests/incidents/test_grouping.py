"""Grouping by failure mode on realistic airline failures (tests/fixtures/airline): the
fingerprint that ignores incidental tools, the fast loop's similarity merge, merge and split by
people (dashboard and API, audited), and related groups that never link opposites."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from base.models import AuditEvent
from base.services import api_key_cache_clear
from incidents.models import Incident, IncidentGroup, SynthesisStatus
from skills.synthesis import services as synthesis
from tests import factories

pytestmark = pytest.mark.django_db

CORPUS = Path(__file__).parents[1] / "fixtures" / "airline" / "failures.jsonl"


def corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


def of_mode(mode: str) -> list[dict]:
    return [row["incident"] for row in corpus() if row["mode"] == mode]


def post(api, key, *items: dict) -> list[dict]:
    response = api.post("/api/v1/incidents/batch", {"items": list(items)}, key=key)
    assert response.status_code in (200, 207), response.content
    results = response.json()["results"]
    assert all(r["status"] in (200, 201, 202) for r in results), results
    return results


def renamed(item: dict, client_id: str, **changes) -> dict:
    item = copy.deepcopy(item)
    item["id"] = client_id
    item.update(changes)
    return item


def with_trailing_call(item: dict, tool: str) -> dict:
    item = copy.deepcopy(item)
    messages = item["messages"]
    final = messages.pop()
    call = {"id": "call_extra", "type": "function", "function": {"name": tool, "arguments": "{}"}}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_extra", "name": tool, "content": "ok"},
        final,
    ]
    return item


def test_a_hand_off_or_a_calculator_at_the_end_does_not_split_a_failure_mode(
    api, project, ingest_key
):
    first = of_mode("cancel_not_allowed")[0]
    items = [renamed(first, "plain")] + [
        renamed(with_trailing_call(first, tool), f"then-{tool}")
        for tool in ("transfer_to_human_agents", "calculate", "think")
    ]
    results = post(api, ingest_key, *items)
    assert len({r["group_id"] for r in results}) == 1
    group = IncidentGroup.objects.get()
    assert group.tool_name == "cancel_reservation"
    assert group.event_count == 4
    assert group.fingerprint_version == 2


def test_volatile_ids_amounts_and_codes_do_not_split_a_failure_mode(api, project, ingest_key):
    # Same wording, different reservation ids, flight numbers, amounts and dates: one group.
    records = [
        r for r in of_mode("fare_difference_not_collected") if r["error"].startswith("Changed")
    ]
    assert len(records) >= 2
    assert len({r["error"] for r in records}) == len(records)  # the values differ
    post(api, ingest_key, *records)
    assert IncidentGroup.objects.count() == 1


def _synthesize_all() -> dict[int, str | None]:
    outcomes = {}
    for group_id in IncidentGroup.objects.order_by("pk").values_list("pk", flat=True):
        outcomes[group_id] = synthesis.group_synthesize(group_id=group_id)
    return outcomes


def test_the_fast_loop_merges_a_new_wording_into_the_group_of_its_mode(api, project, ingest_key):
    records = of_mode(
        "flight_unavailable"
    )  # "... failed: flight X not available on D" / "Error: ..."
    wordings = {r["error"]["message"].split(" ")[0]: r for r in records}
    assert len(wordings) == 2
    post(api, ingest_key, *wordings.values())
    older, newer = IncidentGroup.objects.order_by("pk")
    outcomes = _synthesize_all()
    assert outcomes[newer.pk] == synthesis.MERGED
    newer.refresh_from_db()
    older.refresh_from_db()
    assert newer.merged_into_id == older.pk
    assert older.event_count == 2 and newer.event_count == 0
    assert set(Incident.objects.values_list("group_id", flat=True)) == {older.pk}
    entry = AuditEvent.objects.get(action="incident_group.merged")
    assert entry.object_id == str(older.pk)
    assert entry.actor_label == "fast loop: similarity merge"
    assert "similarity" in entry.message and "decisive tool (update_reservation_flights)" in (
        entry.message
    )
    # The list and the API show one group; the merged one answers as an alias.
    listed = api.get("/api/v1/groups", key=factories.make_key(project, ["admin"])).json()
    assert [g["id"] for g in listed["items"]] == [older.pk]
    # The next incident with the merged wording goes to the group it joined.
    again = renamed(list(wordings.values())[1], "late-arrival")
    (result,) = post(api, ingest_key, again)
    assert result["group_id"] == older.pk
    older.refresh_from_db()
    assert older.event_count == 3


def test_opposite_failures_are_neither_merged_nor_related(api, project, ingest_key):
    wrongly = of_mode("cancel_not_allowed")[:2]
    refused = of_mode("cancel_refused_wrongly")[:2]
    post(api, ingest_key, *wrongly, *refused)
    _synthesize_all()
    roots = IncidentGroup.objects.filter(merged_into__isnull=True)
    for group in roots:
        modes = {
            "cancel_not_allowed" if i.tool_name == "cancel_reservation" else "refused"
            for i in group.incidents.all()
        }
        assert len(modes) == 1, f"group {group.pk} mixes opposite failures"
        related_tools = {other.tool_name for other in group.related_groups.all()}
        assert related_tools <= {group.tool_name}


def test_related_groups_are_shown_with_why(client, api, project, ingest_key):
    from incidents import services

    client.force_login(factories.make_member(project, "reviewer"))
    post(api, ingest_key, *of_mode("payment_id_unknown"))  # two wordings: two groups
    a, b = IncidentGroup.objects.order_by("pk")
    services.groups_relate(group_id=a.pk, related_ids=[b.pk])
    html = client.get(f"/p/{project.slug}/groups/{a.pk}/").content.decode()
    why = html.split("Why related:")[1].split("</li>")[0]
    assert "same kind (tool error)" in why
    assert "same decisive tool (book_reservation)" in why
    assert "shared words: " in why and "payment" in why


@pytest.fixture
def two_groups(api, project, ingest_key):
    post(api, ingest_key, *of_mode("free_bags_charged")[:2], *of_mode("bags_removed")[:2])
    groups = list(IncidentGroup.objects.order_by("pk"))
    assert len(groups) >= 2
    return groups


def test_a_reviewer_merges_and_splits_groups_on_the_dashboard(client, project, two_groups):
    target, source = two_groups[0], two_groups[-1]
    moved = set(source.incidents.values_list("pk", flat=True))
    reviewer = factories.make_member(project, "reviewer")
    client.force_login(reviewer)
    page = f"/p/{project.slug}/groups/{target.pk}/"
    assert "Merge groups into this one" in client.get(page).content.decode()

    response = client.post(page + "merge/", {"group_ids": f"#{source.pk}"})
    assert response.status_code == 302
    source.refresh_from_db()
    target.refresh_from_db()
    assert source.merged_into_id == target.pk
    assert set(target.incidents.values_list("pk", flat=True)) >= moved
    entry = AuditEvent.objects.get(action="incident_group.merged")
    assert entry.actor_id == reviewer.pk
    # The merged group's page now leads to the group it joined.
    assert client.get(f"/p/{project.slug}/groups/{source.pk}/")["Location"] == page
    html = client.get(page).content.decode()
    assert f"was group {source.pk}" in html and "Split off" in html

    response = client.post(page + "split/", {"fingerprint": source.fingerprint})
    assert response.status_code == 302
    source.refresh_from_db()
    target.refresh_from_db()
    assert source.merged_into_id is None
    assert set(source.incidents.values_list("pk", flat=True)) == moved
    assert source.event_count == len(moved)
    assert target.event_count == target.incidents.count()
    assert source.synthesis_status == SynthesisStatus.WAITING
    assert AuditEvent.objects.filter(action="incident_group.split").count() == 1


def test_a_viewer_cannot_merge(client, project, two_groups):
    client.force_login(factories.make_member(project, "viewer"))
    target, source = two_groups[0], two_groups[-1]
    response = client.post(f"/p/{project.slug}/groups/{target.pk}/merge/", {"group_ids": source.pk})
    assert response.status_code == 403
    source.refresh_from_db()
    assert source.merged_into_id is None


def test_merge_form_errors_are_shown_and_change_nothing(client, project, two_groups, other_project):
    client.force_login(factories.make_member(project, "reviewer"))
    target = two_groups[0]
    page = f"/p/{project.slug}/groups/{target.pk}/"
    for bad, message in [
        ("twelve", "Give the numbers of the groups"),
        (str(target.pk), "Name at least one other group"),
        ("999999", "does not exist in this project"),
    ]:
        response = client.post(page + "merge/", {"group_ids": bad}, follow=True)
        assert message in response.content.decode()
    assert IncidentGroup.objects.filter(merged_into__isnull=False).count() == 0
    assert not AuditEvent.objects.filter(action="incident_group.merged").exists()


def test_proposals_follow_a_merged_group(project, two_groups):
    from incidents import services

    target, source = two_groups[0], two_groups[-1]
    revision = factories.make_revision(project)
    revision.source_groups.add(source)
    services.groups_merge(project=project, target_id=target.pk, source_ids=[source.pk], actor=None)
    assert set(target.skill_revisions.all()) == {revision}


def test_the_merge_threshold_is_the_projects_own(api, project, ingest_key):
    project.group_merge_threshold = 0.99  # only near-identical wordings join
    project.save(update_fields=["group_merge_threshold"])
    post(api, ingest_key, *of_mode("flight_unavailable"))
    outcomes = _synthesize_all()
    assert synthesis.MERGED not in outcomes.values()
    assert IncidentGroup.objects.filter(merged_into__isnull=False).count() == 0


def test_a_projects_own_incidental_tools_do_not_decide_its_groups(api, project, ingest_key):
    first = of_mode("cancel_not_allowed")[0]
    post(api, ingest_key, renamed(with_trailing_call(first, "notify_slack"), "before"))
    project.incidental_tools = "notify_*\n"
    project.save(update_fields=["incidental_tools"])
    api_key_cache_clear()  # ingest workers see a project's settings within the key cache's TTL
    post(api, ingest_key, renamed(first, "plain"))
    post(api, ingest_key, renamed(with_trailing_call(first, "notify_slack"), "after"))
    by_client = dict(Incident.objects.values_list("client_id", "group_id"))
    assert by_client["after"] == by_client["plain"] != by_client["before"]
    assert Incident.objects.get(client_id="after").tool_name == "cancel_reservation"


def test_groups_are_merged_and_split_through_the_api(api, project, admin_key, two_groups):
    target, source = two_groups[0], two_groups[-1]
    moved = source.event_count
    url = f"/api/v1/groups/{target.pk}"

    response = api.post(f"{url}/merge", {"group_ids": [source.pk]}, key=admin_key)
    assert response.status_code == 200, response.content
    assert response.json()["event_count"] == target.event_count + moved
    assert api.get(f"/api/v1/groups/{source.pk}", key=admin_key).json()["merged_into_id"] == (
        target.pk
    )
    fingerprints = api.get(f"{url}/fingerprints", key=admin_key).json()
    assert [(f["own"], f["merged_group_id"]) for f in fingerprints] == [
        (True, None),
        (False, source.pk),
    ]
    entry = AuditEvent.objects.get(action="incident_group.merged")
    assert entry.actor_label.startswith("api-key:")

    response = api.post(f"{url}/split", {"fingerprints": [source.fingerprint]}, key=admin_key)
    assert response.status_code == 200, response.content
    (part,) = response.json()
    assert part["id"] == source.pk and part["event_count"] == moved
    assert part["merged_into_id"] is None


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("merge", {"group_ids": []}, "group_ids"),
        ("merge", {"group_ids": ["x"]}, "group_ids"),
        ("merge", {"group_ids": [999999]}, "group_ids"),
        ("split", {"fingerprints": []}, "fingerprints"),
        ("split", {"fingerprints": ["0" * 40]}, "fingerprints"),
    ],
)
def test_bad_merges_and_splits_are_refused_naming_the_field(
    api, project, admin_key, two_groups, path, body, field
):
    target = two_groups[0]
    before = list(IncidentGroup.objects.values_list("pk", "event_count", "merged_into_id"))
    response = api.post(f"/api/v1/groups/{target.pk}/{path}", body, key=admin_key)
    assert 400 <= response.status_code < 500
    assert field in json.dumps(response.json())
    assert list(IncidentGroup.objects.values_list("pk", "event_count", "merged_into_id")) == before


def test_merging_needs_the_admin_scope_and_stays_in_its_project(
    api, project, ingest_key, two_groups, other_project
):
    target, source = two_groups[0], two_groups[-1]
    response = api.post(
        f"/api/v1/groups/{target.pk}/merge", {"group_ids": [source.pk]}, key=ingest_key
    )
    assert response.status_code == 403
    other_key = factories.make_key(other_project, ["admin"])
    response = api.post(
        f"/api/v1/groups/{target.pk}/merge", {"group_ids": [source.pk]}, key=other_key
    )
    assert response.status_code == 404
    assert not IncidentGroup.objects.filter(merged_into__isnull=False).exists()
