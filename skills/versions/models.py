"""Policy versions (what agents run with: a set of revisions and an optional adapter) and the
releases that record each promotion and rollback."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from base.model_fields import person_field
from base.models import Project
from skills.library.models import SkillRevision


class VersionStatus(models.TextChoices):
    CANDIDATE = "candidate", "Candidate"
    ACTIVE = "active", "Active"
    RETIRED = "retired", "Retired"
    REJECTED = "rejected", "Rejected"


class PolicyVersion(models.Model):
    """What an agent runs with: a set of skill revisions and optionally a LoRA adapter.

    Immutable once created, except ``status`` (through services). Exactly one active version per
    project (the partial unique constraint; project creation makes version 1)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="policy_versions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    revisions = models.ManyToManyField(SkillRevision, blank=True, related_name="policy_versions")
    adapter_ref = models.CharField(max_length=500, blank=True, default="")
    base_model = models.CharField(max_length=200, blank=True, default="")
    changelog = models.TextField(blank=True, default="")
    created_by = person_field()
    status = models.CharField(
        max_length=16, choices=VersionStatus.choices, default=VersionStatus.CANDIDATE
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    # Set when a rollback moved away from this version: its data is kept out of training.
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="version_unique_number"),
            models.UniqueConstraint(
                fields=["project"],
                condition=models.Q(status="active"),
                name="version_one_active",
            ),
        ]
        ordering = ["-number"]

    def __str__(self) -> str:
        return f"v{self.number}"


class ReleaseKind(models.TextChoices):
    INITIAL = "initial", "Initial"
    APPROVAL = "approval", "Skill approval"
    PROMOTION = "promotion", "Promotion"
    ROLLBACK = "rollback", "Rollback"


class Release(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="releases")
    kind = models.CharField(max_length=16, choices=ReleaseKind.choices)
    from_version = models.ForeignKey(
        PolicyVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    to_version = models.ForeignKey(PolicyVersion, on_delete=models.PROTECT, related_name="releases")
    actor = person_field()
    actor_label = models.CharField(max_length=200, blank=True, default="")
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.from_version} → {self.to_version}"
