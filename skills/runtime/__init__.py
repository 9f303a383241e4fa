"""What agents run with, served: the active policy (skills and adapter) with an ETag, cached
per process and invalidated across processes through Redis; retrieval of the skills relevant
to a request within a token budget; the OpenAI-compatible proxy that injects them, forwards to
the project's upstream and records each turn as a trajectory; session feedback.

This is the agents' hot path: it never imports the synthesis or training (an import-linter
contract), so a request never pays for the LLM SDK's or PyTorch's import. It reads the library
and versions' models, and writes trajectories and incidents only through incidents' services.
"""
