"""Views that record a purchase and report it to Metrix once the database has committed it.

The request body is the Metrix event of the purchase. Each answer also says which Celery app
``send_metrix_event`` resolves to in the thread that served the request, for the tests.
"""

import json
import threading
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, JsonResponse
from shop.models import Order

from metrix_s2s import send_metrix_event, send_metrix_events


class PaymentDeclined(Exception):
    pass


def _answer(order: Order | None, status: int = 200) -> JsonResponse:
    return JsonResponse(
        {
            "order": order.pk if order else None,
            "producer_app": send_metrix_event.app.main,
            "in_main_thread": threading.current_thread() is threading.main_thread(),
        },
        status=status,
    )


def purchase(request: HttpRequest) -> JsonResponse:
    event = json.loads(request.body)
    with transaction.atomic():
        order = Order.objects.create(user_id=event["metrixUserId"])
        transaction.on_commit(lambda: send_metrix_event.delay(settings.METRIX_APP_ID, event))
    return _answer(order)


def _declined(request: HttpRequest, enqueue: Callable[[dict[str, Any]], object]) -> JsonResponse:
    """A purchase whose transaction rolls back after ``enqueue(event)`` ran inside it."""
    event = json.loads(request.body)
    try:
        with transaction.atomic():
            Order.objects.create(user_id=event["metrixUserId"])
            enqueue(event)
            raise PaymentDeclined
    except PaymentDeclined:
        return _answer(None, status=409)


def purchase_rolled_back(request: HttpRequest) -> JsonResponse:
    return _declined(
        request,
        lambda event: transaction.on_commit(
            lambda: send_metrix_event.delay(settings.METRIX_APP_ID, event)
        ),
    )


def purchase_delay_on_commit(request: HttpRequest) -> JsonResponse:
    event = json.loads(request.body)
    with transaction.atomic():
        order = Order.objects.create(user_id=event["metrixUserId"])
        # validates now, enqueues on commit: the short form of transaction.on_commit(...)
        send_metrix_event.delay_on_commit(settings.METRIX_APP_ID, event)
    return _answer(order)


def purchase_batch_on_commit(request: HttpRequest) -> JsonResponse:
    event = json.loads(request.body)
    with transaction.atomic():
        order = Order.objects.create(user_id=event["metrixUserId"])
        # the purchase and a follow-up event, validated now, enqueued as one batch on commit
        follow_up = {**event, "eventSlug": "follow"}
        send_metrix_events.delay_on_commit(settings.METRIX_APP_ID, [event, follow_up])
    return _answer(order)


def purchase_rolled_back_on_commit(request: HttpRequest) -> JsonResponse:
    return _declined(
        request, lambda event: send_metrix_event.delay_on_commit(settings.METRIX_APP_ID, event)
    )


def purchases_on_commit(request: HttpRequest) -> JsonResponse:
    """``{"count": n, **event}``: n orders in one transaction, one event each (``metrixUserId``
    suffixed with the order's number)."""
    body = json.loads(request.body)
    count = body.pop("count")
    with transaction.atomic():
        for n in range(count):
            event = {**body, "metrixUserId": f"{body['metrixUserId']}-{n}"}
            order = Order.objects.create(user_id=event["metrixUserId"])
            send_metrix_event.delay_on_commit(settings.METRIX_APP_ID, event)
    return _answer(order)
