"""Will this train step fit, and how long will a step take? Planned on this machine, no accelerators.

    python scripts/plan.py --config=configs/pretrain.py:lapa_lwm7b --mesh=data=1,fsdp=8,tensor=1 \\
        --devices=8 --device_memory_gb=80 [--remat=all] [--peak_tflops=989 --mfu=0.4]

Fakes ``--devices`` CPU devices, builds the stage on synthetic sequences of the config's real
shapes (``model.latent_source=synthetic``: no data, tokenizer or LAQ), lowers and compiles the real
train step for the mesh and prints, for each remat policy, per-device bytes of params, optimizer
state and activations (XLA's memory analysis), whether the peak fits in ``--device_memory_gb``,
the FLOPs per step (XLA's cost analysis) and the step time at ``--mfu`` of ``--peak_tflops`` per
device (dense bf16 peaks: H100 SXM 989, H200 989, A100 312, TPU v4 275, v5p 459, v5e 197).
Any ``--config.x.y=v`` override applies (batch, seq_len, grad_accum_steps, ...). See
``jaxvla/planning.py`` for how each figure is measured and what the CPU compiler cannot tell.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _devices_flag(argv) -> int:
    for arg in argv:
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
    return 8


# Fake CPU devices must exist before JAX starts.
import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", _devices_flag(sys.argv))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxvla.models.transformer import REMAT_POLICIES  # noqa: E402
from jaxvla.planning import plan  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/<stage>.py[:variant] file.", lock_config=True)
flags.DEFINE_integer("devices", 8, "Devices to plan for (faked on the CPU).")
flags.DEFINE_string("mesh", "", "data=D,fsdp=F,tensor=T (default: the config's mesh).")
flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one device in GB (1e9 bytes); H100 80, H200 141, v4 32, v5p 95.")
flags.DEFINE_string("remat", "all", f"Remat policy to plan: one of {REMAT_POLICIES}, 'config' or 'all'.")
flags.DEFINE_float("peak_tflops", 989.0, "Dense peak TFLOP/s of one device in the compute dtype.")
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the predicted step time.")
flags.DEFINE_boolean("flops", True, "Measure FLOPs and step time (4 more small compiles); false: memory only.")
FLAGS = flags.FLAGS
GB = 1e9


def parse_mesh(text: str) -> dict[str, int]:
    mesh = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("data", "fsdp", "tensor"):
            raise ValueError(f"--mesh={text!r}: expected data=D,fsdp=F,tensor=T (got {part!r})")
        mesh[key] = int(value)
    return mesh


def main(argv):
    del argv
    config = FLAGS.config
    with config.unlocked():
        if config.stage == "pretrain":
            config.model.latent_source = "synthetic"
        for key, value in parse_mesh(FLAGS.mesh).items():
            config.mesh[key] = value
    devices = jax.devices()[: FLAGS.devices]
    if len(devices) != FLAGS.devices:
        raise ValueError(f"--devices={FLAGS.devices} but only {len(devices)} CPU devices could be faked")
    if FLAGS.remat == "all":
        policies = tuple(p for p in REMAT_POLICIES if p != "full")  # "full" is nothing_saveable
    elif FLAGS.remat == "config":
        policies = (config.remat_policy,)
    elif FLAGS.remat in REMAT_POLICIES:
        policies = (FLAGS.remat,)
    else:
        raise ValueError(f"--remat={FLAGS.remat!r}: expected one of {REMAT_POLICIES}, 'config' or 'all'")
    capacity = FLAGS.device_memory_gb * 1e9
    peak = FLAGS.peak_tflops * 1e12

    model = config.get("model", {})
    print(f"config      {config.stage} {model.get('objective', '')} {model.get('size', '')}: batch {config.batch_size}, "
          f"seq_len {model.get('seq_len', '-')}, {config.compute_dtype}, grad_accum {config.optimizer.grad_accum_steps}, "
          f"{len(devices)} devices x {FLAGS.device_memory_gb:g} GB")
    header = (f"{'remat':<17}{'params':>9}{'opt':>9}{'acts+tmp':>10}{'peak':>9}  {'fits':<5}"
              f"{'TFLOP/step':>11}{'recompute':>10}{'step s':>9}  mesh")
    print(header)
    plans, model_flops = [], None
    for policy in policies:
        p = plan(config, devices, remat=policy, flops=FLAGS.flops, model_flops=model_flops)
        model_flops = p.model_flops
        plans.append(p)
        mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
        print(f"{policy:<17}{p.params_bytes / GB:>8.2f}G{p.opt_state_bytes / GB:>8.2f}G{p.temp_bytes / GB:>9.2f}G"
              f"{p.peak_bytes / GB:>8.2f}G  {'yes' if p.fits(capacity) else 'NO':<5}"
              f"{p.hardware_flops / 1e12:>11.4g}{100 * (p.hardware_flops / p.model_flops - 1):>9.0f}%"
              f"{p.step_seconds(len(devices), peak, FLAGS.mfu):>9.3g}  {mesh}", flush=True)
    last = plans[-1]
    print(f"bytes per device in GB (1e9); TFLOP per step over all devices, recomputation included "
          f"(model FLOPs {last.model_flops / 1e12:.4g} TFLOP; recompute = the extra)")
    print(f"per device: batch {last.batch_bytes / 2**20:.1f} MiB, other state {last.other_state_bytes / 2**20:.1f} MiB, "
          f"one layer's attention scores (materialised on CPU, not by fused attention) "
          f"{last.attention_scores_bytes / GB:.2f} GB")
    print(f"step time at MFU {FLAGS.mfu:g} of {FLAGS.peak_tflops:g} TFLOP/s per device (model FLOPs)")
    fitting = [p for p in plans if p.fits(capacity)]
    # Policies are planned in order of increasing recomputation: the first that fits is the cheapest.
    if fitting:
        best = fitting[0]
        print(f"verdict: fits with remat={best.remat} ({best.peak_bytes / GB:.1f} GB of "
              f"{capacity / GB:.0f} GB per device)")
    else:
        print(f"verdict: does NOT fit in {capacity / GB:.0f} GB per device with any planned remat policy; "
              "raise --config.optimizer.grad_accum_steps or the fsdp axis")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
