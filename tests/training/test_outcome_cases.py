"""A held-out incident is judged by the target its reporter gave: the check in its
``metadata["check"]`` or its expected outcome, not by equality with its corrected answer. The
dataset names an incident by its id's text while the database hands back a UUID; looking one up
with the other lost every incident's check and expected outcome, so a correct answer worded
otherwise than the corrected one failed."""

from __future__ import annotations

import pytest

from tests import factories
from tests.fakes.tinker_server import FakeTinkerServer
from training.runs import execute as runs_execute
from training.runs.models import RunStatus, TrainingRun
from training.runs.outcomes import passes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("training_dir")]

RULE = r"TCK-\d{4}"
EXPECTED = "Refund issued"
BASE_ANSWER = "Please check the documentation."
# What the fake sampler answers, before and after training: it quotes a ticket and says the
# refund was issued, in other words than any corrected answer.
CORRECT_OTHERWISE = "Refund issued, see TCK-4242"


@pytest.fixture
def tinker():
    with FakeTinkerServer(sample_text=CORRECT_OTHERWISE) as server:
        yield server


def _report(api, key, client_id: str, session: str, question: str, **fields) -> None:
    payload = factories.incident_payload(
        client_id,
        kind="wrong_answer",
        error={"type": "WrongAnswer", "message": f"wrong answer to {question}"},
        messages=[
            {"role": "user", "content": question},
            {"role": "assistant", "content": BASE_ANSWER},
        ],
        session_id=session,
        **fields,
    )
    response = api.post("/api/v1/incidents", payload, key=key)
    assert response.status_code == 202, response.content


def report_incidents_with_targets(api, key, sessions: int) -> None:
    """Each session holds one incident with a regex check and one with an expected outcome, so
    the held-out side (whole sessions) always holds both kinds."""
    for n in range(sessions):
        _report(
            api,
            key,
            f"check-{n}",
            f"session-{n}",
            f"My refund for order {1000 + n} never came, can you open a ticket?",
            metadata={
                "corrected_answer": f"I opened ticket TCK-{1000 + n} so billing refunds order.",
                "check": {"regex": RULE},
            },
        )
        _report(
            api,
            key,
            f"expected-{n}",
            f"session-{n}",
            f"Where is the money for my returned parcel {2000 + n}?",
            metadata={"corrected_answer": f"Billing sent your money back for parcel {2000 + n}."},
            expected_outcome=EXPECTED,
        )


@pytest.mark.timeout(120)
def test_held_out_incidents_are_judged_by_their_check_and_expected_outcome(
    api, project, admin_key, tinker, no_enqueue
):
    factories.tinker_policy(project, tinker, eval_fraction=0.5)
    report_incidents_with_targets(api, admin_key, 6)
    response = api.post("/api/v1/training/runs", {}, key=admin_key)
    assert response.status_code in (200, 201, 202), response.content
    run_id = response.json()["id"]

    runs_execute.training_run_execute(run_id=run_id)

    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == RunStatus.SUCCEEDED, run.log + run.error
    # The answers, worded otherwise than the corrected ones yet right, passed, as the API says.
    got = api.get(f"/api/v1/training/runs/{run_id}", key=admin_key).json()
    before, after = got["outcomes"]["before"], got["outcomes"]["after"]
    assert before["n"] == after["n"] == run.dataset.eval_count > 0
    assert before["passed"] == after["passed"] == before["n"]
    assert run.outcomes["judged_by"] == "outcomes"
    assert run.sample_answers and all(
        s["passed_before"] and s["passed_after"] for s in run.sample_answers
    )
    # Because every held-out incident is judged by its reporter's target, not by equality with
    # its corrected answer.
    cases = runs_execute.outcome_cases(run.dataset)
    assert len(cases) == run.dataset.eval_count > 0
    checked = [c for c in cases if c.check]
    expected = [c for c in cases if c.expected]
    assert checked and expected and len(checked) + len(expected) == len(cases)
    assert all(c.check == {"regex": RULE} and not c.expected for c in checked)
    assert all(c.expected == EXPECTED and not c.check for c in expected)
    answer = f"{CORRECT_OTHERWISE} [steps=0]"  # the fake sampler's answer, untrained
    for case in cases:
        assert not passes(case, BASE_ANSWER)
        assert answer != case.reference and passes(case, answer)
