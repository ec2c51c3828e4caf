"""Normalisation statistics, quantile bin edges, and (de)normalisation / (un)binning helpers.

``compute_statistics`` makes ONE pass over a dataset of trajectories and returns, per key
(default ``action`` and ``observation/proprio``), plain numpy::

    {"mean", "std", "min", "max", "q01", "q99": float32 [D], "count": int}
    (+ "bin_edges": float32 [D, num_bins + 1] when num_bins > 0)

Rows are gathered into memory and the quantiles are EXACT (``np.quantile``, linear
interpolation): a few million rows of a few dims are tens of MB, fine for any single dataset we
use. ``action`` rows whose ``has_action`` is False (the RLDS terminal step, action-free video,
dropped actions) are left out (``mask_keys``). ``std`` is the population std (ddof=0).

Caching: with ``cache_dir`` and a ``cache_key`` (a JSON-able dict describing the dataset: name,
split, builder dir, its ``dataset_fingerprint``, standardize fn name, keys, ...), the result is
written to ``<cache_dir>/<name>_<sha256(cache_key)[:16]>.json`` (atomically) and later calls with
the same key read it without touching the dataset. ``load_statistics`` / ``save_statistics``
convert between the JSON and numpy form. The returned dicts are JSON-able once arrays are
listed (``to_jsonable``), so they go straight into checkpoint assets.

Binning (LAPA / OpenVLA-style discrete actions): ``quantile_bin_edges(actions [N, A], 256,
binary_dims=(-1,))`` gives equal-frequency edges ``[A, 257]`` (``np.quantile`` at k/256).
``bin_actions`` maps ``x`` to the bin ``b`` with ``edges[b] <= x < edges[b+1]`` (values outside
[min, max] are clipped into the first / last bin); ``unbin_actions`` returns the bin's midpoint,
so the round trip errs by at most half that bin's width. Ties (point masses, e.g. actions
clipped at exactly +-1) give repeated edges, i.e. empty zero-width bins; the tied value lands in
the last of them and decodes exactly. Binary (gripper) dims use only bins 0 and 1: their edge row
is ``[lo, (lo + hi) / 2, hi, hi, ..., hi]`` with lo / hi the observed min / max; ``x <=
threshold`` -> bin 0 -> decodes to lo, else bin 1 -> hi.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger("jaxvla")

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
DEFAULT_KEYS = ("action", "observation/proprio")
DEFAULT_MASK_KEYS = {"action": "has_action"}
STATS_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- helpers


def _get(tree: Mapping[str, Any], key: str) -> Any:
    """``tree[key]`` for a flat ("a/b" keys) or nested dict; KeyError lists what exists."""
    if key in tree:
        return tree[key]
    node: Any = tree
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def dataset_fingerprint(builder_dir: str | os.PathLike) -> str:
    """sha256 (hex, 16 chars) of a TFDS version dir's ``dataset_info.json`` + ``features.json``
    (split sizes, shard lengths, byte counts, feature spec): changes when the data is rewritten."""
    import tensorflow as tf  # gfile: local or remote (gs://) dataset directories

    digest = hashlib.sha256()
    for name in ("dataset_info.json", "features.json"):
        path = os.path.join(os.fspath(builder_dir), name)
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def cache_key_hash(cache_key: Mapping[str, Any] | str) -> str:
    text = cache_key if isinstance(cache_key, str) else json.dumps(cache_key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_jsonable(stats: Any) -> Any:
    """numpy arrays / scalars -> lists / python numbers, recursively."""
    if isinstance(stats, Mapping):
        return {str(k): to_jsonable(v) for k, v in stats.items()}
    if isinstance(stats, (list, tuple)):
        return [to_jsonable(v) for v in stats]
    if isinstance(stats, np.ndarray):
        return stats.tolist()
    if isinstance(stats, np.generic):
        return stats.item()
    return stats


def from_jsonable(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``to_jsonable`` for a statistics dict (lists -> float32 arrays)."""
    out: dict[str, Any] = {}
    for key, entry in stats.items():
        if key.startswith("_"):
            out[key] = entry
            continue
        item = {}
        for name, value in entry.items():
            if name == "count":
                item[name] = int(value)
            elif name == "binary_dims":
                item[name] = tuple(int(v) for v in value)
            else:
                item[name] = np.asarray(value, dtype=np.float32)
        out[key] = item
    return out


