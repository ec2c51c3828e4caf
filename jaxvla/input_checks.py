"""Checks of what the losses and the encoders are fed: dtype, shape and value range.

A wrong input to a JAX function rarely fails: uint8 frames given where floats in [-1, 1] are
expected train on garbage, a token id past the vocabulary reads a clamped embedding row, float
frames given to a loss that scales uint8 to [-1, 1] become a grey image. These checks turn such
mistakes into one ``InputError`` (a ValueError) naming the function, the batch key, what was
expected and what was got, e.g.::

    laq_loss: batch['frames'] must be uint8 [B, T=3, 64, 64, 3] with values in [0, 255] (frames
    as the data pipeline yields them; the loss scales them to [-1, 1]); got float32 [2, 3, 64, 64, 3]

What is checked when:

* **dtype and shape** at trace time: they are static, so the checks cost nothing under ``jax.jit``
  (they run once per compilation) and work on tracers, numpy and jax arrays alike.
* **value ranges** (token ids inside their vocabulary, frames inside [-1, 1], finite actions) only
  on *concrete* arrays: numpy arrays, and jax arrays outside any transformation. Inside
  ``jax.jit`` (the trainer's step), ``vmap``, or for the argument being differentiated by
  ``jax.grad``, the values are tracers and are *not* checked: checking them there would need
  ``checkify`` or a host callback in every step. Call a loss once eagerly on a real batch (the
  README's loss-reuse example does: ``jax.grad`` traces only the params, so the batch is
  concrete), or call these helpers on the host batch, to check the values too.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Named dtype kinds and how they read in messages.
_KINDS = {
    "uint8": "uint8",
    "integer": "an integer dtype",
    "floating": "a float dtype",
    "mask": "bool (or an integer 0 / 1 dtype)",
}


class InputError(ValueError):
    """An input of the wrong dtype, shape or value range; the message names the function, the key,
    what was expected and what was got."""


def is_concrete(x: Any) -> bool:
    """True when ``x``'s values can be read now (not a tracer of jit / grad / vmap)."""
    return not isinstance(x, jax.core.Tracer)


def readable(x: Any) -> bool:
    """True when this process can read all of ``x``'s values now: concrete, and not a global array
    spread over several processes."""
    return is_concrete(x) and not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def describe(x: Any) -> str:
    """``"float32 [2, 3, 64, 64, 3]"``."""
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    if dtype is None or shape is None:
        return type(x).__name__
    return f"{np.dtype(dtype).name} [{', '.join(str(d) for d in shape)}]"


def _dtype_ok(dtype, kind: str) -> bool:
    dtype = np.dtype(dtype)
    if kind == "uint8":
        return dtype == np.uint8
    if kind == "integer":
        return bool(jnp.issubdtype(dtype, jnp.integer))
    if kind == "floating":
        return bool(jnp.issubdtype(dtype, jnp.floating))  # bfloat16 included
    if kind == "mask":
        return dtype == np.bool_ or bool(jnp.issubdtype(dtype, jnp.integer))
    raise ValueError(f"unknown dtype kind {kind!r}; expected one of {sorted(_KINDS)}")


def _shape_text(shape: Sequence[int | str | None], dims: Mapping[str, int]) -> str:
    parts = []
    for d in shape:
        if d is None:
            parts.append("*")
        elif isinstance(d, str):
            parts.append(f"{d}={dims[d]}" if d in dims else d)
        else:
            parts.append(str(d))
    return "[" + ", ".join(parts) + "]"


def _value_text(low, high) -> str:
    if low is not None and high is not None:
        return f"values in [{low:g}, {high:g}]"
    return f"values >= {low:g}" if low is not None else f"values <= {high:g}"


def value_bounds(x: Any, where: np.ndarray | None = None) -> tuple[float, float] | None:
    """(min, max) of a concrete array (over ``where`` when given), None for a tracer or nothing
    selected; NaN when the array holds one."""
    if not readable(x):
        return None
    values = np.asarray(jax.device_get(x))
    if where is not None:
        values = values[np.asarray(where, bool)]
    if values.size == 0:
        return None
    values = values.astype(np.float64)
    if np.isnan(values).any():
        return float("nan"), float("nan")
    return float(values.min()), float(values.max())


