"""The data pipeline the stages use: dataset specs -> per-process numpy batches.

Datasets are named in ``jaxvla.data.registry`` (one ``DatasetSpec`` each: the Open-X datasets,
``metaworld``, ``video_folder``, anything added with ``register_dataset``); ``config.data.mixture``
/ ``config.data.dataset`` are resolved by ``jaxvla.data.mixtures.resolve_mixture`` and each
dataset's pair gap by ``registry.dataset_gap``.

    from jaxvla.data.pipeline import default_data_config, make_batches
    data = default_data_config(); data.data_dir = "runs/data/metaworld_mt10_64"; data.sample = "pairs"
    batches = make_batches(data, batch_size=16, train=True, seed=0)   # this process's batches
    batch = next(iter(batches))   # {"observation": {"image_primary": uint8 [16, 2, 64, 64, 3], ...}, ...}
    batches.statistics["metaworld"]["action"]["q01"]                  # for checkpoint assets

Whole trajectories' frames instead of samples: ``trajectory_frames(data, split, image_size=S)``
yields (traj_key, uint8 [T, S, S, 3]) of every trajectory in file order, through the same
reader (``make_trajectory_dataset``) and decode; the image tokenizer and the LAQ labeller read
their frames with it.

Stages of ``make_batches``: read -> trajectory transforms -> samples -> mix -> decode -> batches,
one public step each (every step takes ``cfg = with_defaults(config.data)``; composing them as
``make_batches`` does gives its batches):

0. ``mixture_entries`` [(DatasetSpec, weight)] of the mixture; ``mixture_statistics``: statistics
   of every dataset's TRAIN split (``stats.compute_statistics``, cached on disk) when normalisation
   or bins are requested; ``mixture_gaps``: each dataset's pair gap (pairs only).
1. ``read_trajectories`` (read): per dataset of the mixture, its RLDS files (or its
   ``trajectories_fn``), this process's disjoint share (``make_trajectory_dataset``,
   ``TrajDataset.from_rlds``), standardised to the schema; with ``latent_labels``, the latent action
   labels joined onto every trajectory (``latent_labels.join_latent_labels``: ``latent_action``
   [T, *code_shape], ``has_latent`` [T], matched by traj_key and ``observation/timestep``; the label
   directory is read once and shared by every dataset of the mixture). -> ``Trajectories``
   (children [(spec, weight, TrajDataset)], the labels, their join stats).
2-3. ``trajectory_samples`` (trajectory transforms + samples), per dataset: action / proprio
   normalisation (action dims outside the spec's ``normalize_mask``, by default the gripper dims,
   untouched; masked-out steps stay 0), optional ``drop_actions``, zero-padding of action / proprio
   to the mixture's largest dims (``mixture_dims``), dropping the cameras not asked for, optional
   goal relabelling, then the sample transform of ``config.data.sample`` (``traj_transforms``), an
   optional cap of samples per trajectory, ``flatten`` (``flatten_samples``: zero-size keys such as
   the ``proprio [T, 0]`` of datasets without proprioception bypass TensorFlow's ``unbatch``, which
   crashes on them; with ``latent_labels``: then samples whose start frame has no label are
   dropped) and the ``check_nonempty`` probe.
4. ``mix_samples`` (mix): ``repeat``, mixing (``TrajDataset.sample_from_datasets``, probability
   proportional to the weights), a sample shuffle buffer (encoded images, so it is cheap).
5. ``decode_samples`` (decode): the resume skip, decode + resize (+ seeded augmentation when
   training).
6. ``batch_samples`` (batches): ``batch(drop_remainder=True)``, prefetch; numpy from ``Batches``.

Sample kinds (``config.data.sample``; B = batch size, S = image_size; see ``traj_transforms``):

* ``frames``: one frame per sample; ``observation/image_<cam>`` [B, S, S, 3] (with
  ``history > 1``: [B, W, S, S, 3], frames t-(W-1)k .. t-k, t with k = ``history_stride``, and
  ``observation/pad_mask`` [B, W]), ``action`` [B, A], ``has_action`` [B].
* ``pairs``: LAPA's (x_t, x_{t+H}); images [B, 2, S, S, 3], ``action`` [B, Hmax, A] (the H actions
  between the frames, zero-padded to the largest gap of the mixture), ``has_action`` [B, Hmax],
  ``gap`` [B].
* ``clips``: ViPRA's L+1 frames; images [B, L+1, S, S, 3], ``action`` [B, L*stride, A],
  ``has_action`` [B, L*stride] (a mixture whose datasets have different strides, with
  ``clip_stride_seconds``: zero-padded to the largest L*stride, ``has_action`` False there).
* pairs and clips with ``history > 1``: the W - 1 history frames of the anchor t first (images
  [B, (W-1) + 2 or (W-1) + L+1, S, S, 3], ``observation/pad_mask`` likewise), then the frames
  above; actions, labels and the anchor unchanged.
* ``chunks``: action chunks for policy finetuning; images [B, S, S, 3] (or [B, W, ...] with
  history), ``action`` [B, K, A], ``action_pad_mask`` [B, K], ``has_action`` [B]. Samples whose
  first action is missing (the RLDS terminal step) are dropped.

Every kind also has ``observation/proprio``, ``observation/timestep``,
``task/language_instruction`` (bytes), ``dataset_name`` and ``traj_key`` (bytes).

With ``latent_labels`` set, every kind also has ``latent_action`` int32 [B, *code_shape] and
``has_latent`` bool [B] (always True): the label of the sample's start frame t (``frames``: the
frame itself, with history the window's last frame; ``pairs``: x_t; ``clips``: the first frame;
``chunks``: the frame of the chunk's first action). Samples whose start frame has no label (labels
exist only for frames with a full LAQ window ahead, e.g. not for a trajectory's last H frames) are
dropped.

Config keys read (``config.data.*``): this is the one list of them; ``default_data_config()``
holds them all with their defaults, the one place defaults are written. ``make_batches`` fills the
keys a (partial) dict or ConfigDict lacks from it once (``with_defaults``) and refuses a key not
listed here with a ValueError naming it (except ``STAGE_DATA_KEYS``, the stage configs' Meta-World
prerequisite keys, which it ignores):

    data_dir              TFDS data_dir holding the datasets (or one dataset's version dir)
    dataset               single dataset name or alias of ``jaxvla.data.registry``
                          (``metaworld``, ``video_folder``: the folder of clips at ``data_dir``,
                          see ``jaxvla.data.video``; an Open-X dataset; or any registered spec)
                          when ``mixture`` is empty
    mixture               anything ``mixtures.resolve_mixture`` takes: a mixture name, a dataset
                          name, or "name:weight,name:weight"
    split, eval_split     "" -> the spec's train / val split
    sample                frames | pairs | clips | chunks
    image_size            S (square resize, antialiased)
    cameras               comma list of cameras to decode ("primary")
    gap_seconds           0 -> ``gaps.ROBOT_GAP_SECONDS`` (0.6 s) for robot data,
                          ``gaps.HUMAN_GAP_SECONDS`` (2.4 s) for human video (spec ``kind``;
                          ``registry.dataset_gap``)
    gap_frames            > 0 overrides every dataset's gap (frames)
    clip_length, clip_stride   L (clips have L+1 frames) and the stride in frames (steps)
    clip_stride_seconds   > 0: the clip stride in seconds instead, converted per dataset at its
                          control_hz / fps (``registry.clip_stride``), so a mixture's clips span
                          the same time; their actions are zero-padded to the longest span
    chunk_size, chunk_pad      K and "zero" | "last"
    history               frame history W (1 = none): frames / chunks get a window of W frames
                          ending at t, pairs / clips their frames preceded by W - 1 history frames
                          (``traj_transforms``: frames before 0 repeat frame 0)
    history_stride        k: control steps between the history frames (t-(W-1)k, ..., t-k, t)
    shuffle_buffer        samples in the shuffle buffer (train and eval)
    traj_shuffle_buffer   trajectories in a shuffle buffer before windowing (train; 0 = none)
    augment               seeded augmentation when training (``augmentation.*`` ranges:
                          crop_scale, crop_ratio, brightness, contrast, saturation, hue)
    deterministic         same seed -> same batches (order-preserving parallelism)
    num_parallel_reads, num_parallel_calls   -1 = AUTOTUNE
    prefetch              batches prefetched (-1 = AUTOTUNE)
    ignore_errors         skip and count corrupt TFRecord records (``Batches.num_skipped``, over
                          all passes; ``Batches.data_metrics()``: distinct bad records per dataset,
                          which the trainer logs as ``data/skipped/<dataset>``); image bytes that
                          fail to decode still raise
    action_normalization, proprio_normalization   none | q01q99 | min_max | mean_std
    num_bins              > 0: the statistics also hold quantile bin edges (``stats``)
    stats_dir             statistics cache ("" -> $JAXVLA_CACHE_DIR or ~/.cache/jaxvla/stats)
    drop_actions          action-free view of every dataset
    few_demos_per_task    > 0: only the first N episodes of every task (finetuning)
    max_samples_per_traj  > 0: at most N random samples per trajectory and pass
    goal_relabel          add uniform future goal images (task/image_<cam>)
    eval_repeat           repeat the eval split (so any number of eval batches exists)
    check_nonempty        fail early, naming the dataset, when it yields no samples
    latent_labels         latent label directory (``latent_labels.LatentLabelWriter``) joined onto
                          every dataset's trajectories ("" = none); a missing directory raises
                          ``load_latent_labels``'s FileNotFoundError naming it
    latent_labels_hash    expected LAQ config hash of the labels ("" = not checked); a mismatch
                          raises ValueError naming both hashes
    latent_labels_missing "error" (a trajectory without labels raises, naming its traj_key) |
                          "skip" (such trajectories are dropped; ``Batches.latent_join_stats``
                          counts them)

Batch ``s`` of a run depends only on (seed, s, process index / count) in deterministic mode:
``start_step`` skips ``start_step * batch_size`` encoded samples (read and windowed, not decoded)
and the augmentation seed of every sample is its position in the stream, so a resumed run sees
the batches an uninterrupted one would. A run with a different process count reads different
shares and so sees different (equally valid) batches.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxvla.data import frame_transforms as ft
from jaxvla.data import latent_labels as latent_lib
from jaxvla.data import stats as stats_lib
from jaxvla.data import traj_transforms as tt
from jaxvla.data.dataset import (
    AUTOTUNE,
    TrajDataset,
    _default_process,
    _derive_seed,
    abs_path,
    first_episodes_per_task,
    is_dir,
    load_builder,
    path_exists,
    translate_error,
)
from jaxvla.data.mixtures import resolve_mixture
from jaxvla.data.registry import DatasetSpec, clip_stride, dataset_gap, get_dataset_spec

log = logging.getLogger("jaxvla")

SAMPLE_KINDS = ("frames", "pairs", "clips", "chunks")


# --------------------------------------------------------------------------- dataset specs
# One DatasetSpec per dataset: jaxvla.data.registry (get_dataset_spec, register_dataset,
# dataset_gap); mixtures: jaxvla.data.mixtures.resolve_mixture.


def _resolve_fn(fn: Callable | str | None) -> Callable | None:
    if fn is None or callable(fn):
        return fn
    module, _, attr = str(fn).partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_builder_dir(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> str:
    """The dataset's TFDS version directory; errors name the dataset, the key and the path."""
    if not data_dir and not (spec.builder_dir and _is_absolute(spec.builder_dir)):
        raise ValueError(
            f"dataset {spec.name!r}: config.data.data_dir is empty; set it to the directory holding "
            f"the TFDS datasets (e.g. runs/data/metaworld_mt10_64) or to the dataset's version directory"
        )
    data_dir = abs_path(data_dir) if data_dir else ""
    if spec.builder_dir and _is_absolute(spec.builder_dir):
        candidates = [spec.builder_dir]
    else:
        candidates = [data_dir] if data_dir else []  # data_dir may be the version dir itself
        if spec.builder_dir:
            candidates.append(os.path.join(data_dir, spec.builder_dir))
        candidates.append(os.path.join(data_dir, spec.name))
    for path in candidates:
        if path_exists(os.path.join(path, "dataset_info.json")):
            return path
    for path in candidates:
        if is_dir(path):  # a builder dir holding version dirs: the newest
            versions = sorted(
                (
                    d.rstrip("/")
                    for d in tf.io.gfile.listdir(path)
                    if path_exists(os.path.join(path, d.rstrip("/"), "dataset_info.json"))
                ),
                key=_version_key,
            )
            if versions:
                return os.path.join(path, versions[-1])
    expected = (
        "expected the directory holding the TFDS datasets (<data_dir>/<dataset>/<version>/dataset_info.json) "
        "or one dataset's version directory (holding dataset_info.json)"
    )
    if data_dir and not path_exists(data_dir):
        raise FileNotFoundError(f"dataset {spec.name!r}: config.data.data_dir={data_dir} does not exist; {expected}")
    if data_dir and not is_dir(data_dir):
        raise NotADirectoryError(f"dataset {spec.name!r}: config.data.data_dir={data_dir} is a file; {expected}")
    found = _version_dirs_below(data_dir) if data_dir else []
    hint = f"; dataset version directories found below it: {found}" if found else ""
    raise FileNotFoundError(
        f"dataset {spec.name!r}: no TFDS dataset (dataset_info.json) at {candidates or [data_dir]} "
        f"(config.data.data_dir={data_dir or None}; {expected}){hint}"
    )


