"""Policy rollouts in Meta-World: success rates with confidence intervals, episode lengths,
latency, GIFs and a bar plot (``scripts/evaluate.py`` is the command line).

    results = evaluate("runs/ft_flow", tasks="mt10", episodes=10, out_dir="runs/ft_flow/eval")

Episodes are independent jobs ``(task, index)``: episode ``index`` of ``task`` starts from
``MetaWorldEnv.reset(seed=episode_seed(EVAL_SEED_BASE + seed, task, index))`` (placements
never used by the training data, which draws from base ``seed`` = 0..), the policy executes
``execute`` actions of each predicted chunk before replanning (``ActionChunker``), its sampler
(flow) draws the episode's noise from a stream seeded with the same number, and the episode ends
at the first successful step or after ``max_steps``. So results do not depend on scheduling,
workers or which episodes share a batch.

Batched (default, ``batch_envs`` >= 1): up to ``batch_envs`` episodes run at once, one per
slot. The environments live in ``workers`` spawned processes (MuJoCo stepping and rendering;
slot ``s`` in worker ``s % workers``; ``workers=1``: in this process); the policy lives in this
process and acts for every running episode in ONE jitted call per round (``Policy.act_batch``
with per-row keys: each row's key is the next of its episode's own stream, ``seed_keys`` /
``split_keys``, so the noise is the unbatched scheme's; padded to ``batch_envs`` rows so it
compiles once), using all of the machine's XLA threads. Each worker then executes its slots'
chunks, rendering only the frames that are used (the one the next call reads; GIF frames; for a
frame-history policy the o_{t-k} a later call reads, kept per slot; with k = ``execute`` that is
the previous call's frame, so nothing more is rendered). Every call also gets each episode's
observation state (a state-prompt policy reads it). An episode that ends frees its slot for the
next queued one at the next round. GIF frames: episode
0 of each task records them as it runs (it gets a GIF whatever its outcome); the first episode
of the other outcome, if any, is replayed from its seed and actions (the simulation is
deterministic; the replay's outcome is checked).

Unbatched (``batch_envs=0``, the previous scheme): each of ``workers`` processes restores the
policy, reseeds it per episode and runs whole episodes with one XLA thread, one call per replan;
the same episodes (to float rounding for flow: batch sizes round differently).

Result layout (``results.json``): ``tasks`` {task: {episodes, successes, success_rate,
ci95 [lo, hi], mean_length, mean_length_success}}, ``mean`` {success_rate, ci95, episodes},
``latency`` {ms_per_call, calls, rows_per_call, batch_size, actions_per_call, control_hz,
actions_per_second, first_call_seconds}, ``settings``, ``wall_seconds``,
``episodes_per_minute``, ``episodes`` (one row each: task, episode, seed, success, length,
instruction, policy_calls, policy_seconds; no frames or actions), ``files``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing as mp
import os
import time
import traceback
from collections import Counter, deque
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxvla.frame_history import FrameHistory
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
    # The interval holds p exactly; rounding alone would leave e.g. 10 / 10 at hi = 1 - 1e-16.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def summarize(episodes: Sequence[dict], tasks: Sequence[str], calls: Sequence[tuple[float, int]] | None = None,
              batch_size: int = 1, first_call_seconds: float | None = None) -> dict[str, Any]:
    """Per-task and pooled success rates (Wilson 95 % CIs), mean lengths and latency.

    ``calls``: the batched policy calls as ``(seconds, rows)`` (rows: the episodes acting in the
    call, which was padded to ``batch_size``); None (unbatched): each episode's ``policy_calls`` /
    ``policy_seconds`` are its own calls. Latency: ``ms_per_call`` per (batched) call,
    ``rows_per_call``, ``actions_per_call`` executed per episode per call, ``control_hz`` the
    actions one episode gets per second of inference (per-env control rate), and
    ``actions_per_second`` over all episodes together; inference only, simulation excluded."""
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
    actions = sum(e["length"] for e in episodes)
    row_calls = sum(e["policy_calls"] for e in episodes)  # (episode, call) pairs
    if calls is None:
        ncalls, seconds = row_calls, sum(e["policy_seconds"] for e in episodes)
    else:
        ncalls, seconds = len(calls), float(sum(c[0] for c in calls))
    nan = float("nan")
    ms_per_call = 1000.0 * seconds / ncalls if ncalls else nan
    actions_per_call = actions / row_calls if row_calls else nan
    latency = {"ms_per_call": ms_per_call, "calls": ncalls,
               "rows_per_call": row_calls / ncalls if ncalls else nan, "batch_size": int(batch_size),
               "actions_per_call": actions_per_call,
               "control_hz": 1000.0 * actions_per_call / ms_per_call if ncalls else nan,
               "actions_per_second": actions / seconds if seconds > 0 else nan}
    if first_call_seconds is not None:
        latency["first_call_seconds"] = float(first_call_seconds)  # compilation, outside the figures above
    return {
        "tasks": per_task,
        "mean": {"success_rate": wins / total if total else nan, "ci95": list(wilson_interval(wins, total)),
                 "episodes": total, "successes": wins,
                 "mean_length": float(np.mean([e["length"] for e in episodes])) if episodes else nan},
        "latency": latency,
    }


def episode_jobs(settings: EvalSettings, tasks: Sequence[str], episodes: int) -> list[tuple[str, int, int]]:
    """``(task, index, seed)`` of every episode, in task / index order."""
    from jaxvla.sim.metaworld_env import episode_seed  # Meta-World (MuJoCo)

    return [(task, i, episode_seed(EVAL_SEED_BASE + settings.seed, task, i)) for task in tasks
            for i in range(episodes)]


# --------------------------------------------------------------------------- the policy

_worker_state: dict[str, Any] = {}


def _load_policy(settings: EvalSettings):
    """The checkpoint's Policy, kept for the next call with the same settings (per process)."""
    from jaxvla.policy import Policy  # JAX (env workers never load it)

    key = (settings.checkpoint, settings.execute, settings.tokenizer_checkpoint)
    if _worker_state.get("key") != key:
        _worker_state.pop("policy", None)
        _worker_state["policy"] = Policy.from_checkpoint(settings.checkpoint, execute_steps=settings.execute,
                                                         tokenizer_checkpoint=settings.tokenizer_checkpoint)
        _worker_state["key"] = key
        _worker_state["warm"] = None  # its first call compiles
    return _worker_state["policy"]


