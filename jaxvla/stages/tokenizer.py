"""Stage 0: the image tokenizer (LWM-style VQGAN). Config: ``configs/tokenizer.py``.

Frames come from ``config.data.source``:

* ``metaworld`` (default): the embedded Meta-World dataset under ``config.data.data_dir``, a
  prerequisite (``prerequisites``: ``python -m jaxvla.train`` renders it when missing; the build
  only reads it);
* ``dataset``: any registered dataset or mixture (``config.data.dataset`` / ``config.data.mixture``,
  e.g. Open-X datasets) under ``config.data.data_dir``; ``rlds`` is the same, with ``data_dir``
  usually one dataset's version directory;
* ``procedural``: procedurally rendered tabletop scenes (no simulator needed).

``metaworld`` and ``dataset`` read through the data pipeline's one RLDS reader
(``jaxvla.data.pipeline.trajectory_frames``: camera ``config.data.cameras``' first, decoded and
resized to the variant's resolution): the frames of every trajectory of ``config.data.split`` ("":
each dataset's train split), dataset after dataset in file order, concatenated and capped at
``config.data.max_frames``; the held-out frames likewise from ``config.data.eval_split`` ("": each
dataset's val split), or the first 10% of a dataset's train frames when it has no such split. The
frames are held in memory (``jaxvla.data.frames.FrameDataset``: seeded random-access batches).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.data.embedded import MetaWorldData
from jaxvla.data.frames import FrameDataset
from jaxvla.data.procedural import render_scenes
from jaxvla.data.mixtures import resolve_mixture
from jaxvla.frozen import vqgan_model
from jaxvla.losses.lpips import load_lpips
from jaxvla.losses.tokenizer import images_to_float, make_code_restarts, make_tokenizer_loss
from jaxvla.stages import Stage, require

log = logging.getLogger("jaxvla")

CODEBOOK_PATH = ("quantizer", "codebook")


def metaworld_data(data_config, image_size: int) -> MetaWorldData:
    """The embedded Meta-World dataset ``config.data`` (source ``metaworld``) reads."""
    return MetaWorldData(str(data_config.data_dir), str(data_config.tasks), int(data_config.episodes_per_task),
                         int(image_size), int(data_config.seed))


def prerequisites(config) -> list:
    """The embedded Meta-World dataset when ``config.data.source`` is ``metaworld``; else nothing."""
    if config.data.source != "metaworld":
        return []
    return [metaworld_data(config.data, vqgan_model(config.model).resolution)]


SOURCES = ("metaworld", "dataset", "rlds", "procedural")


def load_frames(data_config, image_size: int) -> tuple[FrameDataset, FrameDataset]:
    """(train, eval) frame sets from ``config.data`` (module docstring; a ``metaworld`` source must
    be there: ``prerequisites``)."""
    source = data_config.source
    if source == "procedural":
        frames = render_scenes(data_config.num_frames, image_size, seed=data_config.seed)
        cut = max(len(frames) // 10, 1)
        return FrameDataset(frames[cut:], "procedural/train"), FrameDataset(frames[:cut], "procedural/eval")
    if source not in SOURCES:
        raise ValueError(f"config.data.source={source!r} is unknown; expected one of {', '.join(SOURCES)}")
    from jaxvla.data import pipeline  # TensorFlow

    reader = dict(data_config)
    if source == "metaworld":
        data = metaworld_data(data_config, image_size)
        require([data], "the image tokenizer")
        reader.update(data_dir=data.version_dir(), dataset="metaworld", mixture="")
        name = "metaworld"
    else:
        if not data_config.data_dir:
            raise ValueError(
                f"config.data.data_dir is empty (source {source!r}); set it to the directory holding the TFDS "
                "datasets or to one dataset's version directory"
            )
        name = data_config.mixture or data_config.dataset
        if not name:
            raise ValueError(f"config.data.mixture and config.data.dataset are both empty (source {source!r})")
    specs = [spec for spec, weight in resolve_mixture(name) if float(weight) > 0]
    limit = int(data_config.max_frames or 0)
    train_parts, eval_parts, train_count, eval_count = [], [], 0, 0
    for spec in specs:
        if limit and train_count >= limit:
            break
        split = data_config.split or spec.train_split
        train = _read_frames(pipeline, reader, spec, split, image_size, limit - train_count if limit else 0)
        if train is None:
            continue
        eval_split = data_config.eval_split or spec.val_split
        held_out = None
        if not _has_split(pipeline, spec, reader["data_dir"], eval_split):
            log.info("dataset %r has no %r split: holding out 10%% of %r", spec.name, eval_split, split)
            cut = max(len(train) // 10, 1)
            train, held_out = train[cut:], train[:cut]
        elif not limit or eval_count < limit:
            held_out = _read_frames(pipeline, reader, spec, eval_split, image_size, limit - eval_count if limit else 0)
        train_parts.append(train)
        train_count += len(train)
        if held_out is not None:
            eval_parts.append(held_out)
            eval_count += len(held_out)
    names = ",".join(spec.name for spec in specs)
    if not train_parts or not eval_parts:
        raise ValueError(f"{names}: no frames in {'the eval splits' if train_parts else 'the train split'}")
    where = f"{names} ({reader['data_dir']})"
    return (FrameDataset(np.concatenate(train_parts), f"{where}:{data_config.split or 'train'}"),
            FrameDataset(np.concatenate(eval_parts), f"{where}:eval"))


def _has_split(pipeline, spec, data_dir, split: str) -> bool:
    """Whether ``spec``'s dataset has ``split`` (a slice: its base split); datasets read by a
    function (``trajectories_fn``) are assumed to."""
    if spec.trajectories_fn is not None:
        return True
    from jaxvla.data.dataset import load_builder  # TensorFlow

    builder = load_builder(pipeline.resolve_builder_dir(spec, data_dir), spec.name)
    return split.split("[")[0] in builder.info.splits


def _read_frames(pipeline, reader: dict, spec, split: str, image_size: int, limit: int) -> np.ndarray | None:
    """Frames uint8 [N, S, S, 3] of ``spec``'s ``split`` through the pipeline's reader, at most
    ``limit`` (0: all); None when there is none."""
    parts, count = [], 0
    for _, frames in pipeline.trajectory_frames(reader, split, image_size=image_size, mixture=[(spec, 1.0)]):
        parts.append(frames)
        count += len(frames)
        if limit and count >= limit:
            break
    if not parts:
        return None
    frames = np.concatenate(parts)
    return frames[:limit] if limit else frames


def build(config) -> Stage:
    model = vqgan_model(config.model, config.compute_dtype)
    train_frames, eval_frames = load_frames(config.data, model.resolution)
    log.info("tokenizer data: %d train frames, %d eval frames", len(train_frames), len(eval_frames))

    lpips_fn = None
    if config.model.lpips_weight > 0:
        lpips_fn = load_lpips(config.model.lpips_net, config.model.lpips_weights_dir or None)
        if lpips_fn is None:
            log.warning("LPIPS weights not found: the LPIPS term is off (config.model.lpips_weight ignored)")

    loss_fn = make_tokenizer_loss(
        model,
        l1_weight=config.model.l1_weight,
        codebook_weight=config.model.codebook_weight,
        commitment_weight=config.model.commitment_weight,
        lpips_weight=config.model.lpips_weight,
        lpips_fn=lpips_fn,
    )
    init_aux, post_step = make_code_restarts(
        CODEBOOK_PATH,
        model.codebook_size,
        every=config.model.restart_every,
        decay=config.model.restart_decay,
        threshold=config.model.restart_threshold,
    )
    image_shape = (1, model.resolution, model.resolution, 3)

    def init_variables(rng):
        return model.init(rng, jnp.zeros(image_shape, jnp.float32))

    def visualize(params, batch):
        images = images_to_float(batch["image"][:8])
        recon = jnp.clip(model.apply({"params": params}, images)["recon"], -1, 1)
        return {"reconstructions": jnp.concatenate([images, recon.astype(jnp.float32)], axis=2)}

    process, processes = jax.process_index(), jax.process_count()
    return Stage(
        init_variables=init_variables,
        loss_fn=loss_fn,
        batches=lambda start: train_frames.batches(start, config.batch_size, config.seed, process, processes),
        eval_batches=lambda: eval_frames.batches(0, config.batch_size, config.seed + 1, process, processes),
        init_aux=init_aux,
        post_step=post_step if config.model.restart_every > 0 else None,
        visualize=visualize,
        assets={"image_size": np.asarray(model.resolution), "codebook_size": np.asarray(model.codebook_size)},
    )
