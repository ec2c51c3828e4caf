"""Keys every stage shares, and the checks that run before anything compiles.

Each ``configs/<stage>.py`` starts from ``base_config()`` and fills ``config.model`` and
``config.data``. The returned config is locked: ``--config.no_such_key=1`` on the command line
and ``config.no_such_key`` in code both fail loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.num_steps = 1000
    c.batch_size = 32  # global, over all processes and devices
    c.seed = 0
    c.compute_dtype = "float32"  # bfloat16 on accelerators; params always float32
    c.remat_policy = "none"  # none | full | dots_saveable | nothing_saveable (models that scan)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Overrides of sharding.DEFAULT_RULES: "name=axis[+axis],..." e.g. "embed=none,mlp=fsdp+tensor".
    c.sharding_rules = ""

    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-4,
            schedule="constant",
            warmup_steps=0,
            decay_steps=0,
            end_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            weight_decay_exclude=r"(bias|scale|norm|embed|codebook)",
            grad_clip_norm=1.0,
            freeze="",
            grad_accum_steps=1,
        )
    )
    c.ema_decay = 0.0  # 0: no EMA copy of the params

    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, max_to_keep=3, async_save=True))
    c.log_every = 10
    c.eval_every = 0  # 0: no periodic eval
    c.eval_batches = 4
    c.image_every = 0  # 0: images only at the end
    c.init_from = ""  # another stage's workdir or checkpoint step dir
    c.init_drop = ""  # regex of parameter paths not taken from init_from
    c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="jaxvla", entity="", name=""))

    c.model = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config so unknown keys fail; call at the end of every ``get_config``."""
    config.lock()
    return config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """A stage config from ``"configs/<stage>.py[:variant]"``, as ``--config=`` would load it.

    For scripts and tests that build configs in Python rather than on the command line.
    """
    import importlib.util

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (from {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"jaxvla_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A locked copy of ``config`` with ``apply_overrides(overrides)``; ``config`` is untouched."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.lock()
    return apply_overrides(copy, overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted keys in place, like ``--config.a.b=v`` on the command line: {"a.b": v}.

    A key the config does not have fails (the config is locked)."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> tuple[int, int, int]:
    """Checks mesh and batch against the devices; returns the resolved mesh shape.

    Raises ValueError naming the key and the numbers.
    """
    from jaxvla.sharding import resolve_mesh_shape

    if not config.stage:
        raise ValueError("config.stage is empty; the stage config must set it (e.g. 'tokenizer')")
    data, fsdp, tensor = resolve_mesh_shape(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices
    )
    batch = config.batch_size
    accum = config.optimizer.grad_accum_steps
    if batch <= 0:
        raise ValueError(f"config.batch_size must be positive, got {batch}")
    if accum <= 0 or batch % accum:
        raise ValueError(
            f"config.batch_size={batch} must be divisible by "
            f"config.optimizer.grad_accum_steps={accum}"
        )
    micro = batch // accum
    if micro % (data * fsdp):
        raise ValueError(
            f"config.batch_size={batch} (micro-batch {micro} with grad_accum_steps={accum}) is not "
            f"divisible by data x fsdp = {data} x {fsdp} = {data * fsdp}"
        )
    if batch % num_processes:
        raise ValueError(
            f"config.batch_size={batch} is not divisible by the {num_processes} processes"
        )
    for key in ("num_steps", "log_every"):
        if config[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    if config.checkpoint.every <= 0:
        raise ValueError(f"config.checkpoint.every must be positive, got {config.checkpoint.every}")
    return data, fsdp, tensor


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_hash(config: ml_collections.ConfigDict | dict, keys: tuple[str, ...] = ()) -> str:
    """A short stable hash of (a subset of) a config, e.g. to stamp labels with the model spec."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if keys:
        d = {k: d[k] for k in keys}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config to ``workdir/config.json`` atomically; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(config))
    os.replace(tmp, path)
    return path


def from_dict(d: dict) -> ml_collections.ConfigDict:
    """A config saved with ``save`` (or in a checkpoint), as a locked ConfigDict."""
    return finalize(ml_collections.ConfigDict(d))
