"""Policy rollouts in Meta-World: success rates with confidence intervals, episode lengths,
latency, GIFs and a bar plot (``scripts/evaluate.py`` is the command line).

    results = evaluate("runs/ft_flow", tasks="mt10", episodes=10, out_dir="runs/ft_flow/eval")

Episodes are independent jobs ``(task, index)``: episode ``index`` of ``task`` starts from
``MetaWorldEnv.reset(seed=episode_seed(EVAL_SEED_BASE + seed, task, index))`` (placements
never used by the training data, which draws from base ``seed`` = 0..), the policy's sampler is
reseeded with the same number, and the episode ends at the first successful step or after
``max_steps``. So results do not depend on how jobs are spread over workers.

Workers: ``workers`` spawned processes (default: one per core) each restore the policy once and
run a share of the episodes with one XLA thread each (rendering and small-batch inference do
not parallelise well inside one process; separate processes fill the cores). ``workers=1`` runs
in this process.

Result layout (``results.json``): ``tasks`` {task: {episodes, successes, success_rate,
ci95 [lo, hi], mean_length, mean_length_success}}, ``mean`` {success_rate, ci95, episodes},
``latency`` {ms_per_call, calls, actions_per_call, control_hz}, ``settings``, ``episodes`` (one
row each, no frames), ``files``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from jaxvla.io.files import atomic_path, write_json
from jaxvla.tracking import save_figure

log = logging.getLogger("jaxvla")

# Evaluation placements come from a different seed stream than the generated datasets' (base 0).
EVAL_SEED_BASE = 1_000_003


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    checkpoint: str
    max_steps: int = 150
    execute: int | None = None  # actions executed per policy call (None: the checkpoint's)
    camera: str = "corner"
    seed: int = 0
    record_frames: bool = True
    frame_stride: int = 2  # keep every n-th frame for GIFs
    tokenizer_checkpoint: str | None = None


# --------------------------------------------------------------------------- statistics


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate (sensible at 0 / n and n / n, unlike the
    normal approximation)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(episodes: Sequence[dict], tasks: Sequence[str]) -> dict[str, Any]:
    """Per-task and pooled success rates (Wilson 95 % CIs), mean lengths and latency."""
    per_task = {}
    for task in tasks:
        rows = [e for e in episodes if e["task"] == task]
        wins = [e for e in rows if e["success"]]
        per_task[task] = {
            "episodes": len(rows),
            "successes": len(wins),
            "success_rate": len(wins) / len(rows) if rows else float("nan"),
            "ci95": list(wilson_interval(len(wins), len(rows))),
            "mean_length": float(np.mean([e["length"] for e in rows])) if rows else float("nan"),
            "mean_length_success": float(np.mean([e["length"] for e in wins])) if wins else None,
        }
    total = len(episodes)
    wins = sum(bool(e["success"]) for e in episodes)
    calls = sum(e["policy_calls"] for e in episodes)
    seconds = sum(e["policy_seconds"] for e in episodes)
    actions = sum(e["length"] for e in episodes)
    ms_per_call = 1000.0 * seconds / calls if calls else float("nan")
    actions_per_call = actions / calls if calls else float("nan")
    return {
        "tasks": per_task,
        "mean": {"success_rate": wins / total if total else float("nan"), "ci95": list(wilson_interval(wins, total)),
                 "episodes": total, "successes": wins,
                 "mean_length": float(np.mean([e["length"] for e in episodes])) if episodes else float("nan")},
        "latency": {"ms_per_call": ms_per_call, "calls": calls, "actions_per_call": actions_per_call,
                    # Actions the policy can supply per second, inference only (simulation excluded).
                    "control_hz": 1000.0 * actions_per_call / ms_per_call if calls else float("nan")},
    }


# --------------------------------------------------------------------------- rollouts

_worker_state: dict[str, Any] = {}


def _load_policy(settings: EvalSettings):
    from jaxvla.policy import Policy

    key = (settings.checkpoint, settings.execute, settings.tokenizer_checkpoint)
    if _worker_state.get("key") != key:
        _worker_state["policy"] = Policy.from_checkpoint(settings.checkpoint, execute_steps=settings.execute,
                                                         tokenizer_checkpoint=settings.tokenizer_checkpoint)
        _worker_state["key"] = key
        _worker_state["warm"] = None  # its first call compiles
    return _worker_state["policy"]


def _init_worker(threads: int = 1) -> None:
    """Spawned worker: one XLA compute thread, no TensorFlow device claims, headless MuJoCo.
    Runs before jax is imported in the worker (this module imports jax lazily)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("LP_NUM_THREADS", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=false"
    if "intra_op_parallelism_threads" not in flags:
        flags += f" intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = flags.strip()
    logging.getLogger("jaxvla").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def run_episode(settings: EvalSettings, task: str, index: int) -> dict[str, Any]:
    """One rollout of the policy in ``task``. Returns task, episode, seed, success, length
    (steps until the first success, else ``max_steps``), policy_calls, policy_seconds,
    first_call_seconds (includes compilation in a fresh process) and, when recording, frames
    uint8 ``[T', S, S, 3]`` (every ``frame_stride``-th)."""
    from jaxvla.policy import ActionChunker
    from jaxvla.sim.metaworld_env import MetaWorldEnv, episode_seed

    policy = _load_policy(settings)
    seed = episode_seed(EVAL_SEED_BASE + settings.seed, task, index)
    env = _worker_state.get("env")
    if env is None or env.task != task or env.max_episode_steps != settings.max_steps:
        if env is not None:
            env.close()
        env = MetaWorldEnv(task, seed, image_size=policy.image_size, max_episode_steps=settings.max_steps,
                           camera=settings.camera, terminate_on_success=True)
        _worker_state["env"] = env
    chunker = ActionChunker(policy, settings.execute)
    policy.reseed(seed)
    obs = env.reset(seed=seed)
    instruction = env.instruction
    frames = [obs["image"]] if settings.record_frames else []
    success, length = False, 0
    for t in range(settings.max_steps):
        action = chunker.step(obs, instruction)
        obs, _, terminated, truncated, info = env.step(action)
        length = t + 1
        if settings.record_frames and (t + 1) % settings.frame_stride == 0:
            frames.append(obs["image"])
        if info["success"]:
            success = True
        if terminated or truncated:
            break
    calls = chunker.call_seconds
    # A fresh worker's first call compiles; keep it out of the latency figures.
    timed = calls[1:] if len(calls) > 1 and _worker_state.get("warm") is None else calls
    _worker_state["warm"] = True
    row = {"task": task, "episode": int(index), "seed": int(seed), "success": bool(success), "length": int(length),
           "instruction": instruction, "policy_calls": len(timed), "policy_seconds": float(sum(timed)),
           "first_call_seconds": float(calls[0]) if calls else 0.0}
    if settings.record_frames:
        row["frames"] = np.stack(frames).astype(np.uint8)
    return row


def _run_job(job: tuple[EvalSettings, str, int]) -> dict[str, Any]:
    return run_episode(*job)


def _close_worker() -> None:
    env = _worker_state.pop("env", None)
    if env is not None:
        env.close()


def rollouts(settings: EvalSettings, tasks: Sequence[str], episodes: int, workers: int = 1,
             progress: bool = True) -> list[dict[str, Any]]:
    """Every ``(task, index)`` episode, in task / index order."""
    from tqdm import tqdm

    jobs = [(settings, task, i) for task in tasks for i in range(episodes)]
    bar = tqdm(total=len(jobs), desc="rollouts", unit="ep", disable=not progress)
    results = []

    def collect(rows):
        for row in rows:
            results.append(row)
            bar.update(1)
            bar.set_postfix(success=f"{np.mean([r['success'] for r in results]):.2f}")

    try:
        if workers <= 1:
            try:
                collect(_run_job(job) for job in jobs)
            finally:
                _close_worker()
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # jax and MuJoCo must not be forked
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                collect(pool.imap_unordered(_run_job, jobs))
    finally:
        bar.close()
    order = {(task, i): n for n, (_, task, i) in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r["task"], r["episode"])])


