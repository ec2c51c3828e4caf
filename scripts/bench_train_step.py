"""Train-step benchmark for any stage: compile time, step time, FLOP/s, MFU, memory.

    python scripts/bench_train_step.py --config=configs/tokenizer.py:small [--config.batch_size=32]

Runs the stage's real jitted train step (same code path as ``python -m jaxvla.train``) on the
configured mesh. FLOPs per step come from XLA's cost analysis of the compiled step; the peak is a
large matmul measured in the same run on the same devices, so the ratio (MFU) compares like with
like. Prints the ratio last.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxvla import config as cfg_lib  # noqa: E402
from jaxvla import optim, sharding  # noqa: E402
from jaxvla.stages import build_stage  # noqa: E402
from jaxvla.trainer import StateFactory, make_train_step  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/<stage>.py[:variant] file.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the peak.")
FLAGS = flags.FLAGS


def measure_matmul_peak(mesh, size: int, dtype) -> float:
    """FLOP/s of a [size, size] x [size, size] matmul per device, batched over all devices."""
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


def main(argv):
    del argv
    config = FLAGS.config
    devices = jax.devices()
    cfg_lib.validate(config, len(devices), jax.process_count())
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        stage = build_stage(config)
        optimizer, schedule = optim.make_optimizer(config.optimizer, config.num_steps)
        factory = StateFactory(stage, optimizer, mesh, rules, ema=config.ema_decay > 0)
        state = factory.create(config.seed)
        step_fn = make_train_step(
            stage, optimizer, schedule, factory.shardings, mesh, config.optimizer.grad_accum_steps, config.ema_decay
        )
        batches = stage.batches(0)
        batch = sharding.global_batch(next(batches), mesh)

        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        memory = compiled.memory_analysis()

        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        batch_list = [sharding.global_batch(next(batches), mesh) for _ in range(FLAGS.steps)]
        times = []
        for b in batch_list:
            t0 = time.perf_counter()
            state, metrics = compiled(state, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)

        dtype = jnp.bfloat16 if devices[0].platform != "cpu" and config.compute_dtype == "bfloat16" else jnp.float32
        peak = measure_matmul_peak(mesh, FLAGS.matmul_size, dtype)

    step_s = statistics.median(times)
    achieved = flops / step_s
    params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"stage                 {config.stage} ({params:,} parameters, batch {config.batch_size}, mesh {sharding.describe_mesh(mesh)})")
    print(f"compile time          {compile_s:.2f} s")
    print(f"step time (median)    {step_s * 1e3:.1f} ms  (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, {FLAGS.steps} steps)")
    print(f"examples / s          {config.batch_size / step_s:.1f}")
    print(f"FLOPs / step (XLA)    {flops / 1e9:.2f} GFLOP")
    print(f"achieved              {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul peak ({dtype.__name__ if hasattr(dtype, '__name__') else dtype}) {peak / 1e9:.1f} GFLOP/s  ({FLAGS.matmul_size}^3 on {mesh.devices.size} device(s))")
    if memory is not None:
        per_device = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
        print(f"compiled memory       {per_device / 2**20:.1f} MiB per device (args {memory.argument_size_in_bytes / 2**20:.1f}, temps {memory.temp_size_in_bytes / 2**20:.1f})")
    print(f"peak host RSS         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    print(f"MFU (achieved / peak) {achieved / peak:.3f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
