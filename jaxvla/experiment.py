"""The comparison protocol of LAPA / ViPRA at CPU scale on Meta-World: what ``make demo`` and
``scripts/reproduce.py`` run.

    exp = Experiment("runs/day", PROTOCOLS["day"])
    print(format_plan(exp.plan()))          # what would run, nothing trained
    exp.run()                               # every row x seed; finished stages are reused
    records = exp.records()                 # raw per-episode results

The question: do many action-free videos make a policy finetuned on a few demonstrations
better? Three disjoint seed streams feed it:

* **the video pool**: ``pool_tasks`` (default ML45's 45 training tasks) x ``videos_per_task``
  expert episodes (seed base ``POOL_SEED``), plus one more per task in its val split for the
  LAQ's and pretraining's held-out losses. The image tokenizer, both LAQs, the labeller and the
  LAPA / ViPRA pretraining read it through the pipeline's action-free view
  (``data.drop_actions``: zero actions, ``has_action`` False); only ACTIONVLA, the upper bound,
  pretrains on the same pool *with* its actions.
* **the demonstrations**: ``demos_per_task`` (K) episodes of each ``finetune_tasks`` task for
  finetuning (train split) plus ``heldout_demos_per_task`` more (val split) that choose the
  stopping point (seed base ``DEMO_SEED``).
* **the evaluation placements**: ``eval_placements`` per ``eval_tasks`` task, fixed
  (``jaxvla.evaluation.EVAL_SEED_BASE``), the same for every row and seed.

Rows are pretraining x head: pretraining in ``PRETRAININGS`` (none = SCRATCH, LAPA, VIPRA,
ACTIONVLA) and head ``bins`` (quantile bins) or ``flow`` (chunked flow matching), each finetuned
with ``seeds``. Compute is matched: every pretrained row pretrains ``pretrain_steps``; SCRATCH
finetunes ``pretrain_steps + finetune_steps`` so that its total equals theirs. Every finetuning
run evaluates the held-out demonstrations every ``select_every`` steps and keeps those
checkpoints; the policy evaluated is the one with the lowest held-out action error
(``SELECTION_METRIC``), the same rule for every row.

With ``scratch_control`` (the ``day`` protocol) each SCRATCH finetuning is also evaluated at the
pretrained rows' finetuning budget: its stopping point chosen by the same rule among the kept steps
up to ``finetune_steps``, published as the row ``SCRATCH-<head>@ft<finetune_steps>``. That is the
papers' comparison (pretraining free, equal finetuning), a secondary analysis beside the
matched-compute one; it costs one evaluation per SCRATCH finetuning and no training.

Each LAQ is probed on the pool's held-out episodes and gated (``jaxvla.laq_quality.gate``: code
usage, position R^2, gain over task + phase) before its labels are made; a failed gate stops the
protocol unless ``enforce_laq_gate`` is False (the verdict is recorded either way).

Stages train into ``run_dir/<stage>`` and record ``stage.json``; a stage whose record and
checkpoint exist is reused, so an interrupted run continues at the stage it stopped in. Stage
names carry what distinguishes them (pool size, K, seed), so runs with other settings never reuse
them wrongly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxvla import laq_quality, trainer
from jaxvla.checkpoint import checkpoint_fingerprint, finished_steps, resolve_checkpoint
from jaxvla.config import apply_overrides, load_config, packaged_config_spec, to_json
from jaxvla.data.latent_labels import LabelResumeError
from jaxvla.evaluation import EVAL_SEED_BASE, evaluate
from jaxvla.frozen import TextPrompts, load_laq
from jaxvla.io.files import write_json
from jaxvla.io.weights import flatten_dict
from jaxvla.latent_actions import label_dataset
from jaxvla.sim.instructions import instruction
from jaxvla.tracking import save_figure

log = logging.getLogger("jaxvla")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seed bases of the generated datasets; evaluation placements use jaxvla.evaluation.EVAL_SEED_BASE.
# Every episode's environment seed is metaworld_env.episode_seed(base, task, index), so the three
# streams share no placement (checked by Experiment.seed_streams and the tests).
POOL_SEED = 101
DEMO_SEED = 202

PRETRAININGS = {
    # name: (row label, LAQ kind whose labels it learns, reads the pool's actions)
    "none": ("SCRATCH", None, False),
    "lapa": ("LAPA", "lapa", False),
    "vipra": ("VIPRA", "vipra", False),
    "actionvla": ("ACTIONVLA", None, True),
}
HEADS = ("bins", "flow")
# Held-out error of the predicted first action, in robot units, averaged over the val split of
# the demonstrations (losses.finetune.*_eval_metrics): the stopping rule of every row.
SELECTION_METRIC = "eval/action_mse"


class StageInterrupted(RuntimeError):
    """A stage's training stopped before its last step (SIGTERM): nothing is recorded for it, and
    the run stops; running it again resumes from the stage's checkpoint."""


def row_name(pretraining: str, head: str) -> str:
    return f"{PRETRAININGS[pretraining][0]}-{head}"


