"""The Django app of the outbox: label ``metrix_s2s``."""

from django.apps import AppConfig


class MetrixS2SConfig(AppConfig):
    name = "metrix_s2s.contrib.django"
    label = "metrix_s2s"
    verbose_name = "Metrix S2S"
    default_auto_field = "django.db.models.BigAutoField"
