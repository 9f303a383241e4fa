"""Demo data for the slow loop: a few hundred support-desk turns with rewards, across sessions,
including duplicates, near duplicates, secrets and corrected answers, so the cleaning report
has something to show. Loaded through the same ingestion service agents use. And the demo's
training settings: "Train now" trains the shipped SmolLM2-135M on this machine's CPU for a
few steps, with no search."""

from __future__ import annotations

import random
from datetime import timedelta

from django.utils import timezone

from base.models import Project
from incidents.ingest import trajectories_ingest
from incidents.schemas import TrajectoryIn
from skills.versions.models import PolicyVersion, VersionStatus
from training.policy.models import IdleWindowPolicy
from training.policy.services import idle_policy_update

SYSTEM = "You are Clawdesk, the support assistant of Acme Cloud. Answer briefly, in steps."

TOPICS: list[tuple[list[str], str]] = [
    (
        [
            "How do I reset my password?",
            "I forgot my password, what now?",
            "Can't log in, how can I reset the password?",
        ],
        "Sure. 1) Open the login page and click 'Forgot password'. 2) Enter your account email. "
        "3) Follow the link we send within 10 minutes.",
    ),
    (
        [
            "Where can I download my invoices?",
            "I need last month's invoice as PDF.",
            "How do I get a copy of an invoice?",
        ],
        "Sure. 1) Go to Settings > Billing. 2) Open 'Invoices'. 3) Click the PDF icon next to "
        "the month you need.",
    ),
    (
        [
            "Why am I getting HTTP 429 from the API?",
            "The API keeps answering 429 Too Many Requests.",
            "What does a 429 error mean for my integration?",
        ],
        "Sure. 1) 429 means you hit the rate limit of your plan. 2) Read the Retry-After header "
        "and wait that long. 3) Batch requests or ask us to raise the limit.",
    ),
    (
        [
            "How do I turn on two-factor authentication?",
            "Where do I enable 2FA?",
            "Can I protect my account with an authenticator app?",
        ],
        "Sure. 1) Open Settings > Security. 2) Click 'Enable two-factor'. 3) Scan the QR code "
        "with your authenticator app and enter the 6-digit code.",
    ),
    (
        [
            "How do I set up a webhook?",
            "I want Acme to call my server when a job finishes.",
            "Where do I configure webhooks?",
        ],
        "Sure. 1) Go to Settings > Webhooks. 2) Add your HTTPS URL and pick the events. "
        "3) Verify the X-Acme-Signature header with your signing secret.",
    ),
    (
        [
            "How can I export all my data?",
            "I need a full export of my workspace.",
            "Is there a way to download everything we stored?",
        ],
        "Sure. 1) Open Settings > Data. 2) Click 'Request export'. 3) We email a download link "
        "when the archive is ready, usually within an hour.",
    ),
    (
        [
            "How do I get a refund for a double charge?",
            "I was billed twice this month.",
            "Can you refund a duplicate payment?",
        ],
        "Sure. 1) Open Settings > Billing > Payments. 2) Select the duplicate charge and click "
        "'Report a problem'. 3) Refunds reach your card in 5-10 business days.",
    ),
    (
        [
            "How do I invite a teammate?",
            "Can I add my colleague to the workspace?",
            "Where do I add new users?",
        ],
        "Sure. 1) Open Settings > Members. 2) Click 'Invite' and enter their email. "
        "3) Pick a role; they get an invitation link valid for 7 days.",
    ),
]

BAD_ANSWERS = [
    "I am not sure, please contact support.",
    "That is not possible.",
    "Please check the documentation.",
]

SECRETS = [
    "my key is sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
    "my email is jane.doe@example.com",
    "password: Hunter2Hunter2",
    "token=ghp_abcdefghijklmnopqrstuvwxyz0123456789",
]


def _active_version(project: Project) -> int:
    version = PolicyVersion.objects.filter(project=project, status=VersionStatus.ACTIVE).first()
    return version.number if version else 1


def demo_trajectories(project: Project, *, count: int = 320, seed: int = 7) -> list[TrajectoryIn]:
    """The demo turns as ingestion payloads (deterministic for a seed)."""
    rng = random.Random(seed)
    version = _active_version(project)
    now = timezone.now()
    items: list[TrajectoryIn] = []
    sessions = max(1, count // 5)
    for n in range(count):
        session = n % sessions
        questions, good = TOPICS[rng.randrange(len(TOPICS))]
        question = rng.choice(questions)
        roll = rng.random()
        corrected = ""
        if roll < 0.62:
            answer, reward, outcome = good, 1.0, "success"
        elif roll < 0.80:
            answer, reward, outcome = rng.choice(BAD_ANSWERS), -1.0, "failure"
        elif roll < 0.88:
            answer, reward, outcome = rng.choice(BAD_ANSWERS), -1.0, "failure"
            corrected = good
        elif roll < 0.94:
            # A near duplicate: the same exchange with a little noise.
            question = question.rstrip("?") + " please?"
            answer, reward, outcome = good, 1.0, "success"
        else:
            answer, reward, outcome = good, 0.0, "unknown"
        if rng.random() < 0.08:
            question = f"{question} ({rng.choice(SECRETS)})"
        items.append(
            TrajectoryIn(
                id=f"demo-trajectory-{n}",
                session_id=f"demo-session-{session}",
                agent={"name": "clawdesk", "version": "2.3"},
                policy_version=version,
                model="demo-model",
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
                reward=reward,
                outcome=outcome,
                corrected_answer=corrected,
                metadata={"demo": True},
                occurred_at=now - timedelta(minutes=count - n),
            )
        )
    # Exact duplicates: agents retry and report the same turn under a new id.
    for k in range(0, min(count, 40), 4):
        original = items[k]
        items.append(original.model_copy(update={"id": f"demo-trajectory-dup-{k}"}))
    return items


def demo_trajectories_load(project: Project, *, count: int = 320) -> int:
    """Ingest the demo turns; idempotent (client ids). Returns how many were new."""
    results = trajectories_ingest(project=project, items=demo_trajectories(project, count=count))
    return sum(1 for _, duplicate in results if not duplicate)


# Short enough to watch on a laptop's CPU (SmolLM2-135M: a few seconds a step at these sizes
# on two idle cores, far more on a busy machine), long enough for the loss curve to fall. No
# learning-rate search: pinned by hand. Automatic training off: in the demo a person presses
# "Train now" (and the beat does not spend the day's run before they do).
DEMO_TRAINING_SETTINGS = {
    "auto_train": False,
    "backend": "local",
    "base_model": "smollm2-135m",
    "objective": "sft",
    "search_budget_minutes": 0,
    "total_steps": 12,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "lora_rank": 8,
    "max_sample_tokens": 256,
}


def demo_training_policy_set(project: Project, **overrides: object) -> bool:
    """Save the demo's training settings (``DEMO_TRAINING_SETTINGS`` with ``overrides``) when the
    project has none yet; settings a person saved since are kept. True when it saved them."""
    if IdleWindowPolicy.objects.filter(project=project).exists():
        return False
    idle_policy_update(
        project=project, actor_label="demo", **{**DEMO_TRAINING_SETTINGS, **overrides}
    )
    return True