def _version_dirs_below(root: str, depth: int = 3, limit: int = 5, budget: int = 200) -> list[str]:
    """Up to ``limit`` directories holding dataset_info.json within ``depth`` levels below ``root``
    (a hint when ``data_dir`` points at the wrong level; at most ``budget`` directories listed)."""
    found, level = [], [root]
    for _ in range(depth):
        below = []
        for directory in level:
            budget -= 1
            if budget < 0:
                return found
            try:
                entries = tf.io.gfile.listdir(directory)
            except tf.errors.OpError:
                continue
            for entry in sorted(entries):
                path = os.path.join(directory, entry.rstrip("/"))
                if not is_dir(path):
                    continue
                if path_exists(os.path.join(path, "dataset_info.json")):
                    found.append(path)
                    if len(found) >= limit:
                        return found
                else:
                    below.append(path)
        level = below
    return found


def _is_absolute(path: str) -> bool:
    return "://" in path or os.path.isabs(path)


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


# --------------------------------------------------------------------------- trajectories


def default_stats_dir() -> str:
    root = os.environ.get("JAXVLA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxvla")
    return os.path.join(root, "stats")


def _fn_name(fn: Any) -> str:
    fn = _resolve_fn(fn) if isinstance(fn, str) else fn
    if fn is None:
        return "none"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def dataset_statistics(
    spec: Any,
    data_dir: str | os.PathLike | None,
    *,
    split: str | None = None,
    stats_dir: str | None = None,
    num_bins: int = 0,
    progress: bool = True,
    few_demos_per_task: int = 0,
) -> dict[str, Any]:
    """Statistics (``stats.compute_statistics``) of ``action`` and ``observation/proprio`` over the
    whole train split (all processes alike; only the first ``few_demos_per_task`` episodes of every
    task when > 0, i.e. the finetuning data), cached under ``stats_dir`` keyed by the spec, the
    split, the episode subset, the builder dir and its fingerprint."""
    spec = get_dataset_spec(spec)
    split = split or spec.train_split
    if spec.trajectories_fn is not None:
        trajectories = spec.trajectories_fn(split=split, train=False, seed=0, process_index=0, process_count=1,
                                            data_dir=data_dir)
        if isinstance(trajectories, tf.data.Dataset):
            trajectories = TrajDataset.from_tf(trajectories, spec.name)
        cache_key = None
    else:
        builder_dir = resolve_builder_dir(spec, data_dir)
        standardize = _resolve_fn(spec.standardize_fn)
        indices = _few_demo_indices(spec, builder_dir, split, few_demos_per_task, standardize)
        trajectories = TrajDataset.from_rlds(
            builder_dir, split, shuffle=False, process_index=0, process_count=1,
            standardize_fn=standardize, dataset_name=spec.name, deterministic=True, traj_indices=indices,
        )
        cache_key = {
            "name": spec.name,
            "split": split,
            "episodes": indices,
            "builder_dir": builder_dir,
            "fingerprint": stats_lib.dataset_fingerprint(builder_dir),
            "standardize_fn": _fn_name(spec.standardize_fn),
            "spec_fingerprint": spec.fingerprint,
        }
    return stats_lib.compute_statistics(
        trajectories,
        keys=("action", "observation/proprio"),
        cache_dir=stats_dir or default_stats_dir(),
        cache_key=cache_key,
        name=spec.name,
        num_bins=num_bins,
        binary_dims=spec.gripper_dims,
        progress=progress,
        total=getattr(trajectories, "num_trajectories", None),
    )


