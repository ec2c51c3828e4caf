"""Plans a small backbone train step, then runs it for real and measures memory (JSON on stdout).

    step_memory.py DEVICES KEY=VALUE ...   (config overrides of configs/pretrain.py:vipra_small)

Run in its own process with ``MALLOC_MMAP_THRESHOLD_`` set low, so every large buffer XLA frees
goes back to the OS and the resident set follows the live buffers. Measured: the bytes of the real
state's shards on device 0, and the growth of the resident set during a step above its level
between steps, sampled every ~0.2 ms (all devices of the process together).
"""

import json
import os
import sys
import threading
import time

import jax

devices_count = int(sys.argv[1])
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", devices_count)

import flax.linen as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.pretrain import get_config  # noqa: E402
from jaxvla import sharding  # noqa: E402
from jaxvla.config import with_overrides  # noqa: E402
from jaxvla.planning import plan  # noqa: E402
from jaxvla.trainer import setup_train_step  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def device0_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == jax.devices()[0]:
                total += shard.data.nbytes
    return total


overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[2:])}
config = with_overrides(get_config("vipra_small"), {"model.latent_source": "synthetic", **overrides})
devices = jax.devices()[:devices_count]
planned = plan(config, devices, flops=False)

mesh = sharding.make_mesh(config.mesh, devices)
rules = sharding.logical_rules(config.sharding_rules)
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    setup = setup_train_step(config, mesh, rules)
    state = setup.factory.create(config.seed)
    step = setup.step
    batches = setup.stage.batches(0)
    batch = sharding.global_batch(next(batches), mesh)
    compiled = step.lower(state, batch).compile()
    state_bytes = {"params": device0_bytes(state.params), "opt_state": device0_bytes(state.opt_state)}
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    growth = []
    for _ in range(3):
        batch = sharding.global_batch(next(batches), mesh)
        jax.block_until_ready(batch)
        time.sleep(0.05)
        base = rss()
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.0002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        done.set()
        sampler.join()
        growth.append(peak[0] - base)

print("RESULT " + json.dumps({
    "planned": {"params": planned.params_bytes, "opt_state": planned.opt_state_bytes,
                "argument": planned.argument_bytes, "output": planned.output_bytes, "alias": planned.alias_bytes,
                "temp": planned.temp_bytes, "batch": planned.batch_bytes, "other": planned.other_state_bytes},
    "real": {**state_bytes, "step_growth": growth, "devices": devices_count},
}))
