"""Stage 0: the image tokenizer (LWM-style VQGAN). Config: ``configs/tokenizer.py``.

Frames come from ``config.data.source``:

* ``metaworld`` (default): the embedded Meta-World dataset under ``config.data.data_dir``, a
  prerequisite (``prerequisites``: ``python -m jaxvla.train`` renders it when missing; the build
  only reads it);
* ``rlds``: any RLDS dataset version directory (``config.data.data_dir``);
* ``procedural``: procedurally rendered tabletop scenes (no simulator needed).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.data.embedded import MetaWorldData
from jaxvla.data.frames import FrameDataset, load_rlds_images
from jaxvla.data.procedural import render_scenes
from jaxvla.frozen import vqgan_model
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


def load_frames(data_config, image_size: int) -> tuple[FrameDataset, FrameDataset]:
    """(train, eval) frame sets from ``config.data`` (a ``metaworld`` source must be there:
    ``prerequisites``)."""
    if data_config.source == "procedural":
        frames = render_scenes(data_config.num_frames, image_size, seed=data_config.seed)
        cut = max(len(frames) // 10, 1)
        return FrameDataset(frames[cut:], "procedural/train"), FrameDataset(frames[:cut], "procedural/eval")
    if data_config.source == "metaworld":
        data = metaworld_data(data_config, image_size)
        require([data], "the image tokenizer")
        dataset_dir = data.version_dir()
    elif data_config.source == "rlds":
        if not data_config.data_dir:
            raise ValueError("config.data.data_dir is empty; set it to an RLDS dataset version directory")
        dataset_dir = data_config.data_dir
    else:
        raise ValueError(
            f"config.data.source={data_config.source!r} is unknown; expected metaworld, rlds or procedural"
        )
    limit = data_config.max_frames or None
    train = load_rlds_images(dataset_dir, data_config.split, data_config.image_key, limit)
    try:
        held_out = load_rlds_images(dataset_dir, data_config.eval_split, data_config.image_key, limit)
    except KeyError:
        log.info("%s has no %r split: holding out 10%% of %r", dataset_dir, data_config.eval_split, data_config.split)
        cut = max(len(train) // 10, 1)
        train, held_out = train[cut:], train[:cut]
    if train.shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"{dataset_dir}: frames are {train.shape[1]}x{train.shape[2]} but the tokenizer "
            f"variant expects {image_size}x{image_size}"
        )
    return FrameDataset(train, f"{dataset_dir}:{data_config.split}"), FrameDataset(held_out, "eval")


def build(config) -> Stage:
    model = vqgan_model(config.model, config.compute_dtype)
    train_frames, eval_frames = load_frames(config.data, model.resolution)
    log.info("tokenizer data: %d train frames, %d eval frames", len(train_frames), len(eval_frames))

    lpips_fn = None
    if config.model.lpips_weight > 0:
        from jaxvla.losses.lpips import load_lpips

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