def make_trajectory_dataset(
    dataset_spec: Any,
    split: str | None,
    train: bool,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    deterministic: bool = True,
    ignore_errors: bool = False,
    few_demos_per_task: int = 0,
    num_parallel_reads: int = AUTOTUNE,
    num_parallel_calls: int = AUTOTUNE,
) -> TrajDataset:
    """This process's share of one dataset's split as standardised trajectories.

    ``split`` None / "" -> the spec's train or val split (by ``train``). The file order is
    shuffled every pass when ``train``."""
    spec = get_dataset_spec(dataset_spec)
    if not split:
        split = spec.train_split if train else spec.val_split
    if spec.trajectories_fn is not None:
        ds = spec.trajectories_fn(
            split=split, train=train, seed=seed, process_index=process_index, process_count=process_count,
            data_dir=data_dir,
        )
        if isinstance(ds, tf.data.Dataset):
            ds = TrajDataset.from_tf(ds, spec.name, deterministic=deterministic, seed=seed)
        return ds
    builder_dir = resolve_builder_dir(spec, data_dir)
    standardize = _resolve_fn(spec.standardize_fn)
    indices = _few_demo_indices(spec, builder_dir, split, few_demos_per_task, standardize)
    return TrajDataset.from_rlds(
        builder_dir,
        split,
        shuffle=train,
        num_parallel_reads=num_parallel_reads,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        standardize_fn=standardize,
        dataset_name=spec.name,
        deterministic=deterministic,
        ignore_errors=ignore_errors,
        traj_indices=indices,
        num_parallel_calls=num_parallel_calls,
    )


