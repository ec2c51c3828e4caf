"""Simulated benchmark environments (Meta-World) and their language instructions.

Attributes are loaded lazily so that ``import jaxvla.sim.instructions`` does not pull in
MuJoCo and Meta-World.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MetaWorldEnv": "jaxvla.sim.metaworld_env",
    "ExpertPolicy": "jaxvla.sim.metaworld_env",
    "CameraSpec": "jaxvla.sim.metaworld_env",
    "CAMERAS": "jaxvla.sim.metaworld_env",
    "MT10_TASKS": "jaxvla.sim.metaworld_env",
    "MT50_TASKS": "jaxvla.sim.metaworld_env",
    "canonical_task": "jaxvla.sim.metaworld_env",
    "task_names": "jaxvla.sim.metaworld_env",
    "expert_policy": "jaxvla.sim.metaworld_env",
    "episode_seed": "jaxvla.sim.metaworld_env",
    "rollout_expert": "jaxvla.sim.metaworld_env",
    "instruction": "jaxvla.sim.instructions",
    "all_instructions": "jaxvla.sim.instructions",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
