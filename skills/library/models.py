"""Skills (a stable identity) and their revisions (immutable content)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from base.model_fields import person_field
from base.models import Project
from incidents.models import Incident, IncidentGroup


class Category(models.TextChoices):
    """The categories of the published MetaClaw's SKILL.md files."""

    GENERAL = "general", "General"
    CODING = "coding", "Coding"
    RESEARCH = "research", "Research"
    DATA_ANALYSIS = "data_analysis", "Data analysis"
    SECURITY = "security", "Security"
    COMMUNICATION = "communication", "Communication"
    AUTOMATION = "automation", "Automation"
    AGENTIC = "agentic", "Agentic"
    PRODUCTIVITY = "productivity", "Productivity"
    COMMON_MISTAKES = "common_mistakes", "Common mistakes"


class Skill(models.Model):
    """The stable identity of a skill; its content lives in revisions."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="skills")
    slug = models.SlugField(max_length=64)
    category = models.CharField(max_length=32, choices=Category.choices, default=Category.GENERAL)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "slug"], name="skill_unique_slug"),
        ]
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class RevisionStatus(models.TextChoices):
    PROPOSED = "proposed", "Proposed"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    SUPERSEDED = "superseded", "Superseded"


class Author(models.TextChoices):
    LLM = "llm", "LLM"
    HUMAN = "human", "Human"


class Origin(models.TextChoices):
    """Where the text truly came from (the demo labels fixtures as such)."""

    LIVE_LLM = "live_llm", "Written by the configured LLM"
    HUMAN = "human", "Written by a person"
    IMPORT = "import", "Imported from SKILL.md"
    DEMO_FIXTURE = "demo_fixture", "Demo fixture (not written by a live LLM)"
    EVIDENCE_DRAFT = "evidence_draft", "Draft built from evidence (no LLM configured)"


class SkillRevision(models.Model):
    """Immutable content of a skill. Editing makes a new revision; only the status fields
    (through services) ever change after creation."""

    skill = models.ForeignKey(Skill, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    name = models.CharField(max_length=120)
    # The Agent Skills specification allows 1,024 characters (skill libraries in the wild use
    # them); what the fast loop writes is shorter (``skills.library.services.LIMITS``).
    description = models.CharField(max_length=1024, help_text="When to use it, in one sentence.")
    instructions = models.TextField(help_text="Markdown.")
    # The SKILL.md as it was imported (kept by the revisions made from this one): exported
    # unchanged while the content above still says what it says, so a library goes out byte for
    # byte as it came in (folded descriptions, nested ``metadata``, keys MetaClaw does not use).
    skill_md = models.TextField(blank=True, default="")
    examples = models.JSONField(default=list, blank=True)
    category = models.CharField(max_length=32, choices=Category.choices, default=Category.GENERAL)
    author = models.CharField(max_length=8, choices=Author.choices)
    origin = models.CharField(max_length=16, choices=Origin.choices)
    created_by = person_field()
    source_groups = models.ManyToManyField(
        IncidentGroup, blank=True, related_name="skill_revisions"
    )
    source_incidents = models.ManyToManyField(Incident, blank=True, related_name="skill_revisions")
    diagnosis = models.TextField(blank=True, default="")
    # Redactions applied to the evidence before it left the process: [{"kind": "email", "count": 2}]
    redactions = models.JSONField(default=list, blank=True)
    # Where the evidence came from, counted when it was proposed: distinct sessions, end users,
    # agents, API keys and sources (``incidents.selectors.groups_provenance``). {} = not counted.
    provenance = models.JSONField(default=dict, blank=True)
    llm_model = models.CharField(max_length=200, blank=True, default="")
    prompt_version = models.CharField(max_length=32, blank=True, default="")
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    embedding = models.JSONField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=RevisionStatus.choices, default=RevisionStatus.PROPOSED
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    # With ``require_second_approver``: the first approval, kept until the second arrives. The
    # labels name any actor (a person, an API key, a Slack user); the user fields only people.
    first_approved_by = person_field()
    first_approved_by_label = models.CharField(max_length=200, blank=True, default="")
    first_approved_at = models.DateTimeField(null=True, blank=True)
    # Who approved, rejected or superseded it (with ``status_changed_at``: when).
    decided_by = person_field()
    decided_by_label = models.CharField(max_length=200, blank=True, default="")
    decision_reason = models.TextField(blank=True, default="")
    # Set when a policy version containing this revision was rolled back: the fast loop must not
    # propose the same text again unchanged.
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    # Effectiveness on live traffic (``skills.effectiveness``): the figures last measured, and
    # when and why the periodic check sent the live revision back to the review queue.
    effectiveness = models.JSONField(null=True, blank=True)
    effectiveness_flagged_at = models.DateTimeField(null=True, blank=True)
    effectiveness_flag_reason = models.TextField(blank=True, default="")
    # The risk check's findings on this text (``skills.library.risk``): [{"kind", "severity",
    # "field", "start", "end", "text", "message"}]; one of severity "flag" flags the revision.
    risk_findings = models.JSONField(default=list, blank=True)
    risk_checked_at = models.DateTimeField(null=True, blank=True)
    # The LLM judge's part of the risk check (``skills.library.judge``, run by ``skills.judge``
    # off the request path): its state, its verdict ({"criteria", "reason", "model", tokens} or
    # {"error"}), and when the state last changed. Its fails are in ``risk_findings`` too.
    judge_status = models.CharField(max_length=16, blank=True, default="")
    judge_verdict = models.JSONField(default=dict, blank=True)
    judge_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["skill", "number"], name="revision_unique_number"),
        ]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="revision_status_recent"),
            # The judge's sweep: the few revisions waiting for it.
            models.Index(
                fields=["judge_at"],
                name="revision_judge_waiting",
                condition=models.Q(judge_status__in=["pending", "running"]),
            ),
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.skill.slug} r{self.number}"

    @property
    def risk_flagged(self) -> bool:
        from skills.library.risk import is_flagged

        return is_flagged(self.risk_findings)

    def risk_highlights(self) -> list[dict]:
        """The fields with findings, cut into ``(piece, finding)`` pieces for the review page."""
        from skills.library.risk import FIELDS, highlighted

        findings = self.risk_findings or []
        return [
            {"field": name, "pieces": highlighted(getattr(self, name), findings, name)}
            for name in FIELDS
            if any(f.get("field") == name for f in findings)
        ]

    def judge_summary(self) -> dict:
        """The LLM judge's state, rubric and verdict in words, for the review page and the API."""
        from skills.library.judge import judge_summary

        return judge_summary(self.judge_status, self.judge_verdict)

    def provenance_now(self) -> dict:
        """The provenance stored with the proposal (counted now when it predates the count;
        {} without source groups), and ``abusive``: the marks on its sources as of now. Shared
        by the review page, the API and the chat approvals."""
        from incidents.provenance import abusive_sources_in_groups, groups_provenance

        # A query of the ids, not a list: each read below is one query.
        group_ids = self.source_groups.values("pk")
        provenance = dict(self.provenance or groups_provenance(group_ids))
        if not provenance.get("incidents"):
            return {}
        marks = abusive_sources_in_groups(self.skill.project_id, group_ids)
        provenance["abusive"] = [
            {"kind": m.kind, "value": m.value, "reason": m.reason} for m in marks
        ]
        return provenance


class SkillFile(models.Model):
    """A file bundled with a skill beside its SKILL.md (``scripts/``, ``references/``,
    ``assets/``...), kept as bytes. Each revision holds its own rows: a new revision copies its
    parent's files unless it brings its own, so every revision exports the folder it was."""

    revision = models.ForeignKey(SkillRevision, on_delete=models.CASCADE, related_name="files")
    # Relative to the skill's folder, "/"-separated, e.g. "scripts/extract.py".
    path = models.CharField(max_length=255)
    content = models.BinaryField()
    size = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64)
    executable = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["revision", "path"], name="skill_file_unique_path"),
        ]
        ordering = ["path"]

    def __str__(self) -> str:
        return self.path
