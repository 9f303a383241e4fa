from django.apps import AppConfig


class BaseConfig(AppConfig):
    name = "base"
    # The app's models were first defined in the project package, under this label: keeping it
    # keeps their tables (metaclaw_site_project, ...), migrations and content types exactly as
    # every existing database has them, so moving the code needed no data migration.
    label = "metaclaw_site"
    verbose_name = "MetaClaw"

    def ready(self) -> None:
        from django.core import checks

        from base.redis_cluster import check_the_setting_matches_the_server

        checks.register(check_the_setting_matches_the_server, checks.Tags.caches)
