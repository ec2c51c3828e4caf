"""Stages: what each step of the method gives the shared trainer.

A stage module (``jaxvla/stages/<name>.py``) exposes ``build(config) -> Stage``. The trainer does
the rest (mesh, sharded init, optimizer, checkpoints, logging) the same way for every stage.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

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
