"""What the Django and Flask clients share: a JSON POST over real HTTP, and reading an answer."""

import json
import urllib.error
import urllib.request
from typing import Any


def post_over_http(url: str, data: bytes) -> dict[str, Any]:
    """POST ``data`` (JSON) to ``url``; the answer's status and body."""
    post = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(post, timeout=30) as answer:
            status, content = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, content = exc.code, exc.read()
    return {"status": status, "body": as_json(content)}


def as_json(content: bytes) -> Any:
    """The body as JSON, or the start of its text when it is not JSON."""
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:2000]
