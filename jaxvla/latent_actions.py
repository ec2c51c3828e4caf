"""Using a trained LAQ: load it, encode frames with it, label whole datasets with latent actions.

    laq = load_laq("runs/laq")                      # latest checkpoint of a stage-1 workdir
    codes = laq.encode(frames)                      # uint8 [B, T, S, S, 3] -> int32 [B, T-1, M]
    label_dataset(laq, data_config, out_dir)        # what scripts/label_latent_actions.py runs

Labels (``jaxvla.data.latent_labels`` format) give frame ``t`` of a trajectory the codes of the
LAQ window starting at ``t``: code shape ``[K, M]`` with K = T-1 transitions (lapa: K = 1, the
pair (x_t, x_{t+H}); vipra: the L transitions of the clip t, t+s, ..., t+L*s). Frames too close to
the end for a full window have no label. The labels are stamped with the hash of the LAQ's
config (``latent_labels.config_hash``), and ``meta`` records the checkpoint and its step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jaxvla")


@dataclasses.dataclass
class LoadedLAQ:
    """A restored LAQ: ``model`` (Flax module), ``params`` (numpy tree), ``config`` (ConfigDict of
    the run), ``step``, ``checkpoint`` (the step directory), ``config_hash``."""

    model: Any
    params: Any
    config: Any
    step: int
    checkpoint: str
    config_hash: str

    @property
    def frame_offsets(self) -> np.ndarray:
        """Frame offsets of one window from its start: lapa ``[0, H]``, vipra ``[0, s, ..., L*s]``.
        lapa's H is the Meta-World / dataset gap of the LAQ's data config (``dataset_gap``)."""
        data = self.config.data
        if self.model.variant == "vipra":
            return np.arange(self.model.num_frames) * int(data.clip_stride or 1)
        from jaxvla.data.pipeline import dataset_gap, get_dataset_spec

        spec = get_dataset_spec(data.dataset) if not data.get("mixture") else None
        if spec is None:
            if not data.gap_frames:
                raise ValueError(
                    "the LAQ was trained on a mixture without config.data.gap_frames: pass the gap explicitly"
                )
            return np.asarray([0, int(data.gap_frames)])
        return np.asarray([0, dataset_gap(spec, data.gap_seconds, data.gap_frames)])

    def encode_fn(self, mesh: jax.sharding.Mesh | None = None):
        """A jitted ``frames uint8 [B, T, S, S, 3] -> codes int32 [B, T-1, M]``; with ``mesh`` the
        batch is split over all its devices (B must divide by their number)."""
        from jaxvla.losses.tokenizer import images_to_float

        model = self.model

        def encode(params, frames):
            return model.apply({"params": params}, images_to_float(frames), method=model.encode)["indices"]

        if mesh is None:
            params = jax.device_put(self.params)
            fn = jax.jit(encode)
            return lambda frames: fn(params, frames)
        from jax.sharding import NamedSharding, PartitionSpec

        replicated = NamedSharding(mesh, PartitionSpec())
        batch = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        params = jax.device_put(self.params, replicated)
        fn = jax.jit(encode, in_shardings=(replicated, batch), out_shardings=batch)
        return lambda frames: fn(params, jax.device_put(frames, batch))

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Codes of ``frames`` uint8 ``[B, T, S, S, 3]`` -> int32 ``[B, T-1, M]`` (one device)."""
        if not hasattr(self, "_encode"):
            self._encode = self.encode_fn()
        return np.asarray(self._encode(frames))


def load_laq(checkpoint: str, use_ema: bool = False) -> LoadedLAQ:
    """Restores an LAQ from a stage-1 workdir or step directory (``checkpoint.load_checkpoint``)."""
    from jaxvla import checkpoint as ckpt
    from jaxvla.config import from_dict
    from jaxvla.data.latent_labels import config_hash
    from jaxvla.stages.laq import build_model

    state, config_dict, _, step = ckpt.load_checkpoint(checkpoint)
    if config_dict.get("stage") != "laq":
        raise ValueError(f"{checkpoint}: a {config_dict.get('stage')!r} checkpoint, expected an LAQ (stage 'laq')")
    config = from_dict(config_dict)
    params = state["ema_params"] if use_ema and state.get("ema_params") is not None else state["params"]
    step_dir, _ = ckpt.resolve_checkpoint(checkpoint, step=int(step))  # the step load_checkpoint verified
    return LoadedLAQ(build_model(config), params, config, int(step), str(step_dir), config_hash(config_dict))


# ------------------------------------------------------------------------------------------------
# Labelling.


def window_starts(length: int, offsets: np.ndarray) -> np.ndarray:
    """Start frames t of every full window ``t + offsets`` inside a trajectory of ``length``."""
    return np.arange(max(int(length) - int(offsets[-1]), 0), dtype=np.int64)


