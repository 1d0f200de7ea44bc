"""X-Request-Id in and out: a client's id (up to 128 printable ASCII characters) names its
request inside the server (the response's `id` is `chatcmpl-<it>` / `cmpl-<it>`, as vLLM names
it) and comes back in the response's X-Request-Id header; a request without one gets a fresh
id, also returned. A pure ASGI middleware (not Starlette's BaseHTTPMiddleware), so streaming
and the disconnect detection see the raw channel."""

from __future__ import annotations

import json
import re
import uuid

HEADER = b"x-request-id"
VALID = re.compile(r"^[\x21-\x7e]{1,128}$")


class RequestIdMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER)
        request_id = given.decode("latin-1") if given is not None else uuid.uuid4().hex
        if not VALID.match(request_id):
            body = json.dumps(
                {
                    "error": {
                        "message": "X-Request-Id must be 1-128 printable ASCII characters without spaces",
                        "type": "invalid_request_error",
                        "param": "X-Request-Id",
                        "code": None,
                    }
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
