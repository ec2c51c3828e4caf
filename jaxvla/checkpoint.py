"""Orbax checkpoints: how each stage hands off to the next.

A stage's workdir holds ``checkpoints/<step>/`` with three items:

* ``state``   the TrainState (step, params, optimizer state, rng, EMA, stage aux state),
* ``config``  the resolved config as JSON,
* ``assets``  data assets the next stage or the policy needs (normalisation statistics, bin
  edges, ...) as JSON, numpy arrays tagged so they come back as arrays of the same dtype.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a step that restores half-written. Restores take abstract arrays carrying the
*current* mesh's shardings, so a checkpoint written on 8 devices restores on 1 and the reverse.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxvla.io.weights import flatten_dict, unflatten_dict

log = logging.getLogger("jaxvla")

CHECKPOINT_SUBDIR = "checkpoints"


# ----------------------------------------------------------------------------------------------
# Assets: JSON with tagged numpy arrays.


def encode_assets(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): encode_assets(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [encode_assets(v) for v in tree]
    if isinstance(tree, (np.ndarray, jax.Array)) or isinstance(tree, np.generic):
        array = np.asarray(tree)
        return {"__ndarray__": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}
    return tree


def decode_assets(tree: Any) -> Any:
    if isinstance(tree, dict):
        if "__ndarray__" in tree:
            return np.asarray(tree["__ndarray__"], dtype=tree["dtype"]).reshape(tree["shape"])
        return {k: decode_assets(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_assets(v) for v in tree]
    return tree


# ----------------------------------------------------------------------------------------------
# The manager.


def _is_step_dir(path: str) -> int | None:
    name = os.path.basename(os.path.normpath(path))
    return int(name) if name.isdigit() else None


class Checkpointer:
    """Saves and restores (state, config, assets) under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "config", "assets")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config: dict, assets: dict | None = None) -> None:
        """Starts saving ``step``; with async saves this returns once arrays are on the host."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                assets=ocp.args.JsonSave(encode_assets(assets or {})),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores ``step`` into arrays laid out as ``abstract_state`` (ShapeDtypeStructs with
        shardings) says; returns (state, config dict, assets)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
                assets=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.config, decode_assets(restored.assets)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(step directory, step) from a workdir, its checkpoints dir, or a step dir.

    Raises FileNotFoundError naming the path when it holds no finished checkpoint.
    """
    path = os.path.abspath(path)
    step = _is_step_dir(path)
    if step is not None and os.path.isdir(os.path.join(path, "state")):
        return path, step
    for candidate in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        if os.path.isdir(candidate):
            steps = ocp.utils.checkpoint_steps(candidate)
            if steps:
                return os.path.join(candidate, str(max(steps))), max(steps)
    raise FileNotFoundError(
        f"no finished checkpoint under {path}: expected a workdir with {CHECKPOINT_SUBDIR}/<step>/, "
        "a checkpoints directory, or a step directory"
    )


def _read_json_item(step_dir: str, name: str) -> dict:
    with open(os.path.join(step_dir, name, "metadata")) as f:
        return json.load(f)


def state_metadata(path: str) -> tuple[str, int, Any]:
    """(step dir, step, tree of the saved state's array metadata: .shape, .dtype)."""
    step_dir, step = resolve_checkpoint(path)
    metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state"))
    return step_dir, step, getattr(metadata, "item_metadata", metadata)


def restore_subtree(step_dir: str, item: Any) -> Any:
    """Restores the part of the saved state that ``item`` names (a nested dict of
    ShapeDtypeStructs with shardings, e.g. ``{"params": {...}}``) straight into those shardings."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), item)
    return ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )


def load_checkpoint(path: str) -> tuple[dict, dict, dict, int]:
    """(state as a nested dict of numpy arrays, config dict, assets, step) from ``path``.

    Every array comes to this process's first device, then to the host: meant for small models,
    inspection and tests. Large models restore sharded (``Checkpointer.restore``,
    ``graft_from_checkpoint``).
    """
    step_dir, step, metadata = state_metadata(path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    state = jax.tree.map(np.asarray, restore_subtree(step_dir, item))
    return state, _read_json_item(step_dir, "config"), decode_assets(_read_json_item(step_dir, "assets")), step


# ----------------------------------------------------------------------------------------------
# init_from surgery.


def plan_graft(
    target_shapes: dict[str, tuple], source_shapes: dict[str, tuple], drop: str = "", source_name: str = "init_from"
) -> tuple[list[str], list[str]]:
    """Decides, per parameter path, what surgery does; returns (paths to copy, report lines).

    * kept:        in both (and not matched by the ``drop`` regex); shapes must agree, else one
                   ValueError names every mismatched path with both shapes,
    * initialised: in the target only, or dropped: the fresh initialisation stays,
    * dropped:     in the source only: not used.
    """
    drop_re = re.compile(drop) if drop else None
    kept, report, mismatched = [], [], []
    for path, shape in target_shapes.items():
        if path in source_shapes and not (drop_re and drop_re.search(path)):
            if tuple(source_shapes[path]) != tuple(shape):
                mismatched.append(
                    f"parameter '{path}' has shape {tuple(source_shapes[path])} in the checkpoint "
                    f"but {tuple(shape)} in this model"
                )
                continue
            kept.append(path)
            report.append(f"kept        {path} {tuple(shape)}")
        else:
            why = "dropped by init_drop, " if path in source_shapes else ""
            report.append(f"initialised {path} {tuple(shape)} ({why}fresh init)")
    if mismatched:
        raise ValueError(
            f"{source_name}: " + "; ".join(mismatched) + ". Drop them with config.init_drop or fix the model config"
        )
    for path in sorted(set(source_shapes) - set(target_shapes)):
        report.append(f"dropped     {path} {tuple(source_shapes[path])} (not in this model)")
    return kept, report


def graft_params(params: Any, source: Any, drop: str = "", source_name: str = "init_from") -> tuple[Any, list[str]]:
    """Takes an in-memory ``source`` tree's parameters into ``params`` (see ``plan_graft``)."""
    target, loaded = flatten_dict(params), flatten_dict(source)
    kept, report = plan_graft(
        {k: v.shape for k, v in target.items()}, {k: v.shape for k, v in loaded.items()}, drop, source_name
    )
    for path in kept:
        target[path] = jax.device_put(np.asarray(loaded[path], dtype=target[path].dtype), target[path].sharding)
    return unflatten_dict(target), report


def graft_from_checkpoint(params: Any, path: str, drop: str = "") -> tuple[Any, list[str], int]:
    """``graft_params`` from a checkpoint on disk; kept arrays are restored directly into the
    target parameters' shardings (no host copy of the whole model). Returns (params, report, step)."""
    step_dir, step, metadata = state_metadata(path)
    if "params" not in metadata:
        raise ValueError(f"{step_dir}: the saved state has no 'params' (keys: {sorted(metadata)})")
    target = flatten_dict(params)
    kept, report = plan_graft(
        {k: v.shape for k, v in target.items()},
        {k: tuple(v.shape) for k, v in flatten_dict(metadata["params"]).items()},
        drop,
        source_name=f"config.init_from={path}",
    )
    if kept:
        item = {"params": unflatten_dict({p: jax.ShapeDtypeStruct(target[p].shape, target[p].dtype, sharding=target[p].sharding) for p in kept})}
        restored = flatten_dict(restore_subtree(step_dir, item)["params"])
        target.update(restored)
    return unflatten_dict(target), report, step
