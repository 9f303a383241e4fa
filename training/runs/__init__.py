"""Training runs, from the decision to train to a candidate policy version: readiness (enough new
data, within the day's budget), every state transition of a run (queued → preparing → training ⇄
paused → evaluating → succeeded | failed | cancelled), the worker's side of a run on a backend
(paused when the idle window closes and resumed in the next), evaluation on held-out data and the
candidate version it offers through the versions' services; the beat task's decision; the slow
loop's pages and API.

The top of ``training``: it imports the datasets, the policy, the backends, ``skills``,
``incidents`` and ``base``.
"""
