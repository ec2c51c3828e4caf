"""Train-step benchmark for any stage: compile time, step time, real tokens/s, FLOP/s, MFU, memory.

    python scripts/bench_train_step.py                       # the README's backbone row (below)
    python scripts/bench_train_step.py --config=configs/laq.py:lapa_small [--synthetic_frames]
    python scripts/bench_train_step.py --config=configs/tokenizer.py:small [--config.batch_size=32]
    python scripts/bench_train_step.py ... --json=runs/bench/train_step.json

Without ``--config`` it runs the backbone row of the README: ``configs/pretrain.py:lapa_small``
with ``model.latent_source=synthetic``, dim 1024, 4 layers, 16 heads (16 kv heads), mlp 2816,
batch 8 (``--config.<key>=...`` still overrides any of these).

Runs the stage's real jitted train step (same code path as ``python -m jaxvla.train``) on the
configured mesh, one batch per step. The peak is a large matmul measured in the same run on the
same devices, so MFU compares like with like. What the FLOPs count:

* Backbone (pretraining, finetuning): **model FLOPs of the real tokens only**
  (``jaxvla.planning.real_token_flops``): per example (a packed row's segment), 6 x the layers'
  matmul parameters (q, k, v, o, SwiGLU) x its tokens, plus its causal / bidirectional-block
  attention pairs within that example only (12 x heads x head_dim x layers per pair: examples
  packed in one row never attend to each other), plus 6 x dim x vocab for every target an output
  head scores (the loss applies the heads only there), plus flow finetuning's action encoder and
  velocity head at the action slots. Padding, the dense attention across a packed row, the head
  slots gathered beyond the real targets, embeddings, norms, softmax, the optimizer and remat
  recomputation are not counted. Synthetic pretraining runs on real-length LAPA / ViPRA examples
  packed like real training (``jaxvla.benchmark``), so ``padding_fraction`` is that of the timed
  batches. ``--executed_flops`` (default on) also prints XLA's count of what the compiled step
  executes, layers unrolled (padding and all), and its MFU.
* Other stages (tokenizer, LAQ): XLA's cost analysis of the step compiled with every ``nn.scan``
  fully unrolled (``jaxvla.planning.scan_unrolled_flops``), so each scanned transformer block
  counts, not one loop body (the compiled step's own count is printed beside it: one loop body per
  stack with ``model.scan_unroll=1``, the same figure when the stacks are unrolled, as the small
  LAQs are by default); no padding.

``--json=PATH`` writes the figures (``mfu``, ``padding_fraction``, ``real_tokens_per_s``,
``step_s``, ``peak_gflops``, ...) as one JSON object. Prints the ratio (MFU) last.
"""

from __future__ import annotations

import os
import resource
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxvla import compilation_cache  # noqa: E402
from jaxvla import config as cfg_lib  # noqa: E402
from jaxvla import sharding  # noqa: E402
from jaxvla.benchmark import (backbone_config, matmul_peak, slot_params, time_train_step,  # noqa: E402
                              write_results)
from jaxvla.planning import is_backbone, real_token_flops  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "pretrain.py") + ":lapa_small"
# The README's "backbone train step, MFU" row, applied when --config is not given.
DEFAULT_OVERRIDES = {
    "model.latent_source": "synthetic", "model.dim": 1024, "model.num_layers": 4, "model.num_heads": 16,
    "model.num_kv_heads": 16, "model.mlp_dim": 2816, "batch_size": 8,
}

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                "A configs/<stage>.py[:variant] file (default: the README's backbone row).",
                                lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step), each on its own batch.", lower_bound=1)
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the peak.", lower_bound=64)
flags.DEFINE_boolean("executed_flops", True, "Backbone: also count what the compiled step executes (XLA, layers "
                     "unrolled; one more compile).")
flags.DEFINE_boolean("synthetic_frames", False, "LAQ: random frames instead of the dataset (the step's compute "
                     "does not depend on the pixels; no dataset is read or generated).")
flags.DEFINE_string("json", None, "Write the figures to this JSON file (atomically).")
FLAGS = flags.FLAGS


def _user_config_keys(argv) -> set[str]:
    """Keys given as --config.<key>=... on the command line."""
    keys = set()
    for arg in argv:
        if arg.startswith("--config."):
            keys.add(arg[len("--config."):].split("=", 1)[0])
    return keys


def effective_config(argv):
    """``--config`` as given, or the README's backbone row with the user's ``--config.`` keys kept."""
    config = FLAGS.config
    if FLAGS["config"].present:
        return config
    given = _user_config_keys(argv)
    return cfg_lib.with_overrides(config, {k: v for k, v in DEFAULT_OVERRIDES.items() if k not in given})


