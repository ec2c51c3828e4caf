"""Roll a finetuned policy out in Meta-World and report success rates.

    python scripts/evaluate.py --checkpoint=runs/ft_flow --tasks=mt10 --episodes=10 [--seed=0]

Prints a per-task table (success, Wilson 95 % CI, mean episode length) and the policy latency;
writes ``results.json`` (with one record per episode), ``success.png`` (bar plot) and
``rollouts/*.gif`` (one success and one failure per task when there are any) to ``--out_dir``
(default ``<checkpoint>/eval``). ``--batch_envs`` episodes run at once (default: one per task
up to 16, at least 8; 10 for MT10): their environments step and render in ``--workers``
processes (default: 2, one per core) and the policy acts for all of them in one batched call per
round in this process; ``--batch_envs=0`` is the unbatched scheme (each worker its own policy,
one call per episode replan). The episodes are the same either way. See
``jaxvla/evaluation.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("checkpoint", None, "A finetuning workdir (or one of its step directories).", required=True)
flags.DEFINE_string("tasks", "mt10", "mt10, mt50 or a comma-separated list of Meta-World tasks.")
flags.DEFINE_integer("episodes", 10, "Episodes per task.")
flags.DEFINE_integer("seed", 0, "Evaluation seed (object placements and sampler noise).")
flags.DEFINE_integer("max_steps", 150, "Steps before an episode counts as a failure (Meta-World runs at 80 Hz).")
flags.DEFINE_integer("workers", 0, "Rollout processes (0: min(2, cores)): environments (batched) or environments "
                     "and a policy each (--batch_envs=0).")
flags.DEFINE_integer("batch_envs", -1, "Episodes at once, one policy call for all of them per round (-1: one per "
                     "task up to 16, at least 8 and 4 per worker, at most all episodes; 0: unbatched, one call "
                     "per episode replan).")
flags.DEFINE_integer("execute", 0, "Actions executed per policy call (0: the checkpoint's execute_steps).")
flags.DEFINE_string("camera", "corner", "Camera preset; must match the training data's.")
flags.DEFINE_string("out_dir", "", "Where results go (default <checkpoint>/eval).")
flags.DEFINE_string("tokenizer_checkpoint", "", "The image tokenizer's checkpoint, overriding the one bundled in the "
                    "finetuning workdir (assets/tokenizer) and the path finetuning recorded (as the server's flag).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import logging

    logging.getLogger("jaxvla").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxvla import compilation_cache

    compilation_cache.enable()  # $JAXVLA_COMPILATION_CACHE, else ~/.cache/jaxvla/xla; "off" disables
    from jaxvla.evaluation import evaluate, format_table

    out_dir = FLAGS.out_dir or os.path.join(FLAGS.checkpoint, "eval")
    if FLAGS.batch_envs < -1:
        raise app.UsageError(f"--batch_envs must be >= 0, or -1 for the default; got {FLAGS.batch_envs}")
    summary = evaluate(FLAGS.checkpoint, FLAGS.tasks, FLAGS.episodes, seed=FLAGS.seed, max_steps=FLAGS.max_steps,
                       workers=FLAGS.workers or None, execute=FLAGS.execute or None, out_dir=out_dir,
                       camera=FLAGS.camera, tokenizer_checkpoint=FLAGS.tokenizer_checkpoint or None,
                       batch_envs=None if FLAGS.batch_envs == -1 else FLAGS.batch_envs)
    print(format_table(summary))
    s = summary["settings"]
    scheme = (f"{s['batch_envs']} at once, {s['workers']} environment workers" if s["batch_envs"]
              else f"unbatched, {s['workers']} workers")
    print(f"\n{summary['mean']['episodes']} episodes in {summary['wall_seconds']:.0f} s "
          f"({summary['episodes_per_minute']:.1f} per minute; {scheme}). Files: {out_dir}/results.json, "
          f"{out_dir}/success.png, {len(summary['files']['gifs'])} GIFs in {out_dir}/rollouts/")


if __name__ == "__main__":
    app.run(main)
