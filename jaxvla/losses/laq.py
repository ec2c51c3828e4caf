"""Latent action quantizer (stage 1) loss and NSVQ code replacement.

``laq_loss(params, batch, rng, *, model, ...)`` is pure and jittable; ``make_laq_loss(model, ...)``
binds the keywords and gives the ``loss_fn(params, batch, rng) -> (loss, metrics)`` the trainer
takes. With ``R = recon`` the predicted next frames and ``X`` the real ones:

    lapa:   loss = mean (R - X)^2                                        (``recon_loss="mse"``)
    vipra:  loss = mean |R - X| + lpips_weight * LPIPS(R, X)
                   + ramp(step) * flow_weight * flow_consistency([o_0, R], [o_0, X])

With ``motion_weight = a > 0`` (our addition; 0, the papers' plain mean, by default) the
reconstruction mean is weighted per pixel by ``w = 1 + a * |X - C|`` (``C`` the context frame,
the absolute change averaged over the colour channels, in [0, 2] on the [-1, 1] scale), i.e.
``sum(w * err) / sum(w)``. Meta-World frames change by about 4/255 of a pixel on average over 7
control steps: nearly every pixel is static background, so the plain mean rewards copying the
context and barely sees the arm, whose motion is the action.

``ramp(step)`` is 0 up to ``flow_start`` and rises linearly to 1 over ``flow_warmup`` steps (ViPRA:
60k and 10k). NSVQ needs no commitment or codebook term: gradients reach the codebook through the
substituted noise's scale.

Batch: ``frames`` uint8 ``[B, T, S, S, 3]``; ``step`` int32 ``[B]`` (the training step, the same in
every row; only the flow ramp reads it; absent means "ramp complete").

Metrics: ``recon_loss`` and ``recon_loss_copy`` (the same loss of the copy-frame baseline), ``mse``, ``psnr`` (clipped reconstruction) and ``psnr_copy`` (the
copy-the-context-frame baseline: predicting x_{t+H} = x_t), ``lpips``, ``flow_loss``,
``flow_weight``, ``code_perplexity``, ``codes_used_fraction``; for the replacement hook
``aux/code_counts`` [K] and ``aux/candidates`` [C, Q] (pre-quantisation latents).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxvla.input_checks import check_laq_batch
from jaxvla.losses.flow import estimate_flow, flow_consistency_loss
from jaxvla.losses.tokenizer import images_to_float, psnr
from jaxvla.models.nsvq import LAPA_SCHEDULE, replace_dead_codes, replacement_steps

RECON_LOSSES = ("mse", "l1")
FAR_STEP = 2**30  # "the ramp is complete": eval batches and batches without a step


def flow_ramp(step: jax.Array, start: int, warmup: int) -> jax.Array:
    """0 until ``start``, then linear to 1 over ``warmup`` steps (float32 scalar)."""
    step = jnp.asarray(step, jnp.float32)
    if warmup <= 0:
        return (step > start).astype(jnp.float32)
    return jnp.clip((step - start) / warmup, 0.0, 1.0)


def laq_loss(
    params: Any,
    batch: dict,
    rng: jax.Array,
    *,
    model: Any,
    recon_loss: str = "mse",
    lpips_weight: float = 0.0,
    lpips_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    flow_weight: float = 0.0,
    flow_start: int = 0,
    flow_warmup: int = 0,
    flow_fn: Callable = estimate_flow,
    flow_samples: int = 0,
    motion_weight: float = 0.0,
    num_candidates: int = 256,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The LAQ loss of one batch; see the module docstring. ``flow_samples > 0`` computes the flow
    term on the first ``flow_samples`` clips of the batch only (it costs 4 flow estimates per
    transition); ``motion_weight`` weights the reconstruction by the pixels' change."""
    check_laq_batch(batch, model, "laq_loss")  # dtype / shape at trace time (jaxvla.input_checks)
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss={recon_loss!r} is unknown; expected one of {RECON_LOSSES}")
    if motion_weight < 0:
        raise ValueError(f"motion_weight must be >= 0 (0: the plain mean), got {motion_weight}")
    frames = images_to_float(batch["frames"])  # [B, T, S, S, 3]
    out = model.apply({"params": params}, frames, train=True, rng=rng)
    recon = out["recon"]  # [B, T-1, S, S, 3] float32
    context, target = frames[:, :-1], frames[:, 1:]
    # [B, T-1, S, S, 1]: 1 on static pixels, up to 1 + 2a where the frame changed.
    pixel_weight = 1.0 + motion_weight * jnp.mean(jnp.abs(target - context), axis=-1, keepdims=True)

    def reconstruction(prediction):
        difference = prediction - target
        error = jnp.square(difference) if recon_loss == "mse" else jnp.abs(difference)
        if motion_weight == 0:
            return jnp.mean(error)
        return jnp.sum(error * pixel_weight) / (jnp.sum(pixel_weight) * error.shape[-1])

    recon_term = reconstruction(recon)
    mse = jnp.mean(jnp.square(jnp.clip(recon, -1.0, 1.0) - target))
    copy_mse = jnp.mean(jnp.square(context - target))
    loss = recon_term
    metrics: dict[str, jax.Array] = {}

    if lpips_fn is not None and lpips_weight > 0:
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        perceptual = jnp.mean(lpips_fn(flat(recon), flat(target)))
        loss = loss + lpips_weight * perceptual
        metrics["lpips"] = perceptual

    if flow_weight > 0:
        step = batch["step"][0] if "step" in batch else jnp.asarray(FAR_STEP, jnp.int32)
        weight = flow_ramp(step, flow_start, flow_warmup) * flow_weight
        rows = flow_samples if 0 < flow_samples < frames.shape[0] else frames.shape[0]
        real, predicted = frames[:rows], jnp.concatenate([frames[:rows, :1], recon[:rows]], 1)
        # The flow term costs 4 flow estimates per transition: skip it until the ramp starts.
        flow = jax.lax.cond(
            weight > 0,
            lambda: flow_consistency_loss(predicted, real, flow_fn),
            lambda: jnp.zeros((), jnp.float32),
        )
        loss = loss + weight * flow
        metrics["flow_loss"] = flow
        metrics["flow_weight"] = weight

    latents = out["latents"].reshape(-1, out["latents"].shape[-1])
    stride = max(latents.shape[0] // num_candidates, 1)
    metrics.update(
        {
            "recon_loss": recon_term,
            "recon_loss_copy": reconstruction(context),
            "mse": mse,
            "psnr": psnr(mse),
            "psnr_copy": psnr(copy_mse),
            "code_perplexity": out["perplexity"],
            "codes_used_fraction": out["used_fraction"],
            "aux/code_counts": out["counts"],
            "aux/candidates": jax.lax.stop_gradient(latents[::stride][:num_candidates]),
        }
    )
    return loss, metrics


def make_laq_loss(model: Any, **kwargs) -> Callable:
    """``loss_fn(params, batch, rng)``: :func:`laq_loss` with ``model`` and ``kwargs`` bound."""
    return functools.partial(laq_loss, model=model, **kwargs)


def make_nsvq_replacement(
    codebook_path: Sequence[str],
    codebook_size: int,
    *,
    threshold: float = 0.1,
    schedule: Sequence[tuple[int, int, int]] = LAPA_SCHEDULE,
    stop_after: int | None = None,
) -> tuple[Callable, Callable]:
    """(init_aux, post_step) running NSVQ's dead-code replacement inside the train step.

    Code usage is counted from the last check; at the scheduled steps (``replacement_steps`` of
    the completed step count) codes used less than ``threshold`` x the mean are moved onto this
    batch's pre-quantisation latents (``replace_dead_codes``) and the counts restart from zero.
    """
    codebook_path = tuple(codebook_path)

    def init_aux(params):
        del params
        return {"code_counts": jnp.zeros((codebook_size,), jnp.float32)}

    def post_step(params, aux, aux_outputs, step, rng):
        counts = aux["code_counts"] + aux_outputs["aux/code_counts"]
        check = replacement_steps(step + 1, schedule, stop_after)
        codebook = _get(params, codebook_path)
        replaced_codebook, num_dead = replace_dead_codes(codebook, counts, aux_outputs["aux/candidates"], rng, threshold)
        new_codebook = jnp.where(check, replaced_codebook, codebook)
        params = _set(params, codebook_path, new_codebook)
        counts = jnp.where(check, jnp.zeros_like(counts), counts)
        return params, {"code_counts": counts}, {"codes_replaced": jnp.where(check, num_dead, 0).astype(jnp.float32)}

    return init_aux, post_step


def _get(tree: dict, path: tuple[str, ...]):
    for index, key in enumerate(path):
        if key not in tree:
            raise KeyError(f"parameter path {'/'.join(path)!r}: no '{key}' at {'/'.join(path[:index]) or 'the root'}")
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    if not path:
        return value
    head, *rest = path
    return {**tree, head: _set(tree[head], tuple(rest), value)}


def laq_eval_metrics(params: Any, batch: dict, rng: jax.Array, *, model: Any) -> dict[str, jax.Array]:
    """Held-out metrics with hard codes (no substituted noise): ``mse``, ``psnr``, ``psnr_copy``,
    ``psnr_gain`` (dB over the copy-frame baseline), ``code_perplexity``, ``codes_used_fraction``."""
    del rng
    check_laq_batch(batch, model, "laq_eval_metrics")  # dtype / shape at trace time (jaxvla.input_checks)
    frames = images_to_float(batch["frames"])
    out = model.apply({"params": params}, frames, train=False)
    target = frames[:, 1:]
    mse = jnp.mean(jnp.square(jnp.clip(out["recon"], -1.0, 1.0) - target))
    copy_mse = jnp.mean(jnp.square(frames[:, :-1] - target))
    return {
        "mse": mse,
        "psnr": psnr(mse),
        "psnr_copy": psnr(copy_mse),
        "psnr_gain": psnr(mse) - psnr(copy_mse),
        "code_perplexity": out["perplexity"],
        "codes_used_fraction": out["used_fraction"],
    }
