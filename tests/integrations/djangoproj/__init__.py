"""A minimal Django project (a shop) whose own Celery app runs metrix-s2s."""

# Load the Celery app whenever Django starts, so that send_metrix_event publishes through it.
from .celery import app as celery_app

__all__ = ("celery_app",)
