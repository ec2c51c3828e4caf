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


# -- reliability: instruction limits and the prompt cache ---------------------------------------


class LengthCostPolicy(FakePolicy):
    """act costs 1 s per 10 000 instruction characters (capped at 10 s), as tokenizing them did;
    records the length of every instruction it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def act(self, observation, instruction):
        self.seen.append(len(instruction))
        time.sleep(min(len(instruction) * 1e-4, 10.0))
        return super().act(observation, instruction)


def test_long_instruction_refused_before_the_worker():
    """A 10 MB instruction is refused at parse time, in well under a second, naming the limit and
    its length; another client's requests sent meanwhile are answered at once."""
    policy = LengthCostPolicy()
    srv = PolicyServer(policy, port=0).start()
    huge = "x" * 10_000_000
    try:
        with Client(port=srv.port, timeout=5) as attacker, Client(port=srv.port, timeout=5) as robot:
            image = make_image(6)
            out, done = {}, threading.Event()

            def attack():
                start = time.perf_counter()
                try:
                    attacker.act({"image": image}, huge)
                    out["error"] = "no error"
                except (RuntimeError, TimeoutError) as e:
                    out["error"] = f"{type(e).__name__}: {e}"
                out["seconds"] = time.perf_counter() - start
                done.set()

            thread = threading.Thread(target=attack)
            thread.start()
            deadline = time.monotonic() + 5  # until refused, or (unfixed server) inside policy.act
            while not (done.is_set() or policy.in_act.is_set()) and time.monotonic() < deadline:
                time.sleep(0.005)
            latencies = []
            for _ in range(5):
                start = time.perf_counter()
                actions = robot.act({"image": image}, "pick up the cube")
                latencies.append(time.perf_counter() - start)
                np.testing.assert_array_equal(actions, expected_actions(image, "pick up the cube"))
            thread.join(10)
            assert max(latencies) < 5.0, latencies
            assert out["error"] == (
                "RuntimeError: policy server error: 'instruction' is 10000000 characters; this server "
                "accepts at most 2048 (max_instruction_chars, --max_instruction_chars)"
            )
            assert out["seconds"] < 2.0, out["seconds"]
            assert policy.seen == [len("pick up the cube")] * 5  # the huge one never reached act
            health = robot.health()
            assert (health["requests"], health["errors"]) == (5, 1)
    finally:
        srv.stop()


def test_instruction_limit_is_configurable():
    with pytest.raises(ValueError, match="max_instruction_chars=0: expected >= 1"):
        PolicyServer(FakePolicy(), port=0, max_instruction_chars=0)
    srv = PolicyServer(FakePolicy(), port=0, max_instruction_chars=100).start()
    try:
        with raw_connect(srv.port) as ws:
            image = make_image(7)
            ws.send(packb({"observation": {"image": image}, "instruction": "y" * 100}))
            reply = unpackb(ws.recv(timeout=5))
            np.testing.assert_array_equal(reply["actions"], expected_actions(image, "y" * 100))
            ws.send(packb({"observation": {"image": image}, "instruction": "y" * 101}))
            assert unpackb(ws.recv(timeout=5)) == {"error": (
                "'instruction' is 101 characters; this server accepts at most 100 "
                "(max_instruction_chars, --max_instruction_chars)")}
            ws.send(packb({"image": image, "prompt": "z" * 250}))  # openpi's flat layout
            assert unpackb(ws.recv(timeout=5)) == {"error": (
                "'prompt' is 250 characters; this server accepts at most 100 "
                "(max_instruction_chars, --max_instruction_chars)")}
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def text_tokenizer():
    from jaxvla.data.text import load_text_tokenizer

    return load_text_tokenizer()


@pytest.fixture
def make_prompts(text_tokenizer, monkeypatch):
    """TextPrompts sharing one loaded tokenizer (each instance has its own cache)."""
    from jaxvla.data import text
    from jaxvla.stages.vla import TextPrompts

    monkeypatch.setattr(text, "load_text_tokenizer", lambda path=None: text_tokenizer)
    return TextPrompts


class SequencePolicy(FakePolicy):
    """FakePolicy that builds its flow sequence like jaxvla.policy.Policy: TextPrompts limited to
    the layout's prompt budget, then build_flow; records the instructions act is given."""

    SEQ_LEN, FRAME_TOKENS = 96, 16

    def __init__(self, prompts):
        from jaxvla.data.sequences import Vocab
        from jaxvla.policy import prompt_token_budget

        super().__init__()
        self.prompts = prompts
        self.vocab = Vocab(image_codes=self.FRAME_TOKENS)
        self.budget = prompt_token_budget("flow", self.SEQ_LEN, prompts.markers, self.vocab, self.FRAME_TOKENS,
                                          chunk=CHUNK, action_dim=ACTION_DIM)
        prompts.set_budget(self.budget, f"seq_len {self.SEQ_LEN}")
        self.seen = []

    def check_instruction(self, instruction):
        self.prompts(instruction)

    def act(self, observation, instruction):
        from jaxvla.data.sequences import build_flow

        self.seen.append(instruction)
        build_flow(self.prompts(instruction), np.zeros(self.FRAME_TOKENS, np.int32), self.prompts.markers,
                   self.vocab, self.SEQ_LEN, chunk=CHUNK)
        return super().act(observation, instruction)