def trajectory_frames(
    data_config: Any,
    split: str | None,
    *,
    image_size: int,
    camera: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    mixture: Sequence[tuple[Any, float]] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(traj_key, frames uint8 [T, S, S, 3]) of every trajectory of ``config.data``'s mixture (or
    single dataset), dataset after dataset, each in file order: the one RLDS reader
    (``make_trajectory_dataset``, deterministic, no shuffling) with the pipeline's decode + resize
    (a frame already S x S is not resampled).

    Args:
      data_config: ``config.data``; reads ``mixture`` / ``dataset``, ``data_dir`` and ``cameras``.
      split: the split of every dataset; None / "" -> each spec's train split.
      image_size: S.
      camera: the camera decoded; None -> the first of ``config.data.cameras`` ("primary").
      process_index, process_count: this process's disjoint share of each dataset's files
        (default: all of it).
      mixture: [(spec or dataset name, weight)] overriding ``config.data.mixture`` / ``dataset``;
        entries with weight <= 0 are skipped, the weights are otherwise ignored.
    """
    def get(key: str) -> Any:
        return data_config.get(key) if data_config is not None else None

    if camera is None:
        camera = str(get("cameras") or "primary").split(",")[0].strip() or "primary"
    if mixture is None:
        name = get("mixture") or get("dataset")
        if not name:
            raise ValueError("config.data.mixture and config.data.dataset are both empty; name a dataset")
        mixture = get("mixture") or [(name, 1.0)]
    image_size = int(image_size)
    key = f"image_{camera}"
    for spec, weight in resolve_mixture(mixture):
        if float(weight) <= 0:
            continue
        trajectories = make_trajectory_dataset(
            spec, split or spec.train_split, False, 0, process_index, process_count, data_dir=get("data_dir"),
            deterministic=True,
        )
        if key not in trajectories.element_spec["observation"]:
            cameras = sorted(k[len("image_"):] for k in trajectories.element_spec["observation"] if k.startswith("image_"))
            raise KeyError(f"dataset {spec.name!r} has no camera {camera!r} (config.data.cameras); it has {cameras}")
        shape = np.asarray(list(spec.image_shape or (0, 0))[:2], np.int32)

        def decode(t, spec=spec, shape=shape):
            images = ft.decode_and_resize(
                t["observation"][key], image_size, expected_shape=shape, context=f"dataset '{spec.name}' {key}"
            )
            return {"traj_key": t["traj_key"][0], "images": images}

        dataset = trajectories.traj_map(decode).dataset.prefetch(AUTOTUNE)
        for item in dataset.as_numpy_iterator():
            yield item["traj_key"].decode("utf-8"), item["images"]


def _few_demo_indices(spec: DatasetSpec, builder_dir: str, split: str, num: int, standardize) -> list[int] | None:
    if not num or num <= 0:
        return None
    raw_keys = spec.few_demo_task_key.startswith("episode_metadata/")
    indices = first_episodes_per_task(
        builder_dir, split, int(num),
        standardize_fn=None if raw_keys else standardize,
        task_key=spec.few_demo_task_key, dataset_name=spec.name, order_key=spec.few_demo_order_key,
    )
    log.info("%s: %d episodes (the first %d of every task) of split %s", spec.name, len(indices), num, split)
    return indices


# --------------------------------------------------------------------------- config


def default_data_config():
    """``config.data`` with every key ``make_batches`` reads and its default (an ml_collections
    ConfigDict): the one place the defaults are written. The keys are described in this module's
    docstring."""
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            data_dir="runs/data/metaworld_mt10_64",
            dataset="metaworld",
            mixture="",
            split="",
            eval_split="",
            sample="frames",
            image_size=64,
            cameras="primary",
            gap_seconds=0.0,
            gap_frames=0,
            clip_length=7,
            clip_stride=1,
            clip_stride_seconds=0.0,
            chunk_size=14,
            chunk_pad="zero",
            history=1,
            history_stride=1,
            shuffle_buffer=10_000,
            traj_shuffle_buffer=8,
            augment=False,
            augmentation=dict(
                crop_scale=(0.8, 1.0),
                crop_ratio=(0.9, 1.1),
                brightness=0.1,
                contrast=(0.9, 1.1),
                saturation=(0.9, 1.1),
                hue=0.05,
            ),
            deterministic=True,
            num_parallel_reads=-1,
            num_parallel_calls=-1,
            prefetch=2,
            ignore_errors=False,
            action_normalization="none",
            proprio_normalization="none",
            num_bins=0,
            stats_dir="",
            drop_actions=False,
            few_demos_per_task=0,
            max_samples_per_traj=0,
            goal_relabel=False,
            eval_repeat=True,
            check_nonempty=True,
            latent_labels="",
            latent_labels_hash="",
            latent_labels_missing="error",
        )
    )


# Keys the stage configs keep in ``config.data`` for their embedded Meta-World prerequisite
# (``jaxvla.data.embedded``; configs/laq.py, pretrain.py, finetune.py): not read by ``make_batches``,
# which accepts and ignores them.
STAGE_DATA_KEYS = ("generate_metaworld", "metaworld_tasks", "metaworld_episodes_per_task")


def _config_items(config: Any) -> dict[str, Any]:
    """The top-level (key, value) pairs of a dict, a ConfigDict (references resolved) or None."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "keys"):
        return {key: config[key] for key in config.keys()}
    raise TypeError(f"config.data: expected a dict or ConfigDict, got {type(config).__name__}")


def with_defaults(data_config: Any) -> dict[str, Any]:
    """``config.data`` (a dict or ConfigDict, possibly partial) as a dict holding every key of
    ``default_data_config()``: the given values, the defaults for the keys not given (also inside
    ``augmentation``). A key ``default_data_config()`` lacks raises ValueError naming it, except the
    stage keys ``STAGE_DATA_KEYS`` (dropped)."""
    defaults = _config_items(default_data_config())
    given = _config_items(data_config)
    unknown = sorted(set(given) - set(defaults) - set(STAGE_DATA_KEYS))
    if unknown:
        raise ValueError(
            f"config.data: unknown key(s) {unknown}; the data pipeline reads {sorted(defaults)} "
            "(jaxvla.data.pipeline's module docstring)"
        )
    merged = {key: given.get(key, default) for key, default in defaults.items()}
    merged["augmentation"] = {**_config_items(defaults["augmentation"]), **_config_items(given.get("augmentation"))}
    return merged


def _image_size(value: Any, entries: Sequence[tuple[DatasetSpec, float]] = (), data_dir: Any = None) -> int:
    """``config.data.image_size`` as a positive int; otherwise a ValueError naming the key, what it
    expects and the image sizes the datasets declare."""
    try:
        size = int(value)
        ok = not isinstance(value, bool) and (size == value or str(size) == str(value).strip())
    except (TypeError, ValueError):
        size, ok = 0, False
    if ok and size >= 1:
        return size
    declared = {}
    for spec, _ in entries:
        shapes = _declared_image_shapes(spec, data_dir)
        if shapes:
            declared[spec.name] = shapes
    hint = f"; the datasets' image features: {declared}" if declared else ""
    raise ValueError(
        f"config.data.image_size={value!r}: expected a positive integer S (every camera's frames are decoded "
        f"and resized to S x S pixels, e.g. the datasets' own frame size){hint}"
    )


def _declared_image_shapes(spec: DatasetSpec, data_dir: Any) -> dict[str, tuple]:
    """{feature key: declared shape} of the image features in a dataset's features.json
    (best effort, for error messages; {} when it cannot be read)."""
    if spec.trajectories_fn is not None:
        return {}
    try:
        features = load_builder(resolve_builder_dir(spec, data_dir), spec.name).info.features
    except Exception:  # noqa: BLE001 - only a hint for another error
        return {}
    out = {}

    def walk(node, prefix):
        items = node.items() if hasattr(node, "items") else ()
        for key, value in items:
            path = f"{prefix}/{key}" if prefix else key
            if isinstance(value, tfds.features.Dataset):
                walk(value.feature, path)
            elif isinstance(value, tfds.features.Image):
                out[path] = tuple(value.shape)
            elif hasattr(value, "items"):
                walk(value, path)

    walk(features, "")
    return out