def main(argv):
    del argv
    # Like every jaxvla entry point ($JAXVLA_COMPILATION_CACHE, "off" disables): a hit loads the
    # step instead of compiling it, which the compile time then shows; step times are unaffected.
    cache = compilation_cache.enable()
    config = effective_config(sys.argv[1:])
    backbone = is_backbone(config)
    if FLAGS.synthetic_frames:
        if config.stage != "laq":
            raise app.UsageError(f"--synthetic_frames is for the LAQ stage, not {config.stage!r}")
        config = cfg_lib.with_overrides(config, {"data.generate_metaworld": False})
    timing = time_train_step(config, FLAGS.steps, count_unrolled=not backbone or FLAGS.executed_flops,
                             synthetic_frames=FLAGS.synthetic_frames)
    accelerator = jax.devices()[0].platform != "cpu"
    dtype = jnp.bfloat16 if accelerator and config.compute_dtype == "bfloat16" else jnp.float32
    peak = matmul_peak(timing.mesh, FLAGS.matmul_size, dtype)
    step_s = timing.step_s
    devices = list(timing.mesh.devices.flat)
    times = timing.step_times_s
    processes = jax.process_count()
    results = {
        "stage": config.stage, "num_params": int(timing.num_params), "batch_size": int(config.batch_size),
        "mesh": sharding.describe_mesh(timing.mesh), "platform": devices[0].platform,
        "compute_dtype": str(config.compute_dtype), "synthetic_frames": FLAGS.synthetic_frames,
        "compile_s": timing.compile_s, "compilation_cache": cache, "step_s": step_s,
        "step_s_min": min(times), "step_s_max": max(times), "steps": len(times),
        "examples_per_s": config.batch_size / step_s, "peak_gflops": peak / 1e9, "peak_dtype": jnp.dtype(dtype).name,
        "matmul_size": FLAGS.matmul_size,
    }
    lines = [
        f"stage                 {config.stage} ({timing.num_params:,} parameters, batch {config.batch_size}, "
        f"mesh {results['mesh']})",
        f"compile time          {timing.compile_s:.2f} s (persistent compilation cache: {cache or 'off'})",
        f"step time (median)    {step_s * 1e3:.1f} ms  (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, "
        f"{len(times)} steps)",
        f"examples / s          {config.batch_size / step_s:.1f}",
    ]
    if backbone:
        llama = backbone_config(timing.stage)
        counts = [real_token_flops(llama, b, slot_params(timing.params)) for b in timing.batches]
        # This process's rows; the other processes' rows are alike.
        flops = processes * float(np.mean([c.flops for c in counts]))
        tokens = processes * float(np.mean([c.tokens for c in counts]))
        padding = float(np.mean([c.padding_fraction for c in counts]))
        rows = timing.batches[0]["segment_ids"].shape
        results.update(
            flops_per_step=flops, flops_counted="model FLOPs of real tokens (jaxvla.planning.real_token_flops)",
            real_tokens_per_step=tokens, real_tokens_per_s=tokens / step_s, padding_fraction=padding,
            rows=int(rows[0]) * processes, row_len=int(rows[1]), achieved_gflops=flops / step_s / 1e9,
            mfu=flops / step_s / peak,
            llama=dict(dim=llama.dim, num_layers=llama.num_layers, num_heads=llama.num_heads,
                       num_kv_heads=llama.num_kv_heads, mlp_dim=llama.mlp_dim, attention=llama.attention or "default"),
        )
        lines += [
            f"batch                 {rows[0] * processes} rows x {rows[1]} tokens, {tokens:.0f} real tokens "
            f"(padding fraction {padding:.3f}; {config.batch_size} examples, "
            f"{'packed' if config.model.get('pack', False) else 'one a row'})",
            f"real tokens / s       {tokens / step_s:,.0f}",
            f"FLOPs / step          {flops / 1e9:.2f} GFLOP (model FLOPs of the real tokens only)",
        ]
        if timing.unrolled_flops_per_step is not None:
            executed = timing.unrolled_flops_per_step * len(devices)
            results.update(executed_flops_per_step=executed, mfu_executed=executed / step_s / peak)
            lines.append(f"executed FLOPs / step {executed / 1e9:.2f} GFLOP (XLA cost analysis, layers unrolled: "
                         f"padding, dense row attention, optimizer included; MFU {executed / step_s / peak:.3f})")
    else:
        flops = timing.unrolled_flops_per_step * len(devices)
        scanned = timing.flops_per_step * len(devices)
        results.update(flops_per_step=flops, xla_scanned_flops_per_step=scanned,
                       flops_counted="XLA cost analysis, nn.scan loops unrolled", padding_fraction=0.0,
                       real_tokens_per_s=None, achieved_gflops=flops / step_s / 1e9, mfu=flops / step_s / peak)
        lines.append(f"FLOPs / step          {flops / 1e9:.2f} GFLOP (XLA cost analysis, scans unrolled; the "
                     f"compiled step counts {scanned / 1e9:.2f}: a scan loop's body once)")
    memory = timing.memory
    lines += [f"achieved              {flops / step_s / 1e9:.1f} GFLOP/s",
              f"matmul peak ({results['peak_dtype']}) {peak / 1e9:.1f} GFLOP/s  ({FLAGS.matmul_size}^3 on "
              f"{timing.mesh.devices.size} device(s))"]
    if memory is not None:
        per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                      - memory.alias_size_in_bytes)
        results["compiled_memory_mib"] = per_device / 2**20
        lines.append(f"compiled memory       {per_device / 2**20:.1f} MiB per device (args "
                     f"{memory.argument_size_in_bytes / 2**20:.1f}, temps {memory.temp_size_in_bytes / 2**20:.1f})")
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    lines.append(f"peak host RSS         {results['peak_rss_mib']:.0f} MiB")
    print("\n".join(lines))
    if FLAGS.json:
        write_results(FLAGS.json, results)
        print(f"wrote {FLAGS.json}")
    what = "real tokens" if backbone else "scans unrolled"
    print(f"MFU ({what}; achieved / peak) {results['mfu']:.3f}")


if __name__ == "__main__":
    app.run(main)
