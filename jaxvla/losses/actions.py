"""Stage 3 action losses: chunked flow matching (ViPRA-FM / pi0) and quantile-bin tokens (LAPA).

Flow matching (pure, jittable, differentiable). ``a`` is the clean action chunk [B, K, A]
(normalised to [-1, 1]), ``u_0 ~ N(0, I)`` noise of the same shape, ``s`` [B] the flow time:

    u_s = s * u_0 + (1 - s) * a          s = 1: pure noise, s = 0: the data
    target velocity  g = d u_s / d s = u_0 - a
    loss = mean over valid (unpadded) chunk steps of mean_A (v(u_s, s) - (u_0 - a))^2

(the per-step error is averaged over the A action dims, so the loss is the element-wise MSE).
Training times are ``s ~ Beta(1.5, 1)`` (mean 0.6: noisier times are drawn more often).
Sampling (``euler_sample``) integrates d u / d s = v from s = 1 (noise) down to s = 0 with
``num_steps`` forward-Euler steps: ``u <- u - (1 / num_steps) * v(u, s)``, s = 1, 1 - 1/n, ...,
1/n. ``make_flow_matching_loss(apply_velocity)`` wraps it all into the trainer's
``loss_fn(params, batch, rng) -> (loss, metrics)``.

Discrete actions (LAPA / OpenVLA): 256 equal-frequency bins per action dim from
:mod:`jaxvla.data.stats` (``quantile_bin_edges`` / ``bin_actions`` / ``unbin_actions``, numpy);
``binned_action_loss_from_logits`` is the cross-entropy on the bin tokens. For decoding on device,
``bin_centres(edges)`` tabulates ``unbin_actions`` once ([A, V], numpy) and ``decode_bins(bins,
centres)`` is the jittable lookup.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.data.stats import unbin_actions
from jaxvla.input_checks import check_array, require

# --------------------------------------------------------------------------- flow matching


def sample_flow_times(rng: jax.Array, shape: Sequence[int], alpha: float = 1.5, beta: float = 1.0,
                      eps: float = 1e-3) -> jax.Array:
    """Flow times ``s ~ Beta(alpha, beta)`` (default Beta(1.5, 1), mean 0.6), float32 ``shape``,
    clipped to ``[eps, 1 - eps]`` so they lie strictly inside (0, 1).

    With ``beta == 1`` (or ``alpha == 1``) the CDF is ``x ** alpha`` (``1 - (1 - x) ** beta``), so
    the sample is drawn exactly by inverting it from one uniform: ``s = U ** (1 / alpha)``. That is
    the same distribution as ``jax.random.beta`` without its gamma rejection sampler, which costs
    seconds of compile time on CPU; other parameters use ``jax.random.beta``.
    """
    shape = tuple(shape)
    if beta == 1.0 or alpha == 1.0:
        u = jax.random.uniform(rng, shape, jnp.float32)
        s = u ** (1.0 / alpha) if beta == 1.0 else 1.0 - u ** (1.0 / beta)
    else:
        s = jax.random.beta(rng, alpha, beta, shape, dtype=jnp.float32)
    return jnp.clip(s, eps, 1.0 - eps)


def _expand_time(s: jax.Array, like: jax.Array) -> jax.Array:
    """``s`` [B] (or scalar) -> broadcastable against ``like`` [B, ...]."""
    s = jnp.asarray(s, jnp.float32)
    return s.reshape(s.shape + (1,) * (like.ndim - s.ndim))


def noisy_actions(actions: jax.Array, noise: jax.Array, s: jax.Array) -> jax.Array:
    """``u_s = s * noise + (1 - s) * actions`` with ``s`` [B] broadcast over [B, K, A]."""
    s = _expand_time(s, actions)
    return s * noise + (1.0 - s) * actions


def velocity_target(actions: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow's velocity ``d u_s / d s = noise - actions``."""
    return noise - actions


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over entries where ``mask`` (broadcast, trailing dims appended) is True;
    0 when nothing is valid."""
    values = values.astype(jnp.float32)
    if mask is None:
        return jnp.mean(values)
    mask = jnp.asarray(mask)
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    weights = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def flow_matching_loss_from_velocity(
    predicted_velocity: jax.Array,
    actions: jax.Array,
    noise: jax.Array,
    pad_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``mean_{valid b,k} mean_A (v - (noise - actions))^2`` for [B, K, A] inputs.

    ``pad_mask`` [B, K] bool: True where the chunk step is real (``action_pad_mask``), None = all.
    Metrics: ``mse`` (= the loss), ``velocity_norm`` (RMS of the prediction over valid steps),
    ``valid_fraction``.
    """
    where, dims = "flow_matching_loss_from_velocity", {}
    for key, value in (("actions", actions), ("predicted_velocity", predicted_velocity), ("noise", noise)):
        check_array(value, where=where, key=key, dtype="floating", shape=("B", "K", "A"), dims=dims)
    if pad_mask is not None:
        check_array(pad_mask, where=where, key="pad_mask", dtype="mask", shape=("B", "K"), dims=dims)
    target = velocity_target(actions.astype(jnp.float32), noise.astype(jnp.float32))
    predicted = predicted_velocity.astype(jnp.float32)
    per_step = jnp.mean(jnp.square(predicted - target), axis=-1)  # [B, K]
    loss = _masked_mean(per_step, pad_mask)
    metrics = {
        "mse": loss,
        "velocity_norm": jnp.sqrt(_masked_mean(jnp.mean(jnp.square(predicted), axis=-1), pad_mask)),
        "valid_fraction": (jnp.ones((), jnp.float32) if pad_mask is None
                           else jnp.mean(jnp.asarray(pad_mask).astype(jnp.float32))),
    }
    return loss, metrics


