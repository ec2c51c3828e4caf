"""jaxvla.io.weights: the restricted unpickler and the .pkl/.npz/.msgpack tree loaders."""

import collections
import io
import os
import pickle
import struct
import tracemalloc
import zipfile

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


# --------------------------------------------------------------------------- allocation routes
# Hand-made pickles (opcodes spelled out) that ask the loader for far more memory than the file
# holds. Each must be refused with an error naming the file and the reason, before the
# allocation: the traced peak stays small although each asks for 300 MB.

N = 300_000_000
P2, P5 = b"\x80\x02", b"\x80\x05"
MARK, TUPLE, TUPLE1, TUPLE3, REDUCE, BUILD, STOP = b"(", b"t", b"\x85", b"\x87", b"R", b"b", b"."


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def i32(n):
    return b"J" + struct.pack("<i", n)


def text(s):
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def dtype_of(spec):
    return glob("numpy", "dtype") + text(spec) + TUPLE1 + REDUCE


RECONSTRUCT = glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray")


def refused(tmp_path, payload, *reasons, max_peak=4 << 20):
    """Loads ``payload`` from a file under tracemalloc: UnsafePickleError naming the file and each
    of ``reasons``, with a traced peak under ``max_peak`` bytes."""
    path = tmp_path / "crafted.pkl"
    path.write_bytes(payload)
    tracemalloc.start()
    try:
        with pytest.raises(UnsafePickleError) as info:
            safe_load_pickle(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(path) in message, message
    for reason in reasons:
        assert reason in message, message
    assert peak < max_peak, f"{peak:,} bytes traced while refusing: {message}"
    return message


def test_bytearray_and_bytes_of_an_int_are_refused(tmp_path):
    payload = P2 + glob("__builtin__", "bytearray") + i32(N) + TUPLE1 + REDUCE + STOP
    assert len(payload) == 33
    refused(tmp_path, payload, "bytearray(300000000)")
    refused(tmp_path, P2 + glob("__builtin__", "bytes") + i32(N) + TUPLE1 + REDUCE + STOP, "bytes(300000000)")
    # INST (protocol 0) instantiates without REDUCE: refused as an opcode.
    refused(tmp_path, b"(I300000000\ni__builtin__\nbytearray\n.", "INST")


def test_array_constructors_are_refused_or_bounded(tmp_path):
    # numpy.ndarray((N,)) called directly, by REDUCE or by NEWOBJ (ndarray.__new__).
    refused(tmp_path, P2 + glob("numpy", "ndarray") + i32(N) + TUPLE1 + TUPLE1 + REDUCE + STOP, "numpy.ndarray")
    refused(tmp_path, P2 + glob("numpy", "ndarray") + i32(N) + TUPLE1 + TUPLE1 + b"\x81" + STOP, "NEWOBJ")
    # _reconstruct(ndarray, (N,), "b"): charged its N bytes against a 4 x size + 1 MiB budget.
    payload = P2 + RECONSTRUCT + i32(N) + TUPLE1 + text("b") + TUPLE3 + REDUCE + STOP
    refused(tmp_path, payload, "_reconstruct", "300,000,000 bytes", f"{len(payload)}-byte file")
    # __setstate__ claiming shape (N,) with 2 bytes of data.
    state = MARK + b"K\x01" + i32(N) + TUPLE1 + dtype_of("u1") + b"\x89" + b"C\x02ab" + TUPLE
    payload = P2 + RECONSTRUCT + b"K\x00" + TUPLE1 + text("b") + TUPLE3 + REDUCE + state + BUILD + STOP
    refused(tmp_path, payload, "300,000,000 bytes but the file holds 2")
    # _frombuffer with a 4-byte buffer reshaped to (N,).
    payload = (P2 + glob("numpy._core.numeric", "_frombuffer") + MARK + b"C\x04abcd" + dtype_of("u1")
               + i32(N) + TUPLE1 + text("C") + TUPLE + REDUCE + STOP)
    refused(tmp_path, payload, "_frombuffer", "300,000,000 bytes but the file holds 4")
    # numpy scalar without (or with short) data.
    refused(tmp_path, P2 + glob("numpy.core.multiarray", "scalar") + dtype_of("f8") + b"C\x02ab" + b"\x86" + REDUCE
            + STOP, "needs exactly 8 bytes")


def test_dtypes_with_huge_itemsize_or_objects_are_refused(tmp_path):
    # A 300 MB element, then one array of it: refused at the dtype.
    payload = P2 + RECONSTRUCT + b"K\x01" + TUPLE1 + dtype_of("V300000000") + TUPLE3 + REDUCE + STOP
    refused(tmp_path, payload, "itemsize of 300,000,000 bytes")
    refused(tmp_path, P2 + dtype_of("(100000000,)f8") + STOP, "sub-array")
    refused(tmp_path, P2 + dtype_of("f4,i4") + STOP, "structured")
    refused(tmp_path, P2 + dtype_of("O") + STOP, "object dtype")
    # numpy.dtype(list) is the object dtype too; only type strings and ml_dtypes types are admitted.
    refused(tmp_path, P2 + glob("numpy", "dtype") + glob("__builtin__", "list") + TUPLE1 + REDUCE + STOP,
            "only a type string")
    # dtype.__setstate__ may not change the itemsize (numpy would take it for a void dtype).
    forged = MARK + b"K\x03" + text("|") + b"NNN" + i32(N) + b"K\x01" + b"K\x00" + TUPLE
    refused(tmp_path, P2 + dtype_of("V8") + forged + BUILD + STOP, "only a plain dtype's byte order")
    # ml_dtypes scalar types are dtype arguments, never callables.
    refused(tmp_path, P2 + glob("ml_dtypes", "bfloat16") + b"K\x01" + TUPLE1 + REDUCE + STOP,
            "ml_dtypes.bfloat16")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_object_arrays_are_refused(tmp_path, protocol):
    payload = pickle.dumps({"w": np.array([None, 1], dtype=object)}, protocol=protocol)
    refused(tmp_path, payload, "object dtype")
    # numpy's reduction of an object array does not go through _reconstruct's typecode alone.
    refused(tmp_path, P2 + RECONSTRUCT + b"K\x02" + TUPLE1 + text("O") + TUPLE3 + REDUCE + STOP, "object dtype")


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x96", b"\x8d", b"\x95"], ids=["BINBYTES8", "BYTEARRAY8",
                                                                             "BINUNICODE8", "FRAME"])
