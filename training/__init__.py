"""The slow loop: while a project's agents are idle, fine-tune a LoRA adapter on the turns they
recorded and offer it as a candidate policy version.

``policy`` (when and how a project trains) ← ``datasets`` (what it trains on) ← ``runs`` (the
runs, their pages, API and tasks); ``backends`` (Tinker, local PyTorch + PEFT, and the local
adapter server) take plain data in and give plain data back. The top app: it may import
``skills``, ``incidents`` and ``base``; nothing imports it but the project package.
"""
