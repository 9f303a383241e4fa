from django.apps import AppConfig


class SkillsConfig(AppConfig):
    name = "skills"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects the fast loop to incidents' signals)