# --------------------------------------------------------------------------- outputs


def write_gif(path: str, frames: np.ndarray, fps: int = 20, scale: int = 2) -> str:
    """uint8 ``[T, S, S, 3]`` -> an animated GIF (nearest-neighbour upscaled), written atomically."""
    from PIL import Image

    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def bar_plot(path: str, labels: Sequence[str], rates: Sequence[float], cis: Sequence[Sequence[float]],
             title: str, ylabel: str = "success rate") -> str:
    """Bars with 95 % CI error bars, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = np.asarray(rates, float)
    lo = rates - np.asarray([c[0] for c in cis])
    hi = np.asarray([c[1] for c in cis]) - rates
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(labels) + 1.5), 3.6), dpi=120)
    ax.bar(range(len(labels)), rates, yerr=[lo, hi], capsize=3, color="#4C72B0")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center",
                       fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(summary: dict, episodes: Sequence[dict], out_dir: str, title: str) -> dict[str, Any]:
    """GIFs of one success and one failure per task (from ``episodes`` with frames), success.png
    (per task + mean), then results.json: ``summary`` with the file list, which is also set as
    ``summary["files"]`` and returned."""
    files: dict[str, Any] = {"gifs": []}
    gif_dir = os.path.join(out_dir, "rollouts")
    for task in summary["tasks"]:
        for outcome in (True, False):
            row = next((e for e in episodes if e["task"] == task and e["success"] == outcome and "frames" in e), None)
            if row is None:
                continue
            name = f"{task}_ep{row['episode']}_{'success' if outcome else 'failure'}.gif"
            files["gifs"].append(write_gif(os.path.join(gif_dir, name), row["frames"]))
    labels = list(summary["tasks"]) + ["mean"]
    rates = [summary["tasks"][t]["success_rate"] for t in summary["tasks"]] + [summary["mean"]["success_rate"]]
    cis = [summary["tasks"][t]["ci95"] for t in summary["tasks"]] + [summary["mean"]["ci95"]]
    files["plot"] = bar_plot(os.path.join(out_dir, "success.png"), labels, rates, cis, title)
    files["results"] = os.path.join(out_dir, "results.json")
    summary["files"] = files
    write_json(files["results"], summary)
    return files


def evaluate(checkpoint: str, tasks: str | Sequence[str] = "mt10", episodes: int = 10, *, seed: int = 0,
             max_steps: int = 150, workers: int | None = None, execute: int | None = None, out_dir: str | None = None,
             camera: str = "corner", record_frames: bool = True, tokenizer_checkpoint: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Roll the checkpoint's policy out and summarise; writes outputs when ``out_dir`` is set."""
    from jaxvla.sim.metaworld_env import task_names

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {max_steps}")
    names = task_names(tasks)
    workers = int(workers or min(os.cpu_count() or 1, 2))
    workers = max(1, min(workers, len(names) * episodes))
    settings = EvalSettings(checkpoint=os.path.abspath(checkpoint), max_steps=int(max_steps), execute=execute,
                            camera=camera, seed=int(seed), record_frames=record_frames,
                            tokenizer_checkpoint=tokenizer_checkpoint)
    start = time.time()
    rows = rollouts(settings, names, episodes, workers=workers, progress=progress)
    summary = summarize(rows, names)
    summary["settings"] = dict(dataclasses.asdict(settings), tasks=names, episodes_per_task=episodes,
                               workers=workers, eval_seed_base=EVAL_SEED_BASE)
    summary["wall_seconds"] = time.time() - start
    summary["episodes"] = [{k: v for k, v in e.items() if k != "frames"} for e in rows]
    if out_dir:
        write_outputs(summary, rows, out_dir, title=f"{os.path.basename(os.path.abspath(checkpoint))}: "
                      f"{len(names)} tasks x {episodes} episodes")
    return summary


def format_table(summary: dict) -> str:
    """A Markdown table: per task and mean success (95 % CI), mean episode length."""
    lines = ["| task | success | 95 % CI | mean length |", "|---|---|---|---|"]
    for task, r in summary["tasks"].items():
        lines.append(f"| {task} | {r['successes']}/{r['episodes']} ({r['success_rate']:.0%}) | "
                     f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['mean_length']:.0f} |")
    m = summary["mean"]
    lines.append(f"| **mean** | {m['successes']}/{m['episodes']} ({m['success_rate']:.0%}) | "
                 f"[{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] | {m['mean_length']:.0f} |")
    lat = summary["latency"]
    lines.append("")
    lines.append(f"Policy latency {lat['ms_per_call']:.1f} ms per call, {lat['actions_per_call']:.1f} actions per call "
                 f"-> {lat['control_hz']:.0f} Hz of actions (inference only).")
    return "\n".join(lines)
