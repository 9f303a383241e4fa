"""What the skills app announces. Sent after commit unless noted.

- ``revision_proposed(revision)``: a new proposed revision awaits review (notifications).
- ``revisions_imported(project_id, revision_ids, actor_label)``: a SKILL.md import proposed
  these revisions; they are announced together (one digest), not one ``revision_proposed`` each.
- ``revision_decided(revision, outcome, actor_label)``: approved / rejected / superseded.
- ``revision_judged(revision, flagged)``: the LLM judge stored its verdict (``skills.judge``);
  ``flagged``: it failed the revision on "safe" or "grounded".
- ``version_candidate_created(version)``: a candidate policy version awaits promotion.
- ``active_version_changed(project_id, version_id)``: promotion, approval or rollback made
  another version active (runtime caches invalidate on it).
"""

from django.dispatch import Signal

revision_proposed = Signal()
revisions_imported = Signal()
revision_decided = Signal()
revision_judged = Signal()
version_candidate_created = Signal()
active_version_changed = Signal()
# Sent inside ``policy_version_promote``'s transaction, under the project lock, before the
# candidate becomes active (``project``, ``version``): a receiver refuses the promotion by
# raising ``base.errors.Conflict`` (the replay gate, ``skills.gate.receivers``).
version_promoting = Signal()
