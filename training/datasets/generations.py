"""Which data may train the current policy: the skill generation it was gathered under, and the
rule each kind of sample follows across generations.

Support/query separation (the published MetaClaw) concerns *rewards*: a reward judges the policy
that earned it, so data gathered under another skill set says nothing about the current one. A
*target* is different: a person's corrected answer, or an answer the user accepted, is the answer
to imitate whatever skills are live. So the fast loop approving a skill starts a new generation
for rewards and leaves targets alone; otherwise every approval would throw the slow loop's data
away exactly when the project is busy. Data from a rolled-back version is left out under both
rules: the version was withdrawn, and what it produced with it.

``dataset_build`` (per sample) and readiness (per query, ``new_sample_counts``) apply the same
rules; each rule's counts show in the dataset report and on the training page."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Q

from base.models import Project
from skills.versions.models import PolicyVersion, VersionStatus
from training.policy.models import Objective

# Why a sample gathered under another version is left out (keys of the report's "dropped").
STALE_GENERATION = "stale_generation"
ROLLED_BACK_VERSION = "rolled_back_version"


@dataclass(frozen=True)
class Generation:
    """The policy version that introduced the active skill set, and the version numbers whose
    trajectories count as gathered under it."""

    version: int | None
    allowed: frozenset[int]
    rolled_back: frozenset[int]
    accept_unversioned: bool


def policy_generation(project: Project) -> Generation:
    versions = list(
        PolicyVersion.objects.filter(project=project).values(
            "id", "number", "parent_id", "status", "rolled_back_at"
        )
    )
    links = PolicyVersion.revisions.through.objects.filter(
        policyversion__project=project
    ).values_list("policyversion_id", "skillrevision_id")
    revsets: dict[int, set[int]] = {v["id"]: set() for v in versions}
    for version_id, revision_id in links:
        revsets[version_id].add(revision_id)
    rolled_back = frozenset(v["number"] for v in versions if v["rolled_back_at"] is not None)
    active = next((v for v in versions if v["status"] == VersionStatus.ACTIVE), None)
    if active is None:
        return Generation(None, frozenset(), rolled_back, True)
    by_id = {v["id"]: v for v in versions}
    skills = revsets[active["id"]]
    first = active
    # Walk back while the skill set stays the same (adapter-only changes keep the generation).
    while first["parent_id"] in by_id and revsets[first["parent_id"]] == skills:
        first = by_id[first["parent_id"]]
    allowed = frozenset(
        v["number"]
        for v in versions
        if v["number"] >= first["number"]
        and revsets[v["id"]] == skills
        and v["rolled_back_at"] is None
    )
    # Before any skill change there is nothing a version number could separate.
    accept_unversioned = first["number"] == 1
    return Generation(first["number"], allowed, rolled_back, accept_unversioned)


def version_filter(generation: Generation) -> Q:
    """Rows gathered under the current skill generation (never a rolled-back version)."""
    q = Q(policy_version__in=generation.allowed)
    if generation.accept_unversioned:
        q |= Q(policy_version__isnull=True)
    return q


def stale_reason(version: int | None, generation: Generation) -> str:
    """Why data gathered under ``version`` is not of the current generation ("" if it is)."""
    if version is not None and version in generation.rolled_back:
        return ROLLED_BACK_VERSION
    if version is None and not generation.accept_unversioned:
        return STALE_GENERATION
    if version is not None and version not in generation.allowed:
        return STALE_GENERATION
    return ""


# --- The rule of each sample kind -----------------------------------------------------------


@dataclass(frozen=True)
class GenerationRule:
    name: str
    label: str
    description: str
    across_generations: bool


TARGET = GenerationRule(
    name="target",
    label="Targets",
    description=(
        "Corrected answers, and successful turns for SFT: the answer to imitate stays valid "
        "whatever skills are live, so they are kept across skill generations (not from a "
        "rolled-back version)."
    ),
    across_generations=True,
)
REWARD = GenerationRule(
    name="reward",
    label="Rewards",
    description=(
        "Rewarded turns and failures, for RL: a reward judges the policy that earned it, so "
        "only data gathered under the current skill generation is used (support/query "
        "separation)."
    ),
    across_generations=False,
)
RULES = (TARGET, REWARD)


def rule_for(kind: str, objective: str) -> GenerationRule:
    """The rule a sample of ``kind`` follows. A successful turn is a target for SFT; the RL
    objective learns from its reward, which belongs to the policy that earned it."""
    if kind == "corrected" or (kind == "sft" and objective != Objective.RL):
        return TARGET
    return REWARD


# The sample kinds each objective trains on (``DatasetSnapshot.samples[*]["kind"]``).
OBJECTIVE_KINDS = {
    Objective.SFT: ("corrected", "sft"),
    Objective.RL: ("corrected", "sft", "rl", "incident"),
}


def rule_kinds(rule: GenerationRule, objective: str) -> list[str]:
    kinds = OBJECTIVE_KINDS.get(objective, OBJECTIVE_KINDS[Objective.SFT])
    return [k for k in kinds if rule_for(k, objective) is rule]


def generation_verdict(
    version: int | None, generation: Generation, rule: GenerationRule
) -> tuple[str, bool]:
    """(why a sample of ``rule`` gathered under ``version`` is left out, or ""; whether it is
    kept although gathered under an older generation)."""
    reason = stale_reason(version, generation)
    if reason == STALE_GENERATION and rule.across_generations:
        return "", True
    return reason, False


# --- Readiness: the same rules as queries ---------------------------------------------------


def _positive() -> Q:
    return Q(reward__gt=0) | Q(outcome="success")


def trajectory_rule_filters(objective: str) -> dict[str, Q]:
    """Per rule, the trajectories of its kinds (the kinds ``dataset_build`` assigns)."""
    corrected = ~Q(corrected_answer="")
    success = Q(corrected_answer="") & _positive()
    if objective == Objective.RL:
        rewarded = Q(corrected_answer="") & ~_positive() & Q(reward__isnull=False)
        return {TARGET.name: corrected, REWARD.name: success | rewarded}
    return {TARGET.name: corrected | success}


def incident_rule_filters(objective: str) -> dict[str, Q]:
    """Per rule, the incidents of its kinds: corrected ones are targets; the RL objective also
    takes the others as negative rewards. Ignored incidents are the caller's to exclude."""
    corrected = Q(metadata__has_key="corrected_answer") & ~Q(metadata__corrected_answer="")
    if objective == Objective.RL:
        return {TARGET.name: corrected, REWARD.name: ~corrected}
    return {TARGET.name: corrected}


