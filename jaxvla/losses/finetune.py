"""Stage 3 losses and the flow-matching sampler on the backbone (pure, jittable).

Parameters are ``{"backbone": <Llama params>}`` (bins) or ``{"backbone", "action_encoder",
"velocity_head"}`` (flow); the modules are bound by keyword (``functools.partial``).

Batches (``jaxvla.stages.finetune``): the sequence arrays of ``jaxvla.data.sequences``
(``tokens``, ``modality``, ``positions``, ``segment_ids``, ``bidirectional_ids``, ``targets``,
``target_modality``, ``loss_weight``, all ``[B, L]``), ``action_positions`` ``[B, K]`` (bins: the
A bin tokens; flow: the K placeholder slots), and for flow ``action`` ``[B, K, A]`` (normalised)
and ``action_pad_mask`` ``[B, K]``.

Flow sampling: the prefix (everything but the action block) is run once into a KV cache whose
action slots are masked out (segment 0); each Euler step then runs only the K action tokens
against it (appended after the L prefix slots, with their true RoPE positions), discarding the
updated cache. ``sample_action_chunk_recompute`` runs the whole sequence every step instead
(same result up to float rounding).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxvla.data.sequences import ACTION
from jaxvla.losses.actions import (
    euler_sample,
    flow_matching_loss_from_velocity,
    noisy_actions,
    sample_flow_times,
)
from jaxvla.models.llama import init_cache

SEQ_INPUTS = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids")


def _seq(batch):
    return tuple(jnp.asarray(batch[k], jnp.int32) for k in SEQ_INPUTS)


# --------------------------------------------------------------------------- bins


def action_token_logits(params, batch, *, backbone) -> jax.Array:
    """float32 ``[B, L, V_action]``: the action head's logits at every position (logit ``p``
    predicts token ``p + 1``)."""
    out = backbone.apply({"params": params["backbone"]}, *_seq(batch), heads=("action",))
    return out["logits"]["action"]


def binned_action_loss(params, batch, rng, *, backbone):
    """Cross-entropy of the action-bin tokens, weighted by the sequence's ``loss_weight`` over the
    targets whose ``target_modality`` is action (the builders spread weight 1 over a sequence's
    bin tokens, so this is the mean over them). Metrics: ``cross_entropy``, ``accuracy`` (argmax
    == target over the action targets, teacher-forced)."""
    del rng
    logits = action_token_logits(params, batch, backbone=backbone)
    targets = jnp.asarray(batch["targets"], jnp.int32)
    is_action = (jnp.asarray(batch["target_modality"]) == ACTION) & (jnp.asarray(batch["loss_weight"]) > 0)
    weight = jnp.where(is_action, jnp.asarray(batch["loss_weight"], jnp.float32), 0.0)
    safe_targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1e-6)
    count = jnp.maximum(jnp.sum(is_action), 1)
    correct = (jnp.argmax(logits, axis=-1) == targets) & is_action
    accuracy = jnp.sum(correct) / count
    return loss, {"cross_entropy": loss, "action_token_accuracy": accuracy}


def predicted_bins(params, batch, *, backbone) -> jax.Array:
    """Teacher-forced argmax bins ``[B, A]`` at ``action_positions`` (logits at ``p - 1``)."""
    logits = action_token_logits(params, batch, backbone=backbone)
    positions = jnp.asarray(batch["action_positions"], jnp.int32) - 1
    picked = jnp.take_along_axis(logits, positions[..., None], axis=1)  # [B, A, V]
    return jnp.argmax(picked, axis=-1).astype(jnp.int32)


def predict_bins_greedy(params, batch, *, backbone) -> jax.Array:
    """Bins ``[B, A]`` decoded greedily one token at a time (each predicted bin written into the
    sequence before the next is read): what a policy does, without teacher forcing. Runs the full
    sequence A times (A is small)."""
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    positions = jnp.asarray(batch["action_positions"], jnp.int32)
    rows = jnp.arange(tokens.shape[0])
    out = []
    for i in range(positions.shape[1]):
        seq = dict(batch, tokens=tokens)
        logits = action_token_logits(params, seq, backbone=backbone)
        pick = jnp.argmax(logits[rows, positions[:, i] - 1], axis=-1).astype(jnp.int32)
        tokens = tokens.at[rows, positions[:, i]].set(pick)
        out.append(pick)
    return jnp.stack(out, axis=1)


def predict_bins_cached(params, batch, *, backbone) -> jax.Array:
    """``predict_bins_greedy`` with the prefix in a KV cache (what a policy runs at every control
    step): one prefill with the bin slots masked out (segment 0), whose logits at
    ``action_positions[:, 0] - 1`` give the first bin, then ``A - 1`` one-token steps, each
    feeding the bin just chosen at its true position. Same bins as ``predict_bins_greedy`` up to
    float rounding; ``[B, A]`` int32."""
    tokens, modality, positions, segment_ids, bidirectional_ids = _seq(batch)
    action_positions = jnp.asarray(batch["action_positions"], jnp.int32)
    batch_size, length = tokens.shape
    num_bins = action_positions.shape[1]
    rows = jnp.arange(batch_size)
    prefix_segments = segment_ids.at[rows[:, None], action_positions].set(0)
    cache = init_cache(backbone.config, batch_size, length + num_bins)
    out = backbone.apply({"params": params["backbone"]}, tokens, modality, positions, prefix_segments,
                         bidirectional_ids, cache=cache, heads=("action",))
    pick = jnp.argmax(out["logits"]["action"][rows, action_positions[:, 0] - 1], axis=-1).astype(jnp.int32)
    picks, cache = [pick], out["cache"]
    for i in range(1, num_bins):
        slot = action_positions[:, i - 1:i]
        at = lambda x: jnp.take_along_axis(x, slot, axis=1)  # noqa: E731
        out = backbone.apply({"params": params["backbone"]}, pick[:, None], at(modality), at(positions),
                             at(segment_ids), at(bidirectional_ids), cache=cache, heads=("action",))
        pick = jnp.argmax(out["logits"]["action"][:, 0], axis=-1).astype(jnp.int32)
        picks.append(pick)
        cache = out["cache"]
    return jnp.stack(picks, axis=1)


# --------------------------------------------------------------------------- flow


def _scatter(values: jax.Array, positions: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """``values`` [B, K, D] placed at ``positions`` [B, K] of a [B, length, D] array, and the
    [B, length] bool mask of those slots."""
    batch, _, dim = values.shape
    rows = jnp.arange(batch)[:, None]
    embeddings = jnp.zeros((batch, length, dim), values.dtype).at[rows, positions].set(values)
    mask = jnp.zeros((batch, length), bool).at[rows, positions].set(True)
    return embeddings, mask


def _gather(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.take_along_axis(hidden, positions[..., None], axis=1)


def predict_velocity(params, batch, u_s, s, *, backbone, action_encoder, velocity_head) -> jax.Array:
    """``v(u_s, s)`` [B, K, A] with the whole sequence run (the action slots' embeddings replaced
    by the action encoder's tokens)."""
    positions = jnp.asarray(batch["action_positions"], jnp.int32)
    tokens = action_encoder.apply({"params": params["action_encoder"]}, u_s, s)
    seq = _seq(batch)
    embeddings, mask = _scatter(tokens, positions, seq[0].shape[1])
    out = backbone.apply({"params": params["backbone"]}, *seq, input_embeddings=embeddings,
                         embedding_mask=mask, heads=())
    return velocity_head.apply({"params": params["velocity_head"]}, _gather(out["hidden"], positions))


def flow_matching_loss(params, batch, rng, *, backbone, action_encoder, velocity_head,
                       time_alpha: float = 1.5, time_beta: float = 1.0):
    """ViPRA-FM: ``s ~ Beta(time_alpha, time_beta)``, ``u_0 ~ N(0, I)``,
    ``u_s = s u_0 + (1 - s) a``; the backbone reads the prefix and the action encoder's tokens of
    ``(u_s, s)`` at ``action_positions``; the velocity head's output at those positions is
    regressed on ``u_0 - a`` over the chunk's valid steps (``action_pad_mask``). Metrics: those of
    ``flow_matching_loss_from_velocity`` and ``flow_time_mean``."""
    actions = jnp.asarray(batch["action"], jnp.float32)
    pad_mask = batch.get("action_pad_mask")
    noise_rng, time_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, actions.shape, jnp.float32)
    s = sample_flow_times(time_rng, (actions.shape[0],), time_alpha, time_beta)
    u_s = noisy_actions(actions, noise, s)
    predicted = predict_velocity(params, batch, u_s, s, backbone=backbone, action_encoder=action_encoder,
                                 velocity_head=velocity_head)
    loss, metrics = flow_matching_loss_from_velocity(predicted, actions, noise, pad_mask)
    return loss, dict(metrics, flow_time_mean=jnp.mean(s))


