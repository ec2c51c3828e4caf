"""optax optimizers from ``config.optimizer``.

Keys (all stages): ``name`` (adamw | adam | sgd), ``learning_rate``, ``schedule`` (constant |
warmup_cosine | rsqrt), ``warmup_steps``, ``decay_steps`` (0: ``num_steps``), ``end_lr_ratio``,
``b1``, ``b2``, ``eps``, ``weight_decay``, ``weight_decay_exclude`` (regex over parameter paths
that get no decay), ``grad_clip_norm`` (0: off), ``freeze`` (regex over parameter paths held
fixed), ``grad_accum_steps`` (handled by the train step, not here).

Parameter paths are "/"-joined, e.g. ``encoder/down_0/res_0/conv_1/kernel``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxvla.sharding import path_parts


def param_path(path: tuple) -> str:
    """A jax key path -> "a/b/c"."""
    return "/".join(path_parts(path))


def path_mask(params: Any, pattern: str) -> Any:
    """A bool tree: True where the parameter's path matches ``pattern`` (re.search)."""
    regex = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(param_path(p))), params)


# The names config.optimizer.name / .schedule accept (config.check_values validates against them).
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "rsqrt")


def make_schedule(cfg: Any, num_steps: int) -> optax.Schedule:
    """The learning-rate schedule named by ``cfg.schedule``."""
    peak = cfg.learning_rate
    warmup = int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        if warmup:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
            )
        return optax.constant_schedule(peak)
    if cfg.schedule == "warmup_cosine":
        decay_steps = int(cfg.decay_steps) or num_steps
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(decay_steps, warmup + 1),
            end_value=peak * cfg.end_lr_ratio,
        )
    if cfg.schedule == "rsqrt":
        # Linear warm-up, then lr * sqrt(warmup / step): the "inverse square root" schedule.
        scale = max(warmup, 1)

        def rsqrt(step):
            step = jnp.maximum(step, 1).astype(jnp.float32)
            return peak * jnp.minimum(step / scale, jnp.sqrt(scale / step))

        return rsqrt
    raise ValueError(f"config.optimizer.schedule={cfg.schedule!r} is unknown; expected one of {', '.join(SCHEDULES)}")


def make_optimizer(cfg: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds (optimizer, schedule) from ``config.optimizer``."""
    schedule = make_schedule(cfg, num_steps)
    exclude = cfg.weight_decay_exclude

    def decay_mask(params):
        return jax.tree.map(lambda excluded: not excluded, path_mask(params, exclude)) if exclude else True

    if cfg.name == "adamw":
        base = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    elif cfg.name == "adam":
        base = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "sgd":
        base = optax.sgd(schedule, momentum=cfg.b1 or None)
    else:
        raise ValueError(f"config.optimizer.name={cfg.name!r} is unknown; expected one of {', '.join(OPTIMIZERS)}")

    chain = []
    if cfg.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(base)
    optimizer = optax.chain(*chain)

    if cfg.freeze:
        pattern = cfg.freeze

        def labels(params):
            frozen = path_mask(params, pattern)
            return jax.tree.map(lambda f: "frozen" if f else "trained", frozen)

        # Frozen parameters get no optimizer state at all (set_to_zero keeps none): no memory for
        # Adam moments of, e.g., a frozen vision tokenizer.
        optimizer = optax.multi_transform(
            {"trained": optimizer, "frozen": optax.set_to_zero()}, labels
        )
    return optimizer, schedule


def count_frozen(params: Any, pattern: str) -> tuple[int, int]:
    """(number of frozen parameter arrays, number of frozen scalars) for logging."""
    if not pattern:
        return 0, 0
    mask = path_mask(params, pattern)
    leaves = [(m, x) for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(params)) if m]
    return len(leaves), sum(int(x.size) for _, x in leaves)