def _parallel(value: Any) -> int:
    value = -1 if value is None else int(value)
    return AUTOTUNE if value < 0 else value


# --------------------------------------------------------------------------- batches


class Batches:
    """This process's numpy batches (iterable; each ``iter()`` starts the stream anew).

    Attributes: ``statistics`` {dataset name: stats dict} (empty unless normalisation or bins were
    requested), ``specs`` [(DatasetSpec, weight)], ``gaps`` {dataset name: steps between a
    sample's frames: H for pairs, the clip stride for clips; ``mixture_gaps``}, ``dataset`` (the
    final ``TrajDataset`` of batches), ``batch_size``, ``sample``, ``latent_labels`` (the loaded
    ``LatentLabels`` or None) and ``latent_join_stats`` {dataset name: ``JoinStats``} (trajectories
    dropped for lack of labels with ``latent_labels_missing="skip"``, counted on every pass, the
    ``check_nonempty`` probe included)."""

    def __init__(
        self, dataset: TrajDataset, *, statistics, specs, gaps, batch_size: int, sample: str, children,
        latent_labels=None, latent_join_stats=None, ignore_errors: bool = False,
    ):
        self.dataset = dataset
        self.ignore_errors = bool(ignore_errors)
        self.latent_labels = latent_labels
        self.latent_join_stats = dict(latent_join_stats or {})
        self.statistics = statistics
        self.specs = specs
        self.gaps = gaps
        self.batch_size = batch_size
        self.sample = sample
        self._children = children

    def __iter__(self) -> Iterator[dict]:
        iterator = self.dataset.iterator()
        first = True
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                if first:
                    raise ValueError(
                        f"{self.dataset.name}: the pipeline produced no batch of {self.batch_size} {self.sample} "
                        "samples (too few samples for one batch with drop_remainder; lower the batch size)"
                    ) from None
                return
            first = False
            yield batch

    @property
    def num_skipped(self) -> int:
        """Corrupt records skipped so far (``ignore_errors``), cumulative over passes."""
        return self.dataset.num_skipped

    def data_metrics(self) -> dict[str, float]:
        """With ``ignore_errors``: ``{"data/skipped/<dataset>": n}``, the distinct corrupt records
        found so far in this process's share of each dataset (``TrajDataset.num_unreadable``: after
        one full pass, the number of bad records; it does not grow with further passes). The
        trainer logs these at every log step, summed over processes (``jaxvla.stages.DataStream``).
        {} otherwise."""
        if not self.ignore_errors:
            return {}
        counts: dict[str, float] = {}
        for spec, _, traj in self._children:
            key = f"data/skipped/{spec.name}"
            counts[key] = counts.get(key, 0.0) + float(getattr(traj, "num_unreadable", 0))
        return counts


def _pad_last(x: tf.Tensor, size: int) -> tf.Tensor:
    extra = size - int(x.shape[-1])
    if extra <= 0:
        return x
    paddings = [[0, 0]] * (x.shape.rank - 1) + [[0, extra]]
    return tf.pad(x, paddings)


def _image_keys(tree: Mapping[str, Any]) -> list[str]:
    return [k for k in tree if k.startswith("image_")]


