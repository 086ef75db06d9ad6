"""Send requests to the Django project in this process, the way a web server would, and print the
answers as one line of JSON.

stdin: a JSON list of ``{"view": "purchase" | "purchase/rolled-back" | ..., "event": {...},
"via": "client" | "server"}``. ``client`` goes through ``django.test.Client`` (in this thread);
``server`` through a real threaded WSGI server over HTTP (each request in a thread of its own).
``{"relay": true}`` in the list runs the outbox relay once, in this process, where it stands.
stdout: ``{"responses": [{"status", "body", "error"}...], "orders": [user ids in the database],
"outbox": [event ids in the outbox table, when the outbox app is installed], "elapsed_s": the
seconds the requests took, "writes": [{"sql", "atomic", "synchronous_commit"}...]}``: every INSERT
and DELETE sent to the database through ``django.test.Client`` or by the relay, whether it was
inside an atomic block, and, on PostgreSQL, the ``synchronous_commit`` it ran under.
"""

import json
import os
import sys
import threading
import time
from typing import Any

from webclient import as_json, post_over_http

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproj.settings")


def main() -> int:
    import django

    django.setup()
    from django.apps import apps
    from django.core.management import call_command
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application
    from django.db import connection
    from django.test import Client
    from shop.models import Order

    call_command("migrate", run_syncdb=True, verbosity=0)
    requests = json.load(sys.stdin)
    writes: list[dict[str, Any]] = []
    client = Client(raise_request_exception=False)
    server: ThreadedWSGIServer | None = None
    responses: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        with connection.execute_wrapper(_watching(writes)):
            for request in requests:
                if request.get("relay"):
                    from metrix_s2s.contrib.django.outbox import relay_once

                    relay_once(min_age_s=0)
                    continue
                path = "/" + request["view"]
                data = json.dumps(request["event"])
                if request.get("via", "client") == "client":
                    response = client.post(path, data, content_type="application/json")
                    exc_info = getattr(response, "exc_info", None)
                    responses.append(
                        {
                            "status": response.status_code,
                            "body": as_json(response.content),
                            "error": repr(exc_info[1]) if exc_info else None,
                        }
                    )
                    continue
                if server is None:
                    server = ThreadedWSGIServer(("127.0.0.1", 0), WSGIRequestHandler)
                    server.set_app(get_wsgi_application())
                    threading.Thread(target=server.serve_forever, daemon=True).start()
                url = f"http://127.0.0.1:{server.server_address[1]}{path}"
                responses.append(post_over_http(url, data.encode()) | {"error": None})
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    elapsed = time.monotonic() - started
    orders = list(Order.objects.order_by("pk").values_list("user_id", flat=True))
    outbox: list[str] | None = None
    if apps.is_installed("metrix_s2s.contrib.django"):
        from metrix_s2s.contrib.django.models import OutboxEvent

        outbox = list(OutboxEvent.objects.values_list("event_id", flat=True))
    print(
        json.dumps(
            {
                "responses": responses,
                "orders": orders,
                "outbox": outbox,
                "elapsed_s": elapsed,
                "writes": writes,
            }
        )
    )
    return 0


def _watching(writes: list[dict[str, Any]]) -> Any:
    """An ``execute_wrapper`` that notes each INSERT and DELETE before it runs."""

    def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        verb = sql.lstrip().split(None, 1)[0].upper()
        if verb in ("INSERT", "DELETE"):
            conn = context["connection"]
            setting = None
            if conn.vendor == "postgresql":  # asked on the driver's connection, past this wrapper
                with conn.connection.cursor() as cursor:
                    cursor.execute("SHOW synchronous_commit")
                    setting = cursor.fetchone()[0]
            table = next((t for t in ("metrix_s2s_outbox", "shop_order") if t in sql), None)
            writes.append(
                {
                    "sql": f"{verb} {table}",
                    "atomic": conn.in_atomic_block,
                    "synchronous_commit": setting,
                }
            )
        return execute(sql, params, many, context)

    return watch


if __name__ == "__main__":
    sys.exit(main())
