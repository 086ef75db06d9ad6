"""Settings of the test project: the broker and the database come from the environment.

``DJANGOPROJ_BROKER_URL`` is deliberately not ``CELERY_BROKER_URL``: the broker reaches Celery and
metrix-s2s only through these settings, as in a project that keeps its configuration here.
"""

import os

SECRET_KEY = "metrix-s2s-integration-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["shop"]
if os.environ.get("DJANGOPROJ_OUTBOX"):
    # the transactional outbox: events written in the transaction, published after commit
    INSTALLED_APPS.append("metrix_s2s.contrib.django")
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "djangoproj.urls"
# SQLite by default; DJANGOPROJ_DB_ENGINE=postgresql or mysql for the local servers
ENGINE = os.environ.get("DJANGOPROJ_DB_ENGINE", "sqlite3")
if ENGINE == "sqlite3":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ["DJANGOPROJ_DB_PATH"],
        }
    }
else:
    if ENGINE == "mysql":
        import pymysql  # PyMySQL, under the name Django's MySQL backend imports

        pymysql.install_as_MySQLdb()
    DATABASES = {
        "default": {
            "ENGINE": f"django.db.backends.{ENGINE}",
            "NAME": os.environ["DJANGOPROJ_DB_NAME"],
            "HOST": "127.0.0.1",
            "PORT": os.environ["DJANGOPROJ_DB_PORT"],
            "USER": os.environ["DJANGOPROJ_DB_USER"],
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

CELERY_BROKER_URL = os.environ["DJANGOPROJ_BROKER_URL"]
METRIX_APP_ID = os.environ["DJANGOPROJ_METRIX_APP_ID"]
