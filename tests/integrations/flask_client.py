"""Send requests to the Flask app in this process, the way a web server would, and print the
answers as one line of JSON.

stdin: a JSON list of ``{"event": {...}, "via": "client" | "server"}``, each posted to
``/purchase``. ``client`` goes through ``app.test_client()`` (in this thread); ``server`` through
a real threaded WSGI server (werkzeug's, as ``flask run``) over HTTP, each request in a thread of
its own. stdout: ``{"responses": [{"status", "body"}...]}``.
"""

import json
import sys
import threading
from typing import Any

from flaskapp import app
from webclient import post_over_http
from werkzeug.serving import BaseWSGIServer, make_server


def main() -> int:
    requests = json.load(sys.stdin)
    client = app.test_client()
    server: BaseWSGIServer | None = None
    responses: list[dict[str, Any]] = []
    try:
        for request in requests:
            if request.get("via", "client") == "client":
                response = client.post("/purchase", json=request["event"])
                responses.append({"status": response.status_code, "body": response.get_json()})
                continue
            if server is None:
                server = make_server("127.0.0.1", 0, app, threaded=True)
                threading.Thread(target=server.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{server.server_port}/purchase"
            responses.append(post_over_http(url, json.dumps(request["event"]).encode()))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    print(json.dumps({"responses": responses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
