"""jaxvla.io.weights: the restricted unpickler and the .pkl/.npz/.msgpack tree loaders."""

import collections
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
from flax import serialization
from flax.core import FrozenDict

from jaxvla.io.weights import (
    UnsafePickleError,
    flatten_dict,
    load_param_tree,
    safe_load_pickle,
    safe_loads_pickle,
    save_npz_tree,
    unflatten_dict,
)

VALUES = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64": np.linspace(-1, 1, 5),
    "f16": np.array([0.5, -2.0], np.float16),
    "bf16": np.array([1.5, -0.25], ml_dtypes.bfloat16),
    "i8": np.array([-128, 127], np.int8),
    "u16": np.array([0, 65535], np.uint16),
    "i64": np.array([2**40], np.int64),
    "bool": np.array([True, False]),
    "c64": np.array([1 + 2j], np.complex64),
    "zero_d": np.array(3.25, np.float32),
    "empty": np.zeros((0, 3), np.float32),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "strided": np.arange(10, dtype=np.float32)[::3],
    "np_f32_scalar": np.float32(1.5),
    "np_i64_scalar": np.int64(-7),
    "np_bool_scalar": np.bool_(True),
}


def assert_same(got, want, what=""):
    assert type(got) is type(want), what
    assert got.dtype == want.dtype, what
    assert np.shape(got) == np.shape(want), what
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=what)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_loads_arrays_exactly(protocol):
    tree = {
        "layer": dict(VALUES),
        "list": [np.ones(2, np.float32), 3, "name", None, 1.5],
        "tuple": (np.zeros(1), True),
    }
    loaded = safe_loads_pickle(pickle.dumps(tree, protocol=protocol))
    for key, value in VALUES.items():
        assert_same(loaded["layer"][key], value, f"protocol {protocol}: {key}")
    assert loaded["list"][1:] == [3, "name", None, 1.5]
    assert_same(loaded["list"][0], tree["list"][0])
    assert isinstance(loaded["tuple"], tuple) and loaded["tuple"][1] is True
    # Unpickled arrays are ordinary writable arrays (protocol 5 reads them from a buffer).
    assert loaded["layer"]["f32"].flags.writeable


def test_mapping_wrappers_become_dicts(tmp_path):
    tree = {"params": {"w": np.ones((2, 2), np.float32)}}
    for wrapper in (FrozenDict(tree), collections.OrderedDict(tree)):
        path = tmp_path / "w.pkl"
        path.write_bytes(pickle.dumps(wrapper))
        loaded = safe_load_pickle(path)
        assert isinstance(loaded, dict)
        np.testing.assert_array_equal(loaded["params"]["w"], tree["params"]["w"])


class _RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": np.ones(2), "evil": _RunsShellCommand(marker)})
    assert b"system" in payload  # the payload names os.system (posix.system)
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads_pickle(payload)
    assert not marker.exists()

    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=str(path)):
        safe_load_pickle(path)
    with pytest.raises(UnsafePickleError):
        load_param_tree(path)
    assert not marker.exists()

    with pytest.raises(UnsafePickleError, match="eval"):
        safe_loads_pickle(pickle.dumps(_CallsEval()))


def test_refuses_unlisted_classes_and_codecs():
    # A class from a module that is importable but not allow-listed.
    with pytest.raises(UnsafePickleError, match="collections.Counter"):
        safe_loads_pickle(pickle.dumps(collections.Counter("ab")))
    # _codecs.encode is admitted only for the latin1 round trip of protocol 0-2 array bytes.
    crafted = b"c_codecs\nencode\n(Vabc\nVzlib\ntR."
    with pytest.raises(UnsafePickleError, match="codec"):
        safe_loads_pickle(crafted)


def test_flatten_unflatten_round_trip():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert flatten_dict(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert unflatten_dict(flatten_dict(tree)) == tree


def _tree():
    return {
        "encoder": {"conv": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.ones(4, np.float32)}},
        "codebook": np.linspace(0, 1, 6).reshape(3, 2).astype(np.float32),
        "step": np.array(7, np.int64),
        # .npz cannot name ml_dtypes types natively; save_npz_tree records them.
        "bf16": np.array([[1.5, -0.25]], ml_dtypes.bfloat16),
        "f8": np.array([0.5, 2.0], ml_dtypes.float8_e4m3fn),
    }


def _assert_tree_equal(got, want):
    got, want = flatten_dict(got), flatten_dict(want)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_npz_round_trip(tmp_path):
    path = tmp_path / "tree.npz"
    save_npz_tree(path, _tree())
    assert sorted(os.listdir(tmp_path)) == ["tree.npz"]  # no temporary file left behind
    _assert_tree_equal(load_param_tree(path), _tree())


def test_msgpack_round_trip(tmp_path):
    path = tmp_path / "tree.msgpack"
    path.write_bytes(serialization.msgpack_serialize(_tree()))
    _assert_tree_equal(load_param_tree(path), _tree())


def test_pickle_round_trip(tmp_path):
    path = tmp_path / "tree.pkl"
    path.write_bytes(pickle.dumps({"params": _tree()}))
    _assert_tree_equal(load_param_tree(path), {"params": _tree()})


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_param_tree(tmp_path / "nope.pkl")
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=".safetensors"):
        load_param_tree(path)
    # A pickle that holds something other than a tree.
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([np.ones(2)]))
    with pytest.raises(ValueError, match="expected a parameter tree"):
        load_param_tree(path)
