"""Keys every stage shares, and the checks that run before anything compiles.

Each ``configs/<stage>.py`` starts from ``base_config()`` and fills ``config.model`` and
``config.data``. The returned config is locked: ``--config.no_such_key=1`` on the command line
and ``config.no_such_key`` in code both fail loudly.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
from typing import Any

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags as _ml_config_flags

from jaxvla.models.transformer import REMAT_POLICIES
from jaxvla.optim import OPTIMIZERS, SCHEDULES
from jaxvla.sharding import resolve_mesh_shape


COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


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

    # verify: restores check each step's files against its SHA-256 manifest (and resume falls back
    # past a step that fails); false restores checkpoints written before digests existed.
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, max_to_keep=3, async_save=True, verify=True))
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


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """A ``--config`` spec that is neither a file nor one of the packaged configs; the message lists
    the packaged ones. A ValueError (absl turns it into one flag error) and a FileNotFoundError."""


# The stage configs ship inside the package as ``jaxvla.configs``: setup.py maps the repository's
# top-level configs/ directory onto it, so a wheel, a ``pip install .`` and an editable install all
# carry them, and configs/ stays where the README's commands name it.
CONFIGS_PACKAGE = "jaxvla.configs"


def packaged_configs_dir() -> str | None:
    """The directory of the stage configs shipped with jaxvla, or None when there is none.

    The installed ``jaxvla.configs`` package when there is one (a wheel or ``pip install .``: it is
    ``site-packages/jaxvla/configs``; an editable install maps it back to the checkout's configs/),
    else the configs/ directory next to the ``jaxvla`` package of a source checkout (imported from
    the checkout without installing it)."""
    try:
        spec = importlib.util.find_spec(CONFIGS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if os.path.isdir(location):
            return location
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    if os.path.isfile(os.path.join(checkout, "__init__.py")):
        return checkout
    return None


def packaged_config_names() -> list[str]:
    """The file names of the packaged stage configs (``finetune.py``, ``laq.py``, ...), sorted."""
    directory = packaged_configs_dir()
    if directory is None:
        return []
    return sorted(n for n in os.listdir(directory) if n.endswith(".py") and not n.startswith("_"))


def resolve_config_path(path: str) -> str:
    """The config file a ``--config`` path names: the path as given when it is a file (relative to
    the working directory, or absolute), else the packaged config of that name.

    A bare name (``pretrain.py``, or ``pretrain``) and the repository-relative ``configs/pretrain.py``
    both fall back to the packaged ``pretrain.py``, so the README's commands work from any directory
    and after ``pip install .``. Anything else that is not a file raises ConfigNotFoundError naming
    the path, the working directory and the packaged configs."""
    if os.path.isfile(path):
        return path
    head, name = os.path.split(os.path.normpath(path)) if path else ("", "")
    if name and head in ("", "configs") and not name.startswith("_"):
        name = name if name.endswith(".py") else name + ".py"
        directory = packaged_configs_dir()
        if directory is not None and os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    available = ", ".join(packaged_config_names()) or "none found"
    raise ConfigNotFoundError(
        f"config {path!r} not found: it is not a file (working directory {os.getcwd()}) and not one of "
        f"jaxvla's packaged configs ({available}); pass a packaged config by name "
        f"(--config=pretrain.py:vipra_small) or the path of your own config file"
    )


def packaged_config_spec(spec: str) -> str:
    """``"configs/<stage>.py[:variant]"`` or ``"<stage>.py[:variant]"`` -> the packaged config's
    file (with the variant), whatever the working directory holds: for library code that means
    jaxvla's own configs (``jaxvla.experiment``). ConfigNotFoundError for another name."""
    path, colon, variant = spec.partition(":")
    name = os.path.basename(path)
    name = name if name.endswith(".py") else name + ".py"
    directory = packaged_configs_dir()
    if directory is None or name not in packaged_config_names():
        raise ConfigNotFoundError(f"{spec!r} is not one of jaxvla's packaged configs "
                                  f"({', '.join(packaged_config_names()) or 'none found'})")
    return os.path.join(directory, name) + colon + variant


def resolve_config_spec(spec: str) -> str:
    """``"PATH[:variant]"`` with PATH resolved by ``resolve_config_path`` (the variant kept)."""
    path, colon, variant = spec.partition(":")
    return resolve_config_path(path) + colon + variant


class ResolvingConfigFileParser(_ml_config_flags.ConfigFileFlagParser):
    """ml_collections' config-file flag parser with the path resolved by ``resolve_config_spec``
    first (a ConfigNotFoundError is a ValueError, so absl reports it as one flag error)."""

    def parse(self, path):
        return super().parse(resolve_config_spec(path) if isinstance(path, str) else path)


def DEFINE_config_file(name: str = "config", default: str | None = None,  # noqa: N802 (absl's naming)
                       help_string: str = "A stage config: configs/<stage>.py[:variant], or a packaged "
                       "one by name (<stage>.py[:variant]).", flag_values=None, lock_config: bool = True,
                       **kwargs):
    """``ml_collections.config_flags.DEFINE_config_file`` whose value is resolved by
    ``resolve_config_path`` first: ``--config=pretrain.py:vipra_small`` finds the packaged config from
    any directory, a path works as before, and an unknown one fails as one flag error listing the
    packaged configs. ``--config.a.b=v`` overrides work unchanged."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    holder = _ml_config_flags.DEFINE_config_file(
        name, None if default is None else resolve_config_spec(default), help_string,
        flag_values=flag_values, lock_config=lock_config, **kwargs)
    flag_values[name].parser = ResolvingConfigFileParser(name=name, lock_config=lock_config)
    return holder


def load_config(spec: str) -> ml_collections.ConfigDict:
    """A stage config from ``"configs/<stage>.py[:variant]"`` (or a packaged one by name,
    ``"<stage>.py[:variant]"``: ``resolve_config_path``), as ``--config=`` would load it.

    For scripts and tests that build configs in Python rather than on the command line.
    """
    path, _, variant = spec.partition(":")
    path = resolve_config_path(path)
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


def config_keys(config: ml_collections.ConfigDict | dict, prefix: str = "") -> list[str]:
    """Every dotted key of ``config``: nested dicts and their leaves, e.g. "checkpoint",
    "checkpoint.every"."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            keys.extend(config_keys(value, path + "."))
    return keys


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str | None:
    """None when ``key`` (dotted, e.g. "checkpoint.max_to_keep") exists in ``config``; else one
    line naming it and the closest valid keys (difflib; keys under the same parent first)."""
    keys = config_keys(config)
    if key in keys:
        return None
    leaves = [k for k in keys if not isinstance(_lookup(config, k), (dict, ml_collections.ConfigDict))]
    parent = key.rpartition(".")[0]
    siblings = [k for k in leaves if parent and k.startswith(parent + ".")]
    close = difflib.get_close_matches(key, siblings, n=3, cutoff=0.5)
    close += [k for k in difflib.get_close_matches(key, leaves, n=6, cutoff=0.0) if k not in close]
    return f"unknown config key config.{key}; closest valid keys: {', '.join('config.' + k for k in close[:3])}"


def _lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is not allowed: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_values(config: ml_collections.ConfigDict) -> None:
    """The checks that need no devices: counts, intervals, names and ranges of the shared keys.

    Raises ConfigError naming the key, the value and what is allowed. Runs before anything
    compiles: ``validate`` calls it, and ``python -m jaxvla.train`` runs it right after parsing the
    flags, before TensorFlow or the trainer are imported.
    """
    if not config.stage:
        raise ConfigError("config.stage is empty; the stage config must set it (e.g. 'tokenizer')")
    positive = [("num_steps", config.num_steps), ("batch_size", config.batch_size), ("log_every", config.log_every),
                ("checkpoint.every", config.checkpoint.every), ("checkpoint.max_to_keep", config.checkpoint.max_to_keep),
                ("optimizer.grad_accum_steps", config.optimizer.grad_accum_steps)]
    for key, value in positive:
        _check(_is_int(value) and value >= 1, key, value, "an integer >= 1")
    for key in ("eval_every", "image_every", "eval_batches"):
        _check(_is_int(config[key]) and config[key] >= 0, key, config[key], "an integer >= 0 (0: off)")
    if config.eval_every:
        _check(config.eval_batches >= 1, "eval_batches", config.eval_batches, f"an integer >= 1 when config.eval_every={config.eval_every}")
    for key in ("warmup_steps", "decay_steps"):
        value = config.optimizer[key]
        _check(_is_int(value) and value >= 0, f"optimizer.{key}", value, "an integer >= 0")
    _check(config.compute_dtype in COMPUTE_DTYPES, "compute_dtype", config.compute_dtype, f"one of {', '.join(COMPUTE_DTYPES)}")
    _check(config.remat_policy in REMAT_POLICIES, "remat_policy", config.remat_policy, f"one of {', '.join(REMAT_POLICIES)}")
    opt = config.optimizer
    _check(opt.name in OPTIMIZERS, "optimizer.name", opt.name, f"one of {', '.join(OPTIMIZERS)}")
    _check(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, f"one of {', '.join(SCHEDULES)}")
    for key in ("learning_rate", "weight_decay", "grad_clip_norm", "eps", "end_lr_ratio"):
        _check(_is_number(opt[key]) and opt[key] >= 0, f"optimizer.{key}", opt[key], "a finite number >= 0")
    for key in ("b1", "b2"):
        _check(_is_number(opt[key]) and 0 <= opt[key] < 1, f"optimizer.{key}", opt[key], "a number in [0, 1)")
    _check(_is_number(config.ema_decay) and 0 <= config.ema_decay < 1, "ema_decay", config.ema_decay, "a number in [0, 1) (0: no EMA)")
    for key, pattern in (("optimizer.freeze", opt.freeze), ("optimizer.weight_decay_exclude", opt.weight_decay_exclude),
                         ("init_drop", config.init_drop)):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.{key}={pattern!r} is not a valid regular expression: {e}") from e


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> tuple[int, int, int]:
    """Checks the shared keys' values (``check_values``), then mesh and batch against the
    devices; returns the resolved mesh shape.

    Raises ConfigError (a ValueError) naming the key and the numbers.
    """
    check_values(config)
    try:
        data, fsdp, tensor = resolve_mesh_shape(
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices
        )
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    batch = config.batch_size
    accum = config.optimizer.grad_accum_steps
    if batch % accum:
        raise ConfigError(
            f"config.batch_size={batch} must be divisible by "
            f"config.optimizer.grad_accum_steps={accum}"
        )
    micro = batch // accum
    if micro % (data * fsdp):
        raise ConfigError(
            f"config.batch_size={batch} (micro-batch {micro} with grad_accum_steps={accum}) is not "
            f"divisible by data x fsdp = {data} x {fsdp} = {data * fsdp}"
        )
    if batch % num_processes:
        raise ConfigError(
            f"config.batch_size={batch} is not divisible by the {num_processes} processes"
        )
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
