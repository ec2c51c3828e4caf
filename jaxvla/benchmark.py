"""Timing a stage's real train step and the machine's matmul peak (for scripts/bench_*.py)."""

from __future__ import annotations

import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvla import config as cfg_lib
from jaxvla import sharding
from jaxvla.trainer import setup_train_step


@dataclasses.dataclass
class StepTiming:
    compile_s: float
    step_times_s: list[float]
    flops_per_step: float  # XLA's cost analysis of the compiled step
    num_params: int
    memory: object  # compiled.memory_analysis() (or None)
    mesh: jax.sharding.Mesh

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times_s)


def time_train_step(config, steps: int = 10) -> StepTiming:
    """Compiles ``config.stage``'s train step on the configured mesh (the same code path as
    ``python -m jaxvla.train``) and times ``steps`` steps after one warm-up step."""
    devices = jax.devices()
    cfg_lib.validate(config, len(devices), jax.process_count())
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = setup_train_step(config, mesh, rules)
        state = setup.factory.create(config.seed)
        step_fn = setup.step
        batches = setup.stage.batches(0)
        batch = sharding.global_batch(next(batches), mesh)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        timed_batches = [sharding.global_batch(next(batches), mesh) for _ in range(steps)]
        times = []
        for b in timed_batches:
            t0 = time.perf_counter()
            state, metrics = compiled(state, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    return StepTiming(
        compile_s=compile_s,
        step_times_s=times,
        flops_per_step=float(cost.get("flops", 0.0)) if cost else 0.0,
        num_params=sum(x.size for x in jax.tree.leaves(state.params)),
        memory=compiled.memory_analysis(),
        mesh=mesh,
    )


def matmul_peak(mesh, size: int, dtype) -> float:
    """FLOP/s of [size, size] x [size, size] matmuls, one per device, over all devices."""
    n = mesh.devices.size
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    a = jax.device_put(jnp.ones((n, size, size), dtype), spec)
    b = jax.device_put(jnp.ones((n, size, size), dtype), spec)
    matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y))
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n * size**3 / min(times)
