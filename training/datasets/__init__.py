"""What the slow loop trains on. Which policy versions' data may train the current one
(``generations``: a rule per kind of sample; corrected answers and successful turns are targets
kept across skill generations, rewards count only under the skill set that earned them, and a
rolled-back version's data is left out), and the dataset snapshot a run freezes when it starts:
trajectories and failed incidents, cleaned (duplicates and near duplicates dropped, secrets and
personal data redacted, over-long samples cut), split into train and held-out sets, with a report
of what each rule kept and dropped, and why.

Imports the training policy, ``incidents`` (reads), ``skills`` (versions, the embedder) and
``base``.
"""
