"""Canary releases: a candidate version served to a share of the sessions (hashed, stable per
session), incident rates of canary and control compared while it runs, promotion by a person,
automatic rollback when the canary is worse by a set margin with enough evidence."""
