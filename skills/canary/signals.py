"""``canary_changed(project_id)``: a canary started or ended (sent after commit). The runtime
forgets what it serves the project's sessions (``skills.runtime.policy``)."""

from django.dispatch import Signal

canary_changed = Signal()
