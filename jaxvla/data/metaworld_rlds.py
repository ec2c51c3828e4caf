"""Meta-World expert demonstrations as a TFDS dataset in the RLDS format.

``make_metaworld_dataset`` rolls out Meta-World's scripted experts (in a pool of worker
processes, one MuJoCo environment and renderer per worker) and writes the episodes with
the ``MetaWorld`` TFDS builder. The output directory is written atomically.

On-disk layout (``out_dir`` is a TFDS ``data_dir``)::

    out_dir/metaworld/1.0.0/
        dataset_info.json  features.json  metadata.json
        metaworld-train.tfrecord-00000-of-0000N ...
        metaworld-val.tfrecord-00000-of-0000M ...      (only if there are val episodes)

Read it with ``tfds.builder_from_directory(out_dir + "/metaworld/1.0.0")`` or
``tfds.builder("metaworld", data_dir=out_dir)``. ``builder.info.metadata`` holds the
generation settings (``"config"``) and per-task statistics (``"stats"``).

Features (one example = one episode)::

    steps: Dataset of
        observation/image      Image uint8 [S, S, 3], JPEG (quality 95)
        observation/state      float32 [39]  Meta-World state (goal observable)
        action                 float32 [4]   xyz delta + gripper, in [-1, 1]
        language_instruction   Text          language-world sentence for the task
        reward                 float32       Meta-World reward (0..10)
        discount               float32
        is_first, is_last, is_terminal  bool
    episode_metadata:
        task (Text, no "-v3"), success (bool), seed (int64), episode_id (int64)

RLDS convention used here. An episode with ``T`` environment steps has ``T + 1`` RLDS
steps. Step ``t`` holds the observation seen *before* its action ``a_t``, and the reward
and discount that followed ``a_t``. The last step (``is_last``) holds the final
observation only: its action is zero-padded, its reward and discount are 0.
``is_first`` is true on step 0 only. Episodes end ``steps_after_success`` environment
steps after the first successful one (so the solved scene stays visible), or at
``max_episode_steps``. An episode that ended because it succeeded is *terminal*: its last
step has ``is_terminal=True`` and the step before it has discount 0. An episode cut by the
step limit is truncated: ``is_terminal`` stays false and all discounts before the last
step are 1. ``episode_metadata/success`` is true when any step had
``info["success"]``.

Actions are ``clip(expert(state) + N(0, action_noise^2), -1, 1)``.

Episodes and splits. For each task, episodes ``0 .. episodes_per_task - 1`` are rolled
out with seed ``episode_seed(seed, task, index)`` (a function of the run seed, task name
and index only, so results do not depend on worker scheduling or on the other tasks).
The last ``val_episodes_per_task`` episodes of every task form the ``val`` split (default:
1 when ``episodes_per_task > 1``, else 0), the others ``train``. ``episode_id`` is
``task_position * episodes_per_task + index`` and is unique within a dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm.auto import tqdm

from jaxvla.sim import instructions as _instructions
from jaxvla.sim import metaworld_env as mw

DATASET_NAME = "metaworld"
DATASET_VERSION = "1.0.0"

_DESCRIPTION = __doc__


@dataclasses.dataclass(frozen=True)
class MetaWorldDatasetConfig:
    """What to roll out. ``resolved()`` validates it and fills in defaults."""

    tasks: tuple[str, ...]
    episodes_per_task: int
    image_size: int = 64
    seed: int = 0
    action_noise: float = 0.0
    max_episode_steps: int | None = None
    val_episodes_per_task: int | None = None
    steps_after_success: int = 5
    camera: str | mw.CameraSpec = "corner"

    def resolved(self) -> MetaWorldDatasetConfig:
        tasks = tuple(mw.task_names(self.tasks))
        episodes = int(self.episodes_per_task)
        if episodes < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {self.episodes_per_task}")
        val = self.val_episodes_per_task
        val = (1 if episodes > 1 else 0) if val is None else int(val)
        if not 0 <= val < episodes:
            raise ValueError(
                f"val_episodes_per_task must be in [0, episodes_per_task={episodes}) so that "
                f"every task keeps a train episode, got {val}"
            )
        if int(self.image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if float(self.action_noise) < 0:
            raise ValueError(f"action_noise must be >= 0, got {self.action_noise}")
        max_steps = int(self.max_episode_steps or mw.DEFAULT_MAX_EPISODE_STEPS)
        if max_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {self.max_episode_steps}")
        if int(self.steps_after_success) < 0:
            raise ValueError(f"steps_after_success must be >= 0, got {self.steps_after_success}")
        return dataclasses.replace(
            self,
            tasks=tasks,
            episodes_per_task=episodes,
            image_size=int(self.image_size),
            seed=int(self.seed),
            action_noise=float(self.action_noise),
            max_episode_steps=max_steps,
            val_episodes_per_task=val,
            steps_after_success=int(self.steps_after_success),
            camera=mw.camera_spec(self.camera),
        )

    def to_json(self) -> dict[str, Any]:
        cfg = self.resolved()
        out = dataclasses.asdict(cfg)
        out["tasks"] = list(cfg.tasks)
        out["camera"] = dataclasses.asdict(cfg.camera)
        out["camera"]["lookat"] = list(cfg.camera.lookat)
        return out


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    task: str
    index: int
    seed: int
    episode_id: int
    split: str


def episode_specs(config: MetaWorldDatasetConfig) -> list[EpisodeSpec]:
    """Every episode of the run, task-major, with its seed, id and split."""
    cfg = config.resolved()
    n = cfg.episodes_per_task
    first_val = n - cfg.val_episodes_per_task
    specs = []
    for position, task in enumerate(cfg.tasks):
        for index in range(n):
            specs.append(
                EpisodeSpec(
                    task=task,
                    index=index,
                    seed=mw.episode_seed(cfg.seed, task, index),
                    episode_id=position * n + index,
                    split="val" if index >= first_val else "train",
                )
            )
    return specs


# --------------------------------------------------------------------------- rollouts


def collect_rollouts(
    jobs: Sequence[mw.RolloutJob], num_workers: int = 2, progress: bool = True
) -> list[dict[str, Any]]:
    """Run ``jobs`` (each writes one .npz) and return their summaries in job order.

    ``num_workers > 1`` uses a spawn-context process pool; each worker builds its own
    environment and renderer. ``num_workers <= 1`` runs in this process.
    """
    results: dict[tuple[str, int], dict[str, Any]] = {}
    bar = tqdm(total=len(jobs), desc="Meta-World episodes", unit="ep", disable=not progress)
    successes = 0

    def record(summary: dict[str, Any]) -> None:
        nonlocal successes
        results[(summary["task"], summary["index"])] = summary
        successes += int(summary["success"])
        bar.update(1)
        bar.set_postfix(success=f"{successes}/{len(results)}", last=summary["task"])

    try:
        if num_workers <= 1 or len(jobs) <= 1:
            try:
                for job in jobs:
                    record(mw.run_rollout_job(job))
            finally:
                mw.close_worker_env()
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(num_workers, len(jobs)), initializer=mw.init_rollout_worker) as pool:
                for summary in pool.imap_unordered(mw.run_rollout_job, jobs, chunksize=1):
                    record(summary)
                pool.close()
                pool.join()
    finally:
        bar.close()
    return [results[(job.task, job.index)] for job in jobs]


# --------------------------------------------------------------------------- TFDS builder


def _features(image_size: int) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(
                                shape=(image_size, image_size, 3),
                                dtype=np.uint8,
                                encoding_format="jpeg",
                                doc="RGB frame from the fixed upright camera, before the action.",
                            ),
                            "state": tfds.features.Tensor(
                                shape=(mw.STATE_DIM,),
                                dtype=np.float32,
                                doc="Meta-World state: hand xyz, gripper, objects, previous frame, goal xyz.",
                            ),
                        }
                    ),
                    "action": tfds.features.Tensor(
                        shape=(mw.ACTION_DIM,),
                        dtype=np.float32,
                        doc="xyz delta + gripper effort in [-1, 1]; zeros on the last step.",
                    ),
                    "language_instruction": tfds.features.Text(doc="language-world task sentence."),
                    "reward": tfds.features.Scalar(dtype=np.float32, doc="Reward after the action."),
                    "discount": tfds.features.Scalar(dtype=np.float32, doc="Discount after the action."),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                    "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict(
                {
                    "task": tfds.features.Text(doc="Meta-World task name without '-v3'."),
                    "success": tfds.features.Scalar(dtype=np.bool_, doc="Any step had info['success']."),
                    "seed": tfds.features.Scalar(dtype=np.int64, doc="Environment seed of the episode."),
                    "episode_id": tfds.features.Scalar(dtype=np.int64, doc="Unique id within the dataset."),
                }
            ),
        }
    )


def rlds_steps(episode: Mapping[str, np.ndarray], instruction: str, terminal: bool) -> list[dict[str, Any]]:
    """Arrays of one rollout (see ``rollout_expert``) -> the list of RLDS step dicts."""
    images, states = episode["images"], episode["states"]
    actions, rewards = episode["actions"], episode["rewards"]
    num_actions = int(actions.shape[0])
    if images.shape[0] != num_actions + 1 or states.shape[0] != num_actions + 1:
        raise ValueError("expected one more observation than actions")
    zero_action = np.zeros((mw.ACTION_DIM,), np.float32)
    steps = []
    for t in range(num_actions + 1):
        last = t == num_actions
        if last:
            discount = 0.0
        elif terminal and t == num_actions - 1:
            discount = 0.0
        else:
            discount = 1.0
        steps.append(
            {
                "observation": {"image": images[t], "state": states[t]},
                "action": zero_action if last else actions[t],
                "language_instruction": instruction,
                "reward": np.float32(0.0 if last else rewards[t]),
                "discount": np.float32(discount),
                "is_first": t == 0,
                "is_last": last,
                "is_terminal": bool(last and terminal),
            }
        )
    return steps


class MetaWorld(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """RLDS dataset of Meta-World scripted-expert episodes (see the module docstring).

    Construct with ``gen_config`` to build (``download_and_prepare``; nothing is
    downloaded). Reading needs no code: use ``tfds.builder_from_directory`` or
    ``tfds.builder("metaworld", data_dir=...)``, which load the stored feature spec. The
    class is not registered in the TFDS name registry for that reason: a registered
    class would be instantiated without a ``gen_config`` by ``tfds.builder``.

    Args:
      gen_config: what to roll out (``MetaWorldDatasetConfig``).
      rollout_dir: where the rollout workers write one ``.npz`` per episode; each file is
        deleted once written into the dataset. Default: a temporary directory, removed.
      num_workers: rollout processes (spawn context); 1 rolls out in this process.
      progress: show a progress bar over episodes.
      **kwargs: ``tfds.core.GeneratorBasedBuilder`` arguments, e.g. ``data_dir``.

    ``make_metaworld_dataset`` wraps this with an atomic output directory; prefer it.
    """

    name = DATASET_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Meta-World v3 scripted-expert episodes, RLDS format."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 resolves this through `importlib_resources`, a package it only
        # declares for Python < 3.9 (tensorflow/datasets#11212), so the default raises
        # ModuleNotFoundError on newer Pythons. Only used to look for a checksums file.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        gen_config: MetaWorldDatasetConfig | None = None,
        rollout_dir: str | os.PathLike | None = None,
        num_workers: int = 2,
        progress: bool = True,
        **kwargs,
    ):
        if gen_config is None:
            raise ValueError(
                "MetaWorld builds datasets and needs gen_config=MetaWorldDatasetConfig(...). "
                "To read an existing dataset use tfds.builder_from_directory(<dir>/metaworld/1.0.0)."
            )
        self.gen_config = gen_config.resolved()
        self.rollout_dir = None if rollout_dir is None else Path(rollout_dir)
        self.num_workers = int(num_workers)
        self.progress = bool(progress)
        self.rollout_summaries: list[dict[str, Any]] = []
        self.rollout_seconds = 0.0
        self._scratch_dirs: list[Path] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=_features(self.gen_config.image_size),
            homepage="https://github.com/Farama-Foundation/Metaworld",
            metadata=tfds.core.MetadataDict(config=self.gen_config.to_json()),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is simulated.
        cfg = self.gen_config
        specs = episode_specs(cfg)
        if self.rollout_dir is None:  # Scratch space for the episodes, removed once written.
            rollout_dir = Path(tempfile.mkdtemp(prefix="metaworld_rollouts_"))
            self._scratch_dirs.append(rollout_dir)
        else:
            rollout_dir = self.rollout_dir
            rollout_dir.mkdir(parents=True, exist_ok=True)
        jobs = [
            mw.RolloutJob(
                task=s.task,
                index=s.index,
                seed=s.seed,
                path=str(rollout_dir / f"{s.task}__{s.index:05d}.npz"),
                image_size=cfg.image_size,
                max_episode_steps=cfg.max_episode_steps,
                action_noise=cfg.action_noise,
                steps_after_success=cfg.steps_after_success,
                camera=cfg.camera,
            )
            for s in specs
        ]
        start = time.perf_counter()
        try:
            summaries = collect_rollouts(jobs, self.num_workers, self.progress)
        except BaseException:
            self._remove_scratch()
            raise
        self.rollout_seconds = time.perf_counter() - start
        for spec, summary in zip(specs, summaries):
            summary.update(episode_id=spec.episode_id, split=spec.split)
        self.rollout_summaries = summaries
        self.info.metadata["stats"] = episode_stats(summaries)

        splits = {"train": self._generate_examples([s for s in summaries if s["split"] == "train"])}
        val = [s for s in summaries if s["split"] == "val"]
        if val:
            splits["val"] = self._generate_examples(val)
        return splits

    def download_and_prepare(self, *args, **kwargs):
        try:
            return super().download_and_prepare(*args, **kwargs)
        finally:
            self._remove_scratch()

    def _remove_scratch(self) -> None:
        while self._scratch_dirs:
            shutil.rmtree(self._scratch_dirs.pop(), ignore_errors=True)

    def _generate_examples(self, summaries: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """One example per rollout file; each file is deleted once it has been read."""
        for summary in summaries:
            with np.load(summary["path"]) as arrays:
                episode = {k: arrays[k] for k in ("images", "states", "actions", "rewards")}
            os.remove(summary["path"])  # Consumed: keep the scratch space small.
            task = summary["task"]
            example = {
                "steps": rlds_steps(
                    episode, _instructions.instruction(task), terminal=summary["terminated_on_success"]
                ),
                "episode_metadata": {
                    "task": task,
                    "success": bool(summary["success"]),
                    "seed": int(summary["seed"]),
                    "episode_id": int(summary["episode_id"]),
                },
            }
            yield f"{task}__{summary['index']:05d}", example


def episode_stats(summaries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: episodes, successes, success_rate, env_steps, rlds_steps."""
    stats: dict[str, dict[str, Any]] = {}
    for s in summaries:
        entry = stats.setdefault(s["task"], {"episodes": 0, "successes": 0, "env_steps": 0, "rlds_steps": 0})
        entry["episodes"] += 1
        entry["successes"] += int(s["success"])
        entry["env_steps"] += int(s["num_steps"])
        entry["rlds_steps"] += int(s["num_steps"]) + 1
    for entry in stats.values():
        entry["success_rate"] = entry["successes"] / entry["episodes"]
    return stats


