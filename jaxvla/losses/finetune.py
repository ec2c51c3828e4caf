"""Stage 3 losses and the flow-matching sampler on the backbone (pure, jittable).

Parameters are ``{"backbone": <Llama params>}`` (bins) or ``{"backbone", "action_encoder",
"velocity_head"}`` (flow); the modules are bound by keyword (``functools.partial``).

Batches (``jaxvla.stages.finetune``): the sequence arrays of ``jaxvla.data.sequences``
(``tokens``, ``modality``, ``positions``, ``segment_ids``, ``bidirectional_ids``, ``targets``,
``target_modality``, ``loss_weight``, all ``[R, L]``: R rows of L tokens).

* flow: one example a row (R = B), ``action_positions`` ``[B, K]`` (the K placeholder slots),
  ``action`` ``[B, K, A]`` (normalised) and ``action_pad_mask`` ``[B, K]``.
* bins: ``d`` examples a row when packed (``jaxvla.data.sequences.pack_examples``: segment ids
  1..d, positions restarting per example; unpacked d = 1), ``num_examples`` ``[R]`` and the
  per-example arrays laid out by row and slot: ``action_positions`` ``[R, d, A]`` (the A bin
  tokens' indices in the row), ``action_bins`` ``[R, d, A]``, eval batches also ``action``
  ``[R, d, K, A]`` (raw) and ``bin_centres`` ``[R, d, A, V]``. The decoders also take the
  unpacked ``[B, A]`` positions a policy builds.

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
from jaxvla.losses.pretrain import modality_cross_entropy
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


def _action_head_kernel(backbone_params) -> jax.Array:
    """The action head's ``[D, V]`` matrix (the embedding transposed when the backbone ties them)."""
    head = backbone_params.get("head_action")
    if head is not None:
        return head["kernel"]
    return jnp.transpose(backbone_params["embed_action"]["embedding"])


def padding_fraction(batch) -> jax.Array:
    """Tokens with segment id 0 over all tokens of the batch (float32 scalar)."""
    return jnp.mean((jnp.asarray(batch["segment_ids"]) == 0).astype(jnp.float32))


def binned_action_loss(params, batch, rng, *, backbone, max_targets: int | None = None):
    """Cross-entropy of the action-bin tokens: ``sum_i loss_weight[i] * CE`` over the targets whose
    ``target_modality`` is action, divided by the number of examples (``sum(num_examples)`` when the
    batch is packed, else its rows). The builders spread weight 1 over an example's bin tokens, so
    the loss is the mean over examples of each example's mean bin CE, packed or not (pretraining's
    loss, ``jaxvla.losses.pretrain``, normalises the same way).

    Only the action targets reach the head: up to ``max_targets`` a row are gathered (static; the
    stage passes its layout's per-row cap, ``d`` x A) before the ``[D, V]`` matmul; None gathers
    every position (any batch, at the price of a head at every position).

    Metrics: ``cross_entropy`` (= the loss), ``action_token_accuracy`` (argmax == target over the
    action targets, teacher-forced), ``padding_fraction``."""
    del rng
    out = backbone.apply({"params": params["backbone"]}, *_seq(batch), heads=())
    hidden = out["hidden"]
    count = hidden.shape[1] if max_targets is None else int(max_targets)
    targets = {k: jnp.asarray(batch[k]) for k in ("targets", "target_modality", "loss_weight")}
    sums = modality_cross_entropy(hidden, _action_head_kernel(params["backbone"]), targets, ACTION, count)
    if "num_examples" in batch:
        examples = jnp.maximum(jnp.sum(jnp.asarray(batch["num_examples"])).astype(jnp.float32), 1.0)
    else:
        examples = jnp.float32(hidden.shape[0])
    loss = sums["weighted_ce"] / examples
    accuracy = sums["correct"] / jnp.maximum(sums["targets"], 1.0)
    return loss, {"cross_entropy": loss, "action_token_accuracy": accuracy,
                  "padding_fraction": padding_fraction(batch)}


def _bin_slots(batch) -> jax.Array:
    """``action_positions`` as ``[R, E, A]`` int32 (E examples a row; unpacked ``[B, A]``: E = 1)."""
    positions = jnp.asarray(batch["action_positions"], jnp.int32)
    return positions.reshape(positions.shape[0], -1, positions.shape[-1])


