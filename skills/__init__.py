"""Skills and the policies agents run with: the fast loop's output and the human decisions on it.

``library`` (skills, revisions) ← ``versions`` (reviews, decisions, policy versions) ←
``synthesis`` (the fast loop), ``approvals`` (links, notifications, Slack), ``runtime`` (policy
serving, retrieval, the proxy) and ``skillmd`` (SKILL.md import/export), which do not import one
another. It may import ``incidents`` and ``base``; ``training`` builds on it.
"""
