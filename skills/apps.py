from django.apps import AppConfig


class SkillsConfig(AppConfig):
    name = "skills"

    def ready(self) -> None:
        # Connect each capability's receivers: the fast loop to incidents' signals, the
        # approvals to proposals and decisions, the runtime's caches to promotions.
        import skills.approvals.receivers  # noqa: F401
        import skills.gate.receivers  # noqa: F401
        import skills.judge.receivers  # noqa: F401
        import skills.runtime.receivers  # noqa: F401
        import skills.synthesis.receivers  # noqa: F401
