from django.apps import AppConfig


class MetaclawSiteConfig(AppConfig):
    name = "metaclaw_site"
    verbose_name = "MetaClaw"
