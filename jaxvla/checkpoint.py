"""Orbax checkpoints: how each stage hands off to the next.

A stage's workdir holds ``checkpoints/<step>/`` with three items and a digest manifest:

* ``state``   the TrainState (step, params, optimizer state, rng, EMA, stage aux state),
* ``config``  the resolved config as JSON,
* ``assets``  data assets the next stage or the policy needs (normalisation statistics, bin
  edges, ...) as JSON, numpy arrays tagged so they come back as arrays of the same dtype,
* ``jaxvla_digests.json``  the size and SHA-256 of every file of the three items.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a step that restores half-written. The manifest is computed inside that
temporary directory after Orbax has finalised every item and before the rename (on the primary
process, in the background thread for async saves), so a step directory never exists without it.
Restores verify the manifest first and refuse a step whose files changed, are missing or were
truncated (``CorruptCheckpointError`` names the step and the file); a step without a manifest
(written before digests existed) is refused too unless ``verify=False``. Resuming a workdir, and
loading one without naming a step, falls back to the newest step that verifies and says which
steps it skipped and why; an explicit step never falls back.

Restores take abstract arrays carrying the *current* mesh's shardings, so a checkpoint written on 8
devices restores on 1 and the reverse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.path import atomicity as ocp_atomicity

from jaxvla.io.weights import flatten_dict, unflatten_dict

log = logging.getLogger("jaxvla")

CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("state", "config", "assets")
MANIFEST = "jaxvla_digests.json"
MANIFEST_FORMAT = "jaxvla-checkpoint-digests/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the step directory and the problem."""


