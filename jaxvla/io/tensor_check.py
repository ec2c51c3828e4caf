"""Checking a flat ``{key: array}`` of weights against an expected layout, for the converters in
``jaxvla.io`` (``hf_llama``, ``lwm``): one lookup that checks presence, shape and a floating dtype,
and one ValueError listing every problem found. numpy only.

    problems = []
    embed = checked_tensor(flat, "model.embed_tokens.weight", (V, D), problems)   # None if bad
    ...
    raise_problems(problems, "HF state dict does not match the expected LLaMA layout", "config: ...")
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# Floating dtypes numpy does not class as ``np.floating`` (ml_dtypes' types).
_EXTRA_FLOAT_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating-point dtype, ml_dtypes' bfloat16 / float8 included."""
    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.floating) or dtype.name in _EXTRA_FLOAT_DTYPES)


def checked_tensor(
    tensors: Mapping[str, Any], key: str, shape: tuple[int, ...], problems: list[str], *, kind: str = "tensor"
) -> np.ndarray | None:
    """``tensors[key]`` as a float32 numpy array when it is there, has exactly ``shape`` and a
    floating-point dtype; otherwise None, with one line appended to ``problems`` that names the
    ``kind`` (e.g. "tensor", "LWM tensor", "parameter"), the key, the expected shape and what was
    found instead."""
    shape = tuple(shape)
    if key not in tensors:
        problems.append(f"missing {kind} '{key}' (expected shape {shape})")
        return None
    value = np.asarray(tensors[key])
    if value.shape != shape:
        problems.append(f"{kind} '{key}': expected shape {shape}, found {value.shape}")
        return None
    if not is_floating(value.dtype):
        problems.append(f"{kind} '{key}' (shape {shape}): expected floating point, found {value.dtype}")
        return None
    return value.astype(np.float32)


def raise_problems(problems: list[str], subject: str, context: str) -> None:
    """Raises ValueError ``"<subject> (<n> problem(s)):"`` with the first 20 problems one a line,
    then ``(<context>)``; does nothing when ``problems`` is empty."""
    if not problems:
        return
    shown = problems[:20]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise ValueError(f"{subject} ({len(problems)} problem(s)):\n  " + "\n  ".join(shown) + more + f"\n({context})")
