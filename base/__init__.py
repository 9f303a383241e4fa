"""The base layer: tenancy (projects, members and their roles, API keys), the append-only audit
log, and the small pieces of infrastructure every app shares (API-key admission and rate
limits, redaction, JSON cleaning, the ASGI fast lane, the API's error shapes).

It imports no other MetaClaw app; every app may import it.
"""
