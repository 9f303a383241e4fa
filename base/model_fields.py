"""A field that every app's models declare alike, made in one place so it keeps one meaning.

The function returns a new field, so a model declares it where its other fields are (the field
order stays as written) and migrations see an ordinary field."""

from __future__ import annotations

from django.conf import settings
from django.db import models


def person_field() -> models.ForeignKey:
    """The person who did something to a row (made it, decided it, marked it): optional, since a
    machine may act, and kept as NULL when the account is deleted; no reverse accessor on the
    user. A ``*_label`` field beside it names whoever acted when it was no person."""
    return models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
