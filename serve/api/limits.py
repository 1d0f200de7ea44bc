"""Limits decided before any expensive work: the request body's size (read no further than the
limit), and a prompt's length in characters before it is tokenized.

A 50 MB body would otherwise be parsed and tokenized whole, on the event loop, only for the
context check to refuse it afterwards: seconds to minutes of every endpoint stalled, and
memory the tokenizer keeps. The character bound is exact, not a heuristic: no token of the
vocabulary spells more than `longest` bytes, and a character is at least one byte, so a text of
more than max_model_len x longest characters needs more than max_model_len tokens.
"""

from __future__ import annotations

import json

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # ~1M tokens' worth of JSON token ids; raise with --max-request-bytes


def error_body(message: str, param: str | None, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    ).encode()


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: by its Content-Length before reading a byte of it, or as
    soon as a chunked body passes the limit. The body is read here (as the app would read it)
    and handed on whole; later messages (a disconnect) reach the app as they come. A pure ASGI
    middleware, so streaming responses pass through untouched."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send, int(length) if length.isdigit() else None)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, None)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, length: int | None) -> None:
        size = f"is {length:,} bytes" if length is not None else "passed the limit while it was read"
        body = error_body(
            f"the request body {size}; this server takes at most {self.max_bytes:,} bytes (--max-request-bytes)",
            None,
            "request_too_large",
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def longest_token_bytes(token_bytes, vocab_size: int) -> int:
    """The most bytes any one token spells (serve.engine.token_bytes), at least 1."""
    return max([len(token_bytes.bytes(i)) for i in range(vocab_size)] + [1])


def check_prompt_chars(texts: list[str], max_model_len: int, longest: int, field: str) -> None:
    """ValueError (naming `field`) for texts that cannot fit max_model_len tokens, decided from
    their length alone (module docstring)."""
    chars = sum(len(t) for t in texts)
    if chars > max_model_len * longest:
        raise ValueError(
            f"{field}: {chars:,} characters cannot fit this model's maximum context length of "
            f"{max_model_len:,} tokens (no token spells more than {longest} bytes); shorten it"
        )
