"""How the incidents app tells the rest of the system what happened, without importing it.

- ``incidents_ingested``: sent inside the ingesting transaction, with the ids of the groups
  that received new incidents. Receivers may write in that transaction (the skills app uses it
  to detect regressions of approved skills).
- ``groups_await_synthesis``: sent after commit, with the ids of the groups that now wait for
  the fast loop. A receiver that fails (broker down) loses nothing: the groups stay WAITING in
  the database and the periodic sweep enqueues them again.
- ``groups_merged``: sent inside the merging transaction, with the group that stays and the
  groups merged into it. Receivers move what they keep about the merged groups (the skills app:
  the proposals made for them follow the group).
"""

from django.dispatch import Signal

incidents_ingested = Signal()  # sender=Project, group_ids=list[int], incident_ids=list[str]
groups_await_synthesis = Signal()  # sender=None, group_ids=list[int]
groups_merged = Signal()  # sender=Project, target_id=int, source_ids=list[int]
