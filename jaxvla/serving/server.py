"""PolicyServer: a policy behind a websocket (the protocol is in the ``jaxvla.serving`` docstring)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import ipaddress
import logging
import signal
import threading
import time
from typing import Any, Protocol

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from jaxvla.serving.codec import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, packb, unpackb
from jaxvla.serving.images import fit_frame

logger = logging.getLogger(__name__)

TOKEN_ENV = "JAXVLA_SERVE_TOKEN"
HEALTH_PATH = "/healthz"
DEFAULT_MAX_INSTRUCTION_CHARS = 2048
# Authorization schemes a token may come under: jaxvla's Client sends Bearer, openpi's Api-Key.
AUTH_SCHEMES = ("Bearer", "Api-Key")
# Instruction keys of the nested layout and of openpi's flat layout; never observation keys.
_INSTRUCTION_KEYS = ("instruction", "prompt")
# openpi's observation keys beyond "observation/<jaxvla key>" (which every key also accepts):
# DROID's exterior camera is the policy's view. Wrist cameras and DROID's joint / gripper
# positions have no jaxvla counterpart and, like any other unknown key, are ignored.
_OPENPI_ALIASES = {"image": ("observation/exterior_image_1_left",)}


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
    """A malformed request; its message goes back to the client as the error text frame."""


def aliases(key: str) -> tuple[str, ...]:
    """The openpi-style keys a client may send jaxvla's observation `key` under."""
    return (f"observation/{key}", *_OPENPI_ALIASES.get(key, ()))


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


def _frame_size(shape: tuple[int | None, ...], dtype: np.dtype) -> int | None:
    """S for a uint8 [S, S, C] spec entry (a camera frame the server may resize), else None."""
    if dtype != np.uint8 or len(shape) != 3 or shape[0] != shape[1]:
        return None
    if not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
        return None
    return int(shape[0])


