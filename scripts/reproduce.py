"""The LAPA / ViPRA comparison at CPU scale on Meta-World: pretrain on action-free videos, finetune
on a few demonstrations per MT10 task, evaluate on MT10.

    python scripts/reproduce.py [--budget=hour|overnight|demo] [--run_dir=runs/reproduce]
        [--rows=SCRATCH,LAPA,VIPRA-AR,VIPRA-FM,ACTIONVLA] [--eval_episodes=N] [--steps=N]

Rows (``jaxvla/experiment.py``): SCRATCH (no pretraining), LAPA (LAPA LAQ + objective, bins
head), VIPRA-AR (ViPRA LAQ + objective, bins head), VIPRA-FM (the same backbone, flow-matching
head), ACTIONVLA (pretrained on ground-truth action bins: the upper bound). Budgets:

* ``hour``: the demo's stages (200 steps each, 5 videos and 2 demos per task) with 3 evaluation
  episodes per task; about an hour on 2 CPU cores, less when ``--run_dir`` holds a finished
  ``make demo`` run (its stages are reused: ``--run_dir=runs/demo``).
* ``overnight``: 2000-3000 steps per stage, 20 videos and 10 demos per task, 20 episodes per task.

Writes ``RESULTS.md`` (the table: mean success +- Wilson 95 % CI, wall time, per-task successes),
``comparison.png`` (bar plot) and ``results.json`` into ``--run_dir``; finished stages and rows are
reused, so an interrupted run continues.
"""

from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("budget", "hour", "hour | overnight | demo (jaxvla.experiment.BUDGETS).")
flags.DEFINE_string("run_dir", "runs/reproduce", "Where every stage and the results go.")
flags.DEFINE_string("data_root", "runs/data", "Where the Meta-World datasets are (generated when missing).")
flags.DEFINE_string("rows", "SCRATCH,LAPA,VIPRA-AR,VIPRA-FM,ACTIONVLA", "Rows to run, in order.")
flags.DEFINE_integer("eval_episodes", 0, "Evaluation episodes per task (0: the budget's).")
flags.DEFINE_integer("max_steps", 0, "Episode horizon (0: the budget's).")
flags.DEFINE_integer("steps", 0, "Training steps of every stage (0: the budget's).")
flags.DEFINE_integer("demos_per_task", 0, "Finetuning demonstrations per MT10 task (0: the budget's).")
flags.DEFINE_integer("videos_per_task", 0, "Action-free videos per task for pretraining (0: the budget's).")
FLAGS = flags.FLAGS

DESCRIPTIONS = {
    "SCRATCH": "no pretraining",
    "LAPA": "LAPA latent actions (pairs)",
    "VIPRA-AR": "ViPRA latent actions (clips) + future frame",
    "VIPRA-FM": "ViPRA latent actions (clips) + future frame",
    "ACTIONVLA": "ground-truth action bins",
}


def budget_from_flags():
    from jaxvla.experiment import BUDGETS

    if FLAGS.budget not in BUDGETS:
        raise app.UsageError(f"--budget={FLAGS.budget!r}; expected one of {sorted(BUDGETS)}")
    budget = BUDGETS[FLAGS.budget]
    changes = {}
    if FLAGS.eval_episodes:
        changes["eval_episodes"] = FLAGS.eval_episodes
    if FLAGS.max_steps:
        changes["max_steps"] = FLAGS.max_steps
    if FLAGS.steps:
        changes.update(tokenizer_steps=FLAGS.steps, laq_steps=FLAGS.steps, pretrain_steps=FLAGS.steps,
                       finetune_steps=FLAGS.steps)
    if FLAGS.demos_per_task:
        changes["demos_per_task"] = FLAGS.demos_per_task
    if FLAGS.videos_per_task:
        changes["videos_per_task"] = FLAGS.videos_per_task
    return dataclasses.replace(budget, **changes)


def markdown(results: list[dict], budget, date: str) -> str:
    b = budget
    lines = [
        f"# LAPA / ViPRA comparison on Meta-World MT10 ({date})",
        "",
        f"Budget: tokenizer {b.tokenizer_steps}, LAQ {b.laq_steps}, pretraining {b.pretrain_steps}, finetuning "
        f"{b.finetune_steps} steps; pretraining videos: {b.video_tasks} x {b.videos_per_task} episodes; "
        f"finetuning: {b.demos_per_task} demos per MT10 task; evaluation: {b.eval_tasks} x {b.eval_episodes} episodes "
        f"(horizon {b.max_steps} steps) at held-out placements.",
        "",
        "| row | pretraining | head | MT10 success | 95 % CI | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["mean"]
        lines.append(f"| {r['row']} | {DESCRIPTIONS[r['row']]} | {r['head']} | {m['successes']}/{m['episodes']} "
                     f"({m['success_rate']:.1%}) | [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] | "
                     f"{r['wall_seconds'] / 60:.1f} min |")
    lines += ["", "Wall time: every stage the row needs (shared stages counted in each row), 2 CPU cores.", "",
              "Successes per task:", ""]
    tasks = list(results[0]["tasks"]) if results else []
    lines.append("| row | " + " | ".join(tasks) + " |")
    lines.append("|---" * (len(tasks) + 1) + "|")
    for r in results:
        lines.append(f"| {r['row']} | " + " | ".join(f"{r['tasks'][t]['successes']}/{r['tasks'][t]['episodes']}"
                                                     for t in tasks) + " |")
    lines += ["", "Policy latency (ms per call, inference only):", ""]
    lines += [f"- {r['row']}: {r['latency']['ms_per_call']:.0f} ms, {r['latency']['actions_per_call']:.1f} actions "
              f"per call" for r in results]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import logging

    logging.getLogger("jaxvla").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxvla import compilation_cache

    compilation_cache.enable()  # $JAXVLA_COMPILATION_CACHE, else ~/.cache/jaxvla/xla; "off" disables
    from jaxvla.evaluation import bar_plot
    from jaxvla.experiment import ROWS, Experiment
    from jaxvla.io.files import write_json, write_text

    rows = [r.strip().upper() for r in FLAGS.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"--rows: unknown {unknown}; expected some of {list(ROWS)}")
    budget = budget_from_flags()
    exp = Experiment(FLAGS.run_dir, budget, data_root=FLAGS.data_root)
    start = time.time()
    results = []
    for row in rows:
        logging.getLogger("jaxvla").info("=== %s (%d/%d) ===", row, len(results) + 1, len(rows))
        results.append(exp.run_row(row))
        print(f"{row}: {results[-1]['mean']['successes']}/{results[-1]['mean']['episodes']} successes", flush=True)

    date = time.strftime("%Y-%m-%d")
    text = markdown(results, budget, date)
    out = exp.run_dir
    write_text(os.path.join(out, "RESULTS.md"), text)
    bar_plot(os.path.join(out, "comparison.png"), [r["row"] for r in results],
             [r["mean"]["success_rate"] for r in results], [r["mean"]["ci95"] for r in results],
             f"Meta-World MT10 success ({budget.eval_episodes} episodes per task, {date})")
    write_json(os.path.join(out, "results.json"), {"date": date, "budget": dataclasses.asdict(budget),
                                                   "rows": results, "wall_seconds": time.time() - start})
    print("\n" + text)
    print(f"Files: {out}/RESULTS.md, {out}/comparison.png, {out}/results.json")


if __name__ == "__main__":
    app.run(main)