def make_batches(
    data_config: Any,
    *,
    batch_size: int,
    train: bool = True,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    mixture: Sequence[tuple[Any, float]] | None = None,
    progress: bool = False,
) -> Batches:
    """Per-process numpy batches of ``config.data.sample`` samples (module docstring): the steps
    ``mixture_statistics`` -> ``read_trajectories`` -> ``trajectory_samples`` (per dataset) ->
    ``mix_samples`` -> ``decode_samples`` -> ``batch_samples``.

    Args:
      data_config: ``config.data`` (ConfigDict or dict; missing keys take ``default_data_config()``'s
        values, an unknown key raises ValueError: ``with_defaults``).
      batch_size: rows per batch on THIS process (global batch / process count).
      train: training (shuffled files, augmentation, train split) or evaluation (val split, no
        augmentation, deterministic).
      seed: everything random derives from it.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      start_step: skip this many batches (resume).
      mixture: [(spec or dataset name, weight)] overriding ``config.data.mixture`` / ``dataset``.
    """
    cfg = with_defaults(data_config)  # the defaults, once
    sample = cfg["sample"]
    if sample not in SAMPLE_KINDS:
        raise ValueError(f"config.data.sample={sample!r} is unknown; expected one of {SAMPLE_KINDS}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    process_index, process_count = _default_process(process_index, process_count)
    _cameras(cfg)  # an empty camera list fails before anything is read
    entries = mixture_entries(cfg, mixture)
    image_size = _image_size(cfg["image_size"], entries, cfg["data_dir"])

    statistics = mixture_statistics(cfg, entries, progress=progress)
    gaps = mixture_gaps(cfg, entries)
    max_gap = max(gaps.values()) if gaps else 0
    trajectories = read_trajectories(
        cfg, entries, train=train, seed=seed, process_index=process_index, process_count=process_count
    )
    children = trajectories.children
    action_dim, proprio_dim = mixture_dims(children)
    streams = [
        trajectory_samples(
            traj, spec, cfg, train=train, statistics=statistics.get(spec.name), action_dim=action_dim,
            proprio_dim=proprio_dim, gap=gaps.get(spec.name, 0), max_gap=max_gap,
        )
        for spec, _, traj in children
    ]
    ds = mix_samples(streams, [w for _, w, _ in children], cfg, train=train, seed=seed)
    ds = decode_samples(ds, cfg, image_size=image_size, train=train, seed=seed, skip=int(start_step) * batch_size)
    ds = batch_samples(ds, batch_size, cfg)
    return Batches(
        ds, statistics=statistics, specs=[(s, w) for s, w, _ in children], gaps=gaps, batch_size=batch_size,
        sample=sample, children=children, latent_labels=trajectories.latent_labels,
        latent_join_stats=trajectories.latent_join_stats, ignore_errors=bool(cfg["ignore_errors"]),
    )


# --------------------------------------------------------------------------- the steps of make_batches
# Each takes ``cfg = with_defaults(config.data)`` (a dict holding every key); composing them as
# make_batches does gives its batches (tests/test_data_pipeline.py checks it).


def _cameras(cfg: Mapping[str, Any]) -> list[str]:
    """``config.data.cameras`` as a list of camera names; ValueError when it names none."""
    cameras = [c.strip() for c in str(cfg["cameras"]).split(",") if c.strip()]
    if not cameras:
        raise ValueError("config.data.cameras is empty; name at least one camera (e.g. 'primary')")
    return cameras


def mixture_entries(
    cfg: Mapping[str, Any], mixture: Sequence[tuple[Any, float]] | None = None
) -> list[tuple[DatasetSpec, float]]:
    """[(DatasetSpec, weight > 0)] of ``mixture`` (None: ``config.data.mixture``, else
    ``config.data.dataset`` with weight 1), resolved by ``mixtures.resolve_mixture``; entries with
    weight <= 0 are dropped. ValueError when nothing names a dataset or no weight is positive."""
    if mixture is None:
        name = cfg["mixture"] or cfg["dataset"]
        if not name:
            raise ValueError("config.data.mixture and config.data.dataset are both empty; name a dataset")
        mixture = cfg["mixture"] or [(name, 1.0)]
    entries = [(s, float(w)) for s, w in resolve_mixture(mixture) if w > 0]
    if not entries:
        raise ValueError(f"mixture {mixture!r} has no dataset with a positive weight")
    return entries


def mixture_statistics(
    cfg: Mapping[str, Any], entries: Sequence[tuple[DatasetSpec, float]], *, progress: bool = False
) -> dict[str, Any]:
    """{dataset name: ``dataset_statistics``} of every entry when ``action_normalization`` /
    ``proprio_normalization`` is not "none" or ``num_bins`` > 0 (train split, cached under
    ``stats_dir``; the first ``few_demos_per_task`` episodes of every task when set), else {}."""
    action_norm = cfg["action_normalization"] or "none"
    proprio_norm = cfg["proprio_normalization"] or "none"
    num_bins = int(cfg["num_bins"] or 0)
    statistics: dict[str, Any] = {}
    if action_norm != "none" or proprio_norm != "none" or num_bins > 0:
        for spec, _ in entries:
            statistics[spec.name] = dataset_statistics(
                spec, cfg["data_dir"], stats_dir=cfg["stats_dir"] or None, num_bins=num_bins, progress=progress,
                few_demos_per_task=int(cfg["few_demos_per_task"] or 0),
            )
    return statistics


def mixture_gaps(cfg: Mapping[str, Any], entries: Sequence[tuple[DatasetSpec, float]]) -> dict[str, int]:
    """{dataset name: steps between a sample's consecutive frames}: for "pairs" the frame gap H
    (``registry.dataset_gap`` with ``gap_seconds`` / ``gap_frames``), for "clips" the clip stride
    (``registry.clip_stride`` with ``clip_stride_seconds`` / ``clip_stride``); {} for the other kinds."""
    if cfg["sample"] == "pairs":
        return {s.name: dataset_gap(s, cfg["gap_seconds"], cfg["gap_frames"]) for s, _ in entries}
    if cfg["sample"] == "clips":
        return {s.name: clip_stride(s, cfg["clip_stride_seconds"], cfg["clip_stride"]) for s, _ in entries}
    return {}


class Trajectories(NamedTuple):
    """``read_trajectories``' result.

    children: [(DatasetSpec, weight, TrajDataset)] in mixture order; each ``TrajDataset`` yields
      this process's standardised trajectories (schema dicts of [T, ...] tensors: ``observation/
      image_<cam>`` encoded bytes [T], ``observation/proprio`` [T, P], ``action`` [T, A],
      ``has_action`` [T], ...) with, when ``latent_labels`` is set, ``latent_action``
      [T, *code_shape] and ``has_latent`` [T] joined on.
    latent_labels: the loaded ``latent_labels.LatentLabels`` or None.
    latent_join_stats: {dataset name: ``latent_labels.JoinStats``} ({} without labels).
    """

    children: list[tuple[DatasetSpec, float, TrajDataset]]
    latent_labels: Any
    latent_join_stats: dict[str, Any]


def read_trajectories(
    cfg: Mapping[str, Any],
    entries: Sequence[tuple[DatasetSpec, float]],
    *,
    train: bool,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Trajectories:
    """Step 1 (read): every entry's trajectories, this process's disjoint share of its files
    (``make_trajectory_dataset`` of the ``split`` / ``eval_split`` key, seeded per position in the
    mixture; shuffled file order when ``train``), with the latent labels of ``latent_labels``
    joined onto every trajectory (loaded once for the whole mixture; ``latent_labels_hash`` checked,
    ``latent_labels_missing`` "error" | "skip").

    Whole trajectories, before any sample transform: ``trajectory_samples`` then takes
    ``latent_action`` / ``has_latent`` at each sample's start frame."""
    latent_labels, latent_join_stats, expected_hash, missing_labels = None, {}, None, "error"
    label_dir = str(cfg["latent_labels"] or "")
    if label_dir:
        missing_labels = str(cfg["latent_labels_missing"] or "error")
        if missing_labels not in ("error", "skip"):
            raise ValueError(
                f"config.data.latent_labels_missing={missing_labels!r} is unknown; expected 'error' or 'skip'"
            )
        expected_hash = str(cfg["latent_labels_hash"] or "") or None
        label_info, latent_labels = latent_lib.load_latent_labels(label_dir)  # once, for every dataset
        if expected_hash is not None and label_info["laq_config_hash"] != expected_hash:
            raise ValueError(
                f"{label_dir}: latent labels were made with LAQ config hash {label_info['laq_config_hash']!r}, "
                f"expected {expected_hash!r} (config.data.latent_labels_hash; relabel with the current LAQ or "
                "point config.data.latent_labels at the matching labels)"
            )

    split = cfg["split" if train else "eval_split"] or None
    children = []
    for position, (spec, weight) in enumerate(entries):
        traj = make_trajectory_dataset(
            spec,
            split,
            train,
            _derive_seed(seed, 1000 + position),
            process_index,
            process_count,
            data_dir=cfg["data_dir"],
            deterministic=bool(cfg["deterministic"]) or not train,
            ignore_errors=bool(cfg["ignore_errors"]),
            few_demos_per_task=int(cfg["few_demos_per_task"] or 0),
            num_parallel_reads=_parallel(cfg["num_parallel_reads"]),
            num_parallel_calls=_parallel(cfg["num_parallel_calls"]),
        )
        if latent_labels is not None:
            latent_join_stats[spec.name] = latent_lib.JoinStats()
            traj = traj._derive(
                latent_lib.join_latent_labels(
                    traj.dataset, latent_labels, expected_hash, missing_labels,
                    stats=latent_join_stats[spec.name],
                    num_parallel_calls=traj._calls(_parallel(cfg["num_parallel_calls"])),
                )
            )
        children.append((spec, weight, traj))
    return Trajectories(children, latent_labels, latent_join_stats)


def mixture_dims(children: Sequence[tuple[DatasetSpec, float, TrajDataset]]) -> tuple[int, int]:
    """(A, P): the largest action and proprio widths of the mixture's trajectories, to which
    ``trajectory_samples`` zero-pads every dataset."""
    action_dim = max(int(t.element_spec["action"].shape[-1]) for _, _, t in children)
    proprio_dim = max(int(t.element_spec["observation"]["proprio"].shape[-1]) for _, _, t in children)
    return action_dim, proprio_dim


def trajectory_samples(
    traj: TrajDataset,
    spec: DatasetSpec,
    cfg: Mapping[str, Any],
    *,
    train: bool,
    statistics: Mapping[str, Any] | None,
    action_dim: int,
    proprio_dim: int,
    gap: int = 0,
    max_gap: int = 0,
) -> TrajDataset:
    """Steps 2-3 (trajectory transforms, samples): one dataset's trajectories -> its flat stream of
    encoded ``config.data.sample`` samples, before mixing.

    Per trajectory: action / proprio normalisation with ``statistics`` (``mixture_statistics``;
    action dims outside the spec's ``normalize_mask``, by default the gripper dims, untouched;
    steps without an action stay 0), ``drop_actions``, zero-padding of ``action`` to [T, action_dim]
    and ``observation/proprio`` to [T, proprio_dim] (``mixture_dims``), dropping the cameras not in
    ``config.data.cameras``, the ``traj_shuffle_buffer`` (train), ``goal_relabel``, the sample
    transform (``traj_transforms``: frames with ``history``, pairs with ``gap`` and actions padded
    to ``max_gap``, clips, chunks), ``max_samples_per_traj``; then ``flatten_samples`` (one element
    per sample: the shapes of the module docstring without the batch dim B, images still encoded
    bytes, plus ``_image_shape`` int32 [2], the spec's expected (H, W) checked at decode), and the
    filters: chunks whose first action is missing, samples whose start frame has no latent label.
    With ``check_nonempty``: ValueError naming the dataset when the stream yields no sample."""
    name = spec.name
    sample = cfg["sample"]
    cameras = _cameras(cfg)
    action_norm = cfg["action_normalization"] or "none"
    proprio_norm = cfg["proprio_normalization"] or "none"
    available = set(traj.element_spec["observation"])
    missing = [c for c in cameras if f"image_{c}" not in available]
    if missing:
        raise KeyError(
            f"dataset {name!r}: no camera(s) {missing} (config.data.cameras); it has "
            f"{sorted(k[len('image_'):] for k in available if k.startswith('image_'))}"
        )
    action_dims = int(traj.element_spec["action"].shape[-1])
    if spec.normalize_mask is not None:
        if len(spec.normalize_mask) != action_dims:
            raise ValueError(
                f"dataset {name!r}: normalize_mask has {len(spec.normalize_mask)} entries, actions have {action_dims}"
            )
        norm_mask = np.asarray(spec.normalize_mask, bool)
    else:
        norm_mask = np.ones((action_dims,), bool)
        for d in spec.gripper_dims:
            if -action_dims <= d < action_dims:
                norm_mask[d] = False
    image_shape = np.asarray(list(spec.image_shape or (0, 0))[:2], np.int32)
    drop = bool(cfg["drop_actions"])

    def prepare(t):
        t = dict(t)
        observation = dict(t["observation"])
        if statistics is not None and action_norm != "none":
            action = stats_lib.normalize(t["action"], statistics["action"], action_norm, mask=norm_mask)
            t["action"] = tf.where(t["has_action"][:, None], action, tf.zeros_like(action))
        if statistics is not None and proprio_norm != "none" and proprio_dim > 0:
            observation["proprio"] = stats_lib.normalize(
                observation["proprio"], statistics["observation/proprio"], proprio_norm
            )
        if drop:
            t = tt.drop_actions(t)
        t["action"] = _pad_last(t["action"], action_dim)
        observation["proprio"] = _pad_last(observation["proprio"], proprio_dim)
        for key in list(observation):
            if key.startswith("image_") and key[len("image_"):] not in cameras:
                del observation[key]
        t["observation"] = observation
        return t

    ds = traj.traj_map(prepare)
    traj_buffer = int(cfg["traj_shuffle_buffer"] or 0)
    if train and traj_buffer > 1:
        ds = ds.shuffle(traj_buffer)
    if cfg["goal_relabel"]:
        ds = ds.traj_map_seeded(tt.goal_relabel_uniform)

    history = int(cfg["history"] or 1)
    history_stride = int(cfg["history_stride"] or 1)
    if history < 1 or history_stride < 1:
        raise ValueError(f"config.data.history={history} and config.data.history_stride={history_stride}: "
                         "expected >= 1 (history 1: no history frames)")
    if sample == "frames":
        if history > 1:
            ds = ds.traj_map(lambda t: tt.history_windows(t, history, history_stride))
    elif sample == "pairs":
        ds = ds.traj_map(lambda t: tt.frame_pairs(t, gap, action_window=max_gap, history=history,
                                                  history_stride=history_stride))
    elif sample == "clips":
        length = int(cfg["clip_length"])
        stride = int(gap) if gap else clip_stride(spec, cfg["clip_stride_seconds"], cfg["clip_stride"])
        window = length * max(int(max_gap), stride)
        ds = ds.traj_map(lambda t: tt.clips(t, length, stride, history=history, history_stride=history_stride,
                                            action_window=window))
    elif sample == "chunks":
        chunk, pad = int(cfg["chunk_size"]), str(cfg["chunk_pad"] or "zero")

        def chunks(t):
            t = tt.action_chunks(t, chunk, pad)
            if history > 1:
                t = tt.history_windows(t, history, history_stride)
            return t

        ds = ds.traj_map(chunks)
    else:
        raise ValueError(f"config.data.sample={sample!r} is unknown; expected one of {SAMPLE_KINDS}")
    max_samples = int(cfg["max_samples_per_traj"] or 0)
    if max_samples > 0:
        ds = ds.traj_map_seeded(lambda t, s: tt.subsample(t, max_samples, s))
    ds = ds.traj_map(lambda t: {**t, "_image_shape": tf.tile(image_shape[None], [tf.shape(t["traj_key"])[0], 1])})
    ds = flatten_samples(ds)
    if sample == "chunks":
        ds = ds.filter(lambda s: s["action_pad_mask"][0])
    if "has_latent" in ds.element_spec:
        # Labels exist only for frames with a full LAQ window ahead; has_latent is the start frame's.
        ds = ds.filter(lambda s: s["has_latent"])
    if cfg["check_nonempty"]:
        _check_nonempty(ds, spec, traj, sample, gap, cfg.get)
    return ds


def mix_samples(
    streams: Sequence[TrajDataset], weights: Sequence[float], cfg: Mapping[str, Any], *, train: bool, seed: int
) -> TrajDataset:
    """Step 4 (mix): the datasets' sample streams (``trajectory_samples``) -> one stream. Each is
    repeated when ``train`` or ``eval_repeat``; several are interleaved at random with probability
    proportional to ``weights`` (``TrajDataset.sample_from_datasets``); then a seeded shuffle
    buffer of ``shuffle_buffer`` samples (encoded images, so it is cheap). Elements unchanged."""
    if train or cfg["eval_repeat"]:
        streams = [stream.repeat() for stream in streams]
    if len(streams) == 1:
        ds = streams[0]
    else:
        ds = TrajDataset.sample_from_datasets(list(streams), list(weights), seed=_derive_seed(seed, 3))
    shuffle_buffer = int(cfg["shuffle_buffer"] or 0)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=_derive_seed(seed, 4 if train else 5))
    return ds


def decode_samples(
    ds: TrajDataset, cfg: Mapping[str, Any], *, image_size: int, train: bool, seed: int, skip: int = 0
) -> TrajDataset:
    """Step 5 (decode): the mixed stream of encoded samples -> samples with images decoded,
    checked against ``_image_shape`` (dropped) and resized to uint8 [..., S, S, 3] (S =
    ``image_size``; ``observation/image_<cam>`` and ``task/image_<cam>``), with seeded augmentation
    (``augment`` and ``train``; ``augmentation.*`` ranges).

    The first ``skip`` samples (``start_step * batch_size`` on resume) are skipped before decoding;
    each sample's augmentation seed is its position in the stream, so a resumed stream's samples
    equal the uninterrupted one's."""
    augment = bool(cfg["augment"]) and train
    augment_config = ft.AugmentConfig.from_mapping(cfg["augmentation"]) if augment else None
    aug_seed = _derive_seed(seed, 6)

    def decode(index, sample_dict):
        out = dict(sample_dict)
        check = out.pop("_image_shape")
        for group in ("observation", "task"):
            if group not in out:
                continue
            tree = dict(out[group])
            for key_index, key in enumerate(sorted(_image_keys(tree))):
                context = tf.strings.join(["dataset '", sample_dict["dataset_name"], f"' key {group}/{key}"])
                images = ft.decode_and_resize(tree[key], image_size, expected_shape=check, context=context)
                if augment_config is not None:
                    lead = tf.shape(images)[:-3]
                    frames = tf.reshape(images, [-1, image_size, image_size, 3])
                    seed_ = tf.stack([tf.constant(aug_seed, tf.int64), index * 16 + key_index + (8 if group == "task" else 0)])
                    frames = ft.augment_frames(frames, seed_, augment_config)
                    images = tf.ensure_shape(
                        tf.reshape(frames, tf.concat([lead, [image_size, image_size, 3]], 0)), images.shape
                    )
                tree[key] = images
            out[group] = tree
        return out

    # Per-sample seeds from the sample's position in the stream (stable under start_step).
    ds = ds._derive(ds.dataset.enumerate())
    if skip > 0:
        ds = ds.skip(int(skip))
    return ds.traj_map(decode, num_parallel_calls=_parallel(cfg["num_parallel_calls"]))


def batch_samples(ds: TrajDataset, batch_size: int, cfg: Mapping[str, Any]) -> TrajDataset:
    """Step 6 (batches): decoded samples -> batches of ``batch_size`` rows (every key gains the
    leading dim B; the last partial batch is dropped), ``prefetch`` batches ahead (-1 = AUTOTUNE);
    ``TrajDataset.iterator()`` / ``Batches`` yield them as numpy dicts."""
    ds = ds.batch(int(batch_size), drop_remainder=True)
    prefetch = int(cfg["prefetch"])
    return ds.prefetch(AUTOTUNE if prefetch < 0 else prefetch)


def _zero_size_paths(spec: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], tf.TensorSpec]]:
    """(key path, TensorSpec) of every tensor whose per-row shape (all but the leading dim) is
    fully known and holds no element, e.g. ``observation/proprio`` [N, 0] or [N, 2, 0]."""
    if isinstance(spec, Mapping):
        return [found for key in sorted(spec) for found in _zero_size_paths(spec[key], (*path, key))]
    shape = getattr(spec, "shape", None)
    if shape is None or shape.rank is None or shape.rank < 2:
        return []
    row = shape[1:]
    return [(path, spec)] if row.is_fully_defined() and row.num_elements() == 0 else []


