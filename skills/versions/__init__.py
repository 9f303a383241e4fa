"""Reviews and versions: every decision that changes what agents run with, and what a reviewer
sees to make it. Policy versions (immutable, numbered, a set of revisions and an optional
adapter) and their releases; approving, rejecting and editing a proposed revision (approval
publishes a new version at once); candidates from the slow loop or composed by an admin;
promotion, rejection and one-click rollback; diffs; the review queue, proposal, versions,
compose and library pages and API.

Imports the library, ``incidents`` and ``base``. Synthesis, approvals, the runtime, SKILL.md and
``training`` build on it.
"""
