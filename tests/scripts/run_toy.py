"""Runs the toy stage in its own process: ``run_toy.py WORKDIR KEY=VALUE ...`` (values are JSON).

Used by tests that need a real process: SIGKILL / SIGTERM mid-run, and multi-process runs
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("TOY_NUM_CPU_DEVICES", "1")))

from jaxvla.trainer import train  # noqa: E402
from toy import toy_config  # noqa: E402

workdir, *assignments = sys.argv[1:]
overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in assignments)}
result = train(toy_config(**overrides), workdir)
print(f"FINAL_STEP {result.step} PREEMPTED {result.preempted}", flush=True)
