"""Who may do what: the one place where services check a role.

An actor is either a person (a ``User``) or a machine. A machine reaches a service as
``actor=None``, and only after its entry point checked it: an API key's scope, an approval
link's signature and addressee, a Celery task acting for the system. Services check nothing
more for it. A person must hold at least the required role in the project (superusers act as
admins of every project); roles rank viewer < reviewer < admin.
"""

from __future__ import annotations

from typing import Any

from base.errors import PermissionDenied
from base.models import ApiKey, Project
from base.selectors import membership_for


def has_role(user: Any, project: Project, role: str) -> bool:
    """Whether this person holds at least ``role`` in ``project`` (False for anyone else)."""
    membership = membership_for(user=user, project=project)
    return membership is not None and membership.has_role(role)


def require_role(actor: Any, project: Project, role: str, *, message: str = "") -> None:
    """Refuse (PermissionDenied) a person without ``role``; a machine actor (None) passes."""
    if actor is None:
        return
    if not has_role(actor, project, role):
        raise PermissionDenied(message or f"This needs the {role} role in {project.name}.")


def actor_user(actor: Any) -> Any:
    """The person behind an actor, or None for a machine."""
    return actor if getattr(actor, "is_authenticated", False) else None


def actor_label(actor: Any, label: str = "") -> str:
    """How the audit log names the actor: ``label`` when the entry point gave one (an API key,
    a Slack user), else the person's username, else "system"."""
    if label:
        return label
    user = actor_user(actor)
    return user.get_username() if user is not None else "system"


def api_key_label(api_key: ApiKey) -> str:
    """How the audit log names an API key."""
    return f"api-key:{api_key.prefix}"


def person_id(actor: Any, api_key: ApiKey | None = None) -> int | None:
    """The person a decision counts as, for rules about people (the two-person rule): the
    person acting, or, for a decision made with an API key, the key's owner (``ApiKey.owner``:
    whoever made it in the dashboard). None when no person can be named: a key made by a
    command, a task, a deleted account."""
    user = actor_user(actor)
    if user is not None:
        return user.pk
    return api_key.owner_id if api_key is not None else None
