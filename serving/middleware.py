"""Before any route: the service still starting (503), API keys (401), body size (413) and
requests in flight (503)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from refinery.core.settings import ServingSettings
from serving.metrics import REJECTED
from serving.openai_schema import ApiError

RETRY_AFTER_S = "1"


class GatewayMiddleware:
    """Before any route: the service still starting (503 + Retry-After, at once), API keys
    (401), body size (413) and requests in flight (503)."""

    PROTECTED = ("/v1/", "/rag")
    OPEN = ("/v1/openapi.json", "/v1/docs")

    def __init__(
        self, app: Any, *, settings: ServingSettings, ready: Callable[[], bool] = lambda: True
    ) -> None:
        self.app = app
        self.ready = ready
        self.limits = settings.limits
        self.keys = [k.encode() for k in settings.api_keys]
        self.inflight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.PROTECTED) or path in self.OPEN:
            await self.app(scope, receive, send)
            return
        if not self.ready():
            REJECTED.labels(reason="starting").inc()
            await _send_error(
                send,
                ApiError(
                    503,
                    "the service is starting (models are loading); retry shortly",
                    type="server_error",
                    code="starting",
                    headers={"Retry-After": "5"},
                ),
            )
            return
        headers = {k.decode().lower(): v for k, v in scope.get("headers", [])}
        if self.keys and not self._authorized(headers):
            REJECTED.labels(reason="unauthorized").inc()
            await _send_error(
                send,
                ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                ),
            )
            return
        if self.inflight >= self.limits.max_inflight:
            REJECTED.labels(reason="overloaded").inc()
            await _send_error(
                send,
                ApiError(
                    503,
                    f"{self.inflight} requests in progress; retry shortly",
                    type="server_error",
                    code="overloaded",
                    headers={"Retry-After": RETRY_AFTER_S},
                ),
            )
            return
        body, too_large = await self._read_body(headers, receive)
        if too_large:
            REJECTED.labels(reason="body_too_large").inc()
            await _send_error(
                send,
                ApiError(
                    413,
                    f"the request body is larger than {self.limits.max_body_bytes} bytes",
                    code="body_too_large",
                ),
            )
            return
        self.inflight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.inflight -= 1

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        auth = headers.get("authorization", b"")
        given = (
            auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
        )
        return any(hmac.compare_digest(given, key) for key in self.keys)

    async def _read_body(self, headers: dict[str, bytes], receive: Any) -> tuple[bytes, bool]:
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", True
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(parts), False


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Any, err: ApiError) -> None:
    payload = json.dumps(err.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
