"""Stage 2 loss: weighted next-token cross-entropy over packed multi-modal sequences.

``pretrain_loss(params, batch, rng, *, backbone, max_targets)`` is pure and jittable. ``params`` is
``{"backbone": <Llama params>}``; ``batch`` holds the arrays of ``jaxvla.data.sequences`` (all
``[B, L]``): ``tokens``, ``modality``, ``positions``, ``segment_ids``, ``bidirectional_ids``,
``targets``, ``target_modality``, ``loss_weight``. The sequence builders already spread each loss
group's weight over its targets (LAPA: 0.99 latent / 0.01 text; ViPRA: 0.48 latent / 0.48
future frame / 0.02 text; ACTIONVLA: 0.99 action bins / 0.01 text), so

    loss = mean_b sum_i loss_weight[b, i] * CE(head_{target_modality[b, i]}(h[b, i]), targets[b, i])

Packed batches (``jaxvla.data.sequences.pack_examples``: several examples a row, segment ids 1, 2,
..., and ``num_examples [B]`` int32, the examples in each row) keep that meaning: the sum over all
rows divided by ``sum(num_examples)``, the mean over examples. Under gradient accumulation each
micro-batch is such a mean; the packer gives every row the same number of examples, so the
micro-batch means average to the batch's.

Only the positions that carry a target of modality m go through m's head: they are gathered, up
to ``max_targets[m]`` per row (static, so the step compiles once), before the [D, V] matmul.
With a 32000-row text head that is the difference between computing text logits at every position
and at the ~50 that are text targets. A sequence with more targets than its cap is an error of the
batch iterator (``check_target_caps``), never a silent drop.

A modality whose cap is 0 (packed LAPA: the image head) never runs its head.

Metrics: ``loss``, per modality ``<m>_ce`` (weighted mean CE over that modality's targets) and
``<m>_accuracy`` (argmax == target over them); ``latent_accuracy`` is the latent-token accuracy and
``image_accuracy`` the future-frame-token accuracy (the only image targets, ViPRA);
``padding_fraction`` (tokens with segment id 0 / all tokens of the batch).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.data.sequences import MODALITY_NAMES
from jaxvla.input_checks import backbone_vocab_sizes, check_sequence_batch

SEQUENCE_INPUTS = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids")


def target_counts(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Largest number of weighted targets of each modality in one sequence of ``batch``."""
    counts = {}
    weighted = np.asarray(batch["loss_weight"]) > 0
    for index, name in enumerate(MODALITY_NAMES):
        mask = weighted & (np.asarray(batch["target_modality"]) == index)
        counts[name] = int(mask.sum(axis=1).max()) if mask.size else 0
    return counts


def check_target_caps(batch: Mapping[str, np.ndarray], max_targets: Mapping[str, int], where: str) -> None:
    """Raises ValueError naming ``where`` (the config key) when a sequence has more targets of a
    modality than the loss gathers."""
    for name, count in target_counts(batch).items():
        cap = int(max_targets.get(name, 0))
        if count > cap:
            raise ValueError(
                f"a sequence has {count} {name} targets but the loss gathers at most {cap}: raise {where}.{name}"
            )


def _gather_positions(mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """``mask [B, L]`` -> (the first ``count`` True positions [B, count] int32, valid [B, count])."""
    order = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)[:, :count]
    return order.astype(jnp.int32), jnp.take_along_axis(mask, order, axis=1)


def modality_cross_entropy(hidden: jax.Array, head_kernel: jax.Array, batch: Mapping[str, jax.Array],
                           modality: int, count: int) -> dict[str, jax.Array]:
    """Weighted CE of one modality's targets. ``hidden [B, L, D]``, ``head_kernel [D, V]``.
    Returns sums: ``weighted_ce``, ``weight``, ``correct``, ``targets``."""
    weights = batch["loss_weight"].astype(jnp.float32)
    mask = (batch["target_modality"] == modality) & (weights > 0)
    positions, valid = _gather_positions(mask, count)
    h = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, C, D]
    logits = jnp.einsum("bcd,dv->bcv", h.astype(jnp.float32), head_kernel.astype(jnp.float32))
    # Unused slots hold other modalities' ids, possibly beyond this vocabulary: out-of-range
    # gathers would read NaN, and 0 * NaN poisons the sum.
    targets = jnp.where(valid, jnp.take_along_axis(batch["targets"], positions, axis=1), 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_z - picked
    w = jnp.where(valid, jnp.take_along_axis(weights, positions, axis=1), 0.0)
    correct = (jnp.argmax(logits, axis=-1) == targets) & valid
    return {
        "weighted_ce": jnp.sum(w * ce),
        "weight": jnp.sum(w),
        "correct": jnp.sum(correct.astype(jnp.float32)),
        "targets": jnp.sum(valid.astype(jnp.float32)),
    }


def pretrain_loss(params: Any, batch: dict, rng: jax.Array, *, backbone: Any,
                  max_targets: Mapping[str, int]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """See the module docstring. Inputs are checked (``jaxvla.input_checks.check_sequence_batch``):
    dtypes and ``[B, L]`` shapes at trace time, token and weighted target ids inside their
    modality's table on concrete batches."""
    del rng  # deterministic: no dropout
    check_sequence_batch(batch, where="pretrain_loss", vocab_sizes=backbone_vocab_sizes(backbone), targets=True)
    out = backbone.apply({"params": params["backbone"]}, *(batch[k] for k in SEQUENCE_INPUTS), heads=())
    hidden = out["hidden"]
    batch_size = hidden.shape[0]
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for index, name in enumerate(MODALITY_NAMES):
        count = int(max_targets.get(name, 0))
        head = params["backbone"].get(f"head_{name}")
        if count <= 0 or head is None:
            continue
        sums = modality_cross_entropy(hidden, head["kernel"], batch, index, count)
        total = total + sums["weighted_ce"]
        metrics[f"{name}_ce"] = sums["weighted_ce"] / jnp.maximum(sums["weight"], 1e-12)
        metrics[f"{name}_accuracy"] = sums["correct"] / jnp.maximum(sums["targets"], 1.0)
    # Packed batches (jaxvla.data.sequences.pack_examples) carry the examples of each row; the
    # mean is over examples either way (unpacked: one example a row).
    if "num_examples" in batch:
        examples = jnp.maximum(jnp.sum(batch["num_examples"]).astype(jnp.float32), 1.0)
    else:
        examples = batch_size
    loss = total / examples
    metrics["padding_fraction"] = jnp.mean((batch["segment_ids"] == 0).astype(jnp.float32))
    return loss, metrics
