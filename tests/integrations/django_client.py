"""Send requests to the Django project in this process, the way a web server would, and print the
answers as one line of JSON.

stdin: a JSON list of ``{"view": "purchase" | "purchase/rolled-back" | ..., "event": {...},
"via": "client" | "server"}``. ``client`` goes through ``django.test.Client`` (in this thread);
``server`` through a real threaded WSGI server over HTTP (each request in a thread of its own).
stdout: ``{"responses": [{"status", "body", "error"}...], "orders": [user ids in the database],
"outbox": [event ids in the outbox table, when the outbox app is installed], "elapsed_s": the
seconds the requests took}``.
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
    from django.test import Client
    from shop.models import Order

    call_command("migrate", run_syncdb=True, verbosity=0)
    requests = json.load(sys.stdin)
    client = Client(raise_request_exception=False)
    server: ThreadedWSGIServer | None = None
    responses: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for request in requests:
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
            {"responses": responses, "orders": orders, "outbox": outbox, "elapsed_s": elapsed}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