class PolicyServer:
    """Serves `policy` on ws://host:port (see the `jaxvla.serving` docstring for the protocol).

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
        # Camera frames ([S, S, C] uint8) of another size are cropped and resized to S.
        self.frame_sizes: dict[str, int] = {
            key: size
            for key, (shape, dtype) in self.spec.items()
            if (size := _frame_size(shape, dtype)) is not None
        }
        policy_metadata = dict(policy.metadata)
        self.metadata: dict[str, Any] = {
            **policy_metadata,
            "server": "jaxvla",
            "protocol": PROTOCOL_VERSION,
            "observation_spec": {
                key: {"shape": list(shape), "dtype": dtype.name}
                for key, (shape, dtype) in self.spec.items()
            },
        }
        if "chunk" in policy_metadata:  # openpi's name for the chunk length K
            self.metadata.setdefault("action_horizon", policy_metadata["chunk"])
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

    def _authorized(self, header: str) -> bool:
        """Whether `header` is "<scheme> <token>" for one of AUTH_SCHEMES (constant time)."""
        given = header.encode()
        matches = [
            hmac.compare_digest(given, f"{scheme} {self.token}".encode()) for scheme in AUTH_SCHEMES
        ]
        return any(matches)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if self.token is not None and not self._authorized(request.headers.get("Authorization", "")):
            logger.warning(
                "Rejected connection from %s: bad or missing token", connection.remote_address
            )
            response = connection.respond(
                http.HTTPStatus.UNAUTHORIZED,
                "missing or invalid token: send 'Authorization: Bearer <token>' or "
                "'Authorization: Api-Key <token>'\n",
            )
            response.headers["WWW-Authenticate"] = "Bearer, Api-Key"
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
                    reply = f"internal server error: {type(e).__name__}: {e}"
                if isinstance(reply, str):  # an error: a text frame, which openpi's client raises on
                    await websocket.send(reply)
                    continue
                try:
                    payload = packb(reply)
                except Exception as e:  # e.g. the policy returned something unpackable
                    self.errors += 1
                    await websocket.send(f"could not encode the reply: {e}")
                    continue
                await websocket.send(payload)
        except ConnectionClosed:
            pass
        finally:
            logger.info("Connection from %s closed", peer)

    async def _handle_message(self, message: str | bytes) -> dict[str, Any] | str:
        """The reply to one message: a dict (sent as msgpack) or an error's text."""
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
            return str(e)

        self.requests += 1
        number = self.requests
        self._inflight += 1
        try:
            actions, infer_ms = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._infer, observation, instruction
            )
        except RequestError as e:
            self.errors += 1
            return str(e)
        except Exception as e:  # noqa: BLE001 - the policy's failure goes back to the client
            self.errors += 1
            logger.exception("policy.act failed on request %d", number)
            return f"policy.act raised {type(e).__name__}: {e}"
        finally:
            self._inflight -= 1
        total_ms = (time.perf_counter() - start) * 1e3
        logger.debug("request %d: infer %.1f ms, total %.1f ms", number, infer_ms, total_ms)
        return {"actions": actions, "server_timing": {"infer_ms": infer_ms, "total_ms": total_ms}}

    def _infer(self, observation: dict, instruction: str) -> tuple[np.ndarray, float]:
        """On the worker: fit the frames to the policy's size, then act."""
        observation = dict(observation)
        for key, size in self.frame_sizes.items():
            try:
                observation[key] = fit_frame(observation[key], size)
            except ValueError as e:
                raise RequestError(f"observation[{key!r}]: {e}") from None
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
        # Only the spec's keys reach the policy; any other key is ignored.
        checked = {key: self._check_value(observation, key) for key in self.spec}
        if self._check_instruction is not None:  # e.g. the prompt's tokens against the sequence
            try:
                self._check_instruction(instruction)
            except (ValueError, TypeError) as e:
                raise RequestError(f"{instruction_key!r} refused by the policy: {e}") from None
        return checked, instruction

    def _check_value(self, observation: dict, key: str) -> np.ndarray:
        """observation's value for the spec's `key` (sent as `key` or an openpi alias), checked:
        uint8 kept exact, floats cast to a float32 spec, frames [H, W, C] of any size >= 1."""
        shape, dtype = self.spec[key]
        frame_size = self.frame_sizes.get(key)
        expected = f"a {dtype.name} array of shape {shape}"
        sent = [name for name in (key, *aliases(key)) if name in observation]
        if not sent:
            others = " or ".join(repr(name) for name in aliases(key))
            raise RequestError(
                f"observation is missing required key {key!r} (expected {expected}; openpi-style "
                f"clients may send it as {others})"
            )
        if len(sent) > 1:
            raise RequestError(
                f"observation has {' and '.join(map(repr, sent))}, which all mean {key!r}: send one"
            )
        name = repr(key) if sent[0] == key else f"{sent[0]!r} (jaxvla's {key!r})"
        value = observation[sent[0]]
        if not isinstance(value, np.ndarray):
            raise RequestError(f"observation[{name}] must be {expected}, got {_describe(value)}")
        if value.dtype != dtype:
            if dtype == np.float32 and value.dtype.kind == "f":  # openpi clients send float64 state
                value = value.astype(np.float32)
            else:
                raise RequestError(
                    f"observation[{name}] has dtype {value.dtype}, expected {dtype.name} "
                    f"(shape {shape})"
                )
        if frame_size is not None:  # any height and width: center-cropped and resized later
            if value.ndim != 3 or value.shape[2] != shape[2] or min(value.shape[:2]) < 1:
                raise RequestError(
                    f"observation[{name}] has shape {tuple(value.shape)}, expected {shape} (a "
                    f"[H, W, {shape[2]}] frame of another size is center-cropped to a square and "
                    f"resized to {frame_size})"
                )
        elif len(value.shape) != len(shape) or any(
            want is not None and want >= 0 and got != want for got, want in zip(value.shape, shape)
        ):
            raise RequestError(f"observation[{name}] has shape {tuple(value.shape)}, expected {shape}")
        return value