def parse_row(row: str) -> tuple[str, str]:
    """``"VIPRA-flow"`` -> ``("vipra", "flow")``; unknown rows raise naming the valid ones."""
    for pretraining, (label, _, _) in PRETRAININGS.items():
        for head in HEADS:
            if row.lower() == f"{label}-{head}".lower():
                return pretraining, head
    valid = [row_name(p, h) for p in PRETRAININGS for h in HEADS]
    raise ValueError(f"unknown row {row!r}; expected one of {valid}")


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    tokenizer_steps: int
    laq_steps: int
    pretrain_steps: int
    finetune_steps: int  # the pretrained rows'; SCRATCH gets pretrain_steps more
    select_every: int  # held-out evaluation and checkpoint interval while finetuning
    # Held-out batches (of the finetuning batch size) per check: the chunks the stopping point is
    # chosen on, the same at every check. 2 batches (16 chunks) chose steps whose error on 32 was
    # 1.4x the best kept one (SCRATCH-bins, day seed 0: step 800, 0.240 against 0.166 at 1400).
    select_batches: int = 32
    pool_tasks: str = "ml45"
    videos_per_task: int = 20
    finetune_tasks: str = "mt10"
    demos_per_task: int = 5
    heldout_demos_per_task: int = 2
    eval_tasks: str = "mt10"
    eval_placements: int = 10  # per task
    max_steps: int = 150
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrainings: tuple[str, ...] = tuple(PRETRAININGS)
    heads: tuple[str, ...] = HEADS
    image_size: int = 64
    # The LAQ gate (configs/laq.py gate.*) stops the protocol before labelling when it fails,
    # unless this is False; the probe fits on this many pool episodes per task.
    enforce_laq_gate: bool = True
    probe_episodes_per_task: int = 5
    # The policy's inputs in every pretraining and finetuning stage: ViPRA's frame history
    # (o_{t-k}, o_t with k = history_stride control steps; 0: the current frame alone) and, in
    # finetuning only, the proprioceptive state written into the prompt (``model.state_dims``:
    # hand xyz + gripper; "" : none), our deviation from LAPA / ViPRA, which see pixels only.
    history_stride: int = 7
    state_dims: str = "4"
    # Finetuning examples per step (0: the config's, 8 at small).
    finetune_batch_size: int = 0
    # Also evaluate each SCRATCH finetuning stopped within the pretrained rows' finetune_steps
    # (module docstring): what pretraining buys at equal finetuning, beside matched compute.
    scratch_control: bool = False

    def __post_init__(self):
        unknown = [p for p in self.pretrainings if p not in PRETRAININGS]
        if unknown:
            raise ValueError(f"pretrainings {unknown}: expected some of {list(PRETRAININGS)}")
        bad_heads = [h for h in self.heads if h not in HEADS]
        if bad_heads:
            raise ValueError(f"heads {bad_heads}: expected some of {list(HEADS)}")
        if self.demos_per_task < 1 or self.heldout_demos_per_task < 1:
            raise ValueError("demos_per_task and heldout_demos_per_task must be >= 1, got "
                             f"{self.demos_per_task} and {self.heldout_demos_per_task}")
        if self.videos_per_task < 0:
            raise ValueError(f"videos_per_task must be >= 0, got {self.videos_per_task}")
        if not self.seeds:
            raise ValueError("seeds: at least one finetuning seed")
        if self.select_every < 1 or self.select_batches < 1:
            raise ValueError(f"select_every and select_batches must be >= 1, got {self.select_every} and "
                             f"{self.select_batches}")
        if self.history_stride < 0:
            raise ValueError(f"history_stride must be >= 0 (0: no frame history), got {self.history_stride}")

    @property
    def inputs_tag(self) -> str:
        """What the inputs add to a pretraining stage's name: ``h7`` (frame history, k = 7)."""
        parts = [f"h{self.history_stride}"] if self.history_stride else []
        return "_".join(parts)

    @property
    def finetune_inputs_tag(self) -> str:
        """... and to a finetuning stage's: ``h7_st4`` (history, then the state dims)."""
        parts = [self.inputs_tag] if self.inputs_tag else []
        if self.state_dims:
            parts.append("st" + self.state_dims.replace(":", "-"))
        return "_".join(parts)

    def rows(self, among: Sequence[str] | None = None) -> list[str]:
        """Row names in order; with no videos only SCRATCH rows exist (nothing to pretrain on).
        With ``among`` (e.g. ``--rows``), those of them this protocol has, in ``among``'s order."""
        pretrainings = [p for p in self.pretrainings if p == "none" or self.videos_per_task > 0]
        mine = [row_name(p, h) for p in pretrainings for h in self.heads]
        return mine if not among else [r for r in among if r in mine]

    def finetune_steps_of(self, pretraining: str) -> int:
        return self.finetune_steps + (self.pretrain_steps if pretraining == "none" else 0)

    def control_step(self, row: str) -> int | None:
        """The step cap of ``row``'s equal-finetuning control (``scratch_control``): the pretrained
        rows' ``finetune_steps`` for a SCRATCH row of a protocol that has pretrained rows, else None."""
        pretraining, _ = parse_row(row)
        pretrained = any(parse_row(r)[0] != "none" for r in self.rows())
        if not (self.scratch_control and pretraining == "none" and pretrained and self.pretrain_steps):
            return None
        return self.finetune_steps

    def evaluation_caps(self, row: str) -> list[int | None]:
        """The evaluations of each finetuning of ``row``: ``None`` (its chosen step), then the
        equal-finetuning control's step cap where it has one."""
        cap = self.control_step(row)
        return [None] if cap is None else [None, cap]


def control_row(row: str, max_step: int) -> str:
    """The published name of ``row`` stopped within ``max_step`` finetuning steps: ``SCRATCH-flow@ft1200``."""
    return f"{row}@ft{max_step}"


PROTOCOLS = {
    # make demo: one row (VIPRA-flow, seed 0) end to end on a small pool; 25.6 minutes on a quiet
    # 2-core machine (target 20), most of it finetuning: 1200 steps (2.2 passes over the 50 demos' chunks).
    "demo": Protocol("demo", tokenizer_steps=150, laq_steps=150, pretrain_steps=100, finetune_steps=1200,
                     select_every=200, pool_tasks="mt10", videos_per_task=4, demos_per_task=5,
                     heldout_demos_per_task=1, eval_placements=2, seeds=(0,), pretrainings=("vipra",),
                     heads=("flow",), enforce_laq_gate=False,
                     # One row, nothing compared: its 30 % and 25.6 min were measured choosing on 2
                     # held-out batches, and 32 would add about a minute (6 checks).
                     select_batches=2),
    # The full protocol: 8 rows x 3 seeds on an ML45 pool of 900 videos; scripts/reproduce.py --plan
    # estimates 18.1 hours on 2 cores from scratch (the budget is 10).
    "day": Protocol("day", tokenizer_steps=1500, laq_steps=2000, pretrain_steps=1000, finetune_steps=1200,
                    select_every=200, scratch_control=True),
}

# Seconds per training step of the small configs on 2 CPU cores with the protocol's inputs (frame
# history, state), held-out evaluations included: flow finetuning 0.73 s (make demo's 1200 steps in
# 872 s on a quiet machine, 2026-12-01). Measured on a quiet machine in the day run of 2026-12-02:
# bins finetuning 1.75 s (ACTIONVLA-bins seed 2: 2249 s for 1200 steps, less its checks' ~150 s;
# the earlier 0.95 took the 1.3x ratio of scripts/bench_train_step.py's step times on a shared
# CPU, which the run does not bear out: 2.4x), pretraining 1.36 s (ACTIONVLA: 1000 steps in 1358 s). Finished
# stages are excluded from the estimate. Evaluation and data generation in seconds per episode
# (rendering 64 px: ~1 s; evaluation: flow about 2 s, bins 5.0 s, greedy-decoding 56 tokens a
# chunk: ACTIONVLA-bins seed 2's 100 episodes in 503 s).
STEP_SECONDS = {"tokenizer": 0.57, "laq_lapa": 0.27, "laq_vipra": 0.6, "pretrain": 1.36, "finetune_flow": 0.73,
                "finetune_bins": 1.75}
EPISODE_SECONDS = {"generate": 1.2, "label": 0.3, "evaluate_flow": 2.0, "evaluate_bins": 5.0}
# Seconds per held-out batch of a finetuning check (8 examples, forward only; the 2 batches the
# step figures above include are not subtracted): measured on 2 quiet cores, 2026-12-02.
CHECK_BATCH_SECONDS = {"flow": 0.36, "bins": 0.78}


