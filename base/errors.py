"""The errors every service raises when a business rule refuses an action. Each entry point turns
them into its own answer (a JSON 4xx in the API's one shape, a form error or a message on a page,
a refused approval link) from the ``code`` and the ``field``."""

from __future__ import annotations


class DomainError(Exception):
    """A business rule refused the action. ``code`` is stable; the message is for people."""

    code = "refused"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code
        self.field = field


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    """The object is not in a state that allows this action (someone else acted first...)."""

    code = "conflict"


class PermissionDenied(DomainError):
    code = "forbidden"
