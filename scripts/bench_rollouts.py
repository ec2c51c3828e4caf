"""Evaluation throughput: unbatched rollouts (each of ``--workers`` processes restores the policy
and calls it once per episode replan) against batched ones (``--batch_envs`` episodes at once,
environments in ``--workers`` processes, ONE policy call per round in this process), on the same
episodes, in episodes per minute of wall time.

    python scripts/bench_rollouts.py --checkpoint=runs/ft_flow [--tasks=mt10 --episodes=2] [--json=PATH]

Each run is a whole ``evaluation.evaluate`` (worker start-up, policy restore, compilation from
the persistent cache, rollouts and the GIF frames; no files written), the policy cache dropped
between runs. The two sides alternate in ABBA order (``--repeats`` pairs) so background load
falls on both; the rate of a side is all its episodes over all its wall time. It also checks
that both sides gave the same episodes (task, index, success, length). The ratio is printed
last; ``--json`` writes ``episodes_per_min_unbatched``, ``episodes_per_min_batched``,
``speedup`` and every run's figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("checkpoint", None, "A finetuning workdir (or one of its step directories).", required=True)
flags.DEFINE_string("tasks", "mt10", "mt10, mt50 or a comma-separated list of Meta-World tasks.")
flags.DEFINE_integer("episodes", 2, "Episodes per task in every run.")
flags.DEFINE_integer("max_steps", 150, "Steps before an episode counts as a failure.")
flags.DEFINE_integer("seed", 0, "Evaluation seed.")
flags.DEFINE_integer("workers", 0, "Processes on both sides (0: min(2, cores)).")
flags.DEFINE_integer("batch_envs", -1, "Episodes at once on the batched side (-1: evaluation's default).")
flags.DEFINE_integer("repeats", 1, "ABBA pairs: 1 runs unbatched, batched, batched, unbatched.")
flags.DEFINE_bool("record_frames", True, "Collect GIF frames as scripts/evaluate.py does.")
flags.DEFINE_string("json", "", "Write the figures here as JSON.")
FLAGS = flags.FLAGS


def _run(batch_envs: int | None) -> dict:
    import time

    from jaxvla import evaluation

    evaluation.release()  # each run restores its own policy, as a fresh evaluation would
    start = time.perf_counter()
    summary = evaluation.evaluate(FLAGS.checkpoint, FLAGS.tasks, FLAGS.episodes, seed=FLAGS.seed,
                                  max_steps=FLAGS.max_steps, workers=FLAGS.workers or None,
                                  record_frames=FLAGS.record_frames, progress=False, batch_envs=batch_envs)
    wall = time.perf_counter() - start
    evaluation.release()
    return {"mode": summary["settings"]["mode"], "wall_seconds": wall, "episodes": summary["mean"]["episodes"],
            "episodes_per_min": 60.0 * summary["mean"]["episodes"] / wall,
            "steps": int(sum(e["length"] for e in summary["episodes"])),
            "workers": summary["settings"]["workers"], "batch_envs": summary["settings"]["batch_envs"],
            "latency": summary["latency"], "success_rate": summary["mean"]["success_rate"],
            "records": [(e["task"], e["episode"], bool(e["success"]), int(e["length"])) for e in summary["episodes"]]}


def main(argv):
    del argv
    import logging

    logging.getLogger("jaxvla").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxvla import compilation_cache

    compilation_cache.enable()  # both sides read the same persistent cache
    from jaxvla.io.files import write_json

    batched = None if FLAGS.batch_envs < 0 else FLAGS.batch_envs
    if batched == 0:
        raise app.UsageError("--batch_envs=0 is the unbatched side itself; give >= 1 or -1 (default)")
    load_before = os.getloadavg()
    runs = []
    for _ in range(FLAGS.repeats):
        for side in ("unbatched", "batched", "batched", "unbatched"):
            run = _run(0 if side == "unbatched" else batched)
            runs.append(run)
            print(f"{run['mode']:>9}: {run['episodes']} episodes ({run['steps']} steps) in {run['wall_seconds']:.1f} s "
                  f"= {run['episodes_per_min']:.1f} episodes/min; policy {run['latency']['ms_per_call']:.1f} ms per "
                  f"call, {run['latency']['rows_per_call']:.1f} episodes per call (batch_envs "
                  f"{run['batch_envs']}, workers {run['workers']})", flush=True)
    load_after = os.getloadavg()

    def rate(mode):
        mine = [r for r in runs if r["mode"] == mode]
        return 60.0 * sum(r["episodes"] for r in mine) / sum(r["wall_seconds"] for r in mine)

    unbatched, batched_rate = rate("unbatched"), rate("batched")
    reference = next(r["records"] for r in runs if r["mode"] == "unbatched")
    mismatched = [sorted(set(reference) ^ set(r["records"])) for r in runs if r["records"] != reference]
    same = not mismatched
    result = {"episodes_per_min_unbatched": unbatched, "episodes_per_min_batched": batched_rate,
              "speedup": batched_rate / unbatched, "same_episodes": same,
              "settings": {"checkpoint": os.path.abspath(FLAGS.checkpoint), "tasks": FLAGS.tasks,
                           "episodes_per_task": FLAGS.episodes, "max_steps": FLAGS.max_steps, "seed": FLAGS.seed,
                           "repeats": FLAGS.repeats, "record_frames": FLAGS.record_frames,
                           "cpu_count": os.cpu_count()},
              "loadavg_before": list(load_before), "loadavg_after": list(load_after),
              "runs": [{k: v for k, v in r.items() if k != "records"} for r in runs]}
    if FLAGS.json:
        write_json(FLAGS.json, result)
    print(f"\nSame episodes (task, index, success, length) on both sides: {same}"
          + ("" if same else f"; differing records: {mismatched[0][:6]}"))
    print(f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
          f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f} on {os.cpu_count()} cores")
    print(f"unbatched {unbatched:.1f} episodes/min, batched {batched_rate:.1f} episodes/min")
    print(f"speedup {batched_rate / unbatched:.2f}x")


if __name__ == "__main__":
    app.run(main)