def _chunk_shape(batch, velocity_head) -> tuple[int, int, int]:
    positions = jnp.asarray(batch["action_positions"])
    return positions.shape[0], positions.shape[1], int(velocity_head.action_dim)


def prefill_prefix(params, batch, *, backbone, extra: int, cache_dtype=jnp.float32) -> dict:
    """The KV cache of the prefix: the whole sequence with its action slots (and padding) as
    segment 0, so they are never attended; ``extra`` free slots follow for the action tokens."""
    tokens, modality, positions, segment_ids, bidirectional_ids = _seq(batch)
    batch_size, length = tokens.shape
    rows = jnp.arange(batch_size)[:, None]
    action_positions = jnp.asarray(batch["action_positions"], jnp.int32)
    prefix_segments = segment_ids.at[rows, action_positions].set(0)
    cache = init_cache(backbone.config, batch_size, length + extra, cache_dtype)
    out = backbone.apply({"params": params["backbone"]}, tokens, modality, positions, prefix_segments,
                         bidirectional_ids, cache=cache, heads=())
    return out["cache"]


def sample_action_chunk(params, batch, rng, *, backbone, action_encoder, velocity_head, num_steps: int = 10):
    """Normalised action chunks ``[B, K, A]`` by ``num_steps`` Euler steps from ``N(0, I)`` noise
    (drawn from ``rng``); the prefix is prefilled once into a KV cache and every step runs only
    the K action tokens against it."""
    batch_size, chunk, action_dim = _chunk_shape(batch, velocity_head)
    noise = jax.random.normal(rng, (batch_size, chunk, action_dim), jnp.float32)
    cache = prefill_prefix(params, batch, backbone=backbone, extra=chunk)
    action_positions = jnp.asarray(batch["action_positions"], jnp.int32)
    tokens, modality, positions, segment_ids, bidirectional_ids = (
        jnp.take_along_axis(x, action_positions, axis=1) for x in _seq(batch))
    ones = jnp.ones((batch_size, chunk), bool)

    def velocity(u, s):
        embeddings = action_encoder.apply({"params": params["action_encoder"]}, u, s)
        out = backbone.apply({"params": params["backbone"]}, tokens, modality, positions, segment_ids,
                             bidirectional_ids, input_embeddings=embeddings, embedding_mask=ones, cache=cache,
                             heads=())
        return velocity_head.apply({"params": params["velocity_head"]}, out["hidden"])

    return euler_sample(velocity, noise, num_steps)