def euler_sample(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    noise: jax.Array,
    num_steps: int = 10,
) -> jax.Array:
    """Integrates ``d u / d s = velocity_fn(u, s)`` from ``s = 1`` (``u = noise`` [B, K, A]) to
    ``s = 0`` (the action chunk) with ``num_steps`` forward-Euler steps (a ``lax.fori_loop``).

    Step i (0-based) evaluates the velocity at ``s_i = 1 - i / num_steps`` (an [B] array) and sets
    ``u <- u - (1 / num_steps) * v(u, s_i)``; the last evaluation is at ``s = 1 / num_steps``, so
    ``velocity_fn`` never sees s = 0. Returns float32 [B, K, A].
    """
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"euler_sample: num_steps must be >= 1, got {num_steps}")
    dt = 1.0 / num_steps
    u0 = jnp.asarray(noise, jnp.float32)
    batch = u0.shape[0]

    def body(i, u):
        s = jnp.full((batch,), 1.0 - i * dt, jnp.float32)
        return u - dt * velocity_fn(u, s).astype(jnp.float32)

    return jax.lax.fori_loop(0, num_steps, body, u0)


def make_flow_matching_loss(
    apply_velocity: Callable[[Any, dict, jax.Array, jax.Array], jax.Array],
    *,
    time_alpha: float = 1.5,
    time_beta: float = 1.0,
    action_key: str = "action",
    mask_key: str = "action_pad_mask",
) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for chunked flow matching.

    ``apply_velocity(params, batch, u_s [B, K, A], s [B]) -> v [B, K, A]`` is the model (the stage
    plugs in the backbone). ``batch[action_key]`` [B, K, A] normalised actions;
    ``batch[mask_key]`` [B, K] bool (optional: absent = every step valid). ``rng`` draws the noise
    u_0 ~ N(0, I) and the times s ~ Beta(time_alpha, time_beta). Metrics: those of
    ``flow_matching_loss_from_velocity`` plus ``flow_time_mean``.
    """

    def loss_fn(params: Any, batch: dict, rng: jax.Array):
        where, dims = "flow matching loss", {}
        check_array(require(batch, action_key, where, "float32 [B, K, A] normalised actions"), where=where,
                    key=f"batch[{action_key!r}]", dtype="floating", shape=("B", "K", None), dims=dims, finite=True,
                    note="the normalised action chunk")
        if batch.get(mask_key) is not None:
            check_array(batch[mask_key], where=where, key=f"batch[{mask_key!r}]", dtype="mask", shape=("B", "K"),
                        dims=dims, low=0, high=1, note="True where the chunk step is real")
        actions = jnp.asarray(batch[action_key], jnp.float32)
        pad_mask = batch.get(mask_key)
        noise_rng, time_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, actions.shape, jnp.float32)
        s = sample_flow_times(time_rng, (actions.shape[0],), time_alpha, time_beta)
        u_s = noisy_actions(actions, noise, s)
        predicted = apply_velocity(params, batch, u_s, s)
        loss, metrics = flow_matching_loss_from_velocity(predicted, actions, noise, pad_mask)
        metrics = dict(metrics, flow_time_mean=jnp.mean(s))
        return loss, metrics

    return loss_fn


# --------------------------------------------------------------------------- discrete bins


def binned_action_loss_from_logits(
    logits: jax.Array,
    bins: jax.Array,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of bin tokens: ``logits`` [B, A, V], ``bins`` [B, A] int in [0, V).

    ``mask`` [B] or [B, A] (True = counts; a [B] mask covers all A dims of a sample), None = all.
    The loss is the masked mean over (sample, dim) of ``-log softmax(logits)[bin]`` (float32).
    Metrics: ``cross_entropy`` (= the loss), ``accuracy`` (argmax == bin, masked mean). The bins
    are checked against V on concrete inputs (``jaxvla.input_checks``); dtypes and shapes always.
    """
    where, dims = "binned_action_loss_from_logits", {}
    check_array(logits, where=where, key="logits", dtype="floating", shape=("B", "A", "V"), dims=dims)
    check_array(bins, where=where, key="bins", dtype="integer", shape=("B", "A"), dims=dims, low=0,
                high=dims["V"] - 1, note="one bin id per action dim")
    if mask is not None:
        check_array(mask, where=where, key="mask", dtype="mask", shape=("B",) if np.ndim(mask) == 1 else ("B", "A"),
                    dims=dims)
    logits = logits.astype(jnp.float32)
    bins = jnp.asarray(bins, jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, bins[..., None], axis=-1)[..., 0]  # [B, A]
    correct = (jnp.argmax(logits, axis=-1) == bins).astype(jnp.float32)
    loss = _masked_mean(nll, mask)
    return loss, {"cross_entropy": loss, "accuracy": _masked_mean(correct, mask)}