def trajectory_windows(images: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``images [T, S, S, 3]`` -> (starts [N], windows [N, len(offsets), S, S, 3])."""
    starts = window_starts(len(images), offsets)
    return starts, images[starts[:, None] + offsets[None, :]]


def decoded_trajectories(data_config: Any, split: str, image_size: int, *, process_index: int, process_count: int,
                         mixture=None) -> Iterator[tuple[str, np.ndarray]]:
    """(traj_key, images uint8 [T, S, S, 3]) of this process's share of every dataset of the
    config's mixture (or single dataset), in file order, decoded and resized."""
    import tensorflow as tf

    from jaxvla.data import frame_transforms as ft
    from jaxvla.data.pipeline import as_spec, get_dataset_spec, get_mixture, make_trajectory_dataset

    camera = str(data_config.get("cameras", "primary")).split(",")[0].strip() or "primary"
    if mixture is None:
        name = data_config.get("mixture") or data_config.get("dataset")
        mixture = get_mixture(name) if data_config.get("mixture") else [(name, 1.0)]
    for entry, _ in mixture:
        spec = get_dataset_spec(entry) if isinstance(entry, str) else as_spec(entry)
        trajectories = make_trajectory_dataset(
            spec, split, False, 0, process_index, process_count, data_dir=data_config.get("data_dir"),
            deterministic=True,
        )
        key = f"image_{camera}"
        if key not in trajectories.element_spec["observation"]:
            raise KeyError(f"dataset {spec.name!r} has no camera {camera!r} (config.data.cameras)")
        shape = np.asarray(list(spec.image_shape or (0, 0))[:2], np.int32)

        def decode(t):
            images = ft.decode_and_resize(
                t["observation"][key], image_size, expected_shape=shape, context=f"dataset '{spec.name}' {key}"
            )
            return {"traj_key": t["traj_key"][0], "images": images}

        dataset = trajectories.traj_map(decode).dataset.prefetch(tf.data.AUTOTUNE)
        for item in dataset.as_numpy_iterator():
            yield item["traj_key"].decode("utf-8"), item["images"]


def label_dataset(
    laq: LoadedLAQ,
    data_config: Any,
    out_dir: str,
    *,
    split: str = "train",
    batch_size: int = 64,
    mixture=None,
    resume: bool = False,
    overwrite: bool = False,
    shard_size: int = 256,
    progress: bool = True,
) -> str:
    """Labels every trajectory of ``data_config``'s dataset(s) with ``laq``; see the module docstring.

    Each process labels its share of the files with its local devices into ``out_dir/part-<i>``
    (atomic, resumable: ``LatentLabelWriter``); process 0 then writes ``out_dir``'s index
    (``merge_label_parts``). ``split`` may list several splits (``"train,val"``: pretraining's
    held-out evaluation reads the val split's labels); each gets its own parts
    (``part-<split>-<i>``) in the one directory. Returns ``out_dir``.
    """
    from jaxvla.data import latent_labels as ll

    process_index, process_count = jax.process_index(), jax.process_count()
    out_dir = os.fspath(out_dir).rstrip("/\\")
    if ll.is_complete(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds finished latent labels; pass --overwrite to replace them")
        if process_index == 0:
            os.remove(os.path.join(out_dir, ll.INFO_FILE))
    os.makedirs(out_dir, exist_ok=True)
    splits = [part.strip() for part in str(split).split(",") if part.strip()]
    if not splits:
        raise ValueError(f"label_dataset: no split in {split!r}")
    part_names = [f"part-{process_index:05d}" if len(splits) == 1 else f"part-{name}-{process_index:05d}"
                  for name in splits]
    for name, part_name in zip(splits, part_names):
        _label_split(laq, data_config, os.path.join(out_dir, part_name), name, batch_size=batch_size,
                     mixture=mixture, resume=resume, overwrite=overwrite, shard_size=shard_size,
                     progress=progress and process_index == 0, process_index=process_index,
                     process_count=process_count)
    return _finish(out_dir, process_index, process_count, splits)


def _label_split(laq: LoadedLAQ, data_config: Any, part_dir: str, split: str, *, batch_size: int, mixture,
                 resume: bool, overwrite: bool, shard_size: int, progress: bool, process_index: int,
                 process_count: int) -> None:
    """One split's share of this process, into ``part_dir``."""
    from tqdm import tqdm

    from jaxvla.data import latent_labels as ll

    offsets = laq.frame_offsets
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_size = -(-int(batch_size) // len(devices)) * len(devices)
    encode = laq.encode_fn(mesh)
    model = laq.model
    meta = {"checkpoint": laq.checkpoint, "step": laq.step, "split": split, "variant": model.variant,
            "frame_offsets": offsets.tolist(), "data_dir": str(data_config.get("data_dir"))}
    code_shape = (model.num_transitions, model.code_tokens)
    if resume and ll.is_complete(part_dir):
        log.info("%s: this process's part is already complete", part_dir)
        return
    writer = ll.LatentLabelWriter(part_dir, laq.config_hash, code_shape, model.codebook_size, meta,
                                  resume=resume, overwrite=overwrite, shard_size=shard_size)
    done = writer.done_keys()
    bar = tqdm(desc=f"labelling {split} ({model.variant})", unit="traj", disable=not progress)
    try:
        with writer:
            for traj_key, images in decoded_trajectories(
                data_config, split, model.image_size, process_index=process_index, process_count=process_count,
                mixture=mixture,
            ):
                bar.update(1)
                if traj_key in done:
                    continue
                starts, windows = trajectory_windows(images, offsets)
                codes = np.zeros((len(starts), *code_shape), np.int32)
                for begin in range(0, len(starts), batch_size):
                    chunk = windows[begin : begin + batch_size]
                    padded = np.zeros((batch_size, *chunk.shape[1:]), np.uint8)
                    padded[: len(chunk)] = chunk  # one compiled shape for every batch
                    codes[begin : begin + len(chunk)] = np.asarray(encode(padded))[: len(chunk)]
                writer.add(traj_key, starts, codes)
    finally:
        bar.close()


def _finish(out_dir: str, process_index: int, process_count: int, splits: list[str] | None = None) -> str:
    from jaxvla.data import latent_labels as ll

    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"latent labels {out_dir}")
    if process_index == 0:
        if splits is None or len(splits) == 1:
            names = [f"part-{i:05d}" for i in range(process_count)]
        else:
            names = [f"part-{name}-{i:05d}" for name in splits for i in range(process_count)]
        ll.merge_label_parts(out_dir, [os.path.join(out_dir, name) for name in names])
    return out_dir