# What a finished stage must share with the configuration asking for it before it is reused: the
# whole model, the optimiser and batch size, and the data keys that decide what a sample is.
STAGE_IDENTITY = ("model", "optimizer", "batch_size", "data.sample", "data.image_size", "data.gap_frames",
                  "data.gap_seconds", "data.clip_length", "data.clip_stride", "data.chunk_size", "data.history",
                  "data.history_stride")
# ... except the row length: it decides how examples are laid out into rows, never what is
# computed (packed loss and gradients equal the mean over the examples alone: tests/test_packing.py).
LAYOUT_KEYS = ("model.seq_len",)


def stale_keys(saved: dict, wanted: dict, identity: Sequence[str] = STAGE_IDENTITY,
               ignore: Sequence[str] = LAYOUT_KEYS) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, wanted value) for every leaf under ``identity`` but not in
    ``ignore`` where two config dicts differ; a key missing on one side counts as different."""

    def leaves(tree: Any, prefix: str) -> dict[str, Any]:
        return flatten_dict(tree, ".", prefix) if isinstance(tree, Mapping) else {prefix: tree}

    def lookup(tree: dict, dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return _MISSING
            tree = tree[part]
        return tree

    differ = []
    for key in identity:
        a, b = leaves(lookup(saved, key), key), leaves(lookup(wanted, key), key)
        for leaf in sorted(set(a) | set(b)):
            if leaf not in ignore and a.get(leaf, _MISSING) != b.get(leaf, _MISSING):
                differ.append((leaf, a.get(leaf, _MISSING), b.get(leaf, _MISSING)))
    return differ


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def loss_curve(path: str, history: list, title: str, keys: tuple[str, ...] = ("loss",)) -> str | None:
    """PNG of the logged ``keys`` against steps (eval/... points as markers); None without history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=110)
    for key in keys:
        for name, marker in ((key, None), (f"eval/{key}", "o")):
            points = [(s, m[name]) for s, m in history if name in m]
            if points:
                ax.plot(*zip(*points), marker=marker, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def select_step(history: Sequence[tuple[int, dict]], metric: str = SELECTION_METRIC) -> tuple[int, list]:
    """The step with the lowest ``metric`` among the evaluated steps (the earliest on ties) and the
    ``[(step, value)]`` curve it was chosen from. A non-finite value (a diverged check) is kept in
    the curve but never chosen. ValueError when no step was evaluated, or none finitely."""
    curve = [(int(s), float(m[metric])) for s, m in history if metric in m]
    if not curve:
        raise ValueError(f"no {metric!r} in the training history: finetuning never evaluated the held-out "
                         "demonstrations (eval_every)")
    finite = [point for point in curve if math.isfinite(point[1])]
    if not finite:
        raise ValueError(f"every held-out {metric!r} is non-finite ({curve}): the finetuning diverged")
    best = min(finite, key=lambda point: (point[1], point[0]))
    return best[0], curve


class Experiment:
    """The stages of one protocol under ``run_dir``; see the module docstring."""

    def __init__(self, run_dir: str, protocol: Protocol, data_root: str = "runs/data", progress: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        self.protocol = protocol
        self.progress = progress
        self.data_root = os.path.abspath(data_root)
        p = protocol
        self.pool_data = os.path.join(self.data_root, f"pool_{p.pool_tasks}_{p.videos_per_task}ep_s{POOL_SEED}_"
                                                      f"{p.image_size}")
        self.demo_data = os.path.join(self.data_root, f"demos_{p.finetune_tasks}_{p.demos_per_task}+"
                                                      f"{p.heldout_demos_per_task}ep_s{DEMO_SEED}_{p.image_size}")
        self.stages: dict[str, dict] = {}

    # ------------------------------------------------------------------ names

    @property
    def pool_tag(self) -> str:
        return f"pool{self.protocol.videos_per_task}"

    def stage_names(self, row: str, seed: int) -> list[str]:
        """The stages ``row`` with ``seed`` needs, in training order (shared ones included)."""
        return [name for name, _ in self.stage_costs(row, seed)]

    def stage_costs(self, row: str, seed: int) -> list[tuple[str, float]]:
        """(stage, estimated seconds to run it from nothing) for the stages ``row`` with ``seed``
        needs, in training order: steps x :data:`STEP_SECONDS`, episodes x :data:`EPISODE_SECONDS`."""
        p = self.protocol
        pretraining, head = parse_row(row)
        _, laq, _ = PRETRAININGS[pretraining]
        costs = [(f"tokenizer_{self.pool_tag}", STEP_SECONDS["tokenizer"] * p.tokenizer_steps)]
        if laq:
            costs += [(f"laq_{laq}_{self.pool_tag}", STEP_SECONDS[f"laq_{laq}"] * p.laq_steps),
                      (f"labels_{laq}_{self.pool_tag}",
                       EPISODE_SECONDS["label"] * len(self.tasks["pool"]) * p.videos_per_task)]
        if pretraining != "none":
            costs.append((self.pretrain_name(pretraining), STEP_SECONDS["pretrain"] * p.pretrain_steps))
        finetune = self.finetune_name(row, seed)
        evaluation = EPISODE_SECONDS[f"evaluate_{head}"] * len(self.tasks["eval"]) * p.eval_placements
        costs.append((finetune, STEP_SECONDS[f"finetune_{head}"] * p.finetune_steps_of(pretraining)
                       + self.check_seconds(row)))
        return costs + [(self.eval_name(row, seed, cap), evaluation) for cap in p.evaluation_caps(row)]

    def check_seconds(self, row: str) -> float:
        """Estimated seconds of one finetuning's held-out checks: ``select_batches`` batches at each
        of its ``finetune_steps_of / select_every`` checks."""
        p = self.protocol
        pretraining, head = parse_row(row)
        checks = -(-p.finetune_steps_of(pretraining) // p.select_every)
        return checks * p.select_batches * CHECK_BATCH_SECONDS[head]

    def pretrain_name(self, objective: str) -> str:
        inputs = self.protocol.inputs_tag
        return f"pretrain_{objective}_{self.pool_tag}" + (f"_{inputs}" if inputs else "")

    def pretraining_run(self, row: str) -> str | None:
        """Which pretraining run ``row``'s finetunings start from: the SHA-256 fingerprint of its
        pretraining stage's newest finished checkpoint in this run directory; None for a row
        without pretraining or a run directory without that checkpoint. The same stage trained
        again (another run directory, another machine: CPU training is not bit-reproducible) has
        another fingerprint, so seeds finetuned from different pretraining runs can be told apart."""
        pretraining, _ = parse_row(row)
        if pretraining == "none":
            return None
        try:
            step_dir, _ = resolve_checkpoint(self._path(self.pretrain_name(pretraining)))
        except FileNotFoundError:
            return None
        return checkpoint_fingerprint(step_dir)

    def eval_name(self, row: str, seed: int, max_step: int | None = None) -> str:
        """The evaluation stage of ``row`` with ``seed``; with ``max_step``, of its finetuning stopped
        within that many steps (``_upto<max_step>``)."""
        name = "eval_" + self.finetune_name(row, seed)[len("finetune_"):]
        return name if max_step is None else f"{name}_upto{max_step}"

    def finetune_name(self, row: str, seed: int) -> str:
        pretraining, head = parse_row(row)
        p = self.protocol
        pool = "" if pretraining == "none" else f"_{self.pool_tag}"
        inputs = f"_{p.finetune_inputs_tag}" if p.finetune_inputs_tag else ""
        batch = f"_b{p.finetune_batch_size}" if p.finetune_batch_size else ""
        return (f"finetune_{row.lower()}{pool}_{p.finetune_tasks}_k{p.demos_per_task}{inputs}_"
                f"{p.finetune_steps_of(pretraining)}steps{batch}_s{seed}")

    # ------------------------------------------------------------------ the plan

    @functools.cached_property
    def tasks(self) -> dict[str, list[str]]:
        """The Meta-World task names of the pool, the finetuning demonstrations and the evaluation."""
        from jaxvla.sim.metaworld_env import task_names  # Meta-World (MuJoCo)

        p = self.protocol
        return {"pool": task_names(p.pool_tasks), "finetune": task_names(p.finetune_tasks),
                "eval": task_names(p.eval_tasks)}

    def seed_streams(self) -> dict[str, set[int]]:
        """Environment seeds of the pool, the demonstrations (train and held-out) and the evaluation
        placements; disjoint by construction, checked here."""
        # Meta-World (and MuJoCo) load only where a simulator's tasks or episodes are needed.
        from jaxvla.sim.metaworld_env import episode_seed  # Meta-World (MuJoCo)

        p = self.protocol
        streams = {
            "pool": {episode_seed(POOL_SEED, t, i) for t in self.tasks["pool"]
                     for i in range(p.videos_per_task + 1)},
            "demos": {episode_seed(DEMO_SEED, t, i) for t in self.tasks["finetune"]
                      for i in range(p.demos_per_task + p.heldout_demos_per_task)},
            "eval": {episode_seed(EVAL_SEED_BASE, t, i) for t in self.tasks["eval"]
                     for i in range(p.eval_placements)},
        }
        names = list(streams)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                shared = streams[names[a]] & streams[names[b]]
                if shared:
                    raise ValueError(f"seed streams {names[a]} and {names[b]} share environment seeds {sorted(shared)[:5]}")
        return streams

    def plan(self, rows: Sequence[str] | None = None) -> dict[str, Any]:
        """Everything the protocol would run for ``rows`` (default: all of its rows), with estimated
        hours; trains nothing."""
        p = self.protocol
        chosen = p.rows(rows)
        self.seed_streams()
        pool_tasks, ft_tasks, eval_tasks = self.tasks["pool"], self.tasks["finetune"], self.tasks["eval"]
        videos = len(pool_tasks) * p.videos_per_task
        demos = len(ft_tasks) * p.demos_per_task
        rows = [{"row": r, "pretraining": parse_row(r)[0], "head": parse_row(r)[1], "seeds": list(p.seeds),
                 "pretrain_steps": p.pretrain_steps if parse_row(r)[0] != "none" else 0,
                 "finetune_steps": p.finetune_steps_of(parse_row(r)[0]),
                 "total_steps": p.finetune_steps_of(parse_row(r)[0]) + (
                     p.pretrain_steps if parse_row(r)[0] != "none" else 0)}
                for r in chosen]
        stages = sorted({name for r in chosen for s in p.seeds for name in self.stage_names(r, s)})
        hours = self._estimate_seconds(chosen) / 3600
        return {
            "protocol": dataclasses.asdict(p),
            "datasets": {
                "pool": {"tasks": pool_tasks, "episodes_per_task": p.videos_per_task, "episodes": videos,
                         "seed_base": POOL_SEED, "actions": "dropped (ACTIONVLA alone reads them)",
                         "path": self.pool_data},
                "demos": {"tasks": ft_tasks, "episodes_per_task": p.demos_per_task,
                          "heldout_per_task": p.heldout_demos_per_task, "episodes": demos,
                          "seed_base": DEMO_SEED, "path": self.demo_data},
                "eval": {"tasks": eval_tasks, "placements_per_task": p.eval_placements,
                         "seed_base": EVAL_SEED_BASE, "horizon": p.max_steps},
            },
            "videos_per_demo": videos / demos,
            "rows": rows,
            "stages": stages,
            "selection": f"argmin {SELECTION_METRIC} on {p.select_batches} batches of held-out demonstration "
                         f"chunks every {p.select_every} steps",
            "controls": [control_row(r, p.control_step(r)) for r in chosen if p.control_step(r) is not None],
            "estimated_hours": hours,
        }

    def _estimate_seconds(self, rows: Sequence[str] | None = None) -> float:
        """Seconds to finish ``rows`` (default: the protocol's) from what ``run_dir`` holds: the
        data still to generate and every stage of every (row, seed) not yet done, each shared
        stage counted once."""
        rows = list(rows or self.protocol.rows())
        streams = self.seed_streams()
        total = 0.0
        if self.protocol.videos_per_task and not os.path.exists(os.path.join(self.pool_data, "metaworld")):
            total += EPISODE_SECONDS["generate"] * len(streams["pool"])
        if not os.path.exists(os.path.join(self.demo_data, "metaworld")):
            total += EPISODE_SECONDS["generate"] * len(streams["demos"])
        costs = dict(pair for row in rows for seed in self.protocol.seeds for pair in self.stage_costs(row, seed))
        total += sum(seconds for name, seconds in costs.items() if self._done(name) is None)
        # Finished finetunings whose stopping point was chosen on another number of held-out
        # batches are measured again (Experiment.select).
        for row in rows:
            for seed in self.protocol.seeds:
                done = self._done(self.finetune_name(row, seed))
                if done is not None and done.get("selection_batches") != self.protocol.select_batches:
                    total += self.check_seconds(row)
        return total

    # ------------------------------------------------------------------ bookkeeping

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def _latest_step(self, name: str) -> int:
        """The newest finished checkpoint step of stage ``name`` (-1: none)."""
        steps = finished_steps(self._path(name))
        return steps[-1] if steps else -1

    def _read_record(self, name: str) -> dict | None:
        """Stage ``name``'s written record (finished or not), None without one."""
        path = os.path.join(self._path(name), "stage.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _done(self, name: str) -> dict | None:
        """Stage ``name``'s record when the stage is finished: the record is written and, for a
        trained stage, a checkpoint reaches its ``steps`` (a record over checkpoints that stop
        short, as an interrupted stage once left, is not finished)."""
        record = self._read_record(name)
        if record is None:
            return None
        if name.startswith(("labels", "eval")) or self._latest_step(name) >= record.get("steps", 0):
            return record
        return None

    def _record(self, name: str, wall: float, metrics: dict, **extra) -> dict:
        record = {"stage": name, "wall_seconds": wall, "metrics": metrics, **extra}
        os.makedirs(self._path(name), exist_ok=True)
        write_json(os.path.join(self._path(name), "stage.json"), record)
        self.stages[name] = record
        return record

    def stage_config(self, name: str, config_spec: str, overrides: dict):

        # jaxvla's own configs (jaxvla.configs), wherever jaxvla is installed and whatever the cwd.
        return apply_overrides(load_config(packaged_config_spec(config_spec)), overrides)

    def _check_not_stale(self, name: str, config) -> None:
        """Refuses to reuse (or resume) a finished stage trained with another model, data sample or
        optimiser than ``config`` says (e.g. a default changed since): it would be loaded silently.
        Compares the stage's saved ``config.json`` (written by the trainer) on ``STAGE_IDENTITY``."""
        saved_path = os.path.join(self._path(name), "config.json")
        if not os.path.exists(saved_path):
            return
        with open(saved_path) as f:
            saved = json.load(f)
        differ = stale_keys(saved, json.loads(to_json(config)))
        if differ:
            shown = "; ".join(f"{k}: trained {a!r}, now {b!r}" for k, a, b in differ[:6])
            raise ValueError(f"{self._path(name)} was trained with another configuration than {name} now has "
                             f"({shown}{'; ...' if len(differ) > 6 else ''}); remove that directory to train "
                             "it again, or choose another run_dir")

    def _trained_eval_batches(self, name: str) -> int | None:
        """``eval_batches`` of the config stage ``name`` was last trained with (None: no config)."""
        path = os.path.join(self._path(name), "config.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f).get("eval_batches")

    def _train(self, name: str, config_spec: str, overrides: dict, curve_keys=("loss",), **extra) -> dict:

        config = self.stage_config(name, config_spec, overrides)
        done = self._done(name)
        if done is not None:
            self._check_not_stale(name, config)
        if done is not None and done.get("steps") == int(config.num_steps):
            log.info("%s: reusing %s (%.0f s when trained)", name, self._path(name), done["wall_seconds"])
            self.stages[name] = done
            return done
        # A checkpoint with fewer steps is resumed and trained on to config.num_steps.
        log.info("%s: training %s for %d steps in %s", name, config_spec, config.num_steps, self._path(name))
        start = time.time()
        result = trainer.train(config, self._path(name))
        wall = time.time() - start
        if result.preempted or result.step < int(config.num_steps):
            # Recording it would reuse a half-trained stage as finished (and select, evaluate it).
            raise StageInterrupted(f"{name}: stopped at step {result.step} of {int(config.num_steps)} "
                                   f"(SIGTERM); its checkpoint is in {self._path(name)}: run the same "
                                   "command again to resume")
        metrics = {k: float(v) for k, v in result.metrics.items()}
        curve = loss_curve(os.path.join(self._path(name), "loss.png"), result.history, f"{name}: {config_spec}",
                           curve_keys)
        history = [(int(s), {k: float(v) for k, v in m.items() if k.startswith("eval/")}) for s, m in result.history]
        del result
        return self._record(name, wall, metrics, config=config_spec, steps=int(config.num_steps), loss_curve=curve,
                            eval_history=[h for h in history if h[1]], **extra)

    # ------------------------------------------------------------------ data

    def _ensure(self, path: str, tasks: str, episodes: int, heldout: int, seed: int) -> str:
        # Meta-World (MuJoCo):
        from jaxvla.data.metaworld_rlds import dataset_version_dir, make_metaworld_dataset, read_metadata
        from jaxvla.sim.metaworld_env import task_names

        version_dir = dataset_version_dir(path)
        want = {"tasks": task_names(tasks), "episodes_per_task": episodes, "val_episodes_per_task": heldout,
                "seed": seed, "image_size": self.protocol.image_size}
        if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
            log.info("generating %s: %d tasks x %d episodes (%d held out), seed base %d", path, len(want["tasks"]),
                     episodes, heldout, seed)
            make_metaworld_dataset(want["tasks"], episodes, self.protocol.image_size, path, seed=seed,
                                   val_episodes_per_task=heldout, progress=self.progress)
        config = read_metadata(version_dir).get("config", {})
        wrong = {k: (config.get(k), v) for k, v in want.items() if config.get(k) != v}
        if wrong:
            raise ValueError(f"{version_dir} was generated with other settings than the protocol needs "
                             f"(key: (found, wanted)): {wrong}; remove it or choose another --data_root")
        return version_dir

    def data(self) -> dict:
        start = time.time()
        p = self.protocol
        if p.videos_per_task > 0:
            self._ensure(self.pool_data, p.pool_tasks, p.videos_per_task + 1, 1, POOL_SEED)
        self._ensure(self.demo_data, p.finetune_tasks, p.demos_per_task + p.heldout_demos_per_task,
                     p.heldout_demos_per_task, DEMO_SEED)
        self.stages["data"] = {"stage": "data", "wall_seconds": time.time() - start, "pool": self.pool_data,
                               "demos": self.demo_data}
        return self.stages["data"]

    def pool_overrides(self, with_actions: bool = False) -> dict:
        """Data overrides of every stage that reads the pool: the action-free view unless
        ``with_actions`` (ACTIONVLA)."""
        p = self.protocol
        return {"data.data_dir": self.pool_data, "data.metaworld_tasks": p.pool_tasks,
                "data.metaworld_episodes_per_task": p.videos_per_task + 1, "data.generate_metaworld": False,
                "data.drop_actions": not with_actions}

    # ------------------------------------------------------------------ stages

    def tokenizer(self) -> dict:
        p = self.protocol
        n = p.tokenizer_steps
        # The tokenizer reads frames only (jaxvla.data.frames): no action reaches it.
        return self._train(f"tokenizer_{self.pool_tag}", "configs/tokenizer.py:small", {
            "num_steps": n, "eval_every": n, "checkpoint.every": n, "data.source": "metaworld",
            "data.data_dir": self.pool_data, "data.tasks": p.pool_tasks,
            "data.episodes_per_task": p.videos_per_task + 1,
        }, curve_keys=("loss", "psnr"))

    def laq_overrides(self, kind: str) -> dict:
        n = self.protocol.laq_steps
        return {"num_steps": n, "eval_every": n, "checkpoint.every": n, "image_every": n, **self.pool_overrides()}

    def laq(self, kind: str) -> dict:
        name = f"laq_{kind}_{self.pool_tag}"
        record = self._train(name, f"configs/laq.py:{kind}_small", self.laq_overrides(kind),
                             curve_keys=("loss", "psnr"))
        if record.get("gate", {}).get("steps") != record["steps"]:
            record = self._laq_gate(name, record)
        return record

    def _laq_gate(self, name: str, record: dict) -> dict:
        """Probe the LAQ on the pool's held-out episodes (jaxvla.laq_quality: position R^2, gain over
        task + phase, code usage, with episode-bootstrap intervals) and apply its config's gate; the
        report and the verdict go into the stage record."""

        start = time.time()
        laq = load_laq(self._path(name))
        report = laq_quality.probe(laq, self.label_data_config(laq.config), settings=laq.config.get("probe"),
                                   train_episodes_per_task=self.protocol.probe_episodes_per_task)
        passed, reasons = laq_quality.gate(report, laq.config.get("gate"))
        keep = {k: v for k, v in record.items() if k not in ("stage", "wall_seconds", "metrics")}
        keep["gate"] = {"passed": passed, "reasons": reasons, "steps": record["steps"], "report": report,
                        "seconds": time.time() - start}
        return self._record(name, record["wall_seconds"], record["metrics"], **keep)

    def check_gate(self, kind: str) -> None:
        """Raises before labelling when the LAQ failed its gate (unless the protocol ignores it)."""
        gate = self.laq(kind)["gate"]
        if gate["passed"]:
            log.info("laq_%s: gate passed", kind)
            return
        message = f"laq_{kind}_{self.pool_tag} failed its gate: " + "; ".join(gate["reasons"])
        if self.protocol.enforce_laq_gate:
            raise RuntimeError(message + " (train the LAQ longer, or pass --ignore_laq_gate to pretrain on it "
                               "anyway and publish the result with this verdict)")
        log.warning("%s; continuing (the protocol ignores the gate)", message)

    def label_data_config(self, laq_config):
        """The labeller's data config: the LAQ's, pointed at the pool's action-free view."""

        return apply_overrides(laq_config, self.pool_overrides()).data

    def labels(self, kind: str) -> dict:
        name = f"labels_{kind}_{self.pool_tag}"
        laq_steps = self.laq(kind)["steps"]
        self.check_gate(kind)
        laq_dir = self._path(f"laq_{kind}_{self.pool_tag}")
        weights = checkpoint_fingerprint(resolve_checkpoint(laq_dir)[0])
        done = self._done(name)
        # Records written before the weights were recorded carry no "laq_weights": kept as they are.
        if (done is not None and done.get("laq_steps") == laq_steps
                and done.get("laq_weights", weights) == weights):
            self.stages[name] = done
            return done

        start = time.time()
        laq = load_laq(laq_dir)
        out = self._path(name) + "/labels"
        label = functools.partial(label_dataset, laq, self.label_data_config(laq.config), out, split="train,val",
                                  overwrite=True, progress=self.progress)
        try:
            # An interrupted labelling continues from its finished shards (900 pool episodes take
            # about 10 minutes on 2 cores), but only with the very LAQ that labelled them.
            label(resume=True)
        except LabelResumeError as error:
            log.warning("%s: %s; labelling again from the start", name, error)
            label(resume=False)
        return self._record(name, time.time() - start, {}, labels=out, laq_steps=laq_steps, laq_weights=weights)

    def input_overrides(self, finetuning: bool) -> dict:
        """The protocol's inputs (frame history; state when ``finetuning``) as config overrides, with
        the row lengths they need. Rows hold one example each (``sequences.packing_layout``'s
        choice, and these lengths leave room for no second): every example of a row takes the
        longest example's length, so two a row pad exactly as much as one a row and only add the
        dense attention between them (measured with
        ``scripts/bench_train_step.py``: a bins finetuning step 2087 -> 1384 ms, a LAPA pretraining
        step 1530 -> 1321 ms). With k = 7 a LAPA / ACTIONVLA example is about 187 tokens, a ViPRA
        one about 301 (a 41-id ML45 prompt; rows of 320); in finetuning, with state (a 60-id
        prompt), a bins example is at most 258 tokens and a flow one 210 (rows of 272)."""
        p = self.protocol
        overrides = {"model.history_frames": 1 if p.history_stride else 0}
        if p.history_stride:
            overrides["model.history_stride"] = p.history_stride
        if not finetuning:
            return {**overrides, "model.seq_len": 320 if p.history_stride else 256,
                    "model.pack_prompt_tokens": self.pool_prompt_tokens}
        overrides["model.seq_len"] = 272
        if p.state_dims:
            # The state text takes up to 19 more prompt ids for 4 dims (stages.finetune checks it),
            # and MT50's longest instruction 5 more than MT10's: 60 fits every Meta-World task.
            overrides.update({"model.state_dims": p.state_dims, "model.prompt_tokens": 60})
        return overrides

    @functools.cached_property
    def pool_prompt_tokens(self) -> int:
        """Pretraining's prompt budget (``model.pack_prompt_tokens``): the longest prompt of the
        pool's tasks, at least the config's 36 (MT10's longest is 34; ML45's pick-place-wall is 41)."""
        prompts = TextPrompts()
        return max([36] + [len(prompts(instruction(task))) for task in self.tasks["pool"]])

    def pretrain_overrides(self, objective: str) -> dict:
        n = self.protocol.pretrain_steps
        overrides = {"num_steps": n, "eval_every": n, "checkpoint.every": n,
                     "model.tokenizer_checkpoint": self._path(f"tokenizer_{self.pool_tag}"),
                     **self.input_overrides(finetuning=False),
                     **self.pool_overrides(with_actions=PRETRAININGS[objective][2])}
        laq = PRETRAININGS[objective][1]
        if laq:
            overrides.update({"model.latent_source": "labels",
                              "model.labels_dir": self._path(f"labels_{laq}_{self.pool_tag}") + "/labels",
                              "model.laq_checkpoint": self._path(f"laq_{laq}_{self.pool_tag}")})
        return overrides

    def pretrain(self, objective: str) -> dict:
        self.tokenizer()
        laq = PRETRAININGS[objective][1]
        if laq:
            self.labels(laq)
        return self._train(self.pretrain_name(objective), f"configs/pretrain.py:{objective}_small",
                           self.pretrain_overrides(objective))

    def finetune_overrides(self, row: str, seed: int) -> tuple[str, dict]:
        pretraining, head = parse_row(row)
        p = self.protocol
        n = p.finetune_steps_of(pretraining)
        every = p.select_every
        overrides = {"num_steps": n, "eval_every": every, "checkpoint.every": every,
                     "eval_batches": p.select_batches,
                     # Every evaluated step stays, so the selected one can be evaluated.
                     "checkpoint.max_to_keep": n // every + 2, "seed": seed,
                     "model.tokenizer_checkpoint": self._path(f"tokenizer_{self.pool_tag}"),
                     "data.data_dir": self.demo_data, "data.metaworld_tasks": p.finetune_tasks,
                     "data.metaworld_episodes_per_task": p.demos_per_task + p.heldout_demos_per_task,
                     "data.few_demos_per_task": p.demos_per_task, "data.generate_metaworld": False,
                     **self.input_overrides(finetuning=True)}
        if p.finetune_batch_size:
            overrides["batch_size"] = p.finetune_batch_size
        if pretraining == "none":
            return f"configs/finetune.py:scratch_{head}_small", overrides
        overrides["init_from"] = self._path(self.pretrain_name(pretraining))
        return f"configs/finetune.py:{head}_small", overrides

    def finetune(self, row: str, seed: int) -> dict:
        pretraining, _ = parse_row(row)
        self.tokenizer()
        if pretraining != "none":
            self.pretrain(pretraining)
        spec, overrides = self.finetune_overrides(row, seed)
        name = self.finetune_name(row, seed)
        record = self._train(name, spec, overrides, held_out_batches=self.protocol.select_batches)
        if "selected_step" not in record or record.get("selection_batches") != self.protocol.select_batches:
            record = self.select(name, record)
        return record

    def select(self, name: str, record: dict) -> dict:
        """Chooses finetuning ``name``'s stopping point: the kept checkpoint with the lowest
        :data:`SELECTION_METRIC` on ``select_batches`` held-out batches. Steps its training history
        measured on that many batches are taken from it; the others (a run trained with another
        ``select_batches``, or the steps before a resume, which the history of the resumed run does
        not hold) are measured again from their checkpoints (``trainer.evaluate_checkpoints``). An
        earlier choice made on another number of batches is kept in the record as
        ``earlier_selection``; the evaluation stage reruns when the chosen step changes."""
        p = self.protocol
        path = self._path(name)
        measured = {}
        if record.get("held_out_batches") == p.select_batches:
            measured = {int(s): m for s, m in record.get("eval_history", []) if SELECTION_METRIC in m}
        # The candidates are the checks' grid (every select_every steps, and the last step): a
        # checkpoint saved where a SIGTERM stopped the run is not one of them, and the rule must
        # not get more candidates in an interrupted run than in an uninterrupted one.
        steps = int(record.get("steps", 0))
        grid = sorted({s for s in range(p.select_every, steps + 1, p.select_every)} | {steps})
        on_disk = finished_steps(path)
        kept = [s for s in on_disk if s in grid]
        off_grid = [s for s in on_disk if s not in grid]
        missing = [s for s in grid if s not in on_disk]
        if off_grid:
            log.warning("%s: kept checkpoints %s are off the %d-step grid (an interrupted run): not candidates",
                        name, off_grid, p.select_every)
        if missing:
            log.warning("%s: the checkpoints of steps %s are gone; choosing among %s", name, missing, kept)
        todo = [s for s in kept if s not in measured]
        if todo:
            log.info("%s: measuring %s on %d held-out batches at kept steps %s", name, SELECTION_METRIC,
                     p.select_batches, todo)
            measured.update(trainer.evaluate_checkpoints(path, todo, p.select_batches))
        step, curve = select_step([(s, measured[s]) for s in kept])
        extra = {k: v for k, v in record.items()
                 if k not in ("stage", "wall_seconds", "metrics", "selected_step", "selection_curve",
                              "selection_batches", "earlier_selection", "selection_missing_steps")}
        if "selected_step" in record and record.get("selection_batches") != p.select_batches:
            earlier_batches = record.get("selection_batches") or self._trained_eval_batches(name)
            extra["earlier_selection"] = {"batches": earlier_batches, "selected_step": record["selected_step"],
                                          "curve": record.get("selection_curve")}
        elif "earlier_selection" in record:
            extra["earlier_selection"] = record["earlier_selection"]
        if missing:
            extra["selection_missing_steps"] = missing
        return self._record(name, record["wall_seconds"], record["metrics"], **extra, selected_step=step,
                            selection_curve=curve, selection_batches=p.select_batches)

    def evaluated_step(self, record: dict, max_step: int | None = None) -> int:
        """The step a finetuning (its stage ``record``) is evaluated at: its chosen step or, with
        ``max_step``, the one the same rule chooses among its measured steps up to ``max_step``."""
        if max_step is None:
            return int(record["selected_step"])
        curve = [(s, {SELECTION_METRIC: v}) for s, v in record["selection_curve"] if s <= max_step]
        return select_step(curve)[0]

    def _current(self, evaluation: dict | None, settings: dict, finetune: str) -> bool:
        """Whether a finished ``evaluation`` record measured what ``settings`` asks, on the
        checkpoint that is there now: a finetuning trained again has other checkpoint digests at
        the same step. Records written before they carried the fingerprint are taken as they are."""
        if evaluation is None or evaluation.get("settings") != settings:
            return False
        recorded = evaluation.get("checkpoint_fingerprint")
        if recorded is None:
            return True
        try:
            step_dir, _ = resolve_checkpoint(self._path(finetune), settings["step"])
        except FileNotFoundError:
            log.warning("%s: the evaluated checkpoint (step %d) is gone; its evaluation is kept as recorded",
                        finetune, settings["step"])
            return True
        return checkpoint_fingerprint(step_dir) == recorded

    def evaluate(self, row: str, seed: int, max_step: int | None = None) -> dict:
        """Evaluates ``row`` with ``seed`` at the fixed placements, from its finetuning's chosen
        step or, with ``max_step``, from the step the same rule chooses among the measured steps
        up to ``max_step`` (the equal-finetuning control; its episodes are named
        :func:`control_row`)."""
        finetune = self.finetune_name(row, seed)
        name = self.eval_name(row, seed, max_step)
        record = self.finetune(row, seed)
        p = self.protocol
        step = self.evaluated_step(record, max_step)
        published = row if max_step is None else control_row(row, max_step)
        settings = self.evaluation_settings(step)
        done = self._done(name)
        if self._current(done, settings, finetune):
            self.stages[name] = done
            return done
        if max_step is not None:
            # The control stops where the finetuning did: the same checkpoint at the same
            # placements, its episodes under the control's name.
            primary = self._done(self.eval_name(row, seed))
            if self._current(primary, settings, finetune):
                episodes = [dict(e, row=published) for e in primary["episodes"]]
                kept = {k: v for k, v in primary.items() if k not in ("stage", "wall_seconds", "metrics", "episodes")}
                return self._record(name, 0.0, {}, **kept, episodes=episodes, same_as=self.eval_name(row, seed))

        start = time.time()
        selected, _ = resolve_checkpoint(self._path(finetune), step)
        fingerprint = checkpoint_fingerprint(selected)
        summary = evaluate(selected, p.eval_tasks, p.eval_placements,
                           max_steps=p.max_steps, out_dir=self._path(name), progress=self.progress)
        episodes = [{"row": published, "seed": seed, "task": e["task"], "placement": e["episode"],
                     "env_seed": e["seed"], "success": bool(e["success"]), "length": int(e["length"])}
                    for e in summary["episodes"]]
        return self._record(name, time.time() - start, {}, settings=settings, mean=summary["mean"],
                            tasks=summary["tasks"], latency=summary["latency"], episodes=episodes,
                            files=summary["files"], checkpoint_fingerprint=fingerprint)

    def evaluation_settings(self, step: int) -> dict:
        """What an evaluation stage measured: the placements, the horizon and the step; a finished
        evaluation is reused only for the same."""
        p = self.protocol
        return {"tasks": p.eval_tasks, "placements": p.eval_placements, "max_steps": p.max_steps, "step": int(step)}

    # ------------------------------------------------------------------ the whole protocol

    SHARED_STAGES = ("tokenizer", "labels", "pretrain")

    def prepare(self, until: str, rows: Sequence[str] | None = None) -> None:
        """The stages every seed shares, up to ``until`` (``SHARED_STAGES``): ``tokenizer``; ``labels``
        (also both LAQs, gated, and their labels); ``pretrain`` (also every pretraining of ``rows``).
        What a long run can do before, or apart from, its finetuning runs."""
        if until not in self.SHARED_STAGES:
            raise ValueError(f"until={until!r}; expected one of {self.SHARED_STAGES}")
        rows = list(rows or self.protocol.rows())
        pretrainings = list(dict.fromkeys(parse_row(r)[0] for r in rows))
        self.data()
        self.tokenizer()
        if until == "tokenizer":
            return
        for pretraining in pretrainings:
            laq = PRETRAININGS[pretraining][1]
            if laq:
                self.labels(laq)
        if until == "pretrain":
            for pretraining in pretrainings:
                if pretraining != "none":
                    self.pretrain(pretraining)

    def run(self, rows: Sequence[str] | None = None) -> list[dict]:
        """Every (row, seed) of the protocol (or of ``rows``), reusing finished stages; returns the
        per-episode records."""
        rows = list(rows or self.protocol.rows())
        for row in rows:
            parse_row(row)
        self.data()
        total = len(rows) * len(self.protocol.seeds)
        done = 0
        for row in rows:
            for seed in self.protocol.seeds:
                done += 1
                log.info("=== %s seed %d (%d/%d) ===", row, seed, done, total)
                for cap in self.protocol.evaluation_caps(row):
                    self.evaluate(row, seed, cap)
        return self.records(rows)

    def records(self, rows: Sequence[str] | None = None) -> list[dict]:
        """The per-episode records (row, seed, task, placement, env_seed, success, length) of the
        finished evaluations of ``rows`` (default: the protocol's), equal-finetuning controls
        included."""
        out = []
        for row in rows or self.protocol.rows():
            for seed in self.protocol.seeds:
                # The finetuning's record (its checkpoints may since have been removed).
                finetune = self._read_record(self.finetune_name(row, seed))
                for cap in self.protocol.evaluation_caps(row):
                    name = self.eval_name(row, seed, cap)
                    done = self._done(name)
                    if done is None:
                        continue
                    # Only an evaluation of the step its finetuning chooses now, on the checkpoint
                    # there now: one left behind by a moved selection or a retrained run is not
                    # published (the next run evaluates again).
                    if (finetune is None or "selected_step" not in finetune or not self._current(
                            done, self.evaluation_settings(self.evaluated_step(finetune, cap)),
                            self.finetune_name(row, seed))):
                        log.warning("%s: not published: it does not evaluate the current choice of %s",
                                    name, self.finetune_name(row, seed))
                        continue
                    out.extend(done["episodes"])
        return out

    def selection_curves(self, rows: Sequence[str] | None = None) -> list[dict]:
        """For every finetuning of ``rows`` (default: the protocol's) whose stage record is written:
        ``row``, ``seed``, ``selected_step`` and ``curve``, the held-out selection metric
        (:data:`SELECTION_METRIC`) at each evaluated step as ``[step, value]`` pairs, measured on
        ``batches`` held-out batches: how each row's finetuning converged, beside its success."""
        out = []
        for row in rows or self.protocol.rows():
            for seed in self.protocol.seeds:
                path = os.path.join(self._path(self.finetune_name(row, seed)), "stage.json")
                if not os.path.exists(path):
                    continue
                with open(path) as f:
                    record = json.load(f)
                if "selection_curve" in record:
                    batches = record.get("selection_batches") or self._trained_eval_batches(
                        self.finetune_name(row, seed))
                    out.append({"row": row, "seed": seed, "metric": SELECTION_METRIC, "batches": batches,
                                "selected_step": int(record["selected_step"]),
                                "curve": [[int(step), float(value)] for step, value in record["selection_curve"]]})
        return out


def format_plan(plan: dict) -> str:
    """The plan as text: datasets, rows, steps, selection, estimated hours."""
    d = plan["datasets"]
    p = plan["protocol"]
    lines = [f"protocol {p['name']}", "", "datasets (three disjoint seed streams):"]
    pool = d["pool"]
    lines.append(f"  video pool   {len(pool['tasks'])} tasks ({p['pool_tasks']}) x {pool['episodes_per_task']} = "
                 f"{pool['episodes']} episodes, seed base {pool['seed_base']}, actions {pool['actions']}")
    demos = d["demos"]
    lines.append(f"  demos        {len(demos['tasks'])} tasks ({p['finetune_tasks']}) x K={demos['episodes_per_task']} = "
                 f"{demos['episodes']} episodes (+{demos['heldout_per_task']} held out per task), "
                 f"seed base {demos['seed_base']}")
    ev = d["eval"]
    lines.append(f"  evaluation   {len(ev['tasks'])} tasks ({p['eval_tasks']}) x {ev['placements_per_task']} fixed "
                 f"placements, seed base {ev['seed_base']}, horizon {ev['horizon']}")
    lines.append(f"  videos per demonstration: {plan['videos_per_demo']:.1f}")
    lines += ["", "rows (finetuning seeds, steps):"]
    for r in plan["rows"]:
        lines.append(f"  {r['row']:<16} head {r['head']:<5} seeds {r['seeds']}  pretrain {r['pretrain_steps']:>5}  "
                     f"finetune {r['finetune_steps']:>5}  total {r['total_steps']:>5}")
    inputs = [f"frame history o_(t-{p['history_stride']}), o_t in pretraining and finetuning"
              if p["history_stride"] else "the current frame alone"]
    if p["state_dims"]:
        inputs.append(f"proprioceptive state (dims {p['state_dims']}) in the finetuning prompt (our deviation)")
    lines += ["", "policy inputs: " + "; ".join(inputs)]
    lines += ["", f"stage steps: tokenizer {p['tokenizer_steps']}, LAQ {p['laq_steps']}, pretraining "
                  f"{p['pretrain_steps']}, finetuning {p['finetune_steps']} (+{p['pretrain_steps']} for SCRATCH)",
              f"stopping point: {plan['selection']}",
              *([f"equal-finetuning controls (secondary, evaluation only): {', '.join(plan['controls'])} = SCRATCH "
                 f"stopped within the pretrained rows' {p['finetune_steps']} finetuning steps"]
                if plan.get("controls") else []),
              f"stages to train or evaluate: {len(plan['stages'])}",
              f"estimated time: {plan['estimated_hours']:.1f} h on 2 CPU cores (finished stages excluded)"]
    return "\n".join(lines)