def _without_paths(tree: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    out = dict(tree)
    for path in paths:
        node = out
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        del node[path[-1]]
    return out


def _with_zeros(tree: Mapping[str, Any], found: Sequence[tuple[tuple[str, ...], tf.TensorSpec]]) -> dict[str, Any]:
    out = dict(tree)
    for path, spec in found:
        node = out
        for key in path[:-1]:
            node[key] = dict(node.get(key, {}))
            node = node[key]
        node[path[-1]] = tf.zeros(spec.shape[1:], spec.dtype)
    return out


def flatten_samples(ds: TrajDataset) -> TrajDataset:
    """``ds.flatten()`` (one element per row) without passing zero-size tensors through ``unbatch``.

    TensorFlow 2.21's ``Dataset.unbatch`` crashes the process (SIGSEGV, exit 139) on an element
    holding a tensor with a zero-size dimension after the leading one. Every sample of a mixture
    without proprioception has one: ``observation/proprio`` is [T, 0] (human video, the Open-X
    datasets with ``proprio_encoding="none"``) and stays zero-wide when no dataset of the mixture
    has any (a mixture with Meta-World pads it to 39 and hides the bug). Such keys are removed
    before the unbatch and put back after it as zeros of their per-row static shape: they hold no
    values, so the samples are unchanged."""
    found = _zero_size_paths(ds.element_spec)
    if not found:
        return ds.flatten()
    paths = [path for path, _ in found]
    flat = ds.traj_map(lambda t: _without_paths(t, paths)).flatten()
    return flat.traj_map(lambda s: _with_zeros(s, found))


def _check_nonempty(stream: TrajDataset, spec: DatasetSpec, traj: TrajDataset, sample: str, gap: int, get) -> None:
    """Raises ValueError naming the dataset when ``stream`` yields no sample at all."""
    try:
        for _ in stream.dataset.take(1):
            return
    except tf.errors.InvalidArgumentError as e:
        translate_error(e)
        raise
    need = {
        "pairs": f"pairs need trajectories of at least gap + 1 = {gap + 1} frames",
        "clips": f"clips need at least clip_length * clip_stride + 1 = "
        f"{int(get('clip_length')) * (gap or int(get('clip_stride') or 1)) + 1} frames",
        "chunks": "chunks need steps with actions (has_action)",
        "frames": "frames need non-empty trajectories",
    }[sample]
    if get("latent_labels"):
        need += f"; with latent_labels={get('latent_labels')}, only samples whose start frame is labelled"
    raise ValueError(
        f"dataset {spec.name!r}: no {sample} samples from its {traj.num_trajectories or 'all'} trajectories "
        f"on this process ({need}; the dataset may be empty or its trajectories too short)"
    )
