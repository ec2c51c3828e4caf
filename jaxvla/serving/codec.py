"""msgpack-numpy: the message encoding of the policy server and its clients (no JAX).

numpy arrays travel as ``{b"__ndarray__": True, b"data": raw C-order bytes, b"dtype":
dtype.str, b"shape": [...]}`` and numpy scalars as ``{b"__npgeneric__": True, b"data": item,
b"dtype": dtype.str}``: the tagged maps of openpi's ``openpi_client.msgpack_numpy``, so either
side can be openpi's. Other map keys decode as str. Object and structured dtypes are refused both
ways (they cannot round-trip without pickle).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

# The wire protocol's version (the server's metadata "protocol"). 2: errors are text frames.
PROTOCOL_VERSION = 2
# Largest websocket message either side accepts by default (a few frames of a big camera).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