def save_statistics(path: str | os.PathLike, stats: Mapping[str, Any]) -> None:
    """Writes ``stats`` as JSON atomically (temp file + rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".stats-", suffix=".json", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(to_jsonable(stats), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_statistics(path: str | os.PathLike) -> dict[str, Any]:
    with open(os.fspath(path)) as f:
        return from_jsonable(json.load(f))


def statistics_path(cache_dir: str | os.PathLike, cache_key: Mapping[str, Any] | str, name: str = "dataset") -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "dataset"
    return os.path.join(os.fspath(cache_dir), f"{safe}_{cache_key_hash(cache_key)}.json")


def array_statistics(rows: np.ndarray) -> dict[str, Any]:
    """mean / std / min / max / q01 / q99 over axis 0 of ``rows`` [N, D] (+ count)."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 1:
        rows = rows[:, None]
    dim = rows.shape[1]
    if rows.shape[0] == 0:
        zeros = np.zeros((dim,), np.float32)
        return {"mean": zeros, "std": np.ones((dim,), np.float32), "min": zeros, "max": zeros,
                "q01": zeros, "q99": zeros, "count": 0}
    return {
        "mean": rows.mean(0).astype(np.float32),
        "std": rows.std(0).astype(np.float32),
        "min": rows.min(0).astype(np.float32),
        "max": rows.max(0).astype(np.float32),
        "q01": np.quantile(rows, 0.01, axis=0).astype(np.float32),
        "q99": np.quantile(rows, 0.99, axis=0).astype(np.float32),
        "count": int(rows.shape[0]),
    }


# --------------------------------------------------------------------------- statistics


def _select_fn(keys: Sequence[str], mask_keys: Mapping[str, str]):
    def select(traj):
        out = {}
        for key in keys:
            out[key] = _get(traj, key)
            if key in mask_keys:
                try:
                    out[f"__mask__{key}"] = _get(traj, mask_keys[key])
                except KeyError:
                    pass
        return out

    return select


def _iterate_numpy(source: Any, keys: Sequence[str], mask_keys: Mapping[str, str]) -> Iterable[dict]:
    """Numpy dicts with only ``keys`` (+ masks) from a TrajDataset, tf.data.Dataset or iterable."""
    select = _select_fn(keys, mask_keys)
    dataset = getattr(source, "dataset", None)  # TrajDataset
    if dataset is None:
        try:
            import tensorflow as tf

            if isinstance(source, tf.data.Dataset):
                dataset = source
        except ImportError:  # pragma: no cover
            pass
    if dataset is not None:
        return dataset.map(select).as_numpy_iterator()
    return (select(item) for item in source)


