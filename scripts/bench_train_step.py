"""Train-step benchmark for any stage: compile time, step time, FLOP/s, MFU, memory.

    python scripts/bench_train_step.py --config=configs/tokenizer.py:small [--config.batch_size=32]
    python scripts/bench_train_step.py --config=configs/pretrain.py:lapa_small \
        --config.model.latent_source=synthetic [--config.model.dim=1024 ...]   # the backbone

Runs the stage's real jitted train step (same code path as ``python -m jaxvla.train``) on the
configured mesh. FLOPs per step come from XLA's cost analysis of the compiled step; for the LLaMA
backbone (whose scanned layers XLA would count once) they are the model FLOPs of
``jaxvla.planning.step_flops`` (the step unrolled at 1 and 2 layers, extrapolated; no
recomputation counted). The peak is a large matmul measured in the same run on the same devices,
so the ratio (MFU) compares like with like. Prints the ratio last.
"""

from __future__ import annotations

import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxvla import sharding  # noqa: E402
from jaxvla.benchmark import matmul_peak, time_train_step  # noqa: E402
from jaxvla.planning import is_backbone, step_flops  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/<stage>.py[:variant] file.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the peak.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    timing = time_train_step(config, FLAGS.steps)
    accelerator = jax.devices()[0].platform != "cpu"
    dtype = jnp.bfloat16 if accelerator and config.compute_dtype == "bfloat16" else jnp.float32
    peak = matmul_peak(timing.mesh, FLAGS.matmul_size, dtype)
    step_s = timing.step_s
    devices = list(timing.mesh.devices.flat)
    backbone = is_backbone(config)
    # XLA's figure is per device; the backbone's counts all devices.
    flops = step_flops(config, devices, "none") if backbone else timing.flops_per_step * len(devices)
    source = ("model FLOPs, unrolled + extrapolated" if backbone
              else "XLA cost analysis; a scanned loop body counts once, so a lower bound")
    achieved = flops / step_s
    times = timing.step_times_s
    print(f"stage                 {config.stage} ({timing.num_params:,} parameters, batch {config.batch_size}, mesh {sharding.describe_mesh(timing.mesh)})")
    print(f"compile time          {timing.compile_s:.2f} s")
    print(f"step time (median)    {step_s * 1e3:.1f} ms  (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, {len(times)} steps)")
    print(f"examples / s          {config.batch_size / step_s:.1f}")
    print(f"FLOPs / step          {flops / 1e9:.2f} GFLOP ({source})")
    print(f"achieved              {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul peak ({jnp.dtype(dtype).name}) {peak / 1e9:.1f} GFLOP/s  ({FLAGS.matmul_size}^3 on {timing.mesh.devices.size} device(s))")
    memory = timing.memory
    if memory is not None:
        per_device = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
        print(f"compiled memory       {per_device / 2**20:.1f} MiB per device (args {memory.argument_size_in_bytes / 2**20:.1f}, temps {memory.temp_size_in_bytes / 2**20:.1f})")
    print(f"peak host RSS         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    print(f"MFU (achieved / peak) {achieved / peak:.3f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
