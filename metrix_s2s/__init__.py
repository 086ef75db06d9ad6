"""metrix-s2s: durable server-to-server delivery of in-app events to Metrix, through Celery.

from metrix_s2s import send_metrix_event, InvalidEvent

send_metrix_event.delay("APP_ID", {"metrixUserId": ..., "eventSlug": ..., ...})
"""

from .errors import ConfigurationError, EnqueueError, InvalidEvent, MetrixS2SError
from .schema import validate_event
from .settings import Settings, get_settings
from .tasks import send_metrix_event, send_metrix_events

__all__ = [
    # Producing events
    "send_metrix_event",
    "send_metrix_events",
    "validate_event",
    # Errors
    "ConfigurationError",
    "EnqueueError",
    "InvalidEvent",
    "MetrixS2SError",
    # Configuration
    "Settings",
    "get_settings",
]

__version__ = "0.1.0"
