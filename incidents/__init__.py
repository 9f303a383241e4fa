"""What agents report: incidents (failures, grouped Sentry-style by a versioned fingerprint into
incident groups) and trajectories (ordinary turns with their outcome, the slow loop's material).

Ingestion (the API and its ASGI fast lane), grouping, the groups' pages and API, and the outbox
that tells the fast loop a group waits for a skill (a status plus a signal: this app knows
nothing of skills or training), and the incidents table partitioned by month when it grows
large (``partitions``). The only writer of its own tables. Imports ``base`` only.
"""