def sample_action_chunk_recompute(params, batch, rng, *, backbone, action_encoder, velocity_head,
                                  num_steps: int = 10):
    """``sample_action_chunk`` without a cache: the whole sequence runs at every Euler step (the
    reference for the cached sampler and the baseline of its benchmark)."""
    batch_size, chunk, action_dim = _chunk_shape(batch, velocity_head)
    noise = jax.random.normal(rng, (batch_size, chunk, action_dim), jnp.float32)

    def velocity(u, s):
        return predict_velocity(params, batch, u, s, backbone=backbone, action_encoder=action_encoder,
                                velocity_head=velocity_head)

    return euler_sample(velocity, noise, num_steps)


def flow_eval_metrics(params, batch, rng, *, backbone, action_encoder, velocity_head, time_alpha: float = 1.5,
                      time_beta: float = 1.0, num_steps: int = 10) -> dict[str, Any]:
    """The loss's metrics plus ``sample_mse``: the MSE of ``sample_action_chunk`` against the
    demonstrated normalised chunk over valid steps, and ``zero_mse`` (predicting 0) for scale."""
    loss_rng, sample_rng = jax.random.split(rng)
    modules = dict(backbone=backbone, action_encoder=action_encoder, velocity_head=velocity_head)
    loss, metrics = flow_matching_loss(params, batch, loss_rng, time_alpha=time_alpha, time_beta=time_beta,
                                       **modules)
    sampled = sample_action_chunk(params, batch, sample_rng, num_steps=num_steps, **modules)
    actions = jnp.asarray(batch["action"], jnp.float32)
    mask = jnp.asarray(batch["action_pad_mask"], jnp.float32)[..., None] * jnp.ones_like(actions)
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = dict(metrics, loss=loss)
    metrics["sample_mse"] = jnp.sum(jnp.square(sampled - actions) * mask) / denom
    metrics["zero_mse"] = jnp.sum(jnp.square(actions) * mask) / denom
    return metrics


def bins_eval_metrics(params, batch, rng, *, backbone) -> dict[str, Any]:
    """The loss's metrics plus ``action_l1``: the mean |decoded bin centre - true action| of the
    greedily decoded bins (``batch["bin_centres"]`` [B, A, V] per sample; ``batch["action"]``
    [B, K, A] raw, the first action is the target)."""
    loss, metrics = binned_action_loss(params, batch, rng, backbone=backbone)
    bins = predict_bins_greedy(params, batch, backbone=backbone)  # [B, A]
    centres = jnp.asarray(batch["bin_centres"], jnp.float32)
    decoded = jnp.take_along_axis(centres, bins[..., None], axis=-1)[..., 0]
    target = jnp.asarray(batch["action"], jnp.float32)[:, 0]
    metrics = dict(metrics, loss=loss)
    metrics["action_l1"] = jnp.mean(jnp.abs(decoded - target))
    metrics["greedy_bin_accuracy"] = jnp.mean((bins == jnp.asarray(batch["action_bins"])).astype(jnp.float32))
    return metrics
