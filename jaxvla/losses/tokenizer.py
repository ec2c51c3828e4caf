"""Image-tokenizer (VQGAN) loss, codebook statistics and dead-code restarts.

``make_tokenizer_loss(model, ...)`` returns the pure ``loss_fn(params, batch, rng)``:

    loss = l1_weight * |x - x_hat| + lpips_weight * LPIPS(x, x_hat)
           + codebook_weight * |sg(z_e) - z_q|^2 + commitment_weight * |z_e - sg(z_q)|^2

Codes that the encoder stops selecting never get gradient again ("dead codes"); the restart hook
(a ``post_step`` for the trainer) moves them onto recent encoder outputs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvla.input_checks import InputError, check_uint8_frames, describe, require


def images_to_float(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1].

    Anything but uint8 is refused (an InputError at trace time): float frames are either already in
    [-1, 1] (give them to the model directly) or in [0, 255] (convert them to uint8), and scaling
    either again would silently give a nearly constant image."""
    if np.dtype(images.dtype) != np.uint8:
        raise InputError(f"images_to_float: expects uint8 frames [..., 3] with values in [0, 255]; got "
                         f"{describe(images)} (float frames already in [-1, 1] are the models' input as they are)")
    return images.astype(jnp.float32) / 127.5 - 1.0


def psnr(mse: jax.Array) -> jax.Array:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def code_statistics(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Usage of one batch's codes: counts [K], perplexity and fraction of codes used."""
    counts = jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.float32)
    probs = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return {
        "counts": counts,
        "perplexity": jnp.exp(entropy),
        "used_fraction": jnp.mean((counts > 0).astype(jnp.float32)),
    }


def make_tokenizer_loss(
    model: nn.Module,
    *,
    l1_weight: float = 1.0,
    codebook_weight: float = 1.0,
    commitment_weight: float = 0.25,
    lpips_weight: float = 0.0,
    lpips_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    num_restart_candidates: int = 256,
) -> Callable:
    """The pure tokenizer loss ``(params, batch, rng) -> (loss, metrics)``.

    ``batch["image"]``: uint8 [B, H, W, 3] with H = W = ``model.resolution`` (anything else is an
    InputError naming the key, at trace time: ``jaxvla.input_checks``). Metrics: scalars for
    logging plus ``aux/code_counts`` [K] and ``aux/candidates`` [M, D] (encoder outputs) for
    dead-code restarts. ``lpips_fn(x, y) -> [B]`` adds the perceptual term when given and
    ``lpips_weight > 0``.
    """
    codebook_size = model.codebook_size
    size = int(model.resolution)

    def loss_fn(params: Any, batch: dict, rng: jax.Array):
        del rng  # the tokenizer is deterministic
        check_uint8_frames(require(batch, "image", "tokenizer loss", "uint8 [B, H, W, 3] frames"),
                           where="tokenizer loss", key="batch['image']", shape=("B", size, size, 3),
                           note="frames as the data pipeline yields them; the loss scales them to [-1, 1]")
        images = images_to_float(batch["image"])
        out = model.apply({"params": params}, images)
        recon = out["recon"].astype(jnp.float32)
        z_e = out["z_e"].astype(jnp.float32)
        z_q = out["z_q"].astype(jnp.float32)

        l1 = jnp.mean(jnp.abs(recon - images))
        mse = jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - images))
        codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(z_e) - z_q))
        commitment = jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
        loss = l1_weight * l1 + codebook_weight * codebook + commitment_weight * commitment
        metrics = {}
        if lpips_fn is not None and lpips_weight > 0:
            perceptual = jnp.mean(lpips_fn(recon, images))
            loss = loss + lpips_weight * perceptual
            metrics["lpips"] = perceptual

        stats = code_statistics(out["indices"], codebook_size)
        flat = z_e.reshape(-1, z_e.shape[-1])
        # An even stride through the batch's encoder outputs: restart candidates from all images.
        stride = max(flat.shape[0] // num_restart_candidates, 1)
        metrics.update(
            {
                "l1": l1,
                "mse": mse,
                "psnr": psnr(mse),
                "codebook_loss": codebook,
                "commitment_loss": commitment,
                "code_perplexity": stats["perplexity"],
                "codes_used_fraction": stats["used_fraction"],
                "aux/code_counts": stats["counts"],
                "aux/candidates": jax.lax.stop_gradient(flat[::stride][:num_restart_candidates]),
            }
        )
        return loss, metrics

    return loss_fn


def make_code_restarts(
    codebook_path: tuple[str, ...],
    codebook_size: int,
    *,
    every: int = 100,
    decay: float = 0.99,
    threshold: float = 0.03,
    noise_scale: float = 0.01,
) -> tuple[Callable, Callable]:
    """(init_aux, post_step) that revive dead codes.

    Usage is an EMA of each code's share of the batch's tokens. Every ``every`` steps, codes whose
    usage is below ``threshold / codebook_size`` (i.e. used ``threshold`` times less often than
    uniform) are replaced by randomly chosen recent encoder outputs plus a little noise, and their
    usage is reset to uniform so they get time to be picked.
    """

    def init_aux(params):
        del params
        return {"code_usage": jnp.full((codebook_size,), 1.0 / codebook_size, jnp.float32)}

    def post_step(params, aux, aux_outputs, step, rng):
        counts = aux_outputs["aux/code_counts"]
        share = counts / jnp.maximum(counts.sum(), 1.0)
        usage = decay * aux["code_usage"] + (1.0 - decay) * share
        restart_now = (every > 0) & ((step + 1) % max(every, 1) == 0)
        dead = (usage < threshold / codebook_size) & restart_now

        candidates = aux_outputs["aux/candidates"]
        pick_rng, noise_rng = jax.random.split(rng)
        picks = jax.random.randint(pick_rng, (codebook_size,), 0, candidates.shape[0])
        spread = jnp.std(candidates) + 1e-6
        fresh = candidates[picks] + noise_scale * spread * jax.random.normal(noise_rng, (codebook_size, candidates.shape[-1]))

        params = _replace_at(params, codebook_path, lambda codebook: jnp.where(dead[:, None], fresh.astype(codebook.dtype), codebook))
        usage = jnp.where(dead, 1.0 / codebook_size, usage)
        metrics = {
            "codes_replaced": jnp.sum(dead).astype(jnp.float32),
            "codes_alive_fraction": jnp.mean((usage >= threshold / codebook_size).astype(jnp.float32)),
        }
        return params, {"code_usage": usage}, metrics

    return init_aux, post_step


def _replace_at(tree: dict, path: tuple[str, ...], fn: Callable) -> dict:
    if not path:
        return fn(tree)
    head, *rest = path
    if head not in tree:
        raise KeyError(f"parameter path {'/'.join(path)!r}: no '{head}' among {sorted(tree)}")
    return {**tree, head: _replace_at(tree[head], tuple(rest), fn)}
