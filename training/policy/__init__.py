"""The training policy of a project: when it may train (weekly windows in its time zone, an
iCalendar feed, quiet traffic counted in Redis, or both), whether it starts runs on its own, and
with which backend, objective, model and budgets; and whether it is idle right now. Admins
change it on the settings page or through the API (``api``: ``/api/v1/training/settings``), both
through ``services.idle_policy_update``.

The bottom of ``training`` above the backends: it imports ``base`` only.
"""
