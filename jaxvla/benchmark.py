"""Timing a stage's real train step and the machine's matmul peak (for scripts/bench_*.py), and the
realistic LAPA-style workloads the backbone benchmarks run on.

Backbone batches: with ``model.latent_source="synthetic"`` the pretraining stage's own synthetic
batches give every example the same 24-id prompt, so packed rows hold no padding at all, which no
real run sees. :func:`time_train_step` therefore times the backbone on :func:`realistic_examples`
instead: the objective's layout with the real Meta-World instructions tokenized by the project's
text tokenizer (tasks drawn in proportion to the embedded dataset's steps per task when its
``metadata.json`` is there, uniformly otherwise), the real layout markers, random image / latent /
action ids; packed into the layout real training fixes (``SequencePacker``: rows sized for the
longest possible example, a ``pack_prompt_tokens``-id prompt), or one example a row with
``model.pack=False``. The loss, model and train step are the stage's own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvla import config as cfg_lib
from jaxvla import sharding
from jaxvla.data import sequences as seq
from jaxvla.frozen import TextPrompts
from jaxvla.io.files import write_json
from jaxvla.losses.pretrain import check_target_caps
from jaxvla.planning import scan_unrolled_flops
from jaxvla.sim.instructions import instruction
from jaxvla.stages import build_stage, pretrain
from jaxvla.trainer import setup_train_step

log = logging.getLogger("jaxvla")


@dataclasses.dataclass
class StepTiming:
    compile_s: float
    step_times_s: list[float]
    flops_per_step: float  # XLA's cost analysis of the compiled step (per device; scanned bodies once)
    num_params: int
    memory: object  # compiled.memory_analysis() (or None)
    mesh: jax.sharding.Mesh
    # The timed steps' host batches (numpy, this process's rows), one per entry of step_times_s.
    batches: list[dict] = dataclasses.field(default_factory=list)
    # XLA's cost analysis of the same step with every nn.scan unrolled (per device), when asked.
    unrolled_flops_per_step: float | None = None
    params: object = None  # the trained state's params after the timed steps
    stage: object = None  # the jaxvla.stages.Stage that was timed

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times_s)


# ----------------------------------------------------------------------------------------------
# Realistic backbone workloads


def task_weights(tasks: list[str], data_dir: str) -> np.ndarray:
    """Sampling weight of each task: its steps in the embedded Meta-World dataset at ``data_dir``
    (``metadata.json``'s ``stats[task].rlds_steps``; a pair or frame sample is drawn per step), or
    uniform when that file is absent. Sums to 1."""
    weights = np.ones(len(tasks))
    if data_dir and os.path.isdir(data_dir):
        from jaxvla.data.metaworld_rlds import dataset_version_dir  # Meta-World (MuJoCo)

        path = os.path.join(dataset_version_dir(data_dir), "metadata.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                stats = json.load(f).get("stats", {})
            if all(t in stats for t in tasks):
                weights = np.asarray([float(stats[t]["rlds_steps"]) for t in tasks])
    return weights / weights.sum()


@dataclasses.dataclass
class MetaWorldPrompts:
    """The prompt ids of every task instruction (``prompts[i]``: ``<s>`` + LAPA's template around
    task ``i``'s language-world sentence), their sampling ``weights`` and the layout ``markers``'
    text ids, all from the project's text tokenizer."""

    tasks: list[str]
    prompts: list[np.ndarray]
    weights: np.ndarray
    markers: dict

    @classmethod
    def load(cls, task_spec: str = "mt10", data_dir: str = "", tokenizer_path: str = "") -> "MetaWorldPrompts":
        from jaxvla.sim.metaworld_env import task_names  # Meta-World (MuJoCo)

        tasks = task_names(task_spec or "mt10")
        text = TextPrompts(tokenizer_path)
        return cls(tasks, [np.asarray(text(instruction(t))) for t in tasks], task_weights(tasks, data_dir),
                   text.markers)

    def sample(self, rng: np.random.Generator, count: int) -> list[np.ndarray]:
        return [self.prompts[i] for i in rng.choice(len(self.prompts), size=count, p=self.weights)]


def realistic_examples(model_config, vocab, prompts: MetaWorldPrompts, rng: np.random.Generator, count: int,
                       prompt_ids: list[np.ndarray] | None = None) -> list[dict]:
    """``count`` built examples (``jaxvla.data.sequences`` dicts of ``model.seq_len``) of
    ``model_config.objective``'s layout with real prompts (sampled, or ``prompt_ids``), real markers
    and random ids: ``max_targets.image`` codes a frame, ``synthetic_latent_shape`` latent codes
    (lapa / vipra), 4 action bins (actionvla: Meta-World's 4 action dimensions)."""
    mc = model_config
    frame = int(mc.max_targets["image"])
    prompt_ids = prompts.sample(rng, count) if prompt_ids is None else prompt_ids

    def ids(size, high):
        return rng.integers(0, high, size=size, dtype=np.int32)

    built = []
    for prompt in prompt_ids:
        image = ids(frame, vocab.image_codes)
        previous = ids(frame, vocab.image_codes) if mc.history_frames else None
        if mc.objective == "lapa":
            built.append(seq.build_lapa(prompt, image, ids(tuple(mc.synthetic_latent_shape), vocab.latent_codes),
                                        prompts.markers, vocab, mc.seq_len, latent_weight=mc.latent_weight,
                                        text_weight=mc.text_weight, prev_image=previous))
        elif mc.objective == "vipra":
            built.append(seq.build_vipra(prompt, image, ids(frame, vocab.image_codes),
                                         ids(tuple(mc.synthetic_latent_shape), vocab.latent_codes), prompts.markers,
                                         vocab, mc.seq_len, prev_image=previous, latent_weight=mc.latent_weight,
                                         future_weight=mc.future_weight, text_weight=mc.text_weight))
        elif mc.objective == "actionvla":
            built.append(seq.build_actionvla(prompt, image, ids(4, vocab.action_bins), prompts.markers, vocab,
                                             mc.seq_len, action_weight=mc.action_weight, text_weight=mc.text_weight,
                                             prev_image=previous))
        else:
            raise ValueError(f"config.model.objective={mc.objective!r}; expected lapa, vipra or actionvla")
    return built


def longest_example(model_config, vocab, prompts: MetaWorldPrompts) -> dict:
    """The longest example a packed batch may hold: a ``pack_prompt_tokens``-id prompt (what
    ``SequencePacker`` sizes its layout by)."""
    budget = int(model_config.pack_prompt_tokens)
    prompt = np.concatenate([[vocab.bos_id], np.zeros(budget - 1)]).astype(np.int32)
    return realistic_examples(model_config, vocab, prompts, np.random.default_rng(0), 1, [prompt])[0]


def realistic_backbone_stage(config):
    """(stage, layout) of pretraining on :func:`realistic_examples` (see the module docstring):
    the synthetic stage's backbone and loss with real-length examples; ``layout``: the
    ``PackingLayout`` (None unpacked). Global batch ``s`` depends on (seed, s) only."""
    mc = config.model
    vocab = pretrain.synthetic_vocab(mc.size)
    prompts = MetaWorldPrompts.load(config.data.get("metaworld_tasks", "mt10"), config.data.get("data_dir", ""),
                                    mc.text_tokenizer)
    too_long = [t for t, p in zip(prompts.tasks, prompts.prompts) if mc.pack and p.size > mc.pack_prompt_tokens]
    if too_long:
        raise ValueError(f"prompts of tasks {too_long} exceed config.model.pack_prompt_tokens={mc.pack_prompt_tokens}")
    layout = None
    caps = dict(mc.max_targets)
    if mc.pack:
        layout = pretrain.layout_for(longest_example(mc, vocab, prompts), config.batch_size,
                                     pretrain.packing_group(config), mc.seq_len)
        caps = layout.row_caps
        log.info("packing (benchmark, real prompt lengths): %s", pretrain.describe_layout(layout, config.batch_size))
    batches, eval_batches = pretrain.seeded_batch_streams(
        config, lambda rng, n: realistic_examples(mc, vocab, prompts, rng, n), layout,
        check=lambda batch: check_target_caps(batch, caps, "config.model.max_targets"))

    assets = {"objective": mc.objective, "latent_source": "synthetic", "vocab_sizes": np.asarray(vocab.sizes),
              "seq_len": np.asarray(mc.seq_len)}
    return pretrain._stage(config, vocab, batches, eval_batches, assets, max_targets=caps), layout


def synthetic_frames_stage(config, stage):
    """The LAQ ``stage`` with its batches replaced by random uint8 frames of its own shape
    (``frames [B, num_frames, image_size, image_size, 3]``, ``step [B]``): the step's compute does
    not depend on the pixels, so a machine without the dataset times the same step."""
    if config.stage != "laq":
        raise ValueError(f"synthetic frames: only the LAQ stage reads frame batches, not {config.stage!r}")
    frames, size = int(stage.assets["num_frames"]), int(stage.assets["image_size"])
    rows = config.batch_size // jax.process_count()

    def batches(start_step: int):
        step = start_step
        while True:
            rng = np.random.default_rng([config.seed, step, jax.process_index()])
            yield {"frames": rng.integers(0, 256, size=(rows, frames, size, size, 3), dtype=np.uint8),
                   "step": np.full((rows,), step, np.int32)}
            step += 1

    return dataclasses.replace(stage, batches=batches)


def uses_realistic_batches(config) -> bool:
    """Pretraining on synthetic latents: the backbone benchmarks' workload (see the module docstring)."""
    return config.stage == "pretrain" and config.model.get("latent_source") == "synthetic"


# ----------------------------------------------------------------------------------------------
# Timing


def time_train_step(config, steps: int = 10, *, count_unrolled: bool = False, realistic: bool = True,
                    synthetic_frames: bool = False) -> StepTiming:
    """Compiles ``config.stage``'s train step on the configured mesh (the same code path as
    ``python -m jaxvla.train``) and times ``steps`` steps after one warm-up step, each on its own
    batch from the stage's stream (for synthetic pretraining with ``realistic``, from
    :func:`realistic_backbone_stage`). ``count_unrolled``: also XLA's FLOPs of the step with every
    ``nn.scan`` unrolled (``StepTiming.unrolled_flops_per_step``; see
    ``jaxvla.planning.scan_unrolled_flops``). ``synthetic_frames``: the LAQ on random frames
    (:func:`synthetic_frames_stage`), no dataset read."""
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1 timed step")
    devices = jax.devices()
    cfg_lib.validate(config, len(devices), jax.process_count())
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        stage = realistic_backbone_stage(config)[0] if realistic and uses_realistic_batches(config) else None
        if synthetic_frames:
            stage = synthetic_frames_stage(config, build_stage(config))
        setup = setup_train_step(config, mesh, rules, stage=stage)
        state = setup.factory.create(config.seed)
        step_fn = setup.step
        batches = setup.stage.batches(0)
        batch = sharding.global_batch(next(batches), mesh)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        unrolled = None
        if count_unrolled:
            unrolled = _unrolled_flops(config, mesh, rules, setup.stage, state, batch, scan_unrolled_flops)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        host_batches = [next(batches) for _ in range(steps)]
        timed_batches = [sharding.global_batch(b, mesh) for b in host_batches]
        times = []
        for b in timed_batches:
            t0 = time.perf_counter()
            state, metrics = compiled(state, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    return StepTiming(
        compile_s=compile_s,
        step_times_s=times,
        flops_per_step=float(cost.get("flops", 0.0)) if cost else 0.0,
        num_params=sum(x.size for x in jax.tree.leaves(state.params)),
        memory=compiled.memory_analysis(),
        mesh=mesh,
        batches=host_batches,
        unrolled_flops_per_step=unrolled,
        params=state.params,
        stage=setup.stage,
    )


def backbone_config(stage):
    """The ``LlamaConfig`` of a backbone stage (pretraining, finetuning): its loss's ``backbone``."""
    backbone = (getattr(stage.loss_fn, "keywords", None) or {}).get("backbone")
    if backbone is None:
        raise ValueError("this stage's loss has no LLaMA backbone (not a pretraining / finetuning stage)")
    return backbone.config


def slot_params(params) -> int:
    """Matmul parameters (kernels: arrays of rank >= 2) of flow finetuning's ``action_encoder`` and
    ``velocity_head``, applied once at every action slot; 0 without them."""
    return sum(int(x.size) for name in ("action_encoder", "velocity_head") if name in params
               for x in jax.tree.leaves(params[name]) if x.ndim >= 2)


def _unrolled_flops(config, mesh, rules, stage, state, batch, count) -> float:
    """Per-device FLOPs of the step with unrolled scans. Gradient accumulation's own loop (a
    ``lax.scan`` over micro-batches) would count once too, so the step is counted at one
    micro-batch without accumulation and scaled (the optimizer update is then counted
    ``grad_accum_steps`` times: elementwise, a small over-count)."""
    accum = int(config.optimizer.grad_accum_steps)
    micro_config = cfg_lib.with_overrides(config, {"optimizer.grad_accum_steps": 1,
                                                   "batch_size": config.batch_size // accum})
    micro_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] // accum, *x.shape[1:]), x.dtype, sharding=x.sharding), batch)
    return accum * count(lambda: setup_train_step(micro_config, mesh, rules, stage=stage).step, state, micro_batch)


def matmul_peak(mesh, size: int, dtype, repeats: int = 5) -> float:
    """FLOP/s of [size, size] x [size, size] matmuls, one per device, over all devices (the best of
    ``repeats`` calls)."""
    n = mesh.devices.size
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    a = jax.device_put(jnp.ones((n, size, size), dtype), spec)
    b = jax.device_put(jnp.ones((n, size, size), dtype), spec)
    matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y))
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n * size**3 / min(times)


def write_results(path: str, results: dict) -> None:
    """``results`` as a JSON object at ``path`` (atomically: ``jaxvla.io.files.write_json``);
    non-finite floats are written as null so the file stays strict JSON."""
    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.generic,)):
            value = value.item()
        if isinstance(value, float) and not np.isfinite(value):
            return None
        return value

    write_json(path, clean(results))

