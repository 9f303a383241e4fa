"""The skill library: skills (a stable identity: project, slug, category) and their immutable
revisions (name, when to use it, instructions, examples, sources, author), the one service that
proposes a revision, and the text embedder that retrieval and the fast loop share.

The bottom of ``skills``: it imports only ``incidents`` (the revisions' source incidents) and
``base``.
"""
