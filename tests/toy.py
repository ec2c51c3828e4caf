"""A tiny regression stage that compiles in well under a second: trainer mechanics tests use it.

y = tanh(x @ W1) @ W2 fitted to a fixed random linear target; batch ``s`` depends only on
(seed, s). Test-only knobs in ``config.data``: ``sleep`` per batch (so a subprocess can be
signalled mid-run), ``progress_file`` (touched per batch), ``nan_at_step`` (that batch poisons
the loss with NaN). ``toy_heldout`` is the same stage with a held-out stream (another seed) for
the trainer's periodic evaluation.
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvla.config import apply_overrides, base_config, finalize
from jaxvla.stages import Stage, register_stage

IN_DIM, OUT_DIM = 8, 4


class ToyMLP(nn.Module):
    hidden: int = 16
    extra_head: bool = False  # a second head: exercises init_from surgery
    out_dim: int = OUT_DIM

    @nn.compact
    def __call__(self, x):
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features,
            name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        )
        h = jnp.tanh(dense(self.hidden, ("embed", "mlp"), "hidden")(x))
        h = nn.with_logical_constraint(h, ("batch", "mlp"))
        y = dense(self.out_dim, ("mlp", "embed"), "head")(h)
        if self.extra_head:
            y = y + dense(self.out_dim, ("mlp", "embed"), "head2")(h)
        return y


def toy_config(**overrides) -> ml_collections.ConfigDict:
    c = base_config()
    c.stage = "toy"
    c.num_steps = 6
    c.batch_size = 16
    c.log_every = 1
    c.checkpoint.every = 3
    c.checkpoint.async_save = False
    c.optimizer.learning_rate = 1e-2
    c.model = ml_collections.ConfigDict(dict(hidden=16, extra_head=False, out_dim=OUT_DIM))
    c.data = ml_collections.ConfigDict(dict(sleep=0.0, progress_file="", nan_at_step=-1))
    return apply_overrides(finalize(c), overrides)


def toy_batches(config, start_step: int, seed_offset: int = 0):
    process, processes = jax.process_index(), jax.process_count()
    local = config.batch_size // processes
    target = np.random.default_rng(1234).normal(size=(IN_DIM, OUT_DIM)).astype(np.float32)
    step = start_step
    while True:
        rng = np.random.default_rng([config.seed + seed_offset, step])
        x = rng.normal(size=(config.batch_size, IN_DIM)).astype(np.float32)
        y = np.tanh(x @ target) + 0.01 * rng.normal(size=(config.batch_size, OUT_DIM)).astype(np.float32)
        poison = np.full((config.batch_size,), float(step + 1 == config.data.nan_at_step), np.float32)
        rows = slice(process * local, (process + 1) * local)
        if config.data.sleep:
            time.sleep(config.data.sleep)
        if config.data.progress_file:
            with open(config.data.progress_file, "a") as f:
                f.write(f"{step}\n")
        yield {"x": x[rows], "y": y[rows].astype(np.float32), "poison": poison[rows]}
        step += 1


def build_toy(config) -> Stage:
    model = ToyMLP(config.model.hidden, config.model.extra_head, config.model.out_dim)

    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"])
        mse = jnp.mean(jnp.square(pred - batch["y"]))
        # NaN where the batch is poisoned, the loss itself elsewhere.
        loss = jnp.where(jnp.max(batch["poison"]) > 0, jnp.nan, mse)
        return loss, {"mse": mse}

    return Stage(
        init_variables=lambda rng: model.init(rng, jnp.zeros((1, IN_DIM))),
        loss_fn=loss_fn,
        batches=lambda start: toy_batches(config, start),
        assets={"target_scale": np.arange(3, dtype=np.float32)},
    )


# The held-out stream's seed offset: its batches never appear in training.
HELDOUT_SEED_OFFSET = 10_000


def build_toy_heldout(config) -> Stage:
    stage = build_toy(config)
    return dataclasses.replace(stage, eval_batches=lambda: toy_batches(config, 0, HELDOUT_SEED_OFFSET))


register_stage("toy", build_toy)
register_stage("toy_heldout", build_toy_heldout)