def check_array(x: Any, *, where: str, key: str, dtype: str, shape: Sequence[int | str | None] | None = None,
                dims: dict[str, int] | None = None, low: float | None = None, high: float | None = None,
                finite: bool = False, note: str = "", range_text: str = "") -> Any:
    """Checks one array and returns it.

    ``where``: the function named in the message (``"laq_loss"``); ``key``: the input's name
    (``"batch['frames']"``). ``dtype``: ``"uint8"``, ``"integer"``, ``"floating"`` or ``"mask"``.
    ``shape``: expected dims, each an int (exact), a name (``"B"``: bound in ``dims`` on first
    sight, then equal everywhere it reappears, so several keys share B) or None (any).
    ``low`` / ``high``: inclusive value bounds and ``finite``: no NaN / inf, both checked only
    when ``x`` is concrete (see the module docstring). ``note``: why, appended to the expectation;
    ``range_text``: how the bounds read in the message (default: from ``low`` / ``high``).
    """
    dims = {} if dims is None else dims

    def fail(got: str) -> None:
        expected = _KINDS[dtype] if dtype != "uint8" else "uint8"
        text = f"{where}: {key} must be {expected}"
        if shape is not None:
            text += f" {_shape_text(shape, dims)}"
        if low is not None or high is not None:
            text += f" with {range_text or _value_text(low, high)}"
        if note:
            text += f" ({note})"
        raise InputError(f"{text}; got {got}")

    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        if isinstance(x, (list, tuple, int, float, bool)):
            x = np.asarray(x)
        else:
            fail(type(x).__name__)
    if not _dtype_ok(x.dtype, dtype):
        fail(describe(x))
    if shape is not None:
        if len(x.shape) != len(shape):
            fail(describe(x))
        bound = dict(dims)
        for expected, actual in zip(shape, x.shape):
            if expected is None:
                continue
            if isinstance(expected, str):
                if expected in bound and bound[expected] != actual:
                    fail(f"{describe(x)} ({expected} is {bound[expected]} elsewhere)")
                bound[expected] = int(actual)
            elif int(expected) != actual:
                fail(describe(x))
        dims.update(bound)
    implied = np.dtype(x.dtype) == np.uint8 and (low or 0) <= 0 and (255 if high is None else high) >= 255
    if (low is not None or high is not None or finite) and not implied:  # uint8 in [0, 255]: nothing to read
        bounds = value_bounds(x)
        if bounds is not None:
            lo, hi = bounds
            if np.isnan(lo):
                fail(f"{describe(x)} holding NaN")
            if finite and not (np.isfinite(lo) and np.isfinite(hi)):
                fail(f"{describe(x)} holding inf")
            if (low is not None and lo < low) or (high is not None and hi > high):
                fail(f"{describe(x)} with values in [{lo:g}, {hi:g}]")
    return x


def require(batch: Mapping[str, Any], key: str, where: str, what: str = "") -> Any:
    """``batch[key]``, or an InputError naming the key, what it should hold and the keys there are."""
    if not isinstance(batch, Mapping):
        raise InputError(f"{where}: batch must be a dict of arrays, got {type(batch).__name__}")
    if key not in batch:
        hint = f" ({what})" if what else ""
        raise InputError(f"{where}: batch has no {key!r}{hint}; it has {sorted(batch)}")
    return batch[key]


# ------------------------------------------------------------------------------------------------
# What several losses and encoders share.

FRAME_RANGE = (-1.0, 1.0)
# Float frames within this much of [-1, 1] pass (a bf16 or rounding excursion is not a mistake).
FRAME_TOLERANCE = 1e-3


def check_uint8_frames(x: Any, *, where: str, key: str, shape: Sequence[int | str | None],
                       dims: dict[str, int] | None = None, note: str = "") -> Any:
    """uint8 frames with values in [0, 255] (what the data pipeline yields; the caller scales
    them to [-1, 1]). The range holds by the dtype: only dtype and shape are checked."""
    note = note or "frames as the data pipeline yields them; scaled to [-1, 1] here"
    return check_array(x, where=where, key=key, dtype="uint8", shape=shape, dims=dims, low=0, high=255,
                       note=note)


def check_float_frames(x: Any, *, where: str, key: str, shape: Sequence[int | str | None] | None,
                       dims: dict[str, int] | None = None, note: str = "") -> Any:
    """Float frames with values in [-1, 1] (the models' input; ``images_to_float`` converts uint8
    frames). The range is checked on concrete arrays only (module docstring)."""
    if hasattr(x, "dtype") and np.dtype(x.dtype) == np.uint8:
        raise InputError(f"{where}: {key} must be float with values in [-1, 1]{f' ({note})' if note else ''}; got "
                         f"{describe(x)}: convert uint8 frames with jaxvla.losses.tokenizer.images_to_float "
                         "(x / 127.5 - 1) first")
    return check_array(x, where=where, key=key, dtype="floating", shape=shape, dims=dims,
                       low=FRAME_RANGE[0] - FRAME_TOLERANCE, high=FRAME_RANGE[1] + FRAME_TOLERANCE, note=note,
                       range_text="values in [-1, 1]")


SEQUENCE_INPUTS = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids")
MODALITIES = ("text", "image", "latent", "action")


def backbone_vocab_sizes(backbone: Any) -> tuple[int, int, int, int] | None:
    """(text, image, latent, action) table sizes of a Llama module (0: no table), None when
    ``backbone`` has no LlamaConfig."""
    config = getattr(backbone, "config", None)
    try:
        return (int(config.text_vocab), int(config.image_vocab), int(config.latent_vocab), int(config.action_vocab))
    except AttributeError:
        return None