def test_prompt_over_token_budget_refused_at_parse_time(make_prompts, text_tokenizer):
    """Under the character limit but over the sequence's text slots: refused before act, with
    the prompt's token count and the budget; the boundary prompt (exactly the budget) is served."""
    from jaxvla.data.text import prompt_ids

    policy = SequencePolicy(make_prompts())
    # "robot" repeated: one more word, one more token; find the counts at and past the budget.
    lengths = {k: prompt_ids(text_tokenizer, " ".join(["robot"] * k)).size for k in range(1, 200)}
    fits = max(k for k, n in lengths.items() if n == policy.budget)
    assert lengths[fits + 1] == policy.budget + 1
    fitting, too_long = " ".join(["robot"] * fits), " ".join(["robot"] * (fits + 1))
    srv = PolicyServer(policy, port=0).start()
    try:
        with raw_connect(srv.port) as ws:
            image = make_image(8)
            ws.send(packb({"observation": {"image": image}, "instruction": fitting}))
            reply = unpackb(ws.recv(timeout=5))
            np.testing.assert_array_equal(reply["actions"], expected_actions(image, fitting))

            start = time.perf_counter()
            ws.send(packb({"observation": {"image": image}, "instruction": too_long}))
            reply = unpackb(ws.recv(timeout=5))
            assert time.perf_counter() - start < 1.0
            assert reply == {"error": (
                f"'instruction' refused by the policy: instruction of {len(too_long)} characters is "
                f"{policy.budget + 1} prompt tokens (bos and LAPA's template included); at most "
                f"{policy.budget} fit (seq_len {SequencePolicy.SEQ_LEN})")}
    finally:
        srv.stop()
    assert policy.seen == [fitting]  # the refused one never reached act
    assert list(policy.prompts._cache) == [fitting]  # and left no cache entry


def test_prompt_token_budget_matches_the_sequence_builders(text_tokenizer):
    from jaxvla.data.sequences import Vocab, build_bins, build_flow
    from jaxvla.data.text import marker_ids
    from jaxvla.policy import prompt_token_budget

    markers, vocab, frame, seq_len = marker_ids(text_tokenizer), Vocab(image_codes=16), 16, 120
    size = {m: len(ids) for m, ids in markers.items()}
    prefix = size["<vision>"] + frame + 1 + size["</vision>"]  # + eov
    expected = {"flow": seq_len - prefix - CHUNK,
                "bins": seq_len - prefix - size["<delta>"] - CHUNK * ACTION_DIM - size["</delta>"]}
    image, actions = np.zeros(frame, np.int32), np.zeros((CHUNK, ACTION_DIM), np.int32)  # bins: the chunk's
    for head, build in (("flow", lambda p: build_flow(p, image, markers, vocab, seq_len, chunk=CHUNK)),
                        ("bins", lambda p: build_bins(p, image, actions, markers, vocab, seq_len))):
        budget = prompt_token_budget(head, seq_len, markers, vocab, frame, chunk=CHUNK, action_dim=ACTION_DIM)
        assert budget == expected[head], head
        assert build(np.ones(budget, np.int32))["segment_ids"].sum() == seq_len
        with pytest.raises(ValueError, match=f"exceeds max_len {seq_len}"):
            build(np.ones(budget + 1, np.int32))


def test_prompt_cache_is_a_bounded_lru(make_prompts, text_tokenizer):
    from jaxvla.data.text import prompt_ids

    prompts = make_prompts()  # the default size: 1024 instructions
    instructions = [f"pick up cube number {i}" for i in range(3000)]
    first = {}
    for i, instruction in enumerate(instructions):
        first[instruction] = prompts(instruction)
        assert len(prompts._cache) == min(i + 1, 1024)
    for instruction in instructions[::250]:
        np.testing.assert_array_equal(first[instruction], prompt_ids(text_tokenizer, instruction))
    assert list(prompts._cache) == instructions[-1024:]  # least recently used first

    oldest, next_oldest = instructions[-1024], instructions[-1023]
    assert prompts(oldest) is first[oldest]  # a hit: not tokenized again, now the most recent
    prompts("open the drawer")  # evicts the least recently used: next_oldest, not oldest
    assert len(prompts._cache) == 1024
    assert list(prompts._cache) == instructions[-1022:] + [oldest, "open the drawer"]
    assert next_oldest not in prompts._cache and oldest in prompts._cache


def test_prompt_cache_size_is_configurable_and_never_keeps_failures(make_prompts, text_tokenizer, monkeypatch):
    from jaxvla.data.text import prompt_ids

    with pytest.raises(ValueError, match=r"cache_size=-1: expected >= 0"):
        make_prompts(cache_size=-1)
    uncached = make_prompts(cache_size=0)
    np.testing.assert_array_equal(uncached("reach"), prompt_ids(text_tokenizer, "reach"))
    assert uncached.cached() == []

    prompts = make_prompts(cache_size=3, max_tokens=30)
    for instruction in ("a", "b", "c", "a", "d"):
        prompts(instruction)
    assert prompts.cached() == ["c", "a", "d"]  # "b" was the least recently used

    too_long = "stack every block " * 10
    n = prompt_ids(text_tokenizer, too_long).size
    assert n > 30
    with pytest.raises(ValueError, match=f"is {n} prompt tokens .*; at most 30 fit \\(max_tokens\\)"):
        prompts(too_long)
    assert prompts.cached() == ["c", "a", "d"]  # a rejection neither enters nor evicts

    real_encode = text_tokenizer.encode

    def failing_encode(text, **kwargs):
        if "boom" in text:
            raise RuntimeError("tokenizer failed")
        return real_encode(text, **kwargs)

    monkeypatch.setattr(text_tokenizer, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        prompts("boom")
    with pytest.raises(UnicodeDecodeError):
        prompts(b"\xff\xfe")
    assert prompts.cached() == ["c", "a", "d"]
    np.testing.assert_array_equal(prompts("e"), prompt_ids(text_tokenizer, "e"))
    assert prompts.cached() == ["a", "d", "e"]