def test_lengths_beyond_the_file_are_refused_before_allocating(tmp_path, opcode):
    """CPython's C unpickler allocates a counted opcode's claimed length before reading it."""
    payload = P5 + opcode + struct.pack("<Q", N) + b"N."
    refused(tmp_path, payload, "claims 300,000,000 bytes but only 2 remain")
    refused(tmp_path, P2 + b"\x8b" + struct.pack("<i", N) + STOP, "claims 300,000,000 bytes")  # LONG4


def test_repeated_copies_of_one_memo_entry_are_bounded(tmp_path):
    """A 1000-item list stored once, then copied by tuple() 5000 times (7 bytes per copy in the
    file, 8 kB per copy in memory): the copies are charged and refused long before 40 MB."""
    setup = (P2 + b"]" + b"(" + b"K\x00" * 1000 + b"e" + b"q\x01" + b"0"
             + glob("__builtin__", "tuple") + b"q\x02" + b"0" + b"]")
    payload = setup + (b"h\x02" + b"h\x01" + TUPLE1 + REDUCE + b"a") * 5000 + STOP
    assert len(payload) < 40_000
    refused(tmp_path, payload, "tuple() copy", f"{len(payload):,}-byte file")


def test_budget_admits_genuine_large_arrays():
    """The budget is a few times the file's size: real arrays of any size still load, in every
    protocol (0-2 carry their bytes as latin-1 text, encoded then copied)."""
    value = np.random.default_rng(0).standard_normal(600_000).astype(np.float32)  # 2.4 MB, every byte value
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = safe_loads_pickle(pickle.dumps({"w": value, "s": collections.OrderedDict(a=value[:3])}, protocol))
        np.testing.assert_array_equal(loaded["w"], value)
        assert loaded["w"].dtype == np.float32 and loaded["w"].flags.writeable


def test_param_trees_refuse_object_leaves(tmp_path):
    # .npz: numpy would unpickle an object array; the error names the file and the entry.
    path = tmp_path / "objects.npz"
    np.savez(path, w=np.ones(2, np.float32), evil=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match=rf"{path}: entry 'evil' has object dtype"):
        load_param_tree(path)
    # .msgpack and pickles: a None leaf (or a ragged list) would become an object array.
    path = tmp_path / "none.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"layer": {"w": np.ones(2, np.float32), "b": None}}))
    with pytest.raises(ValueError, match=rf"{path}: parameter 'layer/b' has object dtype"):
        load_param_tree(path)
    path = tmp_path / "none.pkl"
    path.write_bytes(pickle.dumps({"layer": {"w": np.ones(2, np.float32), "b": None}}))
    with pytest.raises(ValueError, match=rf"{path}: parameter 'layer/b' has object dtype"):
        load_param_tree(path)
    cyclic = {"w": np.ones(2)}
    cyclic["self"] = cyclic
    path.write_bytes(pickle.dumps(cyclic))
    with pytest.raises(ValueError, match=rf"{path}: the tree is cyclic at 'self'"):
        load_param_tree(path)


def test_npz_header_cannot_claim_more_than_the_entry_holds(tmp_path):
    """numpy allocates the array a .npz entry's header describes before reading its data: a
    300 MB shape over 16 bytes of data is refused from the header."""
    from numpy.lib import format as npy

    entry = io.BytesIO()
    npy.write_array_header_1_0(entry, {"descr": "<f4", "fortran_order": False, "shape": (N // 4,)})
    entry.write(b"\x00" * 16)
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("w.npy", entry.getvalue())
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{path}: entry 'w' claims shape \(75000000,\)"):
            load_param_tree(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_easylm_streaming_refuses_object_entries(tmp_path):
    import msgpack

    from jaxvla.io.lwm import read_easylm_streaming

    path = tmp_path / "streaming_params"
    with open(path, "wb") as f:
        f.write(msgpack.packb((["params", "w"], serialization.to_bytes(np.ones(2, np.float32)))))
        f.write(msgpack.packb((["params", "b"], serialization.msgpack_serialize(None))))
    with pytest.raises(ValueError, match=rf"{path}: entry 'params/b' has object dtype"):
        read_easylm_streaming(path)
