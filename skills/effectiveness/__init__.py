"""Does a skill work? Effectiveness on live traffic.

For a skill revision, a policy version or an incident group: the incidents of the groups it was
made for per 1,000 turns in a window before and after it went live (its first release), the
ratio of the two rates with a 95 % interval (``stats``), a verdict (improved, no change, worse,
too thin) and the same comparison for every other group (a skill whose activation coincides with
a rise elsewhere is harmful). ``services`` measures and flags, ``tasks`` runs the periodic check,
``api`` and ``views`` show the figures and a small chart (``charts``)."""