def compute_statistics(
    source: Any,
    keys: Sequence[str] = DEFAULT_KEYS,
    *,
    mask_keys: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_key: Mapping[str, Any] | str | None = None,
    name: str = "dataset",
    num_bins: int = 0,
    binary_dims: Sequence[int] = (-1,),
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Statistics per key over every row of every trajectory of ``source`` (one pass).

    Args:
      source: a ``TrajDataset``, a ``tf.data.Dataset`` of trajectories, or an iterable of
        trajectory dicts (numpy or tensors; flat "a/b" or nested keys). Not touched on a cache hit.
      keys: trajectory keys; each value is [T, D] (or [T]) per trajectory.
      mask_keys: key -> boolean [T] key; rows where it is False are left out (default: action
        rows without ``has_action``).
      cache_dir, cache_key: cache location and a JSON-able description of the dataset (both needed
        to cache); see the module docstring.
      name: dataset name, for the cache file name, progress bar and errors.
      num_bins: > 0 adds ``bin_edges`` [D, num_bins + 1] (``quantile_bin_edges``) to every key,
        with ``binary_dims`` (indices into D; those out of range for a key are ignored).
      total: number of trajectories, for the progress bar.

    Returns ``{key: {"mean", "std", "min", "max", "q01", "q99", "count"(, "bin_edges",
    "binary_dims")}}`` plus ``"_num_trajectories"``.
    """
    keys = tuple(keys)
    mask_keys = DEFAULT_MASK_KEYS if mask_keys is None else dict(mask_keys)
    path = None
    if cache_dir is not None and cache_key is not None:
        full_key = {"key": cache_key, "keys": list(keys), "mask_keys": mask_keys, "num_bins": int(num_bins),
                    "binary_dims": [int(d) for d in binary_dims], "format": STATS_FORMAT_VERSION}
        path = statistics_path(cache_dir, full_key, name)
        if os.path.exists(path):
            log.info("%s: statistics read from cache %s", name, path)
            return load_statistics(path)

    from tqdm.auto import tqdm

    rows: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    num_trajectories = 0
    bar = tqdm(total=total, desc=f"statistics {name}", unit="traj", disable=not progress)
    try:
        for item in _iterate_numpy(source, keys, mask_keys):
            num_trajectories += 1
            for key in keys:
                try:
                    value = np.asarray(_get(item, key))
                except KeyError:
                    raise KeyError(
                        f"{name}: statistics key {key!r} not in the trajectory; it has "
                        f"{sorted(_flat_keys(item))}"
                    ) from None
                if value.ndim == 1:
                    value = value[:, None]
                else:
                    value = value.reshape(value.shape[0], int(np.prod(value.shape[1:])))
                mask_name = f"__mask__{key}"
                mask = item.get(mask_name) if isinstance(item, Mapping) else None
                if mask is None and key in mask_keys:
                    try:
                        mask = _get(item, mask_keys[key])
                    except KeyError:
                        mask = None
                if mask is not None:
                    value = value[np.asarray(mask, dtype=bool).reshape(-1)]
                rows[key].append(value.astype(np.float64))
            bar.update(1)
    finally:
        bar.close()
    if num_trajectories == 0:
        raise ValueError(f"{name}: no trajectories to compute statistics from (empty dataset)")

    out: dict[str, Any] = {}
    for key in keys:
        data = np.concatenate(rows[key], axis=0)
        entry = array_statistics(data)
        if num_bins > 0 and data.shape[0] > 0:
            dims = _resolve_dims(binary_dims, data.shape[1])
            entry["bin_edges"] = quantile_bin_edges(data, num_bins, binary_dims=dims)
            entry["binary_dims"] = tuple(dims)
        out[key] = entry
    out["_num_trajectories"] = num_trajectories
    if path is not None:
        save_statistics(path, out)
        log.info("%s: statistics over %d trajectories cached at %s", name, num_trajectories, path)
    return out


def _flat_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, Mapping):
        return [prefix]
    keys = []
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        keys.extend(_flat_keys(value, path) if isinstance(value, Mapping) else [path])
    return keys


# --------------------------------------------------------------------------- binning


def _resolve_dims(dims: Sequence[int], size: int) -> tuple[int, ...]:
    out = []
    for d in dims:
        d = int(d)
        if -size <= d < size:
            out.append(d % size)
    return tuple(sorted(set(out)))


def quantile_bin_edges(actions: np.ndarray, num_bins: int = 256, binary_dims: Sequence[int] = (-1,)) -> np.ndarray:
    """Equal-frequency bin edges per dimension: float32 [A, num_bins + 1].

    Continuous dims: ``np.quantile(x, k / num_bins)`` for k = 0..num_bins (edges[0] = min,
    edges[-1] = max). ``binary_dims`` (e.g. the gripper): ``[lo, (lo+hi)/2, hi, ..., hi]``.
    """
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise ValueError(f"quantile_bin_edges: expected actions [N > 0, A], got shape {actions.shape}")
    if num_bins < 2:
        raise ValueError(f"quantile_bin_edges: num_bins must be >= 2, got {num_bins}")
    dims = _resolve_dims(binary_dims, actions.shape[1])
    edges = np.quantile(actions, np.linspace(0.0, 1.0, num_bins + 1), axis=0).T  # [A, num_bins+1]
    for d in dims:
        lo, hi = actions[:, d].min(), actions[:, d].max()
        row = np.full((num_bins + 1,), hi)
        row[0], row[1] = lo, (lo + hi) / 2.0
        edges[d] = row
    return edges.astype(np.float32)


def bin_actions(actions: np.ndarray, edges: np.ndarray, binary_dims: Sequence[int] = (-1,)) -> np.ndarray:
    """Actions [..., A] -> int32 bins [..., A] in [0, num_bins) (binary dims: 0 or 1)."""
    actions = np.asarray(actions)
    edges = np.asarray(edges)
    num_dims, num_edges = edges.shape
    if actions.shape[-1] != num_dims:
        raise ValueError(f"bin_actions: actions have {actions.shape[-1]} dims, edges {num_dims}")
    dims = set(_resolve_dims(binary_dims, num_dims))
    flat = actions.reshape(-1, num_dims)
    out = np.empty(flat.shape, np.int32)
    for d in range(num_dims):
        if d in dims:
            out[:, d] = (flat[:, d] > edges[d, 1]).astype(np.int32)
        else:
            out[:, d] = np.searchsorted(edges[d, 1:-1], flat[:, d], side="right")
    return out.reshape(actions.shape)


def unbin_actions(bins: np.ndarray, edges: np.ndarray, binary_dims: Sequence[int] = (-1,)) -> np.ndarray:
    """Bins [..., A] -> float32 actions: the midpoint of each bin's edges (binary: lo / hi)."""
    bins = np.asarray(bins)
    edges = np.asarray(edges, dtype=np.float64)
    num_dims, num_edges = edges.shape
    dims = set(_resolve_dims(binary_dims, num_dims))
    flat = np.clip(bins.reshape(-1, num_dims), 0, num_edges - 2)
    out = np.empty(flat.shape, np.float64)
    for d in range(num_dims):
        if d in dims:
            out[:, d] = np.where(flat[:, d] > 0, edges[d, 2], edges[d, 0])
        else:
            out[:, d] = 0.5 * (edges[d, flat[:, d]] + edges[d, flat[:, d] + 1])
    return out.reshape(bins.shape).astype(np.float32)


# --------------------------------------------------------------------------- proprioceptive state

STATE_BINS = 256


def state_bin_edges(stats: Mapping[str, Any], dims: Sequence[int], num_bins: int = STATE_BINS) -> np.ndarray:
    """Equal-width bin edges of the proprio dims ``dims`` over their [q01, q99]: float32
    ``[D, num_bins + 1]`` (``edges[d, 0]`` = q01, ``edges[d, -1]`` = q99).

    ``stats``: one key's statistics (``statistics[dataset]["observation/proprio"]``, q01 / q99
    ``[P]``); ``dims``: indices in [0, P). The finetuning stage stores these edges in its assets,
    so a policy discretizes its observations' state exactly as training did."""
    lo = np.asarray(stats["q01"], np.float64).reshape(-1)
    hi = np.asarray(stats["q99"], np.float64).reshape(-1)
    dims = [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < lo.size]
    if bad or not dims:
        raise ValueError(f"state_bin_edges: dims {dims} must be non-empty indices in [0, {lo.size}) "
                         f"(the proprio statistics' size)")
    if int(num_bins) < 2:
        raise ValueError(f"state_bin_edges: num_bins must be >= 2, got {num_bins}")
    return np.linspace(lo[dims], hi[dims], int(num_bins) + 1, axis=-1).astype(np.float32)


def discretize_state(state: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Selected state values ``[..., D]`` (float, finite) -> int32 bins ``[..., D]`` in
    [0, num_bins): bin ``b`` with ``edges[d, b] <= x < edges[d, b + 1]``; values below q01 go to
    bin 0, values at or above q99 to the last bin (clipped). On equal-width edges this is
    ``clip(floor((x - q01) / (q99 - q01) * num_bins), 0, num_bins - 1)`` up to float rounding at
    the edges; a dim whose q01 = q99 gives 0 below that value and num_bins - 1 at or above it."""
    edges = np.asarray(edges, np.float32)
    state = np.asarray(state, np.float32)
    if edges.ndim != 2 or edges.shape[1] < 3:
        raise ValueError(f"discretize_state: edges must be [D, num_bins + 1], got shape {edges.shape}")
    if state.shape[-1:] != edges.shape[:1]:
        raise ValueError(f"discretize_state: state has {state.shape[-1:]} dims, the edges {edges.shape[0]}")
    if not np.isfinite(state).all():
        raise ValueError("discretize_state: the state holds non-finite values")
    return bin_actions(state, edges, binary_dims=())  # the action bins' rule, no binary dims


def state_bin_centres(edges: np.ndarray) -> np.ndarray:
    """float32 ``[D, num_bins]``: the midpoint of every state bin (what a bin stands for)."""
    edges = np.asarray(edges, np.float64)
    return (0.5 * (edges[:, :-1] + edges[:, 1:])).astype(np.float32)


# --------------------------------------------------------------------------- normalisation

_EPS = 1e-8


def _is_tf(x: Any) -> bool:
    # Never import TensorFlow here: a value can only be a tf tensor if TF is already loaded, and
    # loading TF after MuJoCo's software renderer has started crashes the process (policies
    # call ``unnormalize`` next to a simulator).
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, (tf.Tensor, tf.Variable))


def normalize(x: Any, stats: Mapping[str, Any], mode: str = "q01q99", mask: Sequence[bool] | None = None) -> Any:
    """Normalise ``x`` [..., D] with one key's statistics.

    modes: ``q01q99`` -> 2 (x - q01) / (q99 - q01) - 1 clipped to [-1, 1]; ``min_max`` the same
    with min / max; ``mean_std`` -> (x - mean) / std (not bounded). Dims whose range (or std) is
    ~0 map to 0. ``mask`` [D] (True = normalise) leaves the other dims unchanged (e.g. a gripper
    that is already in [-1, 1]). Works on numpy arrays and tf tensors.
    """
    if mode in ("none", None, ""):
        return x
    tf_mode = _is_tf(x)
    if tf_mode:
        import tensorflow as tf

        xp_where, xp_clip = tf.where, tf.clip_by_value
        cast = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
    else:
        xp_where, xp_clip = np.where, np.clip
        cast = lambda v: np.asarray(v, np.float32)  # noqa: E731
        x = np.asarray(x, np.float32)
    if mode == "mean_std":
        mean, std = cast(stats["mean"]), np.asarray(stats["std"], np.float32)
        ok = std > _EPS
        y = (x - mean) / cast(np.where(ok, std, 1.0))
        y = xp_where(cast(ok) > 0, y, y * 0.0)
    elif mode in ("q01q99", "min_max"):
        lo_name, hi_name = ("q01", "q99") if mode == "q01q99" else ("min", "max")
        lo, hi = np.asarray(stats[lo_name], np.float32), np.asarray(stats[hi_name], np.float32)
        span = hi - lo
        ok = span > _EPS
        y = 2.0 * (x - cast(lo)) / cast(np.where(ok, span, 1.0)) - 1.0
        y = xp_clip(y, -1.0, 1.0)
        y = xp_where(cast(ok) > 0, y, y * 0.0)
    else:
        raise ValueError(f"normalize: unknown mode {mode!r}; expected q01q99, min_max, mean_std or none")
    if mask is not None:
        y = xp_where(cast(np.asarray(mask, bool)) > 0, y, x)
    return y


def unnormalize(y: Any, stats: Mapping[str, Any], mode: str = "q01q99", mask: Sequence[bool] | None = None) -> Any:
    """Inverse of ``normalize`` (exact inside [q01, q99] / [min, max]; clipped values map to the
    bounds; degenerate dims map back to their lower bound / mean)."""
    if mode in ("none", None, ""):
        return y
    tf_mode = _is_tf(y)
    if tf_mode:
        import tensorflow as tf

        xp_where = tf.where
        cast = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
    else:
        xp_where = np.where
        cast = lambda v: np.asarray(v, np.float32)  # noqa: E731
        y = np.asarray(y, np.float32)
    if mode == "mean_std":
        x = y * cast(stats["std"]) + cast(stats["mean"])
    elif mode in ("q01q99", "min_max"):
        lo_name, hi_name = ("q01", "q99") if mode == "q01q99" else ("min", "max")
        lo, hi = np.asarray(stats[lo_name], np.float32), np.asarray(stats[hi_name], np.float32)
        x = (y + 1.0) / 2.0 * cast(hi - lo) + cast(lo)
    else:
        raise ValueError(f"unnormalize: unknown mode {mode!r}; expected q01q99, min_max, mean_std or none")
    if mask is not None:
        x = xp_where(cast(np.asarray(mask, bool)) > 0, x, y)
    return x
