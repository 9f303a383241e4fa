"""The fast loop: a group of incidents becomes a proposed skill revision within seconds.

A worker claims a waiting group, gathers its evidence (redacted, datamarked as untrusted data),
finds the approved skills most similar to it, asks the project's LLM for a structured answer
(a new skill, a revision of one, or no skill with a reason), validates that answer and stores it
as a proposed revision through the library's services; retries honour the LLM's Retry-After, a
daily budget holds groups back, and a sweep rescues groups whose message or worker was lost.
``llm`` is the one module that talks to an LLM (the ``openai`` SDK).

Imports the library and versions (``skills.library``, ``skills.versions``), ``incidents`` and
``base``; the runtime never imports it.
"""