def predicted_bins(params, batch, *, backbone) -> jax.Array:
    """Teacher-forced argmax bins at ``action_positions`` (logits at ``p - 1``), shaped like
    ``action_positions`` (``[B, A]`` or packed ``[R, d, A]``)."""
    logits = action_token_logits(params, batch, backbone=backbone)
    slots = _bin_slots(batch)
    picked = jnp.take_along_axis(logits, slots.reshape(slots.shape[0], -1, 1) - 1, axis=1)  # [R, E*A, V]
    return jnp.argmax(picked, axis=-1).astype(jnp.int32).reshape(batch["action_positions"].shape)


def predict_bins_greedy(params, batch, *, backbone) -> jax.Array:
    """Bins decoded greedily one token at a time (each predicted bin written into the sequence
    before the next is read): what a policy does, without teacher forcing. Runs the full sequence
    A times (A is small). In a packed row every example decodes its i-th bin in the same pass:
    examples never attend to each other, so that equals decoding each alone. Shaped like
    ``action_positions`` (``[B, A]`` or ``[R, d, A]``), int32."""
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    slots = _bin_slots(batch)  # [R, E, A]
    rows = jnp.arange(tokens.shape[0])[:, None]
    out = []
    for i in range(slots.shape[-1]):
        seq = dict(batch, tokens=tokens)
        logits = action_token_logits(params, seq, backbone=backbone)
        pick = jnp.argmax(logits[rows, slots[..., i] - 1], axis=-1).astype(jnp.int32)  # [R, E]
        tokens = tokens.at[rows, slots[..., i]].set(pick)
        out.append(pick)
    return jnp.stack(out, axis=-1).reshape(batch["action_positions"].shape)


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
    ``flow_matching_loss_from_velocity``, ``flow_time_mean`` and ``padding_fraction``."""
    actions = jnp.asarray(batch["action"], jnp.float32)
    pad_mask = batch.get("action_pad_mask")
    noise_rng, time_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, actions.shape, jnp.float32)
    s = sample_flow_times(time_rng, (actions.shape[0],), time_alpha, time_beta)
    u_s = noisy_actions(actions, noise, s)
    predicted = predict_velocity(params, batch, u_s, s, backbone=backbone, action_encoder=action_encoder,
                                 velocity_head=velocity_head)
    loss, metrics = flow_matching_loss_from_velocity(predicted, actions, noise, pad_mask)
    return loss, dict(metrics, flow_time_mean=jnp.mean(s), padding_fraction=padding_fraction(batch))


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
    demonstrated normalised chunk over valid steps, ``zero_mse`` (predicting 0) for scale, and
    ``action_mse``: the same for the chunk's first action only (the experiment's stopping rule)."""
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
    # The stopping rule shared with the bins head: error of the first action the policy would
    # execute (in the space the head is trained in), over examples whose first action is real.
    first = mask[..., 0, :]
    metrics["action_mse"] = jnp.sum(jnp.square(sampled[..., 0, :] - actions[..., 0, :]) * first) / jnp.maximum(
        jnp.sum(first), 1.0)
    return metrics


def bins_eval_metrics(params, batch, rng, *, backbone, max_targets: int | None = None) -> dict[str, Any]:
    """The loss's metrics plus ``action_l1`` / ``action_mse``: the mean |decoded bin centre - true
    action| and its square of the greedily decoded bins, and ``greedy_bin_accuracy`` against ``action_bins``. Per example (``[B,
    ...]`` unpacked, ``[R, d, ...]`` packed): ``bin_centres`` ``[..., A, V]``, ``action`` ``[..., K,
    A]`` raw (the first action is the target), ``action_bins`` ``[..., A]``."""
    loss, metrics = binned_action_loss(params, batch, rng, backbone=backbone, max_targets=max_targets)
    bins = predict_bins_greedy(params, batch, backbone=backbone)  # [..., A]
    centres = jnp.asarray(batch["bin_centres"], jnp.float32)
    decoded = jnp.take_along_axis(centres, bins[..., None], axis=-1)[..., 0]
    target = jnp.asarray(batch["action"], jnp.float32)[..., 0, :]
    metrics = dict(metrics, loss=loss)
    metrics["action_l1"] = jnp.mean(jnp.abs(decoded - target))
    # The stopping rule shared with the flow head (the first action's squared error).
    metrics["action_mse"] = jnp.mean(jnp.square(decoded - target))
    metrics["greedy_bin_accuracy"] = jnp.mean((bins == jnp.asarray(batch["action_bins"])).astype(jnp.float32))
    return metrics