def release() -> None:
    """Drop this process's cached policy and environment (the next evaluation restores its own)."""
    _close_worker()
    _worker_state.clear()


def _init_worker(threads: int = 1) -> None:
    """Spawned worker: one XLA compute thread, one llvmpipe thread, no TensorFlow device claims,
    headless MuJoCo. Runs before jax or MuJoCo is imported in the worker (this module imports them
    lazily; environment workers never import jax)."""
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


# --------------------------------------------------------------------------- unbatched rollouts


def run_episode(settings: EvalSettings, task: str, index: int) -> dict[str, Any]:
    """One rollout of the policy in ``task``, one policy call per replan (the unbatched scheme).
    Returns task, episode, seed, success, length (steps until the first success, else
    ``max_steps``), instruction, policy_calls, policy_seconds, first_call_seconds (includes
    compilation in a fresh process), actions float32 ``[length, A]`` (executed) and, when
    recording, frames uint8 ``[T', S, S, 3]`` (every ``frame_stride``-th)."""
    from jaxvla.policy import ActionChunker  # JAX (env workers never load it)
    from jaxvla.sim.metaworld_env import MetaWorldEnv, episode_seed  # Meta-World (MuJoCo)

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
    actions = []
    success, length = False, 0
    for t in range(settings.max_steps):
        action = chunker.step(obs, instruction)
        actions.append(np.asarray(action, np.float32))
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
           "first_call_seconds": float(calls[0]) if calls else 0.0, "actions": np.stack(actions)}
    if settings.record_frames:
        row["frames"] = np.stack(frames).astype(np.uint8)
    return row