def bin_centres(edges: np.ndarray, binary_dims: Sequence[int] = (-1,)) -> np.ndarray:
    """float32 [A, V] table: ``centres[d, b]`` = what ``stats.unbin_actions`` decodes bin ``b`` of
    dim ``d`` to (continuous: the bin's midpoint; binary dims: lo for bin 0, hi otherwise) for
    ``edges`` [A, V + 1]. Computed once on the host, by ``unbin_actions`` itself."""
    edges = np.asarray(edges)
    num_dims, num_edges = edges.shape
    all_bins = np.broadcast_to(np.arange(num_edges - 1)[:, None], (num_edges - 1, num_dims))
    return np.ascontiguousarray(unbin_actions(all_bins, edges, binary_dims).T)


def decode_bins(bins: jax.Array, centres: jax.Array) -> jax.Array:
    """Jittable ``bins`` [..., A] int -> float32 actions [..., A] via a ``bin_centres`` table
    [A, V] (bins are clipped into [0, V)); equals ``stats.unbin_actions(bins, edges)``."""
    centres = jnp.asarray(centres, jnp.float32)
    num_dims, num_bins = centres.shape
    bins = jnp.clip(jnp.asarray(bins, jnp.int32), 0, num_bins - 1)
    dims = jnp.arange(num_dims, dtype=jnp.int32)
    return centres[dims, bins]
