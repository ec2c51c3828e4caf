"""Continuous action-chunk heads for stage 3 (ViPRA-FM / pi0-style flow matching).

A chunk of ``K`` actions x ``A`` dims (ViPRA: K = 14, normalised to [-1, 1]) enters the backbone as
``K`` tokens and leaves it as ``K`` velocities:

* ``ActionEncoder(width, time_dim)``: ``(noisy_actions [B, K, A], s [B]) -> tokens [B, K, width]``.
  ``Dense(A -> width)`` on each noisy action, concatenated with ``sinusoidal_embedding(s,
  time_dim)`` broadcast over K, then a swish MLP ``Dense(width + time_dim -> hidden) -> swish ->
  Dense(hidden -> width)`` (pi0's ``action_in_proj`` + ``action_time_mlp_{in,out}``).
* ``VelocityHead(action_dim)``: ``hidden [B, K, D] -> velocity [B, K, A]`` (one Dense).

The flow-matching conventions (u_s = s u_0 + (1 - s) a, s = 1 noise, s = 0 data, target
u_0 - a) and the Euler sampler live in :mod:`jaxvla.losses.actions`.

Parameters are float32 (``param_dtype``); ``dtype`` is the compute dtype. Every parameter carries
logical axes: ``embed`` for the model width, ``mlp`` for the MLP's hidden width, ``None`` for the
action and time-embedding dims.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def sinusoidal_embedding(s: jax.Array, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> jax.Array:
    """Sine / cosine embedding of scalar times ``s [...]`` -> float32 ``[..., dim]`` (``dim`` even).

    With ``n = dim // 2`` and ``f_i = i / (n - 1)`` (i = 0..n-1; f = 0 when n = 1), the periods
    are geometric from ``min_period`` to ``max_period``: ``p_i = min_period * (max_period /
    min_period) ** f_i``, and the output is ``[sin(2 pi s / p_i) for i] ++ [cos(2 pi s / p_i) for
    i]``. The defaults (pi0's) resolve times in [0, 1] from ~1e-3 (shortest period 4e-3) up to the
    whole interval (longest period 4, so the lowest frequency is monotone on [0, 1]).
    """
    if dim % 2 != 0 or dim <= 0:
        raise ValueError(f"sinusoidal_embedding: dim must be a positive even number, got {dim}")
    s = jnp.asarray(s, jnp.float32)
    half = dim // 2
    fraction = jnp.linspace(0.0, 1.0, half, dtype=jnp.float32)
    period = min_period * (max_period / min_period) ** fraction
    angles = s[..., None] * (2.0 * jnp.pi / period)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _dense(features: int, axes: tuple[Any, Any], name: str, dtype: Dtype, kernel_init=None) -> nn.Dense:
    init = nn.initializers.lecun_normal() if kernel_init is None else kernel_init
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
    )


class ActionEncoder(nn.Module):
    """``(noisy_actions [B, K, A], s [B]) -> [B, K, width]``: action projection + time MLP.

    Attributes:
      width: the backbone's model width (output, logical axis ``embed``).
      time_dim: size of the sinusoidal time embedding (even).
      hidden: hidden width of the action-time MLP (logical axis ``mlp``); ``None`` -> ``width``.
      min_period, max_period: of the time embedding (see ``sinusoidal_embedding``).
      dtype: compute dtype (params stay float32).
    """

    width: int
    time_dim: int = 256
    hidden: int | None = None
    min_period: float = 4e-3
    max_period: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, noisy_actions: jax.Array, s: jax.Array) -> jax.Array:
        if noisy_actions.ndim != 3:
            raise ValueError(f"ActionEncoder: noisy_actions must be [B, K, A], got {noisy_actions.shape}")
        batch, chunk, _ = noisy_actions.shape
        s = jnp.asarray(s, jnp.float32)
        if s.ndim == 0:
            s = jnp.broadcast_to(s, (batch,))
        if s.shape != (batch,):
            raise ValueError(f"ActionEncoder: s must be [B]={batch}, got {s.shape}")
        hidden = self.width if self.hidden is None else int(self.hidden)
        tokens = _dense(self.width, (None, "embed"), "action_in", self.dtype)(noisy_actions.astype(self.dtype))
        time = sinusoidal_embedding(s, self.time_dim, self.min_period, self.max_period).astype(self.dtype)
        time = jnp.broadcast_to(time[:, None, :], (batch, chunk, self.time_dim))
        x = jnp.concatenate([tokens, time], axis=-1)  # [B, K, width + time_dim]
        x = _dense(hidden, (None, "mlp"), "action_time_mlp_in", self.dtype)(x)
        x = nn.swish(x)
        return _dense(self.width, ("mlp", "embed"), "action_time_mlp_out", self.dtype)(x)


class VelocityHead(nn.Module):
    """``hidden [B, K, D] -> velocity [B, K, action_dim]`` (one Dense).

    ``init_scale`` scales the kernel's fan-in variance (lecun: 1.0); 0 gives a zero kernel (the
    head then starts at v = bias = 0, but no gradient reaches the backbone on the first step).
    The output is cast to float32.
    """

    action_dim: int
    init_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        if self.init_scale == 0:
            init = nn.initializers.zeros
        else:
            init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        out = _dense(self.action_dim, ("embed", None), "velocity_out", self.dtype, kernel_init=init)
        return out(hidden.astype(self.dtype)).astype(jnp.float32)
