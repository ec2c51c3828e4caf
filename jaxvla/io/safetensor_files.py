"""The safetensors file format, written and read with numpy alone (no ``safetensors`` package).

Layout (https://huggingface.co/docs/safetensors, "Format"):

* 8 bytes: N, the header's length, unsigned little-endian 64-bit,
* N bytes: a UTF-8 JSON object ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
  "__metadata__": {str: str}}``, padded with spaces (here to a multiple of 8 bytes, so every
  tensor's data is aligned),
* the data: each tensor's bytes, C order, little-endian, at ``[begin, end)`` of this buffer; the
  tensors follow one another with no gaps or overlaps (what the reference reader checks).

PyTorch users read the files with ``safetensors.torch.load_file``; ``read_safetensors`` here
reads them back as numpy (and checks the layout as strictly).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import numpy as np

# numpy dtype -> safetensors dtype name (bfloat16 is written as float32 by the exporter).
DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32", np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
NUMPY_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference implementation's limit


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (name -> numpy array of a dtype in ``DTYPES``) in name order, with
    ``metadata`` (strings only) as ``__metadata__``; to a temporary file renamed when complete."""
    header: dict = {}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved in safetensors files")
        array = np.asarray(tensors[name])
        if array.dtype.newbyteorder("=") not in DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent "
                            f"(supported: {sorted(str(d) for d in DTYPES)})")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # tobytes() writes C order
        header[name] = {"dtype": DTYPES[array.dtype.newbyteorder("=")], "shape": [int(d) for d in array.shape],
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata must map strings to strings; not: {bad}")
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes(order="C"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> numpy array, metadata) of a safetensors file; ValueError naming the file when its
    header is malformed or the tensors' byte ranges do not tile the data exactly."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER or 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} does not fit the file's {len(raw)} bytes")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: the header is not UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + n:]
    tensors, end = {}, 0
    for name, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = (int(x) for x in entry["data_offsets"])
        dtype = NUMPY_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, not one this reader knows")
        shape = tuple(int(d) for d in entry["shape"])
        if begin != end or stop > len(data) or stop - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} at bytes [{begin}, {stop}) does not follow the previous "
                             f"tensor (ends at {end}), does not fit the {len(data)} bytes of data or does not "
                             f"hold {shape} {dtype}")
        tensors[name] = np.frombuffer(data[begin:stop], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
        end = stop
    if end != len(data):
        raise ValueError(f"{path}: the tensors cover {end} bytes of the {len(data)} bytes of data")
    return tensors, dict(metadata)
