"""Client: a blocking client for `PolicyServer`, importable without JAX (robot computers).

It needs only numpy, msgpack and websockets:
``python -c "import sys, jaxvla.serving.client; assert 'jax' not in sys.modules"``.
"""

from __future__ import annotations

import contextlib
import http
import time
from typing import Any

import numpy as np
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from jaxvla.serving.codec import DEFAULT_MAX_MESSAGE_BYTES, packb, unpackb


class ServerError(RuntimeError):
    """The server refused a request or failed on it; the message is the server's error text."""


class Client:
    """Blocking client for `PolicyServer` (one connection; not thread-safe).

    `metadata` holds the server's metadata; `act()` returns float32 [K, A] actions and
    `last_timing` the reply's server_timing plus `roundtrip_ms` measured here. A server error
    (a text frame) raises `ServerError` ("policy server error: <the server's text>").
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.url = f"ws://{host}:{port}"
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._stack = contextlib.ExitStack()
        try:
            # Entered as a context manager, the form websockets >= 17 expects; close() exits it.
            self._ws = self._stack.enter_context(connect(
                self.url,
                additional_headers=headers,
                compression=None,
                max_size=max_message_bytes,
                open_timeout=timeout,
                proxy=None,  # never route a robot's loopback / LAN traffic through a proxy
            ))
        except InvalidStatus as e:
            if e.response.status_code == http.HTTPStatus.UNAUTHORIZED:
                raise PermissionError(
                    f"{self.url} rejected the connection: bad or missing token"
                ) from e
            raise
        message = self._ws.recv(timeout=self.timeout)
        if isinstance(message, str):
            raise RuntimeError(f"expected the server's metadata, got a text frame: {message[:200]!r}")
        self.metadata: dict[str, Any] = unpackb(message)
        self.last_timing: dict[str, float] = {}

    def _request(self, payload: dict) -> dict:
        self._ws.send(packb(payload))
        reply = self._ws.recv(timeout=self.timeout)
        if isinstance(reply, str):  # errors come as text frames (openpi's client convention)
            raise ServerError(f"policy server error: {reply}")
        reply = unpackb(reply)
        if not isinstance(reply, dict):
            raise RuntimeError(f"unexpected reply from the server: {type(reply).__name__}")
        return reply

    def act(self, observation: dict[str, np.ndarray], instruction: str) -> np.ndarray:
        """Actions float32 [K, A] for one observation; `ServerError` on a server error reply."""
        start = time.perf_counter()
        reply = self._request({"observation": observation, "instruction": instruction})
        roundtrip_ms = (time.perf_counter() - start) * 1e3
        self.last_timing = {**reply.get("server_timing", {}), "roundtrip_ms": roundtrip_ms}
        return np.asarray(reply["actions"], dtype=np.float32)

    def health(self) -> dict[str, Any]:
        return self._request({"type": "health"})

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
