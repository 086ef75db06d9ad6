"""Names that the tasks, the workers' configuration, the producers and the reconciler share.

A leaf module: it imports nothing of metrix-s2s, so any module may import it. The task names, the
queue and the header are part of the wire format: queued messages carry them, so they stay the
same across releases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: The single-event task, ``send_metrix_event``.
TASK_NAME = "metrix_s2s.send_event"
#: The bulk task, ``send_metrix_events``.
BULK_TASK_NAME = "metrix_s2s.send_events"
#: The periodic re-drive of dead letters.
REDRIVE_TASK = "metrix_s2s.redrive"
#: The periodic reconciler of pending events.
RECONCILE_TASK = "metrix_s2s.reconcile"
#: The periodic outbox relay of a Django project (:mod:`metrix_s2s.contrib.django`).
OUTBOX_RELAY_TASK = "metrix_s2s.outbox_relay"
#: The queue metrix-s2s's tasks are routed to and its workers consume.
QUEUE = "metrix_s2s"
#: The message header in which a batch of ``send_metrix_events`` lists its event ids, so that the
#: reconciler can tell that they are queued.
EVENT_IDS_HEADER = "metrix_event_ids"

#: Publishes one event again under its own id: ``enqueue(event_id, app_id, event)``. Re-drive and
#: the reconciler are given one (:func:`metrix_s2s.operations.enqueue_event`).
Enqueue = Callable[[str, str, Any], None]
