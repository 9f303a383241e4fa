"""How the incidents app tells the rest of the system what happened, without importing it.

- ``incidents_ingested``: sent inside the ingesting transaction, with the ids of the groups
  that received new incidents. Receivers may write in that transaction (the skills app uses it
  to detect regressions of approved skills).
- ``groups_await_synthesis``: sent after commit, with the ids of the groups that now wait for
  the fast loop. A receiver that fails (broker down) loses nothing: the groups stay WAITING in
  the database and the periodic sweep enqueues them again.
"""

from django.dispatch import Signal

incidents_ingested = Signal()  # sender=Project, group_ids=list[int], incident_ids=list[str]
groups_await_synthesis = Signal()  # sender=None, group_ids=list[int]
