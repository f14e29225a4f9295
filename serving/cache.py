"""Response cache keyed on the normalized request and the model version.

In-process (an LRU with a time to live) by default; Redis when a URL is given. A cache never
fails a request: when Redis is down every lookup is a miss (counted as an error), and the
client waits ``retry_after_s`` before trying Redis again instead of paying a connect timeout on
every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal, Protocol

Outcome = Literal["hit", "miss", "error"]
_SPACE = re.compile(r"\s+")


def normalize(value: Any) -> Any:
    """Requests that differ only in whitespace around or inside strings, or in key order,
    get the same key. Case is kept: it can change an answer."""
    if isinstance(value, str):
        return _SPACE.sub(" ", value).strip()
    if isinstance(value, Mapping):
        return {str(k): normalize(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [normalize(v) for v in value]
    return value


def cache_key(kind: str, model_version: str, request: Mapping[str, Any]) -> str:
    payload = json.dumps(
        {"kind": kind, "model": model_version, "request": normalize(request)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "refinery:" + kind + ":" + hashlib.sha256(payload.encode()).hexdigest()


class ResponseCache(Protocol):
    backend: str

    def get(self, key: str) -> tuple[Outcome, Any]: ...

    def set(self, key: str, value: Any) -> bool: ...


class InProcessCache:
    """A thread-safe LRU of JSON-able values with a time to live."""

    backend = "memory"

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 600.0):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[Outcome, Any]:
        with self._lock:
            found = self._data.get(key)
            if found is None:
                return "miss", None
            expires, value = found
            if expires < time.monotonic():
                del self._data[key]
                return "miss", None
            self._data.move_to_end(key)
            return "hit", value

    def set(self, key: str, value: Any) -> bool:
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return True


class RedisCache:
    """Values as JSON strings under ``key`` with a TTL. Short socket timeouts: a slow or dead
    Redis costs a request at most ``timeout_s`` once per ``retry_after_s``."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: float = 600.0,
        timeout_s: float = 0.05,
        retry_after_s: float = 5.0,
    ):
        import redis

        self.ttl_s, self.retry_after_s = ttl_s, retry_after_s
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._down_until = 0.0

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self) -> None:
        self._down_until = time.monotonic() + self.retry_after_s

    def get(self, key: str) -> tuple[Outcome, Any]:
        if not self._available():
            return "error", None
        try:
            raw = self._client.get(key)
        except Exception:  # noqa: BLE001 - any Redis failure is a miss, never a failed request
            self._failed()
            return "error", None
        if raw is None:
            return "miss", None
        return "hit", json.loads(raw)

    def set(self, key: str, value: Any) -> bool:
        if not self._available():
            return False
        try:
            self._client.set(key, json.dumps(value), ex=max(1, int(self.ttl_s)))
        except Exception:  # noqa: BLE001 - see get
            self._failed()
            return False
        return True


def make_cache(redis_url: str | None, ttl_s: float = 600.0, max_entries: int = 10_000):
    if redis_url:
        return RedisCache(redis_url, ttl_s=ttl_s)
    return InProcessCache(max_entries=max_entries, ttl_s=ttl_s)
