"""``make demo``: the main job on the embedded default, on a fresh machine.

Renders the Meta-World dataset (MT10 experts) if it is missing, then runs every stage that exists
with its small config, each in its own workdir under ``--run_dir``, and prints a summary with the
files to look at. Later stages (LAQ, latent pretraining, finetuning, evaluation) join this script
as they land.

    python scripts/demo.py [--run_dir=runs/demo] [--tokenizer_steps=300]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("run_dir", "runs/demo", "Where the data, every stage's workdir and the report go.")
flags.DEFINE_string("data_dir", "runs/data/metaworld_mt10_64", "The embedded Meta-World dataset (generated if missing).")
flags.DEFINE_integer("episodes_per_task", 5, "Expert episodes per MT10 task when generating the data.")
flags.DEFINE_integer("tokenizer_steps", 300, "Image-tokenizer training steps.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import logging

    logging.getLogger("jaxvla").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxvla.config import load_config
    from jaxvla.data.embedded import ensure_metaworld_dataset
    from jaxvla.trainer import train

    os.makedirs(FLAGS.run_dir, exist_ok=True)
    rows = []

    start = time.time()
    dataset = ensure_metaworld_dataset(FLAGS.data_dir, "mt10", FLAGS.episodes_per_task, 64)
    rows.append(("data", f"Meta-World MT10 experts, {dataset}", f"{time.time() - start:.0f} s"))

    start = time.time()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(repo, "configs", "tokenizer.py:small"))
    config.num_steps = FLAGS.tokenizer_steps
    config.data.data_dir = FLAGS.data_dir
    config.eval_every = FLAGS.tokenizer_steps
    config.checkpoint.every = FLAGS.tokenizer_steps
    workdir = os.path.join(FLAGS.run_dir, "tokenizer")
    result = train(config, workdir)
    m = result.metrics
    rows.append((
        "tokenizer",
        f"held-out PSNR {m.get('eval/psnr', float('nan')):.1f} dB, code perplexity {m.get('eval/code_perplexity', float('nan')):.0f}, "
        f"codes used {m.get('codes_used_fraction', float('nan')):.0%}",
        f"{time.time() - start:.0f} s",
    ))

    images = sorted(os.listdir(os.path.join(workdir, "images")))
    report = os.path.join(FLAGS.run_dir, "REPORT.md")
    with open(report + ".tmp", "w") as f:
        f.write("# jaxvla demo\n\n| stage | result | wall time |\n|---|---|---|\n")
        for stage, text, wall in rows:
            f.write(f"| {stage} | {text} | {wall} |\n")
        f.write("\n## Pictures\n\n")
        for name in images:
            f.write(f"![{name}](tokenizer/images/{name})\n")
    os.replace(report + ".tmp", report)

    width = max(len(r[1]) for r in rows)
    print("\n" + f"{'stage':<10} | {'result':<{width}} | wall")
    print("-" * (width + 22))
    for stage, text, wall in rows:
        print(f"{stage:<10} | {text:<{width}} | {wall}")
    print(f"\nreport: {report}; TensorBoard: tensorboard --logdir {FLAGS.run_dir}")


if __name__ == "__main__":
    app.run(main)