def _run_job(job: tuple[EvalSettings, str, int]) -> dict[str, Any]:
    return run_episode(*job)


def _close_worker() -> None:
    env = _worker_state.pop("env", None)
    if env is not None:
        env.close()


def _unbatched_rollouts(settings: EvalSettings, jobs: Sequence[tuple[str, int, int]], workers: int,
                        on_episode) -> list[dict[str, Any]]:
    runs = [(settings, task, i) for task, i, _ in jobs]
    results = []
    if workers <= 1:
        try:
            for row in map(_run_job, runs):
                results.append(row)
                on_episode(row)
        finally:
            _close_worker()
    else:
        ctx = mp.get_context("spawn")  # jax and MuJoCo must not be forked
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for row in pool.imap_unordered(_run_job, runs):
                results.append(row)
                on_episode(row)
    return results


# --------------------------------------------------------------------------- batched rollouts


class EnvSlots:
    """The environments of some batch slots, in the process that steps and renders them.

    Commands (``handle``): ``("start", slot, task, index, seed, record)`` -> ``{image, state,
    instruction}``; ``("step", slot, actions [n, A])`` executes them until the episode ends ->
    ``{executed, success, done}`` plus ``image`` and ``state`` (after the last action) while the
    episode runs, or, once done and when recording, ``frames`` (the first frame and every
    ``frame_stride``-th step's); ``("replay", slot, task, seed, actions)`` -> ``{frames, success,
    length}``. With ``history = (k, n)`` (a frame-history policy: o_{t-k} before o_t, replanning
    every n = ``execute`` steps) ``start`` and ``step`` also return ``prev_image``, the frame k
    steps before ``image`` (the first frame while t < k, as in training); the slot renders and
    keeps only the frames some replan needs (steps t with t or t + k a multiple of n), so with
    k = n (the protocol's 7 of 14) no extra frame is rendered. Environments belong to tasks, not
    slots: a slot keeps its environment while its episodes are of one task, and up to ``keep`` environments no slot holds stay for later
    episodes and replays of their task (building one takes seconds, and each holds ~150 MiB with
    its renderer). Frames are rendered only where they are used: the one the next policy call
    reads, and the recorded ones."""

    def __init__(self, settings: EvalSettings, image_size: int, keep: int = 2,
                 history: tuple[int, int] | None = None):
        self.settings = settings
        self.image_size = int(image_size)
        self.keep = int(keep)
        self.history = None if history is None else (int(history[0]), int(history[1]))  # (k, n)
        if self.history is not None and min(self.history) < 1:
            raise ValueError(f"EnvSlots: history (stride k, execute n) must both be >= 1, got {history}")
        self.envs: dict[int, Any] = {}  # slot -> the MetaWorldEnv of its current (or last) episode
        self.idle: list[Any] = []  # environments no slot holds, oldest first
        self.episodes: dict[int, dict[str, Any]] = {}  # slot -> {"success", "steps", "frames" (or None)}

    def _take(self, task: str, seed: int):
        from jaxvla.sim.metaworld_env import MetaWorldEnv  # Meta-World (MuJoCo)

        for n, env in enumerate(self.idle):
            if env.task == task:
                return self.idle.pop(n)
        return MetaWorldEnv(task, seed, image_size=self.image_size, max_episode_steps=self.settings.max_steps,
                            camera=self.settings.camera, terminate_on_success=True)

    def _release(self, env) -> None:
        self.idle.append(env)
        while len(self.idle) > self.keep:
            self.idle.pop(0).close()

    def start(self, slot: int, task: str, index: int, seed: int, record: bool = False) -> dict[str, Any]:
        env = self.envs.get(slot)
        if env is None or env.task != task:
            if env is not None:
                self._release(env)
            env = self.envs[slot] = self._take(task, seed)
        obs = env.reset(seed=seed)
        history = None
        if self.history is not None:
            history = FrameHistory(*self.history)  # (stride k, replanning every n)
            history.push(obs["image"], step=0)
        self.episodes[slot] = {"success": False, "steps": 0, "frames": [obs["image"]] if record else None,
                               "history": history}
        out = {"image": obs["image"], "state": obs["state"], "instruction": env.instruction}
        if history is not None:
            out["prev_image"] = history.previous()  # t = 0 < k: the first frame
        return out

    def step(self, slot: int, actions: np.ndarray) -> dict[str, Any]:
        env, episode = self.envs[slot], self.episodes[slot]
        frames, stride, history = episode["frames"], self.settings.frame_stride, episode["history"]
        executed, done, image, state = 0, False, None, None
        for action in actions:
            step = episode["steps"] + 1
            record = frames is not None and step % stride == 0
            keep = history is not None and history.needs(step)
            obs, _, terminated, truncated, info = env.step(action, render=record or keep)
            episode["steps"] = step
            executed += 1
            episode["success"] = episode["success"] or info["success"]
            image = obs["image"] if record or keep else None
            state = obs["state"]
            if record:
                frames.append(image)
            if history is not None:
                history.push(image if keep else None, step)
            if terminated or truncated:
                done = True
                break
        out = {"executed": executed, "success": episode["success"], "done": done}
        if done:
            del self.episodes[slot]
            if frames is not None:
                out["frames"] = np.stack(frames).astype(np.uint8)
        else:
            out["image"] = env.render() if image is None else image
            out["state"] = state
            if history is not None:
                out["prev_image"] = history.previous()
        return out

    def replay(self, task: str, seed: int, actions: np.ndarray) -> dict[str, Any]:
        """Re-run an episode's actions from its seed, keeping every ``frame_stride``-th frame."""
        held = [env for slot, env in self.envs.items() if slot not in self.episodes and env.task == task]
        env = held[0] if held else self._take(task, seed)
        try:
            stride = self.settings.frame_stride
            frames = [env.reset(seed=seed)["image"]]
            success, length = False, 0
            for t, action in enumerate(actions):
                record = (t + 1) % stride == 0
                obs, _, terminated, truncated, info = env.step(action, render=record)
                length, success = t + 1, success or info["success"]
                if record:
                    frames.append(obs["image"])
                if terminated or truncated:
                    break
            return {"frames": np.stack(frames).astype(np.uint8), "success": success, "length": length}
        finally:
            if not held:
                self._release(env)

    def handle(self, commands: Sequence[tuple]) -> list[dict[str, Any]]:
        out = []
        for kind, slot, *args in commands:
            if kind == "start":
                out.append(self.start(slot, *args))
            elif kind == "step":
                out.append(self.step(slot, *args))
            elif kind == "replay":
                out.append(self.replay(*args))  # slot: only where to send it
            else:
                raise ValueError(f"unknown command {kind!r}")
        return out

    def close(self) -> None:
        for env in list(self.envs.values()) + self.idle:
            env.close()
        self.envs, self.idle, self.episodes = {}, [], {}


