"""Fields and constraints that the tables of agent traffic (incidents, trajectories, traffic
reports) declare alike, made in one place so each keeps one meaning.

Each function returns a new field or constraint, so a model declares it where its other fields
are (the field order stays as written) and migrations see an ordinary one."""

from __future__ import annotations

from django.db import models


def reporting_api_key_field() -> models.ForeignKey:
    """The API key that reported a row, which provenance counts by. The row keeps the key's id
    and nothing more: no constraint, no index and nothing done when the key is deleted, so an
    insert takes no lock on the key's row and removing a key touches no traffic table."""
    return models.ForeignKey(
        "metaclaw_site.ApiKey",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )


def optional_client_id_field() -> models.CharField:
    """The reporter's own id for a row, when it sends one (see ``unique_client_id``)."""
    return models.CharField(max_length=200, null=True, blank=True)


def unique_client_id(*, name: str) -> models.UniqueConstraint:
    """A row sent again with the same ``client_id`` (a retry) is stored once per project; rows
    without one are never deduplicated."""
    return models.UniqueConstraint(
        fields=["project", "client_id"],
        condition=models.Q(client_id__isnull=False),
        name=name,
    )
