"""Stage 1: the latent action quantizer. Config: ``configs/laq.py``; model ``jaxvla/models/laq.py``;
loss ``jaxvla/losses/laq.py``.

Data: ``config.data`` is the pipeline's (``jaxvla.data.pipeline``): ``pairs`` for lapa, ``clips``
for vipra, read from ``config.data.data_dir`` (the embedded Meta-World dataset there is a
prerequisite when ``config.data.dataset`` is ``metaworld`` and ``data.generate_metaworld``:
``python -m jaxvla.train`` renders it when missing, the build only reads it). Batch
``s`` holds ``frames`` uint8 ``[B, T, S, S, 3]`` and ``step`` int32 ``[B]`` (= s).

Logged: the loss's metrics (PSNR vs the copy-frame baseline, code perplexity and usage), codes
replaced; images ``reconstructions`` (context | target | prediction) and ``latent_semantics``
(the first sample's code sequence decoded from the other samples' start frames).
"""

from __future__ import annotations

import functools
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.data.embedded import configured_dataset
from jaxvla.frozen import laq_model
from jaxvla.losses.laq import FAR_STEP, laq_eval_metrics, make_laq_loss, make_nsvq_replacement
from jaxvla.losses.lpips import load_lpips
from jaxvla.losses.tokenizer import images_to_float
from jaxvla.models.laq import LAQ
from jaxvla.models.nsvq import LAPA_SCHEDULE
from jaxvla.stages import DataStream, Stage, require

log = logging.getLogger("jaxvla")

CODEBOOK_PATH = ("quantizer", "codebook")


def expected_sample(model: LAQ) -> str:
    return "pairs" if model.variant == "lapa" else "clips"


def check_data_config(config, model: LAQ) -> None:
    sample = expected_sample(model)
    if config.data.sample != sample:
        raise ValueError(f"config.data.sample={config.data.sample!r}, but the {model.variant} LAQ reads {sample!r}")
    if model.variant == "vipra" and int(config.data.clip_length) + 1 != model.num_frames:
        raise ValueError(
            f"config.data.clip_length={config.data.clip_length} gives {config.data.clip_length + 1}-frame clips "
            f"but config.model.num_frames={model.num_frames}"
        )


def prerequisites(config) -> list:
    """The embedded Meta-World dataset when ``config.data`` asks for it (after the config checks,
    so a bad config fails before anything is rendered)."""
    check_data_config(config, laq_model(config))
    data = configured_dataset(config.data)
    return [data] if data is not None else []


def laq_batch(batch: dict, step: int | None) -> dict:
    """Pipeline batch -> the loss's ``{"frames", "step"}`` (``step`` None: the ramp is complete)."""
    frames = batch["observation"]["image_primary"]
    rows = frames.shape[0]
    return {"frames": frames, "step": np.full((rows,), FAR_STEP if step is None else step, np.int32)}


def make_batches(config, *, train: bool, start_step: int = 0, seed_offset: int = 0):
    """Iterator of loss batches for this process (train: the training stream from ``start_step``)."""
    from jaxvla.data.pipeline import make_batches as pipeline_batches  # TensorFlow

    per_process = config.batch_size // jax.process_count()
    batches = pipeline_batches(
        config.data, batch_size=per_process, train=train, seed=config.seed + seed_offset, start_step=start_step
    )
    if train:
        steps = itertools.count(start_step)
        return DataStream(batches, lambda b: laq_batch(b, next(steps)))
    return (laq_batch(b, None) for b in batches)


def load_lpips_fn(model_config):
    if model_config.lpips_weight <= 0:
        return None
    fn = load_lpips(model_config.lpips_net, model_config.lpips_weights_dir or None)
    if fn is None:
        log.warning("LPIPS weights not found: the LPIPS term is off (config.model.lpips_weight ignored)")
    return fn


def semantics_figure(model: LAQ, params, frames: jax.Array, count: int = 8) -> jax.Array:
    """The "latent action semantics" figure: sample 0's codes applied to the start frames of samples
    0..count-1. ``frames`` [B, T, S, S, 3] in [-1, 1] -> rows [count, S, T*S, 3] (start frame, then
    the decoded frames); row 0 reproduces sample 0's own transition."""
    count = min(count, frames.shape[0])
    codes = model.apply({"params": params}, frames[:1], method=model.encode)["indices"]  # [1, K, M]
    codes = jnp.repeat(codes, count, axis=0)
    starts = frames[:count, 0]
    decoded = model.apply({"params": params}, starts, codes, method=model.rollout)  # [count, K, S, S, 3]
    row = jnp.concatenate([starts[:, None], jnp.clip(decoded, -1, 1)], axis=1)  # [count, T, S, S, 3]
    return jnp.concatenate(list(jnp.moveaxis(row, 1, 0)), axis=2)


def reconstruction_figure(model: LAQ, params, frames: jax.Array, count: int = 8) -> jax.Array:
    """Per sample: the real frames on top, below them the context frame and the predictions
    (hard codes). ``[count, 2S, T*S, 3]``."""
    frames = frames[:count]
    recon = jnp.clip(model.apply({"params": params}, frames, train=False)["recon"], -1, 1)
    real = jnp.concatenate(list(jnp.moveaxis(frames, 1, 0)), axis=2)
    predicted = jnp.concatenate([frames[:, :1], recon], axis=1)
    predicted = jnp.concatenate(list(jnp.moveaxis(predicted, 1, 0)), axis=2)
    return jnp.concatenate([real, predicted], axis=1)


def build(config) -> Stage:
    model = laq_model(config)
    check_data_config(config, model)
    require(prerequisites(config), "the LAQ")
    mc = config.model
    loss_fn = make_laq_loss(
        model,
        recon_loss=mc.recon_loss,
        lpips_weight=mc.lpips_weight,
        lpips_fn=load_lpips_fn(mc),
        flow_weight=mc.flow_weight,
        flow_start=mc.flow_start,
        flow_warmup=mc.flow_warmup,
        flow_samples=mc.flow_samples,
        motion_weight=mc.motion_weight,
    )
    init_aux, post_step = make_nsvq_replacement(
        CODEBOOK_PATH, model.codebook_size, threshold=mc.replace_threshold, schedule=LAPA_SCHEDULE,
        stop_after=mc.replace_stop_after or None,
    )
    frame_shape = (1, model.num_frames, model.image_size, model.image_size, 3)
    log.info(
        "LAQ %s: %d frames of %d px, %d patches, %d code tokens per transition from %d codes",
        model.variant, model.num_frames, model.image_size, model.num_patches, model.code_tokens, model.codebook_size,
    )

    def init_variables(rng):
        return model.init({"params": rng}, jnp.zeros(frame_shape, jnp.float32))

    def visualize(params, batch):
        frames = images_to_float(batch["frames"])
        return {
            "reconstructions": reconstruction_figure(model, params, frames),
            "latent_semantics": semantics_figure(model, params, frames),
        }

    return Stage(
        init_variables=init_variables,
        loss_fn=loss_fn,
        batches=lambda start: make_batches(config, train=True, start_step=start),
        eval_batches=lambda: make_batches(config, train=False, seed_offset=1),
        eval_fn=functools.partial(laq_eval_metrics, model=model),
        init_aux=init_aux,
        post_step=post_step,
        visualize=visualize,
        assets={
            "variant": model.variant,
            "code_shape": np.asarray([model.code_tokens]),
            "codebook_size": np.asarray(model.codebook_size),
            "num_frames": np.asarray(model.num_frames),
            "image_size": np.asarray(model.image_size),
        },
    )