def _env_worker(conn, settings: EvalSettings, image_size: int, keep: int, history=None) -> None:
    """A spawned environment process: runs ``EnvSlots.handle`` on every command list it receives
    (None ends it) and sends back ``("ok", results)`` or ``("error", traceback)``."""
    _init_worker()
    slots = EnvSlots(settings, image_size, keep, history)
    try:
        while True:
            try:
                commands = conn.recv()
            except EOFError:  # the evaluating process went away
                break
            if commands is None:
                break
            try:
                conn.send(("ok", slots.handle(commands)))
            except Exception:  # noqa: BLE001 - reported to the evaluating process, which raises
                conn.send(("error", traceback.format_exc()))
    finally:
        slots.close()
        conn.close()


class EnvPool:
    """``EnvSlots`` spread over ``workers`` spawned processes (slot ``s`` in worker
    ``s % workers``; a replay goes to the worker of the slot that ran the episode), or in this
    process when ``workers`` <= 1. ``run`` sends every worker its share of the commands at once
    and returns the results in order."""

    def __init__(self, settings: EvalSettings, image_size: int, slots: int, workers: int,
                 history: tuple[int, int] | None = None):
        self.workers = max(1, min(int(workers), int(slots)))
        keep = min(4, max(2, -(-int(slots) // self.workers)))  # idle environments a worker keeps
        self._local = None
        self._procs, self._conns = [], []
        if self.workers == 1:
            self._local = EnvSlots(settings, image_size, keep, history)
            return
        ctx = mp.get_context("spawn")  # MuJoCo's renderer must not be forked
        try:
            for _ in range(self.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_env_worker, args=(child, settings, image_size, keep, history), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
        except BaseException:
            self.close()
            raise

    def run(self, commands: Sequence[tuple]) -> list[dict[str, Any]]:
        if not commands:
            return []
        if self._local is not None:
            return self._local.handle(commands)
        shares: list[list[int]] = [[] for _ in self._conns]
        for n, (_, slot, *_) in enumerate(commands):
            shares[slot % self.workers].append(n)
        for conn, share in zip(self._conns, shares):
            if share:
                conn.send([commands[n] for n in share])
        out: list[Any] = [None] * len(commands)
        errors = []
        for w, (conn, share) in enumerate(zip(self._conns, shares)):
            if not share:
                continue
            try:  # every worker's answer is read before raising: none is left blocked on its reply
                status, results = conn.recv()
            except EOFError:
                errors.append(f"rollout worker {w} exited (exit code {self._procs[w].exitcode})")
                continue
            if status != "ok":
                errors.append(f"rollout worker {w} failed:\n{results}")
                continue
            for n, result in zip(share, results):
                out[n] = result
        if errors:
            raise RuntimeError("\n".join(errors))
        return out

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Schedule:
    """Which queued episode a free slot starts next. Building an environment costs seconds (as
    much as simulating a whole flow episode), so a slot keeps to one task while it has queued
    episodes (its environment is reused), then takes a task no slot has started, then helps the
    task with the most queued episodes (keeping the batch full to the end). Any order gives the
    same episodes; this one only decides how few environments are built."""

    def __init__(self, jobs: Sequence[tuple[str, int, int]], slots: int):
        self.queued: dict[str, Any] = {}
        for task, index, seed in jobs:
            self.queued.setdefault(task, deque()).append((int(index), int(seed)))
        self.unstarted = deque(self.queued)
        self.last_task: list[str | None] = [None] * slots

    def __bool__(self) -> bool:
        return any(self.queued.values())

    def next(self, slot: int) -> tuple[str, int, int] | None:
        task = self.last_task[slot]
        if task is None or not self.queued[task]:
            if self.unstarted:
                task = self.unstarted.popleft()
            else:
                task = max(self.queued, key=lambda t: len(self.queued[t]))  # the first of the longest
                if not self.queued[task]:
                    return None
        self.last_task[slot] = task
        index, seed = self.queued[task].popleft()
        return task, index, seed


def _pad_rows(rows: np.ndarray | None, num_rows: int) -> np.ndarray | None:
    """``rows`` ``[R, ...]`` with its first row repeated up to ``num_rows`` rows (None stays None)."""
    if rows is None or len(rows) == num_rows:
        return rows
    return np.concatenate([rows, np.repeat(rows[:1], num_rows - len(rows), axis=0)])


def _batched_rollouts(policy, settings: EvalSettings, jobs: Sequence[tuple[str, int, int]], batch_envs: int,
                      pool: EnvPool, on_episode) -> tuple[list[dict[str, Any]], list[tuple[float, int]], float]:
    """Rounds of: start queued episodes in free slots (``_Schedule``); ONE policy call for every
    running episode (padded to ``batch_envs`` rows, per-row keys); each episode executes its
    chunk's first ``execute`` actions. GIF frames (when recording): episode 0 of each task, which
    gets one whatever its outcome, records them while it runs; the first episode of the other
    outcome, if any, is replayed when the task's last episode ends. Returns the episode rows (with
    ``actions``; ``slot``: where it ran), the calls ``(seconds, rows)`` and the seconds of the
    compiling first call (made on the first round's inputs, outside the figures)."""
    from jaxvla.policy import seed_keys, split_keys  # JAX (env workers never load it)

    execute = int(settings.execute or policy.execute_steps)
    history = bool(policy.history_frames)
    with_state = bool(policy.state_dims)
    schedule = _Schedule(jobs, batch_envs)
    unfinished = Counter(task for task, _, _ in jobs)
    slots: list[dict[str, Any] | None] = [None] * batch_envs
    rows, calls = [], []
    first_call_seconds = None
    while schedule or any(slots):
        starts = []
        for s in range(batch_envs):
            job = schedule.next(s) if slots[s] is None and schedule else None
            if job is not None:
                task, index, seed = job
                slots[s] = {"task": task, "episode": index, "seed": seed, "calls": 0, "seconds": 0.0, "actions": [],
                            "stream": seed_keys([seed])[0]}  # the sampler stream policy.reseed(seed) starts
                starts.append(("start", s, task, index, seed, settings.record_frames and index == 0))
        for (_, s, *_), out in zip(starts, pool.run(starts)):
            slots[s].update(image=out["image"], state=out["state"], prev_image=out.get("prev_image"),
                            instruction=out["instruction"])
        active = [s for s in range(batch_envs) if slots[s] is not None]
        images = np.stack([slots[s]["image"] for s in active])
        # The checkpoint's optional inputs: o_{t-k} from the slot's kept frames, the observation state.
        prev = np.stack([slots[s]["prev_image"] for s in active]) if history else None
        states = np.stack([slots[s]["state"] for s in active]).astype(np.float32) if with_state else None
        instructions = [slots[s]["instruction"] for s in active]
        streams, keys = split_keys(np.stack([slots[s]["stream"] for s in active]))
        for s, stream in zip(active, streams):
            slots[s]["stream"] = stream
        # A fixed batch size, one compilation: free slots repeat the first active row's inputs.
        images, keys, prev, states = (_pad_rows(x, batch_envs) for x in (images, keys, prev, states))
        instructions += instructions[:1] * (batch_envs - len(active))
        inputs = {"prev_images": prev, "states": states}
        if first_call_seconds is None:
            start = time.perf_counter()
            policy.act_batch(images, instructions, keys, **inputs)
            first_call_seconds = time.perf_counter() - start
        start = time.perf_counter()
        chunks = np.asarray(policy.act_batch(images, instructions, keys, **inputs))[: len(active), :execute]
        seconds = time.perf_counter() - start
        calls.append((seconds, len(active)))
        steps = [("step", s, chunk) for s, chunk in zip(active, chunks)]
        for s, chunk, out in zip(active, chunks, pool.run(steps)):
            episode = slots[s]
            episode["calls"] += 1
            episode["seconds"] += seconds
            episode["actions"].append(chunk[: out["executed"]])
            if not out["done"]:
                episode.update(image=out["image"], state=out["state"], prev_image=out.get("prev_image"))
                continue
            actions = np.concatenate(episode["actions"]).astype(np.float32)
            row = {"task": episode["task"], "episode": episode["episode"], "seed": episode["seed"],
                   "success": bool(out["success"]), "length": int(len(actions)),
                   "instruction": episode["instruction"], "policy_calls": episode["calls"],
                   "policy_seconds": float(episode["seconds"]), "actions": actions, "slot": s}
            if "frames" in out:
                row["frames"] = out["frames"]
            rows.append(row)
            on_episode(row)
            slots[s] = None
            unfinished[row["task"]] -= 1
            if settings.record_frames and not unfinished[row["task"]]:
                _replay_frames(pool, sorted((r for r in rows if r["task"] == row["task"]), key=lambda r: r["episode"]))
    return rows, calls, float(first_call_seconds or 0.0)


def _replay_frames(pool: EnvPool, rows: Sequence[dict[str, Any]]) -> None:
    """Frames for the episodes of one task (``rows`` in index order) that get a GIF, the first
    success and the first failure, as ``write_outputs`` picks them: those without frames are
    replayed from their actions in the worker that ran them, and the replay's outcome checked."""
    chosen = [next(r for r in rows if r["success"] == outcome) for outcome in (True, False)
              if any(r["success"] == outcome for r in rows)]
    chosen = [r for r in chosen if "frames" not in r]
    replays = pool.run([("replay", r["slot"], r["task"], r["seed"], r["actions"]) for r in chosen])
    for row, replay in zip(chosen, replays):
        if (replay["success"], replay["length"]) != (row["success"], row["length"]):
            log.warning("replay of %s episode %d (seed %d) ended differently (success %s, length %d) than the "
                        "evaluated episode (%s, %d): its GIF may not show it", row["task"], row["episode"],
                        row["seed"], replay["success"], replay["length"], row["success"], row["length"])
        row["frames"] = replay["frames"]


def default_batch_envs(workers: int, episodes: int, tasks: int = 1) -> int:
    """Episodes run at once by default: one per task up to 16 (each slot then keeps to its task
    and its environment for all the task's episodes, and every round is full), else 4 per
    environment worker, at least 8 (a round's call serves enough episodes to amortise its fixed
    cost; every running episode holds an environment of ~150 MiB); at most all of them."""
    return max(1, min(int(episodes), max(8, 4 * int(workers), min(int(tasks), 16))))


def rollouts(settings: EvalSettings, tasks: Sequence[str], episodes: int, workers: int = 1,
             progress: bool = True, batch_envs: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every ``(task, index)`` episode, in task / index order, and the calls' timing
    ``{calls, batch_size, first_call_seconds}`` (batched; ``calls`` None when unbatched).
    ``batch_envs``: episodes at once (None: ``default_batch_envs``; 0: unbatched)."""
    jobs = episode_jobs(settings, tasks, episodes)
    bar = tqdm(total=len(jobs), desc="rollouts", unit="ep", disable=not progress)
    successes = []

    def on_episode(row):
        successes.append(row["success"])
        bar.update(1)
        bar.set_postfix(success=f"{np.mean(successes):.2f}")

    if batch_envs is None:
        batch_envs = default_batch_envs(workers, len(jobs), len(tasks))
    timing: dict[str, Any] = {"calls": None, "batch_size": 1, "first_call_seconds": None}
    try:
        if batch_envs <= 0:
            results = _unbatched_rollouts(settings, jobs, workers, on_episode)
        else:
            batch_envs = min(int(batch_envs), len(jobs))
            policy = _load_policy(settings)
            history = None
            if policy.history_frames:  # o_{t-k} per slot: stride k, replanning every n steps
                history = (int(policy.history_stride), int(settings.execute or policy.execute_steps))
            with EnvPool(settings, policy.image_size, batch_envs, workers, history) as pool:
                results, calls, first = _batched_rollouts(policy, settings, jobs, batch_envs, pool, on_episode)
            timing = {"calls": calls, "batch_size": batch_envs, "first_call_seconds": first}
    finally:
        bar.close()
    order = {(task, i): n for n, (task, i, _) in enumerate(jobs)}
    for row in results:
        row.pop("slot", None)
    return sorted(results, key=lambda r: order[(r["task"], r["episode"])]), timing


# --------------------------------------------------------------------------- outputs


def write_gif(path: str, frames: np.ndarray, fps: int = 20, scale: int = 2) -> str:
    """uint8 ``[T, S, S, 3]`` -> an animated GIF (nearest-neighbour upscaled), written atomically."""
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
             progress: bool = True, batch_envs: int | None = None) -> dict[str, Any]:
    """Roll the checkpoint's policy out and summarise; writes outputs when ``out_dir`` is set.
    ``workers``: environment processes (batched) or policy + environment processes (unbatched),
    default ``min(2, cores)``; ``batch_envs``: episodes at once, one policy call for all of them
    per round (None: ``default_batch_envs``; 0: unbatched, one call per episode replan)."""
    from jaxvla.sim.metaworld_env import task_names  # Meta-World (MuJoCo)

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {max_steps}")
    if batch_envs is not None and batch_envs < 0:
        raise ValueError(f"--batch_envs must be >= 0 (0: unbatched), got {batch_envs}")
    names = task_names(tasks)
    total = len(names) * episodes
    workers = int(workers or min(os.cpu_count() or 1, 2))
    workers = max(1, min(workers, total))
    if batch_envs is None:
        batch_envs = default_batch_envs(workers, total, len(names))
    batch_envs = min(int(batch_envs), total)
    if batch_envs:
        workers = min(workers, batch_envs)
    settings = EvalSettings(checkpoint=os.path.abspath(checkpoint), max_steps=int(max_steps), execute=execute,
                            camera=camera, seed=int(seed), record_frames=record_frames,
                            tokenizer_checkpoint=tokenizer_checkpoint)
    start = time.time()
    rows, timing = rollouts(settings, names, episodes, workers=workers, progress=progress, batch_envs=batch_envs)
    summary = summarize(rows, names, timing["calls"], timing["batch_size"], timing["first_call_seconds"])
    summary["settings"] = dict(dataclasses.asdict(settings), tasks=names, episodes_per_task=episodes,
                               workers=workers, batch_envs=batch_envs, mode="batched" if batch_envs else "unbatched",
                               eval_seed_base=EVAL_SEED_BASE)
    summary["wall_seconds"] = time.time() - start
    summary["episodes_per_minute"] = 60.0 * total / summary["wall_seconds"]
    summary["episodes"] = [{k: v for k, v in e.items() if k not in ("frames", "actions")} for e in rows]
    if out_dir:
        write_outputs(summary, rows, out_dir, title=f"{os.path.basename(os.path.abspath(checkpoint))}: "
                      f"{len(names)} tasks x {episodes} episodes")
    return summary


def format_table(summary: dict) -> str:
    """A Markdown table: per task and mean success (95 % CI), mean episode length; then the
    policy latency."""
    lines = ["| task | success | 95 % CI | mean length |", "|---|---|---|---|"]
    for task, r in summary["tasks"].items():
        lines.append(f"| {task} | {r['successes']}/{r['episodes']} ({r['success_rate']:.0%}) | "
                     f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['mean_length']:.0f} |")
    m = summary["mean"]
    lines.append(f"| **mean** | {m['successes']}/{m['episodes']} ({m['success_rate']:.0%}) | "
                 f"[{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] | {m['mean_length']:.0f} |")
    lat = summary["latency"]
    lines.append("")
    if lat.get("batch_size", 1) > 1:
        lines.append(f"Policy latency {lat['ms_per_call']:.1f} ms per batched call ({lat['rows_per_call']:.1f} "
                     f"episodes per call on average, padded to {lat['batch_size']}), {lat['actions_per_call']:.1f} "
                     f"actions per episode per call -> {lat['control_hz']:.0f} Hz per episode, "
                     f"{lat['actions_per_second']:.0f} actions/s in all (inference only).")
    else:
        lines.append(f"Policy latency {lat['ms_per_call']:.1f} ms per call, {lat['actions_per_call']:.1f} actions "
                     f"per call -> {lat['control_hz']:.0f} Hz of actions (inference only).")
    return "\n".join(lines)
