"""The whole method end to end on the embedded Meta-World data: what ``make demo`` and
``scripts/reproduce.py`` run.

    exp = Experiment("runs/demo", BUDGETS["demo"])
    row = exp.run_row("VIPRA-FM")   # data -> tokenizer -> LAQ -> labels -> pretrain -> finetune -> eval

Rows (the comparison of LAPA / ViPRA at CPU scale):

=========  =================================================  ==================
row        pretraining (action-free videos)                   finetuning head
=========  =================================================  ==================
SCRATCH    none                                               ``scratch_head``
LAPA       LAPA LAQ (pairs) -> labels -> LAPA objective       bins
VIPRA-AR   ViPRA LAQ (clips) -> labels -> ViPRA objective     bins
VIPRA-FM   the same pretrained backbone as VIPRA-AR           flow (chunk 14)
ACTIONVLA  ground-truth action bins (the upper bound)         bins
=========  =================================================  ==================

Every stage trains into its own directory under ``run_dir`` with the small configs and the
budget's step counts, and records ``stage.json`` (wall time, final metrics, loss-curve PNG);
a stage whose ``stage.json`` and checkpoint exist is reused, so rows share the tokenizer, LAQs,
labels and pretrained backbones, and an interrupted run continues where it stopped.

Data: the video dataset (``video_tasks`` x ``videos_per_task`` expert episodes rendered at
64 px, actions unused before finetuning) and the demonstrations (the first ``demos_per_task``
episodes of each MT10 task). When the tasks are the same, one dataset serves both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

from jaxvla.io.files import write_json
from jaxvla.tracking import save_figure

log = logging.getLogger("jaxvla")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = {
    "SCRATCH": {"laq": None, "pretrain": None, "head": None},
    "LAPA": {"laq": "lapa", "pretrain": "lapa", "head": "bins"},
    "VIPRA-AR": {"laq": "vipra", "pretrain": "vipra", "head": "bins"},
    "VIPRA-FM": {"laq": "vipra", "pretrain": "vipra", "head": "flow"},
    "ACTIONVLA": {"laq": None, "pretrain": "actionvla", "head": "bins"},
}


@dataclasses.dataclass(frozen=True)
class Budget:
    tokenizer_steps: int
    laq_steps: int
    pretrain_steps: int
    finetune_steps: int
    video_tasks: str = "mt10"
    videos_per_task: int = 5
    demos_per_task: int = 2
    eval_tasks: str = "mt10"
    eval_episodes: int = 5
    max_steps: int = 150
    scratch_head: str = "flow"


BUDGETS = {
    # make demo: every stage once, under 20 minutes on 2 CPU cores.
    "demo": Budget(tokenizer_steps=200, laq_steps=200, pretrain_steps=200, finetune_steps=200, eval_episodes=1),
    # scripts/reproduce.py default: the five rows in about an hour on top of a demo run (its
    # tokenizer, ViPRA LAQ, labels and pretraining are reused); finetuning on all 4 train episodes.
    "hour": Budget(tokenizer_steps=200, laq_steps=200, pretrain_steps=200, finetune_steps=400, demos_per_task=4,
                   eval_episodes=3),
    # Longer training, 10 demonstrations per task, more evaluation episodes.
    "overnight": Budget(tokenizer_steps=2000, laq_steps=3000, pretrain_steps=3000, finetune_steps=2000,
                        video_tasks="mt10", videos_per_task=20, demos_per_task=10, eval_episodes=20, max_steps=200),
}


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


class Experiment:
    """Stages of the method under one run directory; see the module docstring."""

    def __init__(self, run_dir: str, budget: Budget, data_root: str = "runs/data", progress: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        self.budget = budget
        self.progress = progress
        os.makedirs(self.run_dir, exist_ok=True)
        b = budget
        # 5 MT10 episodes per task is the configs' default dataset (runs/data/metaworld_mt10_64).
        suffix = "" if b.videos_per_task == 5 else f"_{b.videos_per_task}ep"
        self.video_data = os.path.join(data_root, f"metaworld_{b.video_tasks}{suffix}_64")
        same = b.video_tasks == "mt10" and b.videos_per_task >= b.demos_per_task
        self.demo_data = self.video_data if same else os.path.join(data_root, f"metaworld_mt10_{b.demos_per_task}ep_64")
        self.stages: dict[str, dict] = {}

    # ------------------------------------------------------------------ bookkeeping

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def _done(self, name: str) -> dict | None:
        from jaxvla.stages.vla import has_checkpoint

        record = os.path.join(self._path(name), "stage.json")
        if os.path.exists(record) and (name.startswith(("labels", "eval")) or has_checkpoint(self._path(name))):
            with open(record) as f:
                return json.load(f)
        return None

    def _record(self, name: str, wall: float, metrics: dict, **extra) -> dict:
        record = {"stage": name, "wall_seconds": wall, "metrics": metrics, **extra}
        os.makedirs(self._path(name), exist_ok=True)
        write_json(os.path.join(self._path(name), "stage.json"), record)
        self.stages[name] = record
        return record

    def _train(self, name: str, config_spec: str, overrides: dict, curve_keys=("loss",)) -> dict:
        from jaxvla.config import apply_overrides, load_config
        from jaxvla.trainer import train

        config = apply_overrides(load_config(os.path.join(REPO, config_spec)), overrides)
        done = self._done(name)
        if done is not None and done.get("steps") == int(config.num_steps):
            log.info("%s: reusing %s (%.0f s when trained)", name, self._path(name), done["wall_seconds"])
            self.stages[name] = done
            return done
        # A checkpoint with fewer steps is resumed and trained on to config.num_steps.
        log.info("%s: training %s for %d steps in %s", name, config_spec, config.num_steps, self._path(name))
        start = time.time()
        result = train(config, self._path(name))
        wall = time.time() - start
        metrics = {k: float(v) for k, v in result.metrics.items()}
        curve = loss_curve(os.path.join(self._path(name), "loss.png"), result.history, f"{name}: {config_spec}",
                           curve_keys)
        del result
        return self._record(name, wall, metrics, config=config_spec, steps=int(config.num_steps), loss_curve=curve)

    # ------------------------------------------------------------------ stages

    def data(self) -> dict:
        from jaxvla.data.embedded import ensure_metaworld_dataset

        start = time.time()
        b = self.budget
        ensure_metaworld_dataset(self.video_data, b.video_tasks, b.videos_per_task, 64)
        if self.demo_data != self.video_data:
            ensure_metaworld_dataset(self.demo_data, "mt10", b.demos_per_task, 64)
        wall = time.time() - start
        self.stages["data"] = {"stage": "data", "wall_seconds": wall, "videos": self.video_data,
                               "demos": self.demo_data}
        return self.stages["data"]

    def _video_overrides(self) -> dict:
        b = self.budget
        return {"data.data_dir": self.video_data, "data.metaworld_tasks": b.video_tasks,
                "data.metaworld_episodes_per_task": b.videos_per_task}

    def tokenizer(self) -> dict:
        b = self.budget
        n = b.tokenizer_steps
        return self._train("tokenizer", "configs/tokenizer.py:small", {
            "num_steps": n, "eval_every": n, "checkpoint.every": n, "data.source": "metaworld",
            "data.data_dir": self.video_data, "data.tasks": b.video_tasks, "data.episodes_per_task": b.videos_per_task,
        }, curve_keys=("loss", "psnr"))

    def laq(self, kind: str) -> dict:
        n = self.budget.laq_steps
        return self._train(f"laq_{kind}", f"configs/laq.py:{kind}_small", {
            "num_steps": n, "eval_every": n, "checkpoint.every": n, "image_every": n, **self._video_overrides(),
        }, curve_keys=("loss", "psnr"))

    def labels(self, kind: str) -> dict:
        name = f"labels_{kind}"
        laq_steps = self.laq(kind)["steps"]
        done = self._done(name)
        if done is not None and done.get("laq_steps") == laq_steps:
            self.stages[name] = done
            return done
        from jaxvla.latent_actions import label_dataset, load_laq

        start = time.time()
        laq = load_laq(self._path(f"laq_{kind}"))
        data = laq.config.data
        data.unlock()
        data.data_dir = self.video_data
        out = self._path(name) + "/labels"
        label_dataset(laq, data, out, split="train,val", overwrite=True, progress=self.progress)
        return self._record(name, time.time() - start, {}, labels=out, laq_steps=laq_steps)

    def pretrain(self, objective: str) -> dict:
        n = self.budget.pretrain_steps
        overrides = {"num_steps": n, "eval_every": n, "checkpoint.every": n,
                     "model.tokenizer_checkpoint": self._path("tokenizer"), **self._video_overrides()}
        self.tokenizer()
        if objective != "actionvla":
            labels = self.labels(objective)
            overrides.update({"model.latent_source": "labels", "model.labels_dir": labels["labels"],
                              "model.laq_checkpoint": self._path(f"laq_{objective}")})
        return self._train(f"pretrain_{objective}", f"configs/pretrain.py:{objective}_small", overrides)

    def finetune_name(self, row: str) -> str:
        """``finetune_<row>_<steps>x<demos>``: budgets that finetune differently share the
        pretraining stages but never a finetuning run."""
        return f"finetune_{row.lower()}_{self.budget.finetune_steps}x{self.budget.demos_per_task}"

    def finetune(self, row: str) -> dict:
        spec = ROWS[row]
        b = self.budget
        head = spec["head"] or b.scratch_head
        n = b.finetune_steps
        overrides = {"num_steps": n, "eval_every": n, "checkpoint.every": n,
                     "model.tokenizer_checkpoint": self._path("tokenizer"), "data.data_dir": self.demo_data,
                     "data.metaworld_tasks": "mt10",
                     "data.metaworld_episodes_per_task": b.videos_per_task if self.demo_data == self.video_data
                     else b.demos_per_task,
                     "data.few_demos_per_task": b.demos_per_task}
        self.tokenizer()
        if spec["pretrain"]:
            self.pretrain(spec["pretrain"])
            overrides["init_from"] = self._path(f"pretrain_{spec['pretrain']}")
            variant = f"{head}_small"
        else:
            variant = f"scratch_{head}_small"
        return self._train(self.finetune_name(row), f"configs/finetune.py:{variant}", overrides)

    def evaluate(self, row: str) -> dict:
        name = self.finetune_name(row).replace("finetune_", "eval_", 1)
        self.finetune(row)
        b = self.budget
        done = self._done(name)
        settings = {"tasks": b.eval_tasks, "episodes": b.eval_episodes, "max_steps": b.max_steps,
                    "finetune_steps": self.stages[self.finetune_name(row)]["steps"]}
        if done is not None and done.get("settings") == settings:
            self.stages[name] = done
            return done
        from jaxvla.evaluation import evaluate

        start = time.time()
        summary = evaluate(self._path(self.finetune_name(row)), b.eval_tasks, b.eval_episodes, max_steps=b.max_steps,
                           out_dir=self._path(name), progress=self.progress)
        keep = {k: summary[k] for k in ("tasks", "mean", "latency", "files")}
        return self._record(name, time.time() - start, {}, settings=settings, **keep)

    # ------------------------------------------------------------------ rows

    def stages_of(self, row: str) -> list[str]:
        spec = ROWS[row]
        names = ["tokenizer"]
        if spec["laq"]:
            names += [f"laq_{spec['laq']}", f"labels_{spec['laq']}"]
        if spec["pretrain"]:
            names.append(f"pretrain_{spec['pretrain']}")
        finetune = self.finetune_name(row)
        return names + [finetune, finetune.replace("finetune_", "eval_", 1)]

    def run_row(self, row: str) -> dict:
        """Every stage ``row`` needs (reusing finished ones), then its evaluation; returns the
        row's success (mean, CI, per task) and its wall time: the sum over its stages, shared
        ones included (the time to produce this row from the data alone)."""
        if row not in ROWS:
            raise ValueError(f"unknown row {row!r}; expected one of {list(ROWS)}")
        if "data" not in self.stages:
            self.data()
        result = self.evaluate(row)
        wall = sum(self.stages[name]["wall_seconds"] for name in self.stages_of(row))
        return {"row": row, "head": ROWS[row]["head"] or self.budget.scratch_head, "mean": result["mean"],
                "tasks": result["tasks"], "latency": result["latency"], "files": result["files"],
                "wall_seconds": wall, "stages": self.stages_of(row)}