class CorruptCheckpointError(CheckpointError):
    """A step fails verification against its digest manifest (or has none)."""

    def __init__(self, step_dir: str, step: int | None, problem: str):
        self.step_dir, self.step, self.problem = step_dir, step, problem
        super().__init__(f"checkpoint step {step} ({step_dir}) fails verification: {problem}")


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
# Digests: per-file SHA-256 of every file of a step's items, in ``<step>/jaxvla_digests.json``.


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of the file at ``path``, read in 4 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _item_files(step_dir: str) -> list[str]:
    """Every file under the step's item directories, relative to ``step_dir``, "/"-separated."""
    files = []
    for item in ITEMS:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in names:
                files.append(os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/"))
    return sorted(files)


def _digests(step_dir: str, files: list[str]) -> dict[str, tuple[int, str]]:
    """{file: (size, sha256)}; files hashed in parallel (hashlib releases the GIL)."""
    paths = {f: os.path.join(step_dir, *f.split("/")) for f in files}
    order = sorted(files, key=lambda f: -os.path.getsize(paths[f]))
    workers = max(1, min(16, os.cpu_count() or 1, len(files)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = dict(zip(order, pool.map(lambda f: file_digest(paths[f]), order)))
    return results


def write_manifest(step_dir: str, step: int) -> str:
    """Hashes every file of the step's items and writes the manifest (temp file + os.replace)."""
    files = _item_files(step_dir)
    digests = _digests(step_dir, files)
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": int(step),
        "algorithm": "sha256",
        "files": {f: {"size": digests[f][0], "sha256": digests[f][1]} for f in files},
    }
    path = os.path.join(step_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def verify_step(step_dir: str, step: int | None = None) -> None:
    """Checks every file of the step against its manifest; raises CorruptCheckpointError naming
    the step and each missing, truncated or changed file (or the missing manifest)."""
    step = _is_step_dir(step_dir) if step is None else step
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(
            step_dir, step,
            f"it has no digest manifest {MANIFEST}: written before checkpoints carried digests, or "
            "not by jaxvla's Checkpointer; restore it unverified with verify=False "
            "(--config.checkpoint.verify=false)",
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        recorded_step = manifest["step"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(step_dir, step, f"its digest manifest {MANIFEST} is unreadable: {e}") from e
    if step is not None and recorded_step != step:
        raise CorruptCheckpointError(step_dir, step, f"its digest manifest {MANIFEST} is for step {recorded_step}")
    problems, present = [], []
    for name, entry in sorted(files.items()):
        full = os.path.join(step_dir, *name.split("/"))
        if not os.path.isfile(full):
            problems.append(f"{name} is missing")
        elif os.path.getsize(full) != entry["size"]:
            problems.append(f"{name} is {os.path.getsize(full)} bytes, the manifest recorded {entry['size']} (truncated or overwritten)")
        else:
            present.append(name)
    if present:
        digests = _digests(step_dir, present)
        for name in present:
            if digests[name][1] != files[name]["sha256"]:
                problems.append(
                    f"{name} has SHA-256 {digests[name][1][:16]}..., the manifest recorded "
                    f"{files[name]['sha256'][:16]}... (its bytes changed after the save)"
                )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CorruptCheckpointError(step_dir, step, shown)


class _DigestingTemporaryPath(ocp_atomicity.AtomicRenameTemporaryPath):
    """Orbax's rename-on-commit temporary directory, plus the manifest: for a step directory
    (a name of digits) the digests are written into the temporary directory after Orbax has
    finalised every item and before the rename that makes the step visible. Orbax calls this on
    the primary process only, after every process has written its files; for async saves it runs
    in the background save thread, so ``wait``/``close``/the next save wait for it."""

    async def finalize(self, *args, **kwargs):
        final = self.get_final()
        if final.name.isdigit():
            await asyncio.to_thread(write_manifest, os.fspath(self.get()), int(final.name))
        return await super().finalize(*args, **kwargs)


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _none_verifies(where: str, skipped: list[CorruptCheckpointError], advice: str = "") -> CheckpointError:
    return CheckpointError(
        f"no checkpoint under {where} verifies: " + "; ".join(f"step {e.step}: {e.problem}" for e in skipped) + advice
    )


def _restore_error(step_dir: str, step: int | None, what: str, error: Exception) -> CheckpointError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return CheckpointError(
        f"checkpoint step {step} ({step_dir}): reading {what} failed: {type(error).__name__}: {message[:500]}"
    )


# ----------------------------------------------------------------------------------------------
# The manager.


def _is_step_dir(path: str) -> int | None:
    name = os.path.basename(os.path.normpath(path))
    return int(name) if name.isdigit() else None


class Checkpointer:
    """Saves and restores (state, config, assets) under ``<workdir>/checkpoints``; every step
    carries a digest manifest and restores verify it."""

    def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            temporary_path_class=_DigestingTemporaryPath,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "config", "assets")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, config: dict, assets: dict | None = None) -> None:
        """Starts saving ``step``; with async saves this returns once arrays are on the host (the
        files, the digests and the rename that publishes the step follow in the background)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                assets=ocp.args.JsonSave(encode_assets(assets or {})),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, verify: bool = True) -> tuple[Any, dict, dict]:
        """Restores ``step`` into arrays laid out as ``abstract_state`` (ShapeDtypeStructs with
        shardings) says; returns (state, config dict, assets). With ``verify`` (the default) the
        step's files are checked against its digest manifest first: CorruptCheckpointError names
        the step and the file."""
        step_dir = self.step_dir(step)
        if verify:
            verify_step(step_dir, step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    config=ocp.args.JsonRestore(),
                    assets=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # TensorStore / JSON errors: say which step
            raise _restore_error(step_dir, step, "the checkpoint", e) from e
        return restored.state, restored.config, decode_assets(restored.assets)

    def restore_latest(self, abstract_state: Any, verify: bool = True) -> tuple[int, Any, dict, dict] | None:
        """(step, state, config, assets) of the newest step that verifies, or None when there
        are no steps. Steps that fail verification are skipped with a warning naming the step and
        the file, then moved aside to ``checkpoints/corrupt-<step>-<time>`` (so a new save of the
        same step number works and nothing is deleted). When steps exist but none verifies,
        raises CheckpointError listing each one and moves nothing.

        With several processes only process 0 reads and hashes the files (the storage is shared);
        every process follows its verdict."""
        steps = sorted(self.all_steps(), reverse=True)
        skipped: list[CorruptCheckpointError] = []
        for step in steps:
            error = None
            if verify and jax.process_index() == 0:
                try:
                    verify_step(self.step_dir(step), step)
                except CorruptCheckpointError as e:
                    error = e
            if not _all_processes_agree(error is None):
                error = error or CorruptCheckpointError(self.step_dir(step), step, "process 0 found it corrupt")
                log.warning("checkpoint step %d is skipped: %s", step, error.problem)
                skipped.append(error)
                continue
            state, config, assets = self.restore(step, abstract_state, verify=False)
            for bad in skipped:
                moved = self.set_aside(bad.step, "corrupt")
                log.warning("moved the unverifiable checkpoint step %d aside to %s", bad.step, moved)
            return step, state, config, assets
        if skipped:
            raise _none_verifies(
                self.directory, skipped,
                ". Nothing was moved or deleted. Resume anyway with --config.checkpoint.verify=false, "
                f"or move {self.directory} away to start from scratch",
            )
        return None

    def set_aside(self, step: int, why: str) -> str:
        """Moves step ``step`` to ``checkpoints/<why>-<step>-<time>`` (after any save in flight
        finishes); Orbax no longer sees it, so the step number can be saved again."""
        self._manager.wait_until_finished()
        target = os.path.join(self.directory, f"{why}-{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        if jax.process_index() == 0:
            suffix, base = 1, target
            while os.path.exists(target):
                target, suffix = f"{base}.{suffix}", suffix + 1
            os.replace(self.step_dir(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxvla_checkpoint_set_aside_{step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _checkpoints_dir(path: str) -> str | None:
    for candidate in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        if os.path.isdir(candidate) and ocp.utils.checkpoint_steps(candidate):
            return candidate
    return None


def _candidates(path: str, step: int | None) -> tuple[list[tuple[str, int]], bool]:
    """([(step dir, step)] newest first, explicit): one explicit step for a step directory or
    ``step``, else every finished step under a workdir or checkpoints directory."""
    path = os.path.abspath(path)
    own = _is_step_dir(path)
    if own is not None and os.path.isdir(os.path.join(path, "state")):
        if step is not None and step != own:
            raise ValueError(f"{path} is the directory of step {own}, but step={step} was asked for")
        return [(path, own)], True
    directory = _checkpoints_dir(path)
    if directory is None:
        raise FileNotFoundError(
            f"no finished checkpoint under {path}: expected a workdir with {CHECKPOINT_SUBDIR}/<step>/, "
            "a checkpoints directory, or a step directory"
        )
    steps = sorted(ocp.utils.checkpoint_steps(directory), reverse=True)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no finished checkpoint step {step} in {directory} (it has steps {sorted(steps)})")
        return [(os.path.join(directory, str(step)), step)], True
    return [(os.path.join(directory, str(s)), s) for s in steps], False


def checkpoint_fingerprint(step_dir: str) -> str | None:
    """SHA-256 of the step's digest manifest: one string that changes when any file of the step
    does (a retrained run's step of the same number differs); None for a step without a manifest.
    Cheap: the manifest is read, the arrays are not hashed again."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def finished_steps(path: str) -> list[int]:
    """The finished checkpoint steps under a workdir or its checkpoints directory, ascending;
    [] when there are none."""
    directory = _checkpoints_dir(os.path.abspath(path))
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory else []


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """(step directory, step) from a workdir, its checkpoints dir, or a step dir: ``step``, or
    else the latest finished step. Does not verify digests (``find_checkpoint`` does).

    Raises FileNotFoundError naming the path when it holds no finished checkpoint (or not ``step``).
    """
    return _candidates(path, step)[0][0]


def find_checkpoint(path: str, step: int | None = None, verify: bool = True) -> tuple[str, int]:
    """(step directory, step) of a verified checkpoint.

    A step directory, or ``step``, is verified and never replaced: CorruptCheckpointError names
    the step and the problem. Otherwise the newest step that verifies is chosen; each newer step
    that does not is skipped with a warning naming it and why. Nothing is moved or deleted.
    """
    candidates, explicit = _candidates(path, step)
    if not verify:
        return candidates[0]
    if explicit:
        verify_step(*candidates[0])
        return candidates[0]
    skipped = []
    for step_dir, s in candidates:
        try:
            verify_step(step_dir, s)
        except CorruptCheckpointError as e:
            log.warning("checkpoint step %d is skipped: %s", s, e.problem)
            skipped.append(e)
            continue
        if skipped:
            log.warning("using checkpoint step %d of %s instead", s, path)
        return step_dir, s
    raise _none_verifies(path, skipped)


def _read_json_item(step_dir: str, name: str, step: int | None = None) -> dict:
    path = os.path.join(step_dir, name, "metadata")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise _restore_error(step_dir, step, f"{name}/metadata", e) from e


def _state_metadata(step_dir: str, step: int | None) -> Any:
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state"))
    except Exception as e:
        raise _restore_error(step_dir, step, "state/_METADATA", e) from e
    return getattr(metadata, "item_metadata", metadata)


def state_metadata(path: str, step: int | None = None, verify: bool = False) -> tuple[str, int, Any]:
    """(step dir, step, tree of the saved state's array metadata: .shape, .dtype); with
    ``verify`` the step is chosen (and checked) as ``find_checkpoint`` does."""
    step_dir, step = find_checkpoint(path, step, verify) if verify else resolve_checkpoint(path, step)
    return step_dir, step, _state_metadata(step_dir, step)


def restore_subtree(step_dir: str, item: Any, verify: bool = True) -> Any:
    """Restores the part of the saved state that ``item`` names (a nested dict of
    ShapeDtypeStructs with shardings, e.g. ``{"params": {...}}``) straight into those shardings.
    With ``verify`` (the default) the step is checked against its digest manifest first."""
    step = _is_step_dir(step_dir)
    if verify:
        verify_step(step_dir, step)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), item)
    try:
        return ocp.PyTreeCheckpointer().restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    except Exception as e:
        raise _restore_error(step_dir, step, "the state", e) from e


def load_checkpoint(path: str, step: int | None = None, verify: bool = True) -> tuple[dict, dict, dict, int]:
    """(state as a nested dict of numpy arrays, config dict, assets, step) from ``path``.

    ``path`` is a workdir, its checkpoints directory or a step directory. Without ``step`` a
    workdir gives its newest step that verifies (newer ones that do not are skipped with a
    warning); ``step=N`` or a step directory gives exactly that step or raises
    (CorruptCheckpointError names the step and the file). ``verify=False`` skips the digest check
    (checkpoints written before digests existed).

    Every array comes to this process's first device, then to the host: meant for small models,
    inspection and tests. Large models restore sharded (``Checkpointer.restore``,
    ``graft_from_checkpoint``).
    """
    step_dir, step = find_checkpoint(path, step, verify)
    metadata = _state_metadata(step_dir, step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    state = jax.tree.map(np.asarray, restore_subtree(step_dir, item, verify=False))
    config = _read_json_item(step_dir, "config", step)
    assets = decode_assets(_read_json_item(step_dir, "assets", step))
    return state, config, assets, step


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


def graft_from_checkpoint(params: Any, path: str, drop: str = "", verify: bool = True) -> tuple[Any, list[str], int]:
    """``graft_params`` from a checkpoint on disk; kept arrays are restored directly into the
    target parameters' shardings (no host copy of the whole model). Returns (params, report, step).

    The step is chosen and verified as ``load_checkpoint`` does: a workdir gives its newest step
    that verifies, a step directory exactly that step or CorruptCheckpointError."""
    step_dir, step, metadata = state_metadata(path, verify=verify)
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
        restored = flatten_dict(restore_subtree(step_dir, item, verify=False)["params"])
        target.update(restored)
    return unflatten_dict(target), report, step
