"""``make demo``: the whole method on the embedded default, on a fresh machine, in about 25 minutes
on 2 CPU cores.

Renders the Meta-World MT10 expert datasets when they are missing, then trains, each stage in its
own directory under ``--run_dir`` with the small configs (``jaxvla.experiment.PROTOCOLS["demo"]``):
image tokenizer -> ViPRA LAQ -> latent labels for the action-free video pool (MT10 x 4 expert
videos) -> latent pretraining (ViPRA objective, frame history o_{t-7}) -> flow-matching finetuning
on 5 other demonstrations per task, with frame history and the 4-dim state prompt (the step chosen
on a held-out one) -> evaluation in Meta-World (MT10, 2 fixed placements per task). Prints the
success table and writes ``REPORT.md`` listing the plots (loss curves, reconstructions,
latent-action semantics, success bars, rollout GIFs).

    python scripts/demo.py [--run_dir=runs/demo] [--data_root=runs/data] [--eval_episodes=1]

Finished stages are reused (``stage.json``), so a second run only re-prints the report, and
``scripts/reproduce.py --protocol=demo --run_dir=runs/demo`` builds the other rows on top of it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("run_dir", "runs/demo", "Where every stage's workdir and the report go.")
flags.DEFINE_string("data_root", "runs/data", "Where the Meta-World dataset is (generated when missing).")
flags.DEFINE_integer("eval_episodes", 0, "Evaluation placements per MT10 task (0: the demo protocol's, 2).")
flags.DEFINE_integer("steps", 0, "Training steps of every stage (0: the demo protocol's).")
FLAGS = flags.FLAGS

ROW = "VIPRA-flow"
SEED = 0


def _fmt(value, spec=".3f"):
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def main(argv):
    del argv
    import logging

    logging.getLogger("jaxvla").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxvla import compilation_cache

    compilation_cache.enable()  # $JAXVLA_COMPILATION_CACHE, else ~/.cache/jaxvla/xla; "off" disables
    from jaxvla.evaluation import format_table
    from jaxvla.experiment import PROTOCOLS, Experiment, StageInterrupted
    from jaxvla.io.files import write_text

    protocol = PROTOCOLS["demo"]
    if FLAGS.eval_episodes:
        protocol = dataclasses.replace(protocol, eval_placements=FLAGS.eval_episodes)
    if FLAGS.steps:
        n = FLAGS.steps
        protocol = dataclasses.replace(protocol, tokenizer_steps=n, laq_steps=n, pretrain_steps=n, finetune_steps=n,
                                       select_every=max(1, n // 4))
    start = time.time()
    exp = Experiment(FLAGS.run_dir, protocol, data_root=FLAGS.data_root)
    try:
        exp.run([ROW])
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    total = time.time() - start

    s = exp.stages
    tokenizer, laq_name, labels_name, pretrain_name, finetune, evaluation = exp.stage_names(ROW, SEED)
    result = s[evaluation]
    tok, laq = s[tokenizer]["metrics"], s[laq_name]["metrics"]
    pre, ft = s[pretrain_name]["metrics"], s[finetune]["metrics"]
    rows = [
        ("data", f"action-free pool: {protocol.pool_tasks} x {protocol.videos_per_task} videos ({exp.pool_data}); "
                 f"demos: {protocol.finetune_tasks} x {protocol.demos_per_task}", s["data"]["wall_seconds"]),
        ("tokenizer", f"held-out PSNR {_fmt(tok.get('eval/psnr'), '.1f')} dB, code perplexity "
                      f"{_fmt(tok.get('eval/code_perplexity'), '.0f')}", s[tokenizer]["wall_seconds"]),
        ("LAQ (ViPRA)", f"held-out PSNR {_fmt(laq.get('eval/psnr'), '.1f')} dB vs copy-frame "
                        f"{_fmt(laq.get('eval/psnr_copy'), '.1f')}, perplexity {_fmt(laq.get('eval/code_perplexity'), '.2f')}",
         s[laq_name]["wall_seconds"]),
        ("labels", f"latent actions for every pool clip: {s[labels_name]['labels']}", s[labels_name]["wall_seconds"]),
        ("pretrain", f"held-out latent-token accuracy {_fmt(pre.get('eval/latent_accuracy'))}, future-frame "
                     f"accuracy {_fmt(pre.get('eval/image_accuracy'))}", s[pretrain_name]["wall_seconds"]),
        ("finetune", f"flow matching, {protocol.demos_per_task} demos per task: step {s[finetune]['selected_step']} "
                     f"chosen on held-out demos; held-out sample MSE {_fmt(ft.get('eval/sample_mse'))} "
                     f"(zeros: {_fmt(ft.get('eval/zero_mse'))})", s[finetune]["wall_seconds"]),
        ("evaluate", f"MT10 success {result['mean']['successes']}/{result['mean']['episodes']} "
                     f"({result['mean']['success_rate']:.0%}), 95 % CI [{result['mean']['ci95'][0]:.2f}, "
                     f"{result['mean']['ci95'][1]:.2f}]", s[evaluation]["wall_seconds"]),
    ]

    def rel(path):
        return os.path.relpath(path, exp.run_dir)

    pictures = []
    for name in (tokenizer, laq_name, pretrain_name, finetune):
        if s[name].get("loss_curve"):
            pictures.append((f"loss curve: {name}", s[name]["loss_curve"]))
    for pattern, label in ((f"{tokenizer}/images/reconstructions_*.png", "tokenizer reconstructions"),
                           (f"{laq_name}/images/reconstructions_*.png", "LAQ reconstructions"),
                           (f"{laq_name}/images/latent_semantics_*.png", "latent-action semantics")):
        found = sorted(glob.glob(os.path.join(exp.run_dir, pattern)))
        if found:
            pictures.append((label, found[-1]))
    pictures.append(("success per task", result["files"]["plot"]))
    pictures += [(f"rollout: {os.path.basename(g)}", g) for g in result["files"]["gifs"]]

    lines = [f"# jaxvla demo ({time.strftime('%Y-%m-%d')}, {total / 60:.1f} min)\n",
             "| stage | result | wall time |", "|---|---|---|"]
    lines += [f"| {stage} | {text} | {wall:.0f} s |" for stage, text, wall in rows]
    lines += ["", f"## Meta-World MT10 success ({ROW})", "", format_table(result), "", "## Pictures", ""]
    lines += [f"- {label}: [{rel(path)}]({rel(path)})\n\n  ![{label}]({rel(path)})" for label, path in pictures]
    report = write_text(os.path.join(exp.run_dir, "REPORT.md"), "\n".join(lines) + "\n")

    width = max(len(r[1]) for r in rows)
    print("\n" + f"{'stage':<12} | {'result':<{width}} | wall")
    print("-" * (width + 24))
    for stage, text, wall in rows:
        print(f"{stage:<12} | {text:<{width}} | {wall:.0f} s")
    print(f"\nMeta-World MT10 success of the {ROW} policy:\n")
    print(format_table(result))
    print(f"\n{total / 60:.1f} min in all. Report: {report}; TensorBoard: tensorboard --logdir {exp.run_dir}")


if __name__ == "__main__":
    app.run(main)
