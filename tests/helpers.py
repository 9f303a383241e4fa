"""Small helpers several test modules share (data builders live in ``tests/factories.py``)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from django.urls import reverse

from skills.approvals import links
from skills.approvals.models import ApprovalAction
from skills.library.models import RevisionStatus

ROOT = Path(__file__).resolve().parent.parent


def run_in_checkout(
    command: Sequence[str], environment: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the checkout's folder and capture its output as text."""
    return subprocess.run(
        list(command),
        cwd=ROOT,
        env=None if environment is None else dict(environment),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_line_of_success(
    command: Sequence[str], environment: Mapping[str, str] | None = None, timeout: float = 120
) -> str:
    """Run ``command`` as ``run_in_checkout`` does; it must exit 0 (its stderr's tail says why
    not). The last line it printed."""
    done = run_in_checkout(command, environment, timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def review_page(client, revision) -> str:
    """The review page of ``revision``, as the client's logged-in person sees it."""
    url = reverse(
        "skills:revision_detail",
        kwargs={"project_slug": revision.skill.project.slug, "revision_id": revision.pk},
    )
    return client.get(url).content.decode()


def chat_link_approval_refused(client, revision, addressee) -> str:
    """Approve ``revision`` through a chat link sent to ``addressee``: the link must answer 409
    and change nothing (the revision stays proposed, the link unused). The answer's text."""
    request, token = links.approval_request_create(
        action=ApprovalAction.APPROVE_REVISION, addressee=addressee, revision=revision
    )
    response = client.post(f"/a/{token}")
    assert response.status_code == 409
    revision.refresh_from_db()
    request.refresh_from_db()
    assert revision.status == RevisionStatus.PROPOSED and request.used_at is None
    return response.content.decode()
