"""The project's Celery app, in the form Celery's Django guide gives, plus ``configure_app``."""

import os

from celery import Celery

from metrix_s2s.workers import configure_app

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproj.settings")

app = Celery("djangoproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
configure_app(app)
