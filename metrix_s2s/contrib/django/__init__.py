"""Django: the transactional outbox, as an app.

Add ``"metrix_s2s.contrib.django"`` to ``INSTALLED_APPS`` and run ``manage.py migrate``. Then
``send_metrix_event.delay_on_commit(app_id, event)`` (and ``send_metrix_events.delay_on_commit``)
writes the event to the outbox table in the current transaction, and publishes it after the
commit; when the broker cannot take it then, the relay does later: the periodic task that
:func:`metrix_s2s.workers.configure_app` adds to the beat schedule, or
``manage.py metrix_s2s_relay``. Without the app, ``delay_on_commit`` publishes after the commit
and logs, never raises, when the broker cannot take the event.
"""

import os
import sys

APP_NAME = "metrix_s2s.contrib.django"


def in_installed_apps() -> bool:
    """Whether the project's Django settings (loaded now if need be) install the outbox app; for
    :func:`metrix_s2s.workers.configure_app`, which may run before ``django.setup()``."""
    if "django" not in sys.modules and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return False
    try:
        from django.conf import settings  # noqa: PLC0415 - Django is optional

        installed = list(settings.INSTALLED_APPS)
    except Exception:  # no Django, or no settings: not a Django project
        return False
    return APP_NAME in installed or f"{APP_NAME}.apps.MetrixS2SConfig" in installed