def check_sequence_batch(batch: Mapping[str, Any], *, where: str, vocab_sizes: Sequence[int] | None,
                         targets: bool = False, dims: dict[str, int] | None = None) -> dict[str, int]:
    """The ``jaxvla.data.sequences`` arrays of a batch: ``tokens``, ``modality``, ``positions``,
    ``segment_ids``, ``bidirectional_ids`` (and with ``targets``: ``targets``, ``target_modality``
    int, ``loss_weight`` float), all ``[B, L]``; ``num_examples`` int ``[B]`` when present.

    On concrete batches also the values: modality ids in [0, 3], positions and segment ids >= 0,
    every token id inside its modality's table (``vocab_sizes``, e.g. ``backbone_vocab_sizes``;
    a modality without a table, 0, is skipped: flow's action placeholders are replaced by
    embeddings) and, with ``targets``, every weighted target inside its modality's table.
    Returns the bound dims (``B``, ``L``)."""
    dims = {} if dims is None else dims
    shape = ("B", "L")
    keys = SEQUENCE_INPUTS + (("targets", "target_modality") if targets else ())
    for key in keys:
        check_array(require(batch, key, where, "[B, L] int32, jaxvla.data.sequences"), where=where,
                    key=f"batch[{key!r}]", dtype="integer", shape=shape, dims=dims)
    if targets:
        check_array(require(batch, "loss_weight", where, "[B, L] float32"), where=where, key="batch['loss_weight']",
                    dtype="floating", shape=shape, dims=dims, low=0.0, finite=True)
    if "num_examples" in batch:
        check_array(batch["num_examples"], where=where, key="batch['num_examples']", dtype="integer", shape=("B",),
                    dims=dims, low=0)
    for key in ("modality",) + (("target_modality",) if targets else ()):
        check_array(batch[key], where=where, key=f"batch[{key!r}]", dtype="integer", shape=shape, dims=dims,
                    low=0, high=len(MODALITIES) - 1, note="0 text, 1 image, 2 latent, 3 action")
    for key in ("positions", "segment_ids", "bidirectional_ids"):
        check_array(batch[key], where=where, key=f"batch[{key!r}]", dtype="integer", shape=shape, dims=dims, low=0)
    if vocab_sizes is not None:
        _check_ids(batch, "tokens", "modality", None, vocab_sizes, where)
        if targets:
            _check_ids(batch, "targets", "target_modality", "loss_weight", vocab_sizes, where)
    return dims


def _check_ids(batch, ids_key: str, modality_key: str, weight_key: str | None, vocab_sizes, where: str) -> None:
    arrays = [batch[ids_key], batch[modality_key]] + ([batch[weight_key]] if weight_key else [])
    if not all(readable(a) for a in arrays):
        return  # tracers (or arrays spread over processes): values are not checked (module docstring)
    ids, modality = batch[ids_key], batch[modality_key]
    ids, modality = np.asarray(jax.device_get(ids)), np.asarray(jax.device_get(modality))
    selected = np.ones(ids.shape, bool) if weight_key is None else np.asarray(jax.device_get(batch[weight_key])) > 0
    for index, (name, size) in enumerate(zip(MODALITIES, vocab_sizes)):
        if not size:
            continue
        mask = selected & (modality == index)
        if not mask.any():
            continue
        lo, hi = int(ids[mask].min()), int(ids[mask].max())
        if lo < 0 or hi >= size:
            what = "weighted targets" if weight_key else "tokens"
            raise InputError(f"{where}: batch[{ids_key!r}] ids of {name} {what} must lie in the {name} table "
                             f"[0, {size - 1}] (the backbone's {name} vocabulary); got ids in [{lo}, {hi}]")


def check_laq_batch(batch: Mapping[str, Any], model: Any, where: str) -> dict[str, int]:
    """An LAQ loss batch: ``frames`` uint8 ``[B, T, S, S, 3]`` (T = ``model.num_frames``, S =
    ``model.image_size``) and, when present, ``step`` int ``[B]`` >= 0 (the flow ramp's step)."""
    dims: dict[str, int] = {}
    size = int(model.image_size)
    frames = require(batch, "frames", where, "uint8 [B, T, S, S, 3] clips")
    check_uint8_frames(frames, where=where, key="batch['frames']", shape=("B", int(model.num_frames), size, size, 3),
                       dims=dims,
                       note="clips as the data pipeline yields them; the loss scales them to [-1, 1]")
    if "step" in batch:
        check_array(batch["step"], where=where, key="batch['step']", dtype="integer", shape=("B",), dims=dims, low=0,
                    note="the training step of every row (the flow ramp reads it)")
    return dims
