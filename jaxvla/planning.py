"""Memory and time plans for a train step, without the hardware (``scripts/plan.py``).

``plan(config, devices)`` builds the stage, derives the train state's shapes and shardings with
``jax.eval_shape`` (nothing is allocated), lowers and compiles the real jitted train step for the
mesh of ``devices`` (fake CPU devices stand in for the accelerators) and reads:

* per-device bytes of params, optimizer state and the batch, from each array's shard shape;
* the compiled step's temporaries (activations kept for the backward pass, gradients, workspace),
  arguments, outputs and donated aliases from XLA's memory analysis; the peak is
  ``arguments + outputs - aliased + temporaries``;
* FLOPs per step from XLA's cost analysis.

XLA's cost analysis counts a loop body once, so a scanned model reports one layer. The FLOPs are
therefore measured on the same model unrolled (``model.scan_layers=False``) at 1 and 2 layers and
extrapolated linearly to the real depth (layers are identical, so this is exact), once with the
configured remat policy (hardware FLOPs: what the chips execute, recomputation included) and once
without remat (model FLOPs, the MFU convention). Gradient accumulation is planned on one
micro-batch and scaled.

Caveat: the memory analysis is the CPU compiler's. On GPU / TPU the fusions differ, attention may
run as a fused (flash) kernel that never materialises the ``[B, H, L, L]`` scores, and bf16 dots
stay bf16; ``attention_scores_bytes`` reports the score tensor of one layer so the difference can
be judged. Tests check the plan against real CPU runs (``tests/test_planning.py``).

FLOP counting helpers for the benchmarks (``scripts/bench_*.py``):

* :func:`real_token_flops`: the model FLOPs of a batch's real tokens only, counted analytically
  per example (see there): what MFU on real tokens divides by the step time.
* :func:`unrolled_scans` / :func:`scan_unrolled_flops`: XLA's cost analysis of a step whose
  ``nn.scan`` loops are fully unrolled, so every scanned block counts (the LAQ's transformer
  stacks), not just one loop body.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from jaxvla import config as cfg_lib
from jaxvla import sharding
from jaxvla.data.sequences import ACTION
from jaxvla.models.llama import MODALITIES, llama_config
from jaxvla.trainer import setup_train_step


@dataclasses.dataclass
class StepPlan:
    """One compiled train step's per-device memory and per-step FLOPs."""

    mesh: dict[str, int]
    remat: str
    grad_accum_steps: int
    params_bytes: int  # per device
    opt_state_bytes: int  # per device
    other_state_bytes: int  # EMA params, step, rng, stage aux (per device)
    batch_bytes: int  # per device
    argument_bytes: int  # compiled: state + batch
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int  # compiled: activations, gradients, workspace
    attention_scores_bytes: int  # one layer's [B/dev, H, L, L] float32 scores
    hardware_flops: float  # per step, all devices (recomputation included)
    model_flops: float  # per step, all devices (no recomputation)

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, device_memory_bytes: float) -> bool:
        return self.peak_bytes <= device_memory_bytes

    def step_seconds(self, devices: int, peak_flops_per_device: float, mfu: float) -> float:
        """Predicted step time when the devices run at ``mfu`` of their peak (model FLOPs)."""
        return self.model_flops / (devices * peak_flops_per_device * mfu)


