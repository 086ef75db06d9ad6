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
import urllib.error
import urllib.request
from typing import Any

from flaskapp import app
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
            post = urllib.request.Request(
                f"http://127.0.0.1:{server.server_port}/purchase",
                json.dumps(request["event"]).encode(),
                {"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(post, timeout=30) as answer:
                    status, content = answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                status, content = exc.code, exc.read()
            responses.append({"status": status, "body": _json(content)})
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    print(json.dumps({"responses": responses}))
    return 0


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:2000]


if __name__ == "__main__":
    sys.exit(main())
