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
  per-example arrays laid out by row and slot. An example's target is its chunk of K actions as
  T = K * A bin tokens, time-major (step 0's A bins, then step 1's, ...; K = 1 is LAPA / OpenVLA's
  one action, K = 14 ViPRA-AR's chunk): ``action_positions`` ``[R, d, T]`` (the T bin tokens'
  indices in the row), ``action_bins`` ``[R, d, T]``, ``action`` ``[R, d, K, A]`` (raw) and
  ``action_pad_mask`` ``[R, d, K]``; eval batches also ``bin_centres`` ``[R, d, A, V]``. The bins of
  padded chunk steps (past the episode's end) are in the sequence but carry loss weight 0 (set by
  the stage). The decoders also take the unpacked ``[B, T]`` positions a policy builds.

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
from jaxvla.input_checks import backbone_vocab_sizes, check_array, check_sequence_batch, require
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


def check_flow_batch(batch, *, backbone, velocity_head, where: str = "flow_matching_loss",
                     actions: bool = True) -> dict[str, int]:
    """A flow batch (``jaxvla.input_checks``): the sequence arrays ``[B, L]`` (ids inside their
    tables on concrete batches), ``action_positions`` int ``[B, K]`` in ``[0, L)``, and with
    ``actions`` the normalised chunk ``action`` float ``[B, K, A]`` (A = the velocity head's
    action_dim; finite on concrete batches) and, when present, ``action_pad_mask`` bool ``[B, K]``."""
    dims = check_sequence_batch(batch, where=where, vocab_sizes=backbone_vocab_sizes(backbone))
    check_array(require(batch, "action_positions", where, "int32 [B, K]: the chunk's placeholder slots"), where=where,
                key="batch['action_positions']", dtype="integer", shape=("B", "K"), dims=dims, low=0,
                high=dims["L"] - 1, note="indices of the action placeholders in each row")
    if actions:
        check_array(require(batch, "action", where, "float32 [B, K, A] normalised actions"), where=where,
                    key="batch['action']", dtype="floating", shape=("B", "K", int(velocity_head.action_dim)), dims=dims,
                    finite=True, note="the normalised action chunk")
        if batch.get("action_pad_mask") is not None:
            check_array(batch["action_pad_mask"], where=where, key="batch['action_pad_mask']", dtype="mask",
                        shape=("B", "K"), dims=dims, low=0, high=1, note="True where the chunk step is real")
    return dims


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
    batch is packed, else its rows). The builders spread weight 1 over an example's T = K * A bin
    tokens (1 / T each) and the stage zeroes the weights of padded chunk steps, so every real bin
    token of the batch weighs the same, 1 / (N T) for N examples: the loss is
    ``sum over real bin tokens of CE / (N T)`` (with no padded step, e.g. K = 1: the mean over
    examples of each example's mean bin CE, packed or not, normalised like pretraining's loss,
    ``jaxvla.losses.pretrain``). Padded steps' tokens are never gathered (weight 0).

    Only the action targets reach the head: up to ``max_targets`` a row are gathered (static; the
    stage passes its layout's per-row cap, ``d`` x T) before the ``[D, V]`` matmul; None gathers
    every position (any batch, at the price of a head at every position).

    Metrics: ``cross_entropy`` (the mean CE over the real bin tokens: ``sum(w CE) / sum(w)``; equals
    the loss when no step is padded), ``valid_fraction`` (``sum(w) / N``: the share of the chunks'
    steps that are real, up to float rounding of the 1 / T weights), ``action_token_accuracy`` (argmax == target over the real bin tokens,
    teacher-forced), ``padding_fraction``."""
    del rng
    check_sequence_batch(batch, where="binned_action_loss", vocab_sizes=backbone_vocab_sizes(backbone), targets=True)
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
    return loss, {"cross_entropy": sums["weighted_ce"] / jnp.maximum(sums["weight"], 1e-12),
                  "valid_fraction": sums["weight"] / examples, "action_token_accuracy": accuracy,
                  "padding_fraction": padding_fraction(batch)}


def _bin_slots(batch) -> jax.Array:
    """``action_positions`` as ``[R, E, T]`` int32 (E examples a row; unpacked ``[B, T]``: E = 1)."""
    positions = jnp.asarray(batch["action_positions"], jnp.int32)
    return positions.reshape(positions.shape[0], -1, positions.shape[-1])


def predict_bins_greedy(params, batch, *, backbone) -> jax.Array:
    """Bins decoded greedily one token at a time without a cache (each predicted bin written into
    the sequence before the next is read): what a policy does, without teacher forcing, and the
    reference for :func:`predict_bins_cached`. Runs the full ``[R, L]`` sequence T times (a
    ``lax.fori_loop``; T = K * A, e.g. 14 x 4 = 56). In a packed row every example decodes its i-th
    bin in the same pass: examples never attend to each other, so that equals decoding each alone.

    ``batch["action_positions"]``: ``[B, T]`` (one example a row) or ``[R, d, T]`` (packed), the T
    bin slots of each example in time-major order. Returns int32 bins shaped like it (``[B, T]`` or
    ``[R, d, T]``); ``.reshape(..., K, A)`` gives the chunk's steps."""
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    slots = _bin_slots(batch)  # [R, E, T]
    rows = jnp.arange(tokens.shape[0])[:, None]

    def body(i, carry):
        tokens, picks = carry
        slot = jax.lax.dynamic_index_in_dim(slots, i, axis=2, keepdims=False)  # [R, E]
        logits = action_token_logits(params, dict(batch, tokens=tokens), backbone=backbone)  # [R, L, V]
        pick = jnp.argmax(logits[rows, slot - 1], axis=-1).astype(jnp.int32)  # [R, E]
        return tokens.at[rows, slot].set(pick), picks.at[:, :, i].set(pick)

    _, picks = jax.lax.fori_loop(0, slots.shape[-1], body, (tokens, jnp.zeros(slots.shape, jnp.int32)))
    return picks.reshape(batch["action_positions"].shape)


def predict_bins_cached(params, batch, *, backbone, cache_dtype=jnp.float32) -> jax.Array:
    """:func:`predict_bins_greedy` with the prefix in a KV cache (what a policy runs at every
    control step): one prefill of the ``[R, L]`` rows with every bin slot masked out (segment 0),
    whose action logits at ``slots[..., 0] - 1`` give each example's first bin, then ``T - 1``
    one-token steps (a ``lax.scan``): step i feeds the bin just chosen for slot ``i - 1`` at that
    slot's true position, segment and ids (``[R, E]`` tokens: one per example of the row, which
    never see each other) and reads bin i from its logits. The cache holds ``L + E (T - 1)`` slots.
    Same bins as :func:`predict_bins_greedy` up to float rounding.

    ``batch["action_positions"]``: ``[B, T]`` or packed ``[R, d, T]`` (T = K * A, time-major).
    Returns int32 bins shaped like it; ``.reshape(..., K, A)`` gives the chunk's steps."""
    tokens, modality, positions, segment_ids, bidirectional_ids = _seq(batch)
    slots = _bin_slots(batch)  # [R, E, T]
    num_rows, length = tokens.shape
    per_row, num_bins = slots.shape[1], slots.shape[2]
    rows = jnp.arange(num_rows)[:, None]
    prefix_segments = segment_ids.at[rows, slots.reshape(num_rows, -1)].set(0)
    cache = init_cache(backbone.config, num_rows, length + per_row * (num_bins - 1), cache_dtype)
    out = backbone.apply({"params": params["backbone"]}, tokens, modality, positions, prefix_segments,
                         bidirectional_ids, cache=cache, heads=("action",))
    first = jnp.argmax(out["logits"]["action"][rows, slots[..., 0] - 1], axis=-1).astype(jnp.int32)  # [R, E]

    def step(carry, i):
        pick, cache = carry
        slot = jax.lax.dynamic_index_in_dim(slots, i - 1, axis=2, keepdims=False)  # [R, E]: where pick sits
        at = lambda x: jnp.take_along_axis(x, slot, axis=1)  # noqa: E731
        out = backbone.apply({"params": params["backbone"]}, pick, at(modality), at(positions), at(segment_ids),
                             at(bidirectional_ids), cache=cache, heads=("action",))
        pick = jnp.argmax(out["logits"]["action"], axis=-1).astype(jnp.int32)  # [R, E]
        return (pick, out["cache"]), pick

    _, rest = jax.lax.scan(step, (first, out["cache"]), jnp.arange(1, num_bins))  # [T - 1, R, E]
    picks = jnp.concatenate([first[None], rest], axis=0)  # [T, R, E]
    return jnp.moveaxis(picks, 0, -1).reshape(batch["action_positions"].shape)


def decode_bin_chunk(bins: jax.Array, centres: jax.Array) -> jax.Array:
    """Bin ids ``[..., T]`` (T = K * A, time-major) -> float32 actions ``[..., K, A]``: each step's
    A bins looked up in the per-example ``bin_centres`` table ``[..., A, V]`` (leading dims equal
    to the bins')."""
    centres = jnp.asarray(centres, jnp.float32)
    action_dim, num_values = centres.shape[-2], centres.shape[-1]
    steps = jnp.clip(jnp.asarray(bins, jnp.int32), 0, num_values - 1)
    steps = steps.reshape(steps.shape[:-1] + (-1, action_dim))  # [..., K, A]
    table = jnp.broadcast_to(centres[..., None, :, :], steps.shape + (num_values,))  # [..., K, A, V]
    return jnp.take_along_axis(table, steps[..., None], axis=-1)[..., 0]


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
    ``flow_matching_loss_from_velocity``, ``flow_time_mean`` and ``padding_fraction``. Inputs are
    checked by :func:`check_flow_batch`."""
    check_flow_batch(batch, backbone=backbone, velocity_head=velocity_head)
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
    """The loss's metrics plus those of the greedily decoded chunk (:func:`predict_bins_cached`,
    the policy's decoder, on the packed rows) mapped to bin centres, in robot units.

    Per example (``[B, ...]`` unpacked, ``[R, d, ...]`` packed): ``action_positions`` /
    ``action_bins`` ``[..., K * A]``, ``bin_centres`` ``[..., A, V]``, ``action`` ``[..., K, A]`` raw,
    ``action_pad_mask`` ``[..., K]`` (absent: every step real).

    * ``action_mse`` / ``action_l1``: the mean squared / absolute error of the chunk's FIRST
      decoded action against the demonstrated one, over examples whose first step is real (all:
      the pipeline drops the others): the experiment's stopping rule, the same quantity whatever
      K is, and the flow head's ``action_mse`` counterpart.
    * ``chunk_action_mse``: the same squared error over every real step of the chunk.
    * ``greedy_bin_accuracy``: decoded bin == ``action_bins`` over the real steps' tokens."""
    loss, metrics = binned_action_loss(params, batch, rng, backbone=backbone, max_targets=max_targets)
    where = "bins_eval_metrics"
    for key, kind in (("action_positions", "integer"), ("action_bins", "integer"), ("bin_centres", "floating"),
                      ("action", "floating")):
        check_array(require(batch, key, where), where=where, key=f"batch[{key!r}]", dtype=kind)
    bins = predict_bins_cached(params, batch, backbone=backbone)  # [..., K * A]
    decoded = decode_bin_chunk(bins, batch["bin_centres"])  # [..., K, A]
    target = jnp.asarray(batch["action"], jnp.float32)  # [..., K, A]
    valid = batch.get("action_pad_mask")
    valid = jnp.ones(target.shape[:-1], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    weights = jnp.broadcast_to(valid[..., None], target.shape)  # [..., K, A]
    error = decoded - target
    first = weights[..., 0, :]

    def mean(values, w):
        return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)

    metrics = dict(metrics, loss=loss)
    metrics["action_l1"] = mean(jnp.abs(error[..., 0, :]), first)
    # The stopping rule shared with the flow head (the first action's squared error).
    metrics["action_mse"] = mean(jnp.square(error[..., 0, :]), first)
    metrics["chunk_action_mse"] = mean(jnp.square(error), weights)
    hits = (bins == jnp.asarray(batch["action_bins"], jnp.int32)).astype(jnp.float32)
    metrics["greedy_bin_accuracy"] = mean(hits, weights.reshape(hits.shape))
    return metrics
