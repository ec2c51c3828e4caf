"""Compile time of a stage's train step: a first run against a second identical run that finds
JAX's persistent compilation cache (jaxvla.compilation_cache) filled by the first.

    python scripts/bench_compile_cache.py [--config=configs/pretrain.py:lapa_small] [--json=PATH]

Each run is a fresh process (nothing cached in memory) that builds the stage's real jitted train
step the way ``python -m jaxvla.train`` does and times XLA's compile (``lowered.compile()``; the
tracing to HLO before it is printed beside it: it is Python work the cache cannot skip); the
cached runs share one new, empty cache directory. Also reported: the same first compile with the cache off, so the cost of
writing the cache is visible. Prints the ratio (second / first) last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxvla.io.files import write_json  # noqa: E402

flags.DEFINE_string("config", "configs/pretrain.py:lapa_small", "A configs/<stage>.py[:variant].")
flags.DEFINE_multi_string("set", ["model.latent_source=synthetic"], "KEY=VALUE config overrides.")
flags.DEFINE_string("json", "", "Write the figures to this JSON file.")
FLAGS = flags.FLAGS

# One compile in a fresh process; prints the seconds as JSON on its last line.
_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from jaxvla import compilation_cache
compilation_cache.enable(sys.argv[1])
import flax.linen as nn, jax
from jaxvla import config as cfg_lib, sharding
from jaxvla.trainer import setup_train_step
config = cfg_lib.load_config(sys.argv[2])
config = cfg_lib.with_overrides(config, json.loads(sys.argv[3]))
devices = jax.devices()
mesh = sharding.make_mesh(config.mesh, devices)
rules = sharding.logical_rules(config.sharding_rules)
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    setup = setup_train_step(config, mesh, rules)
    state = setup.factory.abstract_with_shardings()
    batch = sharding.global_batch(next(setup.stage.batches(0)), mesh)
    start = time.perf_counter()
    lowered = setup.step.lower(state, batch)
    traced = time.perf_counter()
    lowered.compile()
    print(json.dumps({"trace_s": traced - start, "compile_s": time.perf_counter() - traced}))
"""


def _compile_seconds(cache_dir: str, overrides: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", _CHILD, cache_dir, FLAGS.config, json.dumps(overrides)],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"compile run failed ({FLAGS.config}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    overrides = {}
    for item in FLAGS.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    with tempfile.TemporaryDirectory() as cache_dir:
        uncached = _compile_seconds("off", overrides)
        first = _compile_seconds(cache_dir, overrides)
        second = _compile_seconds(cache_dir, overrides)
    ratio = second["compile_s"] / first["compile_s"]
    figures = {"config": FLAGS.config, "overrides": overrides, "uncached_compile_s": uncached["compile_s"],
               "first_compile_s": first["compile_s"], "second_compile_s": second["compile_s"],
               "trace_s": [run["trace_s"] for run in (uncached, first, second)], "ratio": ratio}
    print(f"config                       {FLAGS.config} {overrides}")
    print("                             XLA compile   (tracing to HLO, never cached)")
    for name, run in (("cache off", uncached), ("first run (fills the cache)", first), ("second run (cache hit)", second)):
        print(f"{name:28s} {run['compile_s']:8.2f} s    ({run['trace_s']:.2f} s)")
    if FLAGS.json:
        write_json(FLAGS.json, figures)
    print(f"second / first compile       {ratio:.3f}")


if __name__ == "__main__":
    app.run(main)
