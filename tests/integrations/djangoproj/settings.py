"""Settings of the test project: the broker and the database come from the environment.

``DJANGOPROJ_BROKER_URL`` is deliberately not ``CELERY_BROKER_URL``: the broker reaches Celery and
metrix-s2s only through these settings, as in a project that keeps its configuration here.
"""

import os

SECRET_KEY = "metrix-s2s-integration-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["shop"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "djangoproj.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["DJANGOPROJ_DB_PATH"],
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

CELERY_BROKER_URL = os.environ["DJANGOPROJ_BROKER_URL"]
METRIX_APP_ID = os.environ["DJANGOPROJ_METRIX_APP_ID"]
