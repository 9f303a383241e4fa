from django.apps import AppConfig


class ProjectPackageConfig(AppConfig):
    """The project package is an app only for its management commands (``seed_demo`` seeds
    every app, so it lives in the one package that may import them all). It has no models."""

    name = "metaclaw_site"
    label = "metaclaw_project"  # "metaclaw_site" is the base app's label (see base/apps.py)
    verbose_name = "MetaClaw project"
