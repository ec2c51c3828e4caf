"""Stages: what each step of the method gives the shared trainer.

A stage module (``jaxvla/stages/<name>.py``) exposes ``build(config) -> Stage`` and, when it reads
what another step makes, ``prerequisites(config) -> [Checkpoint | MetaWorldData]``: the earlier
stages' checkpoints (where, and the config that trains them) and the embedded Meta-World dataset
it reads (``jaxvla.data.embedded.MetaWorldData``). A build only reads: it checks its prerequisites (``require``) and raises
``MissingPrerequisiteError`` naming each missing one and the command that makes it; it never
trains or renders. The entry point ``python -m jaxvla.train`` makes missing prerequisites first
(the trainer module's ``train_prerequisites``); ``jaxvla.experiment`` trains its stages in its own order
and the builds check it. The trainer does the rest (mesh, sharded init, optimizer, checkpoints,
logging) the same way for every stage.

Also here, what the backbone stages (2: latent pretraining, 3: action finetuning) share: the
image tokenizer they read (``image_tokenizer_checkpoint`` / ``image_tokenizer``) and the frame
history settings (``history_settings`` / ``data_with_history``). The frozen encoders themselves
live in ``jaxvla.frozen``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import shlex
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxvla import checkpoint as ckpt
from jaxvla.config import apply_overrides, load_config
from jaxvla.frozen import FrameTokenizer

log = logging.getLogger("jaxvla")

Batch = dict[str, Any]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Stage:
    """The pieces of one training stage.

    Attributes:
      init_variables: rng -> Flax variables ``{"params": ...}`` with logically-partitioned boxes
        (``nn.with_logical_partitioning``); traced abstractly for shardings, then jitted sharded.
      loss_fn: pure ``(params, batch, rng) -> (loss, metrics)``. Scalar metrics are logged; entries
        named ``aux/...`` (any shape) are not logged but handed to ``post_step``.
      batches: ``start_step -> iterator`` of this process's share of each global batch (numpy,
        leading dim ``batch_size / process_count``). Batch ``s`` must depend only on (seed, s) so
        resumed runs see the same data. An iterator with a ``data_metrics()`` method (a
        ``DataStream``) has those scalars (e.g. ``data/skipped/<dataset>``) logged at every log
        step and in the final metrics.
      assets: JSON-able data (numpy arrays allowed) saved with every checkpoint.
      init_aux: params -> stage state updated outside the gradient (e.g. codebook usage).
      post_step: ``(params, aux, aux_outputs, step, rng) -> (params, aux, metrics)``, jitted into
        the train step after the optimizer update (e.g. dead-code restarts).
      eval_batches: () -> iterator of held-out batches (same layout as ``batches``).
      eval_fn: ``(params, batch, rng) -> metrics``; defaults to the loss's metrics.
      visualize: ``(params, batch) -> {name: images [N, H, W, 3] in [-1, 1]}``, jitted.
      workdir_assets: ``workdir -> assets``, called by the trainer (every process) before training
        starts: writes files the checkpoints need into the workdir (finetuning bundles its image
        tokenizer, ``jaxvla.frozen.bundle_image_tokenizer``) and returns assets added to
        ``assets`` (e.g. their paths relative to the checkpoint, their digests).
    """

    init_variables: Callable[[jax.Array], dict]
    loss_fn: LossFn
    batches: Callable[[int], Iterator[Batch]]
    assets: dict = dataclasses.field(default_factory=dict)
    init_aux: Callable[[Any], Any] | None = None
    post_step: Callable | None = None
    eval_batches: Callable[[], Iterator[Batch]] | None = None
    eval_fn: Callable | None = None
    visualize: Callable | None = None
    workdir_assets: Callable[[str], dict] | None = None


class DataStream:
    """Iterator of stage batches ``fn(batch)`` over a data pipeline's batches (``source``: e.g.
    ``jaxvla.data.pipeline.Batches``) that passes on the source's ``data_metrics()`` for the
    trainer to log (summed over processes: every process must call it at the same steps, as the
    trainer's log block does)."""

    def __init__(self, source: Any, fn: Callable[[Batch], Batch] | None = None):
        self._source = source
        self._iterator = iter(source)
        self._fn = fn

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        return batch if self._fn is None else self._fn(batch)

    def data_metrics(self) -> dict[str, float]:
        metrics = getattr(self._source, "data_metrics", None)
        values = dict(metrics()) if metrics is not None else {}
        if values and jax.process_count() > 1:
            keys = sorted(values)
            gathered = multihost_utils.process_allgather(np.asarray([values[k] for k in keys], np.float32))
            values = dict(zip(keys, (float(v) for v in np.asarray(gathered).reshape(-1, len(keys)).sum(0))))
        return values


_BUILDERS: dict[str, Callable[[Any], Stage] | str] = {
    "tokenizer": "jaxvla.stages.tokenizer",
    "laq": "jaxvla.stages.laq",
    "finetune": "jaxvla.stages.finetune",
    "pretrain": "jaxvla.stages.pretrain",
}


def register_stage(name: str, build: Callable[[Any], Stage]) -> None:
    """Adds a stage under ``config.stage = name`` (user extensions, tests)."""
    _BUILDERS[name] = build


def build_stage(config: Any) -> Stage:
    """The Stage for ``config.stage``; ValueError listing the known stages otherwise."""
    try:
        builder = _BUILDERS[config.stage]
    except KeyError:
        raise ValueError(
            f"config.stage={config.stage!r} is unknown; known stages: {sorted(_BUILDERS)}"
        ) from None
    if isinstance(builder, str):
        builder = importlib.import_module(builder).build
    return builder(config)


def _stage_module(config: Any):
    """The module registered for ``config.stage`` (None for a stage registered as a function)."""
    builder = _BUILDERS.get(config.stage)
    return importlib.import_module(builder) if isinstance(builder, str) else None


# ------------------------------------------------------------------------------------------------
# Prerequisites: what a build reads that another step makes.


class MissingPrerequisiteError(FileNotFoundError):
    """A stage's build found a prerequisite missing; the message names each missing one and the
    command that makes it."""


def _flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A prerequisite: an earlier stage's checkpoint in ``workdir``, made (when missing) by training
    ``config_spec`` (e.g. ``configs/tokenizer.py:small``) with ``overrides`` (dotted keys) there."""

    what: str
    workdir: str
    config_spec: str
    overrides: dict = dataclasses.field(default_factory=dict)

    def present(self) -> bool:
        try:
            ckpt.resolve_checkpoint(self.workdir)
            return True
        except FileNotFoundError:
            return False

    def missing(self) -> str:
        return f"no checkpoint in {self.workdir}"

    def config(self) -> ml_collections.ConfigDict:
        """The config that trains it."""
        return apply_overrides(load_config(self.config_spec), dict(self.overrides))

    def command(self) -> str:
        """The command that trains it (``python -m jaxvla.train``, every override as a flag)."""
        return shlex.join(["python", "-m", "jaxvla.train", f"--config={self.config_spec}", f"--workdir={self.workdir}",
                           *(f"--config.{key}={_flag_value(value)}" for key, value in self.overrides.items())])

    def describe_training(self, num_steps: int) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.overrides.items()) or "its defaults"
        return (f"{self.what}: no checkpoint in {self.workdir}: training {self.config_spec} there first "
                f"({num_steps} steps; {settings})")


def prerequisites(config: Any) -> list:
    """What ``config.stage`` declares it reads (its module's ``prerequisites(config)``; none for a
    stage without one), in the order to make them."""
    module = _stage_module(config)
    declare = getattr(module, "prerequisites", None) if module is not None else None
    return list(declare(config)) if declare is not None else []


def require(needs: list, stage: str) -> None:
    """Raises ``MissingPrerequisiteError`` naming every missing one of ``needs`` and the command
    that makes it; logs the checkpoints that are there. What a build calls: it never trains or
    renders."""
    missing = []
    for need in needs:
        if not need.present():
            missing.append(need)
        elif isinstance(need, Checkpoint):
            log.info("%s: using the checkpoint in %s", need.what, need.workdir)
    if missing:
        lines = "\n".join(f"  - {need.what}: {need.missing()}; make it with: {need.command()}" for need in missing)
        raise MissingPrerequisiteError(
            f"{stage} reads what is not there (a stage build never trains or renders; `python -m jaxvla.train` "
            f"with this config makes missing prerequisites first):\n{lines}")


# ------------------------------------------------------------------------------------------------
# What the backbone stages (2 and 3) share.


def tokenizer_overrides(config) -> dict:
    """Overrides for training the image tokenizer first: its steps and, when this run reads the
    embedded Meta-World dataset, the same data directory, tasks and episodes."""
    overrides = {"num_steps": int(config.model.tokenizer_steps)}
    data = config.data
    if data.get("dataset") == "metaworld" and not data.get("mixture"):
        overrides.update({"data.source": "metaworld", "data.data_dir": str(data.data_dir)})
        if data.get("metaworld_tasks"):
            overrides["data.tasks"] = data.metaworld_tasks
        if data.get("metaworld_episodes_per_task"):
            overrides["data.episodes_per_task"] = int(data.metaworld_episodes_per_task)
    return overrides


def image_tokenizer_checkpoint(config) -> Checkpoint:
    """The image tokenizer a backbone stage reads: ``config.model.tokenizer_checkpoint``, trained
    from ``model.tokenizer_config`` for ``model.tokenizer_steps`` on this run's data when missing."""
    mc = config.model
    return Checkpoint("image tokenizer", str(mc.tokenizer_checkpoint), str(mc.tokenizer_config),
                      tokenizer_overrides(config))


def image_tokenizer(config) -> FrameTokenizer:
    """The frozen image tokenizer of ``config.model.tokenizer_checkpoint`` (a prerequisite the
    build has required), checked against ``config.data.image_size``."""
    tokenizer_dir = image_tokenizer_checkpoint(config).workdir
    frames = FrameTokenizer.from_checkpoint(tokenizer_dir)
    if frames.image_size != int(config.data.image_size):
        raise ValueError(f"config.data.image_size={config.data.image_size} but the image tokenizer "
                         f"({tokenizer_dir}) reads {frames.image_size} px frames")
    return frames


def history_settings(model_config) -> tuple[int, int]:
    """``(history_frames, history_stride)`` of a stage 2 / 3 ``config.model``: 0 or 1 earlier frame
    o_{t-k} before o_t in the vision block, ``k`` control steps before it (missing keys: no
    history, k = 1). Errors name the key."""
    frames = int(model_config.get("history_frames", 0) or 0)
    stride = int(model_config.get("history_stride", 1) or 0)
    if frames not in (0, 1):
        raise ValueError(f"config.model.history_frames={frames}: expected 0 (o_t only) or 1 (o_{{t-k}} before o_t)")
    if stride < 1:
        raise ValueError(f"config.model.history_stride={stride}: expected k >= 1 control steps")
    return frames, stride


def data_with_history(data_config, history_frames: int, history_stride: int):
    """A copy of ``config.data`` whose pipeline windows carry the history frame:
    ``history = 1 + history_frames``, ``history_stride = k`` (``jaxvla.data.pipeline``: frames
    t-k, t; before the episode's start, frame 0). ``config.data.history`` left at 1 is set here;
    another value that disagrees with ``config.model.history_frames`` is an error naming both."""
    data = ml_collections.ConfigDict(data_config.to_dict())
    given = int(data.get("history", 1) or 1)
    if given not in (1, 1 + history_frames):
        raise ValueError(f"config.data.history={given} disagrees with config.model.history_frames={history_frames}: "
                         f"leave config.data.history at 1 (the stage sets it to 1 + history_frames)")
    data.history = 1 + int(history_frames)
    data.history_stride = int(history_stride)
    return data
