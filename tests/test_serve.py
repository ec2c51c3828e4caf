"""jaxvla.serve: msgpack-numpy packing, the websocket protocol, errors, concurrency, tokens."""

import contextlib
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.sync.client import connect

from jaxvla.serve import Client, PolicyServer, packb, unpackb

CHUNK, ACTION_DIM, IMAGE_SHAPE = 4, 3, (8, 8, 3)


class FakePolicy:
    """Numpy stand-in for jaxvla.policy.Policy: actions = image mean + len(instruction)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.in_act = threading.Event()  # set once act() has started (for the concurrency test)

    @property
    def metadata(self):
        return {
            "head": "flow",
            "chunk": CHUNK,
            "action_dim": ACTION_DIM,
            "execute_steps": 2,
            "image_size": 8,
        }

    def observation_spec(self):
        return {"image": (IMAGE_SHAPE, "uint8")}

    def act(self, observation, instruction):
        self.in_act.set()
        if instruction == "explode":
            raise ValueError("kaboom")
        if self.delay_s:
            time.sleep(self.delay_s)
        image = observation["image"]
        return np.full((CHUNK, ACTION_DIM), image.mean() + len(instruction), np.float32)


def expected_actions(image, instruction):
    return np.full((CHUNK, ACTION_DIM), image.mean() + len(instruction), np.float32)


def make_image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)


@pytest.fixture
def server():
    srv = PolicyServer(FakePolicy(), port=0).start()
    yield srv
    srv.stop()


@contextlib.contextmanager
def raw_connect(port):
    """A bare websocket (no Client) with the metadata message already read."""
    with connect(f"ws://127.0.0.1:{port}", proxy=None, compression=None) as ws:
        assert unpackb(ws.recv(timeout=5))["server"] == "jaxvla"
        yield ws


# -- msgpack-numpy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5),
        np.array([-(2**62), 0, 2**62], dtype=np.int64),
        np.array([True, False, True]),
        np.array(3.5, dtype=np.float64),  # 0-d
        np.zeros((0, 7), dtype=np.float32),  # empty
        np.arange(12, dtype=np.float16).reshape(3, 4).T,  # non-contiguous
        np.array([1, 2], dtype=">i4"),  # big-endian
    ],
)
def test_ndarray_round_trip_exact(array):
    out = unpackb(packb({"x": array}))["x"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    out[...] = out  # writable, owns its memory


def test_scalars_and_containers_round_trip():
    obj = {
        "f32": np.float32(1.25),
        "f64": np.float64(-2.5),
        "i64": np.int64(-7),
        "u8": np.uint8(200),
        "b": np.bool_(True),
        "nested": {"list": [1, "two", b"three", None], "tuple": (1, 2)},
    }
    out = unpackb(packb(obj))
    for key in ("f32", "f64", "i64", "u8", "b"):
        assert type(out[key]) is type(obj[key]) and out[key] == obj[key]
    assert out["nested"] == {"list": [1, "two", b"three", None], "tuple": [1, 2]}
    assert all(isinstance(k, str) for k in out)


def test_object_arrays_rejected():
    with pytest.raises(TypeError, match="object"):
        packb({"x": np.array([1, "a"], dtype=object)})


# -- protocol -----------------------------------------------------------------------------------


def test_metadata_act_and_flat_layout(server):
    with Client(port=server.port, timeout=5) as client:
        meta = client.metadata
        assert meta["server"] == "jaxvla" and meta["protocol"] == 1
        assert (meta["head"], meta["chunk"], meta["action_dim"]) == ("flow", CHUNK, ACTION_DIM)
        assert meta["observation_spec"] == {"image": {"shape": list(IMAGE_SHAPE), "dtype": "uint8"}}

        image = make_image(1)
        actions = client.act({"image": image}, "pick up the cube")
        assert actions.dtype == np.float32 and actions.shape == (CHUNK, ACTION_DIM)
        np.testing.assert_array_equal(actions, expected_actions(image, "pick up the cube"))
        assert client.last_timing["infer_ms"] >= 0
        assert client.last_timing["total_ms"] >= client.last_timing["infer_ms"]
        assert client.last_timing["roundtrip_ms"] >= 0

        health = client.health()
        assert health["status"] == "ok" and health["requests"] == 1 and health["busy"] is False

    # openpi's flat layout: observation keys at the top level, instruction as "prompt".
    with raw_connect(server.port) as ws:
        image = make_image(2)
        ws.send(packb({"image": image, "prompt": "open drawer"}))
        reply = unpackb(ws.recv(timeout=5))
        np.testing.assert_array_equal(reply["actions"], expected_actions(image, "open drawer"))
        assert reply["server_timing"]["infer_ms"] >= 0


BAD_REQUESTS = [
    ({"observation": {}, "instruction": "x"}, "'image'"),
    ({"observation": {"image": np.zeros((8, 8), np.uint8)}, "instruction": "x"}, "shape"),
    ({"observation": {"image": np.zeros(IMAGE_SHAPE, np.float32)}, "instruction": "x"}, "dtype"),
    ({"observation": {"image": [1, 2, 3]}, "instruction": "x"}, "'image'"),
    ({"observation": {"image": np.zeros(IMAGE_SHAPE, np.uint8)}, "instruction": 3}, "str"),
    ({"observation": {"image": np.zeros(IMAGE_SHAPE, np.uint8)}}, "instruction"),
    ({"observation": "image", "instruction": "x"}, "observation"),
    ({"type": "reboot"}, "unknown request type"),
    ([1, 2, 3], "dict"),
    ("hello", "dict"),
]


def test_malformed_requests_get_errors_and_connection_survives(server):
    with raw_connect(server.port) as ws:
        image = make_image(3)
        good = packb({"observation": {"image": image}, "instruction": "ok"})
        bad = [(packb(req), match) for req, match in BAD_REQUESTS]
        bad.append((np.random.default_rng(0).bytes(64), "msgpack"))  # random bytes
        bad.append((b"\xc1", "msgpack"))  # a never-used msgpack byte
        bad.append(("not a binary frame", "text frame"))
        for message, match in bad:
            ws.send(message)
            reply = unpackb(ws.recv(timeout=5))
            assert set(reply) == {"error"}, (message, reply)
            assert match in reply["error"], (match, reply["error"])
            ws.send(good)
            reply = unpackb(ws.recv(timeout=5))
            np.testing.assert_array_equal(reply["actions"], expected_actions(image, "ok"))

    with Client(port=server.port, timeout=5) as client:
        with pytest.raises(RuntimeError, match="expected uint8"):
            client.act({"image": np.zeros(IMAGE_SHAPE, np.int64)}, "x")
        assert client.health()["errors"] == len(bad) + 1


def test_policy_exception_is_reported_and_server_keeps_serving(server):
    with Client(port=server.port, timeout=5) as client:
        with pytest.raises(RuntimeError, match="ValueError: kaboom"):
            client.act({"image": make_image()}, "explode")
        image = make_image(4)
        actions = client.act({"image": image}, "again")
        np.testing.assert_array_equal(actions, expected_actions(image, "again"))
    with Client(port=server.port, timeout=5) as client:  # new connections still accepted
        assert client.health()["status"] == "ok"


def test_health_answered_while_slow_act_in_flight():
    policy = FakePolicy(delay_s=1.0)
    srv = PolicyServer(policy, port=0).start()
    try:
        with Client(port=srv.port, timeout=5) as slow, Client(port=srv.port, timeout=5) as fast:
            result = {}

            def slow_request():
                result["actions"] = slow.act({"image": make_image()}, "slow")

            worker = threading.Thread(target=slow_request)
            worker.start()
            assert policy.in_act.wait(5)  # the slow request is inside policy.act now
            start = time.perf_counter()
            health = fast.health()
            elapsed = time.perf_counter() - start
            assert elapsed < 0.5, elapsed
            assert health["busy"] is True
            worker.join(5)
            assert result["actions"].shape == (CHUNK, ACTION_DIM)
            assert slow.last_timing["infer_ms"] >= 900
            assert fast.health()["busy"] is False
    finally:
        srv.stop()


def test_token_and_http_healthz():
    srv = PolicyServer(FakePolicy(), port=0, token="s3cret").start()
    try:
        with pytest.raises(PermissionError):
            Client(port=srv.port, timeout=5)
        with pytest.raises(PermissionError):
            Client(port=srv.port, token="wrong", timeout=5)
        with Client(port=srv.port, token="s3cret", timeout=5) as client:
            image = make_image(5)
            actions = client.act({"image": image}, "hi")
            np.testing.assert_array_equal(actions, expected_actions(image, "hi"))

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{srv.port}/healthz", timeout=5) as response:
            assert response.status == 200 and response.read().strip() == b"ok"
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            opener.open(f"http://127.0.0.1:{srv.port}/", timeout=5)
        assert excinfo.value.code == 401
        excinfo.value.close()  # else the server waits close_timeout for this socket on stop()
    finally:
        srv.stop()


def test_start_reports_bind_errors_and_stop_is_idempotent(server):
    with pytest.raises(OSError):
        PolicyServer(FakePolicy(), port=server.port).start()
    server.stop()
    server.stop()
