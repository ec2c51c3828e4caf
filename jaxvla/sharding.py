"""The one place that builds device meshes and maps logical axis names onto them.

Models name the axes of every parameter and activation logically (``embed``, ``mlp``, ``heads``,
``vocab``, ``batch``, ...) through ``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``.
The rules below map those names to the three mesh axes:

* ``data``   pure data parallelism (parameters replicated),
* ``fsdp``   data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3),
* ``tensor`` tensor (model) parallelism inside a layer.

The same code runs on 1 CPU, 8 fake CPU devices, a GPU box and every host of a TPU pod: only the
mesh shape (``config.mesh``) changes.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes). A logical name absent here is replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    # Conv kernels [kh, kw, in, out] shard their output channels over fsdp x tensor and keep input
    # channels whole. Sharding `in` over fsdp while the batch is also on fsdp and `out` on tensor
    # gave wrong gradients in the VQGAN encoder on XLA:CPU (jax 0.10.2; mesh 2x2x2, off by
    # O(100%)); this layout shards the same bytes and matches one device to 1e-6
    # (tests/test_tokenizer_stage.py::test_two_steps_sharded_match_single_device).
    ("conv_in", None),
    ("conv_out", ("fsdp", "tensor")),
    ("codebook", None),
    ("codebook_dim", None),
    ("norm", None),
)


def logical_rules(overrides: str = "") -> tuple[tuple[str, Any], ...]:
    """The default rules, with ``overrides`` ("name=axis[+axis],...", "none" replicates) applied."""
    rules = dict(DEFAULT_RULES)
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        name, sep, axes = item.partition("=")
        mesh_axes = tuple(a for a in axes.split("+") if a and a != "none")
        unknown = [a for a in mesh_axes if a not in MESH_AXES]
        if not sep or not name or unknown:
            raise ValueError(
                f"config.sharding_rules entry {item!r} is malformed; expected name=axis[+axis] "
                f"with axes from {MESH_AXES} or 'none'"
            )
        rules[name] = mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None)
    return tuple(rules.items())


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one ``-1`` entry of (data, fsdp, tensor) to the devices left over.

    Raises ValueError naming ``config.mesh.*`` and the numbers when the shape does not divide the
    device count.
    """
    shape = [data, fsdp, tensor]
    names = [f"config.mesh.{a}" for a in MESH_AXES]
    if sum(s == -1 for s in shape) > 1:
        raise ValueError(f"at most one of {', '.join(names)} may be -1, got {tuple(shape)}")
    for name, size in zip(names, shape):
        if size == 0 or size < -1:
            raise ValueError(f"{name} must be a positive integer or -1, got {size}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, shape))} does not divide the {num_devices} devices: "
                f"the fixed axes multiply to {known}, which does not divide {num_devices}"
            )
        shape[shape.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} uses {known} devices but {num_devices} are "
            f"present; set one of {', '.join(names)} to -1 or make the product {num_devices}"
        )
    return tuple(shape)  # type: ignore[return-value]


def _num_slices(devices: Sequence[jax.Device]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh from ``config.mesh``.

    On a multi-slice TPU deployment the ``data`` axis spans slices (data-center network) and the
    other axes stay inside a slice (ICI), as MaxText does. Axis types are Auto: GSPMD propagates
    shardings from the annotations.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, len(devices))
    slices = _num_slices(devices)
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(
                f"config.mesh.data={shape[0]} must be a multiple of the {slices} slices so that "
                "data parallelism spans the slices"
            )
        ici = (shape[0] // slices, shape[1], shape[2])
        device_array = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices=devices)
    elif len(devices) == len(jax.devices()) and jax.devices()[0].platform == "tpu":
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide (such a dim is replicated instead).

    Keeps small variants (a 3-channel conv, a codebook of 8) valid on any mesh while large
    variants shard as the rules say.
    """
    entries = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            entries.append(None)
            continue
        axes_tuple = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        size = 1
        for axis in axes_tuple:
            if dim % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
        entries.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*entries)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Iterable) -> Any:
    """NamedShardings for a tree of (possibly boxed) abstract arrays from their logical names.

    ``abstract_tree`` is typically ``jax.eval_shape(model.init, ...)``: leaves boxed in
    ``nn.LogicallyPartitioned`` are sharded by their names, plain leaves are replicated.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, tuple(rules))
    # The values only (nn.meta.unbox would also apply sharding constraints, which need a trace).
    unboxed = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _divisible_spec(spec, leaf.shape, mesh)),
        mesh_specs,
        unboxed,
        is_leaf=lambda x: isinstance(x, P),
    )


def path_parts(path: tuple) -> tuple[str, ...]:
    """A jax key path -> ("a", "b", "c"): dict keys, attribute names and indices as strings."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


def optimizer_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: a leaf whose key path ends with a parameter's path (and has
    its shape) is sharded like that parameter (Adam's mu / nu, masked or multi-transform states
    alike); everything else (counts, scalars) is replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for (path, leaf), sharding in zip(flat_params, jax.tree.leaves(param_shardings)):
        by_path[path_parts(path)] = (tuple(leaf.shape), sharding)
    depths = sorted({len(k) for k in by_path}, reverse=True)
    replicated_sharding = NamedSharding(mesh, P())

    def choose(path, leaf):
        parts = path_parts(path)
        for depth in depths:
            match = by_path.get(parts[-depth:]) if depth <= len(parts) else None
            if match and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated_sharding

    return jax.tree_util.tree_map_with_path(choose, abstract_opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles per-process numpy batches [B_local, ...] into global arrays [B_global, ...]."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def maybe_initialize_distributed() -> bool:
    """Joins a multi-process run when the environment describes one; returns True if it did.

    * ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: explicit (loopback
      tests, custom launchers). CPU processes then use gloo collectives.
    * SLURM (``SLURM_NTASKS`` > 1) and multi-host TPU VMs (``TPU_WORKER_HOSTNAMES`` naming more
      than one host, ``MEGASCALE_COORDINATOR_ADDRESS``): ``jax.distributed.initialize()`` detects
      the cluster itself.
    """
    if jax.distributed.is_initialized():
        return True
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
        process_id = int(os.environ["JAX_PROCESS_ID"])
        # CPU processes need gloo for cross-process collectives; GPU/TPU backends ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
        return True
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if len(tpu_hosts) > 1 or slurm_tasks > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
        return True
    return False


def describe_mesh(mesh: Mesh) -> str:
    return ", ".join(f"{name}={size}" for name, size in mesh.shape.items()) + (
        f" over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
        f" in {jax.process_count()} process(es)"
    )

