"""The LLM judge of every skill text (issue 22): when an LLM is configured, each proposed,
edited or imported revision is read once, off the request path, against a stated rubric
(``skills.library.judge``), with the evidence it was written from wrapped as untrusted data; a
fail on "safe" or "grounded" becomes a risk finding like the rules'. ``services`` asks and
stores, ``tasks`` runs it on the fast queue, ``receivers`` hear of new revisions."""