@dataclass(frozen=True)
class RuleCount:
    """Readiness of one rule: usable rows, how many of them are from older generations, and
    the rows left out (per reason)."""

    rule: GenerationRule
    usable: int
    older_generations: int
    left_out: dict[str, int]

    @property
    def summary(self) -> str:
        """One line for the training page and the status API ("" when the rule saw nothing)."""
        if not self.usable and not self.left_out:
            return ""
        line = f"{self.rule.label}: {self.usable} usable"
        if self.older_generations:
            line += (
                f", {self.older_generations} of them gathered before the latest skill change "
                "(kept: targets stay valid across generations)"
            )
        reasons = {
            STALE_GENERATION: "from an older skill generation",
            ROLLED_BACK_VERSION: "from a rolled-back version",
        }
        left = [f"{n} {reasons[reason]}" for reason, n in self.left_out.items()]
        if left:
            line += "; left out: " + ", ".join(left)
        return line + "."


def new_sample_counts(
    *,
    querysets: Iterable[tuple[Any, dict[str, Q]]],
    generation: Generation,
) -> list[RuleCount]:
    """Count, per rule, the rows of each ``(queryset, rule filters)`` pair that the generation
    rules admit or leave out: one aggregate query per queryset."""
    current = version_filter(generation)
    rolled = (
        Q(policy_version__in=sorted(generation.rolled_back))
        if generation.rolled_back
        else Q(pk__isnull=True)  # never true: nothing was rolled back
    )
    totals: dict[str, dict[str, int]] = {
        r.name: {"usable": 0, "older": 0, STALE_GENERATION: 0, ROLLED_BACK_VERSION: 0}
        for r in RULES
    }
    for queryset, filters in querysets:
        aggregates = {}
        for rule in RULES:
            if rule.name not in filters:
                continue
            of_rule = filters[rule.name]
            name = rule.name
            if rule.across_generations:
                aggregates[f"{name}__usable"] = Count("pk", filter=of_rule & ~rolled)
                aggregates[f"{name}__older"] = Count("pk", filter=of_rule & ~rolled & ~current)
            else:
                aggregates[f"{name}__usable"] = Count("pk", filter=of_rule & current)
                aggregates[f"{name}__{STALE_GENERATION}"] = Count(
                    "pk", filter=of_rule & ~current & ~rolled
                )
            aggregates[f"{name}__{ROLLED_BACK_VERSION}"] = Count("pk", filter=of_rule & rolled)
        if not aggregates:
            continue
        for key, value in queryset.aggregate(**aggregates).items():
            name, what = key.split("__", 1)
            totals[name][what] += value or 0
    return [
        RuleCount(
            rule=r,
            usable=totals[r.name]["usable"],
            older_generations=totals[r.name]["older"],
            left_out={
                reason: totals[r.name][reason]
                for reason in (STALE_GENERATION, ROLLED_BACK_VERSION)
                if totals[r.name][reason]
            },
        )
        for r in RULES
    ]