def _shard_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _compile(config, devices):
    """(compiled train step, abstract sharded state, abstract sharded batch)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = setup_train_step(config, mesh, rules)
        state = setup.factory.abstract_with_shardings()
        example = next(setup.stage.batches(0))
        batch_sharding = sharding.batch_sharding(mesh)
        batch = {
            # The process's rows times the processes: packed batches have fewer rows than examples.
            key: jax.ShapeDtypeStruct((np.shape(value)[0] * jax.process_count(), *np.shape(value)[1:]),
                                      np.asarray(value).dtype,
                                      sharding=batch_sharding)
            for key, value in example.items()
        }
        compiled = setup.step.lower(state, batch).compile()
    return compiled, state, batch


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def step_flops(config, devices, remat: str) -> float:
    """All-device FLOPs of one full step: unrolled at 1 and 2 layers, extrapolated (see module doc)."""
    layers = _num_layers(config)
    accum = config.optimizer.grad_accum_steps
    micro = dict(batch_size=config.batch_size // accum)
    micro["optimizer.grad_accum_steps"] = 1
    per_depth = []
    for depth in (1, 2):
        small = cfg_lib.with_overrides(config, {"remat_policy": remat, "model.scan_layers": False,
                                                "model.num_layers": depth, **micro})
        compiled, *_ = _compile(small, devices)
        per_depth.append(_flops(compiled) * len(devices))
    one, two = per_depth
    return accum * (one + (layers - 1) * (two - one))


def is_backbone(config) -> bool:
    """Does ``config`` train the LLaMA backbone (stages 2 and 3), whose FLOPs ``step_flops`` counts?"""
    return config.stage in ("pretrain", "finetune") and "num_layers" in config.get("model", {})


def _num_layers(config) -> int:
    return int(config.model.num_layers or llama_config(config.model.size).num_layers)


def _attention_scores_bytes(config, mesh_shape: dict[str, int]) -> int:
    heads = int(config.model.num_heads or llama_config(config.model.size).num_heads)
    batch_per_device = config.batch_size // config.optimizer.grad_accum_steps // (mesh_shape["data"] * mesh_shape["fsdp"])
    return batch_per_device * heads * int(config.model.seq_len) ** 2 * 4


def plan(config, devices, remat: str | None = None, flops: bool = True, model_flops: float | None = None) -> StepPlan:
    """Compiles ``config``'s train step for ``devices`` (``remat`` overrides
    ``config.remat_policy``) and returns its :class:`StepPlan`. Needs a stage that builds without
    data (the backbone stages: ``model.latent_source="synthetic"``); FLOPs need a LLaMA backbone
    config (``model.size``), skip them with ``flops=False``. ``model_flops`` reuses a figure from an
    earlier plan of the same config (it does not depend on the remat policy)."""
    if remat is not None:
        config = cfg_lib.with_overrides(config, {"remat_policy": remat})
    data, fsdp, tensor = cfg_lib.validate(config, len(devices), 1)
    compiled, state, batch = _compile(config, devices)
    memory = compiled.memory_analysis()
    other = dataclasses.replace(state, params=None, opt_state=None)
    backbone = is_backbone(config)
    return StepPlan(
        mesh=dict(data=data, fsdp=fsdp, tensor=tensor),
        remat=config.remat_policy,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        params_bytes=_shard_bytes(state.params),
        opt_state_bytes=_shard_bytes(state.opt_state),
        other_state_bytes=_shard_bytes(other),
        batch_bytes=_shard_bytes(batch),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        attention_scores_bytes=_attention_scores_bytes(config, dict(data=data, fsdp=fsdp)) if backbone else 0,
        hardware_flops=step_flops(config, devices, config.remat_policy) if flops and backbone else float("nan"),
        model_flops=(model_flops if model_flops is not None else step_flops(config, devices, "none"))
        if flops and backbone else float("nan"),
    )


# ----------------------------------------------------------------------------------------------
# FLOP counting for the benchmarks


def layer_matmul_params(llama) -> int:
    """Matmul parameters of one LLaMA decoder layer (``llama``: a ``LlamaConfig``): q, k, v, o
    projections (grouped-query k / v) and the SwiGLU MLP's gate, up and down. Norm scales are
    elementwise, not matmuls, and are left out."""
    d, h, kv, dh, f = llama.dim, llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.mlp_dim
    return d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f


def attended_pairs(positions, bidirectional_ids) -> int:
    """(query, key) pairs that one example's attention computes: query ``i`` sees key ``j`` iff
    ``pos[j] <= pos[i]`` or both share a positive bidirectional id (``jaxvla.models.llama``'s
    rule within one segment). ``positions`` / ``bidirectional_ids``: ``[n]`` of ONE example (its
    positions are distinct, ``0..n-1``), so the causal pairs are ``n (n + 1) / 2`` and every
    bidirectional block of ``b`` tokens adds its ``b (b - 1) / 2`` later-key pairs."""
    n = int(np.size(positions))
    pairs = n * (n + 1) // 2
    blocks = np.asarray(bidirectional_ids)
    for block in np.unique(blocks[blocks > 0]):
        b = int(np.count_nonzero(blocks == block))
        pairs += b * (b - 1) // 2
    return pairs


def example_flops(llama, length: int, pairs: int, head_targets: Mapping[str, int], slot_params: int = 0,
                  slots: int = 0) -> float:
    """Training FLOPs (forward + backward = 3 x forward, 2 FLOPs a multiply-add) of one example:

    * body: ``6 * layer_matmul_params * num_layers * length``;
    * attention: ``12 * num_heads * head_dim * num_layers * pairs`` (q.k and p.v, 2 each per head
      dimension and attended pair, times 3);
    * output heads: ``6 * dim * vocab_m`` per target scored by modality ``m``'s head
      (``head_targets[m]``: the pretraining loss applies a head only at the positions whose target
      it scores);
    * ``slot_params`` matmul parameters applied at ``slots`` positions (the flow head's action
      encoder and velocity head): ``6 * slot_params * slots``.

    Embedding lookups, norms, RoPE, softmax and the optimizer are not counted (not matmuls);
    neither is recomputation under remat (model FLOPs, the MFU convention)."""
    body = 6.0 * layer_matmul_params(llama) * llama.num_layers * length
    attention = 12.0 * llama.num_heads * llama.head_dim * llama.num_layers * pairs
    heads = sum(6.0 * llama.dim * llama.vocab(m) * int(count) for m, count in head_targets.items())
    return body + attention + heads + 6.0 * slot_params * slots


@dataclasses.dataclass(frozen=True)
class RealTokenCount:
    """One batch's real (non-padding) work: ``flops`` (:func:`example_flops` summed over its
    examples), ``tokens`` (real tokens), ``examples`` and ``slots`` (padding and real tokens)."""

    flops: float
    tokens: int
    examples: int
    slots: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.slots if self.slots else 0.0


def real_token_flops(llama, batch: Mapping[str, np.ndarray], slot_params: int = 0) -> RealTokenCount:
    """Model FLOPs of the real tokens of ``batch`` (the ``[R, L]`` arrays of
    ``jaxvla.data.sequences``: ``segment_ids``, ``positions``, ``bidirectional_ids``,
    ``loss_weight``, ``target_modality``; packed or not): every example (a row's segment ``k > 0``)
    counts :func:`example_flops` of its own length and attention pairs (examples packed in one
    row never attend to each other; padding counts nothing), with one head application per
    weighted target of a modality the backbone has a head for. ``slot_params``: matmul parameters
    applied at each of an example's action-modality tokens (flow finetuning's action encoder and
    velocity head at its placeholders; needs ``modality``; 0 otherwise)."""
    segments = np.asarray(batch["segment_ids"])
    positions = np.asarray(batch["positions"])
    bidirectional = np.asarray(batch["bidirectional_ids"])
    weighted = np.asarray(batch["loss_weight"]) > 0
    target_modality = np.asarray(batch["target_modality"])
    action = np.asarray(batch["modality"]) == ACTION if slot_params else None

    heads = [(MODALITIES.index(m), m) for m in llama.present]
    flops, tokens, examples = 0.0, 0, 0
    for row in range(segments.shape[0]):
        for segment in np.unique(segments[row][segments[row] > 0]):
            member = segments[row] == segment
            n = int(np.count_nonzero(member))
            pairs = attended_pairs(positions[row][member], bidirectional[row][member])
            targets = {m: int(np.count_nonzero(member & weighted[row] & (target_modality[row] == index)))
                       for index, m in heads}
            slots = int(np.count_nonzero(member & action[row])) if slot_params else 0
            flops += example_flops(llama, n, pairs, targets, slot_params, slots)
            tokens += n
            examples += 1
    return RealTokenCount(flops=flops, tokens=tokens, examples=examples, slots=int(segments.size))


@contextlib.contextmanager
def unrolled_scans():
    """While active, every ``flax.linen.scan`` built is fully unrolled (``unroll=True``): the
    compiled step has no loop, so XLA's cost analysis counts each scanned block instead of one loop
    body. Same parameters and the same arithmetic; only for counting (compile time grows with
    depth)."""
    original = nn.scan

    def scan(target, *args, **kwargs):
        kwargs["unroll"] = True
        return original(target, *args, **kwargs)

    nn.scan = scan
    try:
        yield
    finally:
        nn.scan = original


def scan_unrolled_flops(setup_step, state, batch) -> float:
    """Per-device FLOPs of XLA's cost analysis of a train step traced under
    :func:`unrolled_scans`. ``setup_step``: ``() -> jitted step`` building a NEW step function
    (a step already traced would be reused from jax's trace cache, scans and all); ``state``,
    ``batch``: the arguments (arrays or ``ShapeDtypeStruct``) to lower it with."""
    with unrolled_scans():
        compiled = setup_step().lower(state, batch).compile()
    return _flops(compiled)
