"""What the slow loop trains on. Which policy versions' data may train the current one (support
/query separation: data gathered under another skill set, or under a rolled-back version, is left
out), and the dataset snapshot a run freezes when it starts: trajectories and failed incidents,
cleaned (duplicates and near duplicates dropped, secrets and personal data redacted, over-long
samples cut), split into train and held-out sets, with a report of what was dropped and why.

Imports the training policy, ``incidents`` (reads), ``skills`` (versions, the embedder) and
``base``.
"""
