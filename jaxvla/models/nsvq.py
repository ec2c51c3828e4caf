"""NSVQ: noise-substitution vector quantization for the latent action quantizer (stage 1).

Training forward, for an input vector ``x`` whose nearest code (squared euclidean) is ``c``::

    q = x + (||x - c|| / ||n||) * n,        n ~ N(0, I)   (norms per vector)

``q`` lies exactly as far from ``x`` as ``c`` does, but in a random direction. Gradients reach the
encoder through ``x`` and the codebook through ``||x - c||``, so no straight-through estimator and
no commitment loss are needed. At inference (``train=False``) ``q = c`` exactly.

Codes that go unused are revived between steps with :func:`replace_dead_codes`, at the steps for
which :func:`replacement_steps` is true (LAPA: 10..100 every 10, 100..1000 every 100, 1000..5000
every 500; ViPRA stops replacing at 120k steps). Both functions are pure and jittable; the caller
keeps the usage counts accumulated since the last check (the ``counts`` output of :class:`NSVQ`).

The codebook parameter carries the logical axes ``("codebook", "codebook_dim")``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CODEBOOK_AXES = ("codebook", "codebook_dim")

# (start, end, every): a check at start, start + every, ..., up to and including end.
LAPA_SCHEDULE = ((10, 100, 10), (100, 1000, 100), (1000, 5000, 500))


def _safe_norm(v: jax.Array) -> jax.Array:
    """``v [..., D] -> [...]`` euclidean norm with a finite (zero) gradient at ``v = 0``."""
    sq = jnp.sum(jnp.square(v), axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


class NSVQ(nn.Module):
    """Noise-substitution vector quantizer over ``num_codes`` codes of size ``code_dim``.

    Parameters: ``codebook [num_codes, code_dim]`` float32, initialised uniform in
    ``[-1/num_codes, 1/num_codes]``.
    """

    num_codes: int
    code_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None) -> dict:
        """Quantise ``x [..., code_dim]``.

        Args:
          x: ``[..., code_dim]`` encoder outputs (any float dtype; distances are float32).
          train: noise substitution (True) or the hard nearest code (False).
          rng: PRNG key for the noise; required when ``train`` is True.

        Returns a dict:
          quantized: ``[..., code_dim]`` in ``x.dtype`` (train: noisy substitute; eval: the code).
          indices: ``[...]`` int32, the nearest code of each vector.
          perplexity: scalar float32, ``exp(entropy)`` of the code usage in this batch (1..K).
          used_fraction: scalar float32, fraction of codes used at least once in this batch.
          counts: ``[num_codes]`` float32, how many vectors chose each code in this batch.
        """
        limit = 1.0 / self.num_codes

        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -limit, limit)

        codebook = self.param(
            "codebook",
            nn.with_logical_partitioning(init, CODEBOOK_AXES),
            (self.num_codes, self.code_dim),
        )
        if x.shape[-1] != self.code_dim:
            raise ValueError(f"expected last dim {self.code_dim}, got shape {x.shape}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.code_dim).astype(jnp.float32)  # [N, D]
        cb = codebook.astype(jnp.float32)  # [K, D]

        # Squared distances [N, K]; only used for the (non-differentiable) argmin.
        dist = (
            jnp.sum(jnp.square(flat), axis=-1, keepdims=True)
            - 2.0 * jnp.dot(flat, cb.T, precision=jax.lax.Precision.HIGHEST)
            + jnp.sum(jnp.square(cb), axis=-1)[None, :]
        )
        indices = jnp.argmin(jax.lax.stop_gradient(dist), axis=-1).astype(jnp.int32)  # [N]
        hard = jnp.take(cb, indices, axis=0)  # [N, D]

        if train:
            if rng is None:
                raise ValueError("NSVQ(train=True) needs an rng for the substituted noise")
            noise = jax.random.normal(rng, flat.shape, jnp.float32)  # [N, D]
            scale = _safe_norm(flat - hard) / jnp.maximum(_safe_norm(noise), 1e-12)  # [N]
            quantized = flat + scale[:, None] * noise
        else:
            quantized = hard

        counts = jnp.sum(jax.nn.one_hot(indices, self.num_codes, dtype=jnp.float32), axis=0)  # [K]
        probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
        safe_probs = jnp.where(probs > 0, probs, 1.0)
        entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(safe_probs), 0.0))
        return {
            "quantized": quantized.reshape(*lead, self.code_dim).astype(x.dtype),
            "indices": indices.reshape(lead),
            "perplexity": jnp.exp(entropy),
            "used_fraction": jnp.mean((counts > 0).astype(jnp.float32)),
            "counts": counts,
        }


def replacement_steps(
    step,
    schedule: Sequence[tuple[int, int, int]] = LAPA_SCHEDULE,
    stop_after: int | None = None,
) -> jax.Array:
    """Whether ``step`` is a dead-code replacement check: a jittable scalar jnp bool.

    ``schedule`` holds ``(start, end, every)`` ranges; a step is a check when, for some range,
    ``start <= step <= end`` and ``(step - start) % every == 0``. With ``stop_after`` set, steps
    greater than ``stop_after`` are never checks (ViPRA: 120_000). The default is LAPA's:
    10, 20, ..., 100, 200, ..., 1000, 1500, ..., 5000 and nothing after.
    """
    step = jnp.asarray(step, jnp.int32)
    hit = jnp.zeros((), jnp.bool_)
    for start, end, every in schedule:
        hit = hit | ((step >= start) & (step <= end) & ((step - start) % every == 0))
    if stop_after is not None:
        hit = hit & (step <= stop_after)
    return hit


def replace_dead_codes(
    codebook: jax.Array,
    usage_counts: jax.Array,
    candidates: jax.Array,
    rng: jax.Array,
    threshold: float,
    *,
    noise_scale: float = 1e-4,
) -> tuple[jax.Array, jax.Array]:
    """Move dead codes onto random encoder outputs. Pure and jittable.

    A code ``k`` is dead when ``usage_counts[k] < threshold * mean(usage_counts)``, i.e. it was
    chosen fewer than ``threshold`` times the count it would have under uniform usage (LAPA: 0.1,
    ViPRA: 0.015). Counts should cover the steps since the last check. With all counts zero nothing
    is dead.

    Args:
      codebook: ``[K, D]`` current codes.
      usage_counts: ``[K]`` how often each code was chosen since the last check.
      candidates: ``[M, D]`` encoder outputs (e.g. the flattened pre-quantisation batch).
      rng: PRNG key choosing candidates (without repetition when ``M >= K``) and the noise.
      threshold: fraction of the mean usage below which a code is dead.
      noise_scale: standard deviation of the gaussian added to each chosen candidate.

    Returns ``(new_codebook [K, D] in codebook.dtype, num_replaced scalar int32)``; alive codes
    are returned unchanged.
    """
    num_codes, dim = codebook.shape
    cand = candidates.reshape(-1, dim).astype(jnp.float32)
    counts = usage_counts.astype(jnp.float32)
    dead = counts < threshold * jnp.mean(counts)  # [K]
    pick_key, noise_key = jax.random.split(rng)
    num_cand = cand.shape[0]
    picks = jax.random.choice(pick_key, num_cand, (num_codes,), replace=num_cand < num_codes)
    fresh = cand[picks] + noise_scale * jax.random.normal(noise_key, (num_codes, dim), jnp.float32)
    new = jnp.where(dead[:, None], fresh.astype(codebook.dtype), codebook)
    return new, jnp.sum(dead).astype(jnp.int32)
