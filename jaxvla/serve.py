"""Serve a robot policy over websockets with msgpack-numpy messages (openpi's client convention).

Every websocket message is a binary frame holding one msgpack map. numpy arrays travel as
``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": [...]}`` and numpy
scalars as ``{b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}``; other map keys
decode as str.

On connect the server sends its metadata: ``policy.metadata`` (e.g. ``head``, ``chunk`` = K,
``action_dim`` = A, ``execute_steps``, ``image_size``) plus ``server: "jaxvla"``, ``protocol: 1``
and ``observation_spec: {key: {"shape": [...], "dtype": "uint8"}}`` (the required keys). A
``Policy`` finetuned with frame history also requires ``"prev_image"`` (uint8, the frame
``history_stride`` control steps before ``"image"``, the episode's first frame while t < k: the
client keeps its frames, the server is stateless), one with state prompts ``"state"`` (float32
``[state_size]``, e.g. Meta-World's 39-d state); the metadata carries ``history_frames``,
``history_stride`` and ``state_dims``.

Then each client message gets exactly one reply, in order:

* ``{"type": "health"}`` -> ``{"status": "ok", "uptime_s": float, "requests": int,
  "errors": int, "busy": bool}`` (answered at once, even while an inference is running).
* ``{"observation": {"image": uint8 [H, W, 3], ...}, "instruction": str}``, or openpi's flat
  layout ``{"image": ..., ..., "prompt": str}`` -> ``{"actions": float32 [K, A],
  "server_timing": {"infer_ms": float, "total_ms": float}}``.
* anything malformed (undecodable bytes, a text frame, a non-map, a missing / mis-shaped /
  mis-typed observation key, a non-str instruction) or an exception inside ``policy.act`` ->
  ``{"error": str}``; the connection stays open.

Inference runs on one worker thread (the policy is not thread-safe), off the event loop. Requests
are validated before they are queued for it: an instruction longer than ``max_instruction_chars``
(``--max_instruction_chars``, default 2048) or, when the policy has ``check_instruction`` (a real
``Policy`` does), one whose prompt does not fit the policy's sequence is refused with an error
naming the limit and the length, so it never delays other clients' inferences.
The server binds 127.0.0.1 by default. With a token (``--token`` or ``JAXVLA_SERVE_TOKEN``)
the handshake must carry ``Authorization: Bearer <token>`` or it is refused with HTTP 401.
A plain ``GET /healthz`` answers 200 "ok". Run: ``python -m jaxvla.serve --checkpoint=DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hmac
import http
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import msgpack
import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response
from websockets.sync.client import connect

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
TOKEN_ENV = "JAXVLA_SERVE_TOKEN"
HEALTH_PATH = "/healthz"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_INSTRUCTION_CHARS = 2048
# Instruction keys of the nested layout and of openpi's flat layout; never observation keys.
_INSTRUCTION_KEYS = ("instruction", "prompt")


# ---------------------------------------------------------------------------------------------
# msgpack-numpy
# ---------------------------------------------------------------------------------------------


def _check_packable_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise TypeError(f"cannot pack numpy arrays of dtype {dtype} (object dtypes are refused)")
    if dtype.fields is not None:
        raise TypeError(f"cannot pack numpy arrays of structured dtype {dtype}")


def _encode(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays / scalars to tagged maps, containers to plain ones."""
    if isinstance(obj, np.ndarray):
        _check_packable_dtype(obj.dtype)
        return {
            b"__ndarray__": True,
            b"data": obj.tobytes(),  # C order, whatever the array's strides
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        _check_packable_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    # strict_types=True sends subclasses of the builtin types here; map them to their bases.
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (tuple, list)):
        return list(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"cannot pack object of type {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    """msgpack `object_hook`: rebuild the tagged numpy maps, leave the others alone."""
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        _check_packable_dtype(dtype)
        shape = tuple(int(n) for n in obj[b"shape"])
        # Copy so the array owns writable memory instead of aliasing the message buffer.
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        _check_packable_dtype(dtype)
        return np.asarray(obj[b"data"], dtype=dtype)[()]
    return obj


def packb(obj: Any) -> bytes:
    """msgpack-encode `obj`; numpy arrays and scalars become openpi's tagged maps."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True, strict_types=True)


def unpackb(data: bytes) -> Any:
    """Decode `packb` output: tagged maps become numpy arrays / scalars, map keys str."""
    return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


class ServablePolicy(Protocol):
    """What `PolicyServer` needs from a policy (`jaxvla.policy.Policy` provides it).

    Optional: ``check_instruction(instruction)``, raising ValueError / TypeError for an instruction
    the policy cannot take; the server calls it on the event loop before queueing the request, so it
    must be cheap (the server's character limit bounds its input).
    """

    @property
    def metadata(self) -> dict: ...

    def observation_spec(self) -> dict[str, tuple[tuple[int, ...], str]]: ...

    def act(self, observation: dict, instruction: str) -> np.ndarray: ...


class RequestError(ValueError):
    """A malformed request; its message goes back to the client as {"error": ...}."""


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {tuple(value.shape)}"
    return type(value).__name__


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PolicyServer:
    """Serves `policy` on ws://host:port (see the module docstring for the protocol).

    `serve_forever()` blocks the calling thread; `start()` / `stop()` run the server on a
    background thread instead (tests, notebooks). `port=0` picks a free port: read `.port`
    after `start()`. `max_instruction_chars` bounds instructions (longer ones are refused before
    they reach the inference worker).
    """

    def __init__(
        self,
        policy: ServablePolicy,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS,
    ):
        if int(max_instruction_chars) < 1:
            raise ValueError(
                f"max_instruction_chars={max_instruction_chars}: expected >= 1 character"
            )
        self.policy = policy
        self.max_instruction_chars = int(max_instruction_chars)
        self._check_instruction = getattr(policy, "check_instruction", None)
        self.host = host
        self.port = port
        self.token = token or None
        self.max_message_bytes = max_message_bytes
        self.spec: dict[str, tuple[tuple[int | None, ...], np.dtype]] = {
            key: (tuple(shape), np.dtype(dtype))
            for key, (shape, dtype) in policy.observation_spec().items()
        }
        self.metadata: dict[str, Any] = {
            **dict(policy.metadata),
            "server": "jaxvla",
            "protocol": PROTOCOL_VERSION,
            "observation_spec": {
                key: {"shape": list(shape), "dtype": dtype.name}
                for key, (shape, dtype) in self.spec.items()
            },
        }
        self._metadata_bytes = packb(self.metadata)
        self.requests = 0  # inference requests answered (successes and errors)
        self.errors = 0  # error replies of any kind
        self._inflight = 0
        self._started_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        if self.token is None and not _is_loopback(host):
            logger.warning(
                "Serving on non-loopback host %r without a token: anyone who can reach this "
                "port can drive the robot. Pass --token or set %s.",
                host,
                TOKEN_ENV,
            )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve on the calling thread until `stop()` (or Ctrl-C: KeyboardInterrupt propagates)."""
        asyncio.run(self._serve())

    def start(self) -> PolicyServer:
        """Serve on a daemon thread; returns once the socket is bound (`.port` is then real)."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._run_in_thread, name="PolicyServer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Close the listening socket and every connection; joins the `start()` thread."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop closed in between
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _run_in_thread(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to start() if before ready
            if not self._ready.is_set():
                self._startup_error = e
            else:
                logger.exception("policy server crashed")
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            try:
                self._loop.add_signal_handler(signal.SIGTERM, self._stop_event.set)
            except (NotImplementedError, RuntimeError):
                pass
        # One worker: inferences run one at a time, in arrival order, off the event loop.
        self._executor = executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="policy-act"
        )
        self._started_at = time.monotonic()
        try:
            async with serve(
                self._handle_connection,
                self.host,
                self.port,
                process_request=self._process_request,
                compression=None,
                max_size=self.max_message_bytes,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                logger.info(
                    "Serving policy on %s (token %s)", self.url, "required" if self.token else "off"
                )
                self._ready.set()
                await self._stop_event.wait()
                logger.info("Stopping policy server on %s", self.url)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            self._loop = None

    # -- HTTP side -------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                logger.warning(
                    "Rejected connection from %s: bad or missing token", connection.remote_address
                )
                response = connection.respond(
                    http.HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token\n"
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return None

    # -- websocket side --------------------------------------------------------------------------

    async def _handle_connection(self, websocket: ServerConnection) -> None:
        peer = websocket.remote_address
        logger.info("Connection from %s", peer)
        try:
            await websocket.send(self._metadata_bytes)
            async for message in websocket:
                try:
                    reply = await self._handle_message(message)
                except Exception as e:  # a bug here must not take the connection down
                    logger.exception("unexpected error handling a request")
                    self.errors += 1
                    reply = {"error": f"internal server error: {type(e).__name__}: {e}"}
                try:
                    payload = packb(reply)
                except Exception as e:  # e.g. the policy returned something unpackable
                    self.errors += 1
                    payload = packb({"error": f"could not encode the reply: {e}"})
                await websocket.send(payload)
        except ConnectionClosed:
            pass
        finally:
            logger.info("Connection from %s closed", peer)

    async def _handle_message(self, message: str | bytes) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            request = self._decode_request(message)
            if "type" in request:
                if request["type"] == "health":
                    return self.health()
                raise RequestError(
                    f"unknown request type {request['type']!r}; expected 'health' or an "
                    "inference request with 'observation' and 'instruction'"
                )
            observation, instruction = self._parse_inference(request)
        except RequestError as e:
            self.errors += 1
            return {"error": str(e)}

        self.requests += 1
        number = self.requests
        self._inflight += 1
        try:
            actions, infer_ms = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._infer, observation, instruction
            )
        except Exception as e:  # noqa: BLE001 - the policy's failure goes back to the client
            self.errors += 1
            logger.exception("policy.act failed on request %d", number)
            return {"error": f"policy.act raised {type(e).__name__}: {e}"}
        finally:
            self._inflight -= 1
        total_ms = (time.perf_counter() - start) * 1e3
        logger.debug("request %d: infer %.1f ms, total %.1f ms", number, infer_ms, total_ms)
        return {"actions": actions, "server_timing": {"infer_ms": infer_ms, "total_ms": total_ms}}

    def _infer(self, observation: dict, instruction: str) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        actions = self.policy.act(observation, instruction)
        infer_ms = (time.perf_counter() - start) * 1e3
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2:
            raise ValueError(f"expected actions of shape [K, A], got shape {actions.shape}")
        return actions, infer_ms

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "uptime_s": time.monotonic() - self._started_at,
            "requests": self.requests,
            "errors": self.errors,
            "busy": self._inflight > 0,
        }

    # -- request validation ----------------------------------------------------------------------

    @staticmethod
    def _decode_request(message: str | bytes) -> dict:
        if isinstance(message, str):
            raise RequestError("expected a binary frame holding a msgpack map, got a text frame")
        try:
            request = unpackb(message)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise RequestError(
                f"could not decode the message as msgpack: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(request, dict):
            raise RequestError(f"request must be a msgpack map (dict), got {type(request).__name__}")
        return request

    def _parse_inference(self, request: dict) -> tuple[dict[str, Any], str]:
        if "observation" in request:
            observation = request["observation"]
            if not isinstance(observation, dict):
                raise RequestError(
                    f"'observation' must be a map of arrays, got {type(observation).__name__}"
                )
            instruction = request.get("instruction", request.get("prompt"))
            instruction_key = "instruction"
        else:  # openpi's flat layout: observation keys at the top level plus "prompt"
            observation = {k: v for k, v in request.items() if k not in _INSTRUCTION_KEYS}
            instruction = request.get("prompt", request.get("instruction"))
            instruction_key = "prompt"
        if instruction is None:
            raise RequestError(
                f"missing {instruction_key!r}: expected the task instruction as a str "
                "(nested layout: 'observation' + 'instruction'; flat layout: keys + 'prompt')"
            )
        if not isinstance(instruction, str):
            raise RequestError(f"{instruction_key!r} must be a str, got {type(instruction).__name__}")
        if len(instruction) > self.max_instruction_chars:
            raise RequestError(
                f"{instruction_key!r} is {len(instruction)} characters; this server accepts at most "
                f"{self.max_instruction_chars} (max_instruction_chars, --max_instruction_chars)"
            )
        for key, (shape, dtype) in self.spec.items():
            expected = f"a {dtype.name} array of shape {shape}"
            if key not in observation:
                raise RequestError(
                    f"observation is missing required key {key!r} (expected {expected})"
                )
            value = observation[key]
            if not isinstance(value, np.ndarray):
                raise RequestError(f"observation[{key!r}] must be {expected}, got {_describe(value)}")
            if value.dtype != dtype:
                raise RequestError(
                    f"observation[{key!r}] has dtype {value.dtype}, expected {dtype.name} "
                    f"(shape {shape})"
                )
            if len(value.shape) != len(shape) or any(
                want is not None and want >= 0 and got != want for got, want in zip(value.shape, shape)
            ):
                raise RequestError(
                    f"observation[{key!r}] has shape {tuple(value.shape)}, expected {shape}"
                )
        if self._check_instruction is not None:  # e.g. the prompt's tokens against the sequence
            try:
                self._check_instruction(instruction)
            except (ValueError, TypeError) as e:
                raise RequestError(f"{instruction_key!r} refused by the policy: {e}") from None
        return observation, instruction


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


class Client:
    """Blocking client for `PolicyServer` (one connection; not thread-safe).

    `metadata` holds the server's metadata; `act()` returns float32 [K, A] actions and
    `last_timing` the reply's server_timing plus `roundtrip_ms` measured here.
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
        self.metadata: dict[str, Any] = self._recv()
        self.last_timing: dict[str, float] = {}

    def _recv(self) -> Any:
        message = self._ws.recv(timeout=self.timeout)
        if isinstance(message, str):
            raise RuntimeError(f"unexpected text frame from the server: {message[:200]!r}")
        return unpackb(message)

    def _request(self, payload: dict) -> dict:
        self._ws.send(packb(payload))
        reply = self._recv()
        if not isinstance(reply, dict):
            raise RuntimeError(f"unexpected reply from the server: {type(reply).__name__}")
        if "error" in reply:
            raise RuntimeError(f"policy server error: {reply['error']}")
        return reply

    def act(self, observation: dict[str, np.ndarray], instruction: str) -> np.ndarray:
        """Actions float32 [K, A] for one observation; RuntimeError on a server error reply."""
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a jaxvla policy checkpoint over websockets.")
    parser.add_argument("--checkpoint", required=True, help="policy checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"shared secret clients send as 'Authorization: Bearer <token>' (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--max_instruction_chars",
        type=int,
        default=DEFAULT_MAX_INSTRUCTION_CHARS,
        help="longer instructions are refused before inference (default: %(default)s)",
    )
    parser.add_argument(
        "--text_cache_size",
        type=int,
        default=None,
        help="instructions whose prompt ids the policy keeps, LRU (default: 1024)",
    )
    parser.add_argument(
        "--compilation_cache",
        default=None,
        help="persistent XLA compilation cache directory, or 'off' (default: $JAXVLA_COMPILATION_CACHE, "
        "else ~/.cache/jaxvla/xla)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request's timing")
    args = parser.parse_args(argv)
    if args.max_instruction_chars < 1:
        parser.error(f"--max_instruction_chars={args.max_instruction_chars}: expected >= 1")
    if args.text_cache_size is not None and args.text_cache_size < 0:
        parser.error(f"--text_cache_size={args.text_cache_size}: expected >= 0 (0 disables the cache)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:  # our per-request timings, not websockets' frame dumps
        logger.setLevel(logging.DEBUG)

    from jaxvla import compilation_cache  # heavy (jax); only the CLI needs it
    from jaxvla.policy import Policy

    logger.info("compilation cache: %s", compilation_cache.enable(args.compilation_cache) or "off")

    logger.info("Loading policy from %s", args.checkpoint)
    policy = Policy.from_checkpoint(args.checkpoint, text_cache_size=args.text_cache_size)
    # Compile before the first client connects, so its first request is as fast as the rest.
    start = time.perf_counter()
    warmup = {key: np.zeros(shape, dtype) for key, (shape, dtype) in policy.observation_spec().items()}
    policy.act(warmup, "warm up")
    logger.info("Policy compiled in %.1f s", time.perf_counter() - start)
    server = PolicyServer(
        policy,
        host=args.host,
        port=args.port,
        token=args.token,
        max_instruction_chars=args.max_instruction_chars,
    )
    logger.info("Policy metadata: %s", server.metadata)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Interrupted; server stopped")


if __name__ == "__main__":
    main()