# --------------------------------------------------------------------------- atomic build


def dataset_version_dir(out_dir: str | os.PathLike) -> str:
    """The directory ``tfds.builder_from_directory`` reads, for a dataset made in ``out_dir``."""
    return str(Path(out_dir) / DATASET_NAME / DATASET_VERSION)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory.")
    if overwrite or not any(out.iterdir()):
        return
    if (Path(dataset_version_dir(out)) / "dataset_info.json").exists():
        raise FileExistsError(
            f"{out} already holds a complete Meta-World dataset ({dataset_version_dir(out)}). "
            "Refusing to overwrite it: pass overwrite=True (--overwrite) or choose another --out."
        )
    raise FileExistsError(
        f"{out} exists and is not empty. Refusing to write a dataset into it: pass overwrite=True "
        "(--overwrite) to replace it, or choose another --out."
    )


class _TfdsProgressBars:
    """Silence TFDS's own per-split bars (we show one bar over episodes), then restore."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        from tensorflow_datasets.core.utils import tqdm_utils

        self._previous = getattr(tqdm_utils, "_active", True)
        tfds.display_progress_bar(self.enabled)

    def __exit__(self, *exc):
        tfds.display_progress_bar(self._previous)


def make_metaworld_dataset(
    tasks: str | Sequence[str],
    episodes_per_task: int,
    image_size: int,
    out_dir: str | os.PathLike,
    *,
    action_noise: float = 0.0,
    seed: int = 0,
    max_episode_steps: int | None = None,
    val_episodes_per_task: int | None = None,
    steps_after_success: int = 5,
    camera: str | mw.CameraSpec = "corner",
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> str:
    """Roll out the experts and write the RLDS dataset to ``out_dir`` atomically.

    ``tasks`` is ``"mt10"``, ``"mt50"``, ``"a,b,c"`` or a list of names. The dataset is
    built in a temporary directory next to ``out_dir`` and renamed into place when
    complete; on any error (or interrupt) that directory is removed and ``out_dir`` is
    left as it was. An existing non-empty ``out_dir`` is refused unless ``overwrite``.

    Returns the dataset version directory ``<out_dir>/metaworld/1.0.0`` (pass it to
    ``tfds.builder_from_directory``).

    With ``num_workers > 1`` the rollouts run in a spawn-context process pool, so a
    calling script needs the usual ``if __name__ == "__main__":`` guard (the workers
    re-import the main module; keep heavy imports out of its top level).
    ``num_workers=1`` rolls out in this process.
    """
    config = MetaWorldDatasetConfig(
        tasks=tuple(mw.task_names(tasks)),
        episodes_per_task=episodes_per_task,
        image_size=image_size,
        seed=seed,
        action_noise=action_noise,
        max_episode_steps=max_episode_steps,
        val_episodes_per_task=val_episodes_per_task,
        steps_after_success=steps_after_success,
        camera=camera,
    ).resolved()
    out = Path(out_dir).expanduser().absolute()
    _check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build_dir = tmp / "dataset"
        builder = MetaWorld(
            gen_config=config,
            rollout_dir=tmp / "rollouts",
            num_workers=num_workers,
            progress=progress,
            data_dir=str(build_dir),
        )
        # TFDS prints where it writes (our temp dir); the summary below names the result.
        with _TfdsProgressBars(False), contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_dir=str(tmp / "downloads"),
                download_config=tfds.download.DownloadConfig(
                    compute_stats=tfds.download.ComputeStatsMode.SKIP
                ),
            )
        relative_version_dir = Path(builder.data_dir).relative_to(build_dir)
        if not (build_dir / relative_version_dir / "dataset_info.json").exists():
            raise RuntimeError(f"TFDS did not produce {build_dir / relative_version_dir}")
        _move_into_place(build_dir, out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    version_dir = str(out / relative_version_dir)
    if verbose:
        print(format_summary(builder.rollout_summaries, wall, builder.rollout_seconds, version_dir))
    return version_dir


def _move_into_place(build_dir: Path, out: Path, tmp: Path) -> None:
    """Rename ``build_dir`` to ``out``; an existing ``out`` is moved aside into ``tmp`` first."""
    old = None
    if out.exists():
        old = tmp / "replaced"
        os.replace(out, old)
    try:
        os.replace(build_dir, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise


def format_summary(
    summaries: Sequence[Mapping[str, Any]], wall_seconds: float, rollout_seconds: float, version_dir: str
) -> str:
    stats = episode_stats(summaries)
    lines = [f"Meta-World RLDS dataset: {version_dir}"]
    width = max([len(t) for t in stats] + [4])
    lines.append(f"  {'task':<{width}}  episodes  success  mean_env_steps")
    for task, entry in stats.items():
        mean_steps = entry["env_steps"] / entry["episodes"]
        lines.append(
            f"  {task:<{width}}  {entry['episodes']:8d}  {entry['success_rate']:7.0%}  {mean_steps:14.1f}"
        )
    episodes = sum(e["episodes"] for e in stats.values())
    successes = sum(e["successes"] for e in stats.values())
    env_steps = sum(e["env_steps"] for e in stats.values())
    rlds_steps_total = sum(e["rlds_steps"] for e in stats.values())
    splits = {}
    for s in summaries:
        splits[s.get("split", "?")] = splits.get(s.get("split", "?"), 0) + 1
    lines.append(
        f"  total: {episodes} episodes ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}), "
        f"{env_steps} env steps / {rlds_steps_total} RLDS steps, success {successes}/{episodes} "
        f"({successes / max(episodes, 1):.0%})"
    )
    lines.append(
        f"  wall time {wall_seconds:.1f} s (rollouts {rollout_seconds:.1f} s, "
        f"encoding + writing {max(wall_seconds - rollout_seconds, 0.0):.1f} s)"
    )
    return "\n".join(lines)


def read_metadata(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The generation config and stats stored with a dataset (``metadata.json``)."""
    with open(Path(version_dir) / "metadata.json") as f:
        return json.load(f)
