"""Stage 3 (action finetuning): the cached flow sampler, both heads through the trainer (rows sized
to the prompt budget, padding logged), learning, and init_from a latent-pretraining checkpoint."""

from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.config import apply_overrides, load_config
from jaxvla.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def stats_dir(finetune_stats_dir):
    return finetune_stats_dir


def tiny_finetune_config(variant, tokenizer, data_dir, stats_dir, **overrides):
    config = load_config(os.path.join(REPO, f"configs/finetune.py:{variant}"))
    values = {
        "batch_size": 4,
        "num_steps": 2,
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 1,
        "checkpoint.async_save": False,
        "optimizer.schedule": "constant",
        "optimizer.warmup_steps": 0,
        "optimizer.learning_rate": 1e-3,
        "model.size": "tiny",
        "model.tokenizer_checkpoint": tokenizer,
        "data.data_dir": str(data_dir),
        "data.generate_metaworld": False,
        "data.shuffle_buffer": 64,
        "data.traj_shuffle_buffer": 0,
        "data.stats_dir": stats_dir,
        **overrides,
    }
    return apply_overrides(config, values)


def _unbox(tree):
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


@pytest.fixture(scope="module")
def flow_stage(tiny_tokenizer, metaworld_dataset, stats_dir):
    from jaxvla.stages.finetune import build

    config = tiny_finetune_config("flow_small", tiny_tokenizer, metaworld_dataset["out"], stats_dir)
    return config, build(config)


def test_cached_sampler_matches_recompute(flow_stage):
    from jaxvla.losses import finetune as losses
    from jaxvla.frozen import FinetuneModels

    config, stage = flow_stage
    batch = next(stage.batches(0))
    # Rows sized to the prompt budget: 36 prompt ids + <vision> 3 + 64 codes + eov + </vision> 3 + 14 slots.
    assert int(stage.assets["seq_len"]) == 121 and int(stage.assets["prompt_tokens"]) == 36
    assert batch["tokens"].shape == (4, 121) and batch["action_positions"].shape == (4, 14)
    assert batch["action"].shape == (4, 14, 4) and batch["action_pad_mask"].shape == (4, 14)
    # the action block is the last non-padding stretch of every sequence
    lengths = batch["segment_ids"].sum(axis=1)
    np.testing.assert_array_equal(batch["action_positions"][:, -1], lengths - 1)
    params = _unbox(stage.init_variables(jax.random.PRNGKey(0)))["params"]
    assert set(params) == {"backbone", "action_encoder", "velocity_head"}
    assert "embed_latent" not in params["backbone"] and "head_latent" not in params["backbone"]
    models = FinetuneModels(config, stage_vocab(stage), 4)
    kw = dict(**models.flow_modules, num_steps=4)
    rng = jax.random.PRNGKey(1)
    cached = jax.jit(functools.partial(losses.sample_action_chunk, **kw))(params, batch, rng)
    full = jax.jit(functools.partial(losses.sample_action_chunk_recompute, **kw))(params, batch, rng)
    assert cached.shape == (4, 14, 4)
    assert float(jnp.std(full - jax.random.normal(rng, full.shape))) > 0.05  # the model moved the noise
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-4, rtol=1e-4)


def stage_vocab(stage):
    from jaxvla.data.sequences import Vocab

    v = stage.assets["vocab"]
    return Vocab(text_size=int(v["text"]), image_codes=int(v["image_codes"]), image_vocab=int(v["image"]), latent_codes=8,
                 action_bins=int(v["action"]))


@pytest.mark.parametrize("variant", ["flow_small", "bins_small"])
def test_few_steps_through_trainer(variant, finetuned, tiny_tokenizer):
    from jaxvla.checkpoint import load_checkpoint

    from jaxvla.experiment import select_step

    workdir, result = finetuned[variant]
    assert np.isfinite(result.metrics["loss"])
    # The held-out evaluation lands in the history at its step (the experiment's stopping rule
    # reads it from there), once: eval_every=3 divides num_steps, so no second final evaluation.
    evaluated = [(s, m) for s, m in result.history if "eval/action_mse" in m]
    assert [s for s, _ in evaluated] == [3] and [s for s, _ in result.history] == [1, 2, 3]
    assert evaluated[0][1]["eval/action_mse"] == result.metrics["eval/action_mse"]
    assert select_step(result.history) == (3, [(3, result.metrics["eval/action_mse"])])
    # Rows sized to the 36-id prompt budget: the reach / button-press prompts leave at most 10 % padding.
    assert 0.0 < result.metrics["padding_fraction"] <= 0.10
    assert 0.0 < result.metrics["eval/padding_fraction"] <= 0.10
    # eval/action_mse: the experiment's stopping rule, the same first-action error for both heads.
    if variant == "flow_small":
        assert np.isfinite(result.metrics["eval/sample_mse"])
        assert 0.0 < result.metrics["eval/action_mse"] < 10.0
    else:
        assert 0.0 <= result.metrics["eval/action_token_accuracy"] <= 1.0
        assert 0.0 < result.metrics["eval/valid_fraction"] <= 1.0 + 1e-5  # sums of 1 / 56 weights
        assert np.isfinite(result.metrics["eval/action_l1"]) and np.isfinite(result.metrics["eval/chunk_action_mse"])
        # Jensen: the mean square of the errors is at least the square of their mean magnitude.
        assert result.metrics["eval/action_mse"] >= result.metrics["eval/action_l1"] ** 2 - 1e-7
    _, saved_config, assets, step = load_checkpoint(workdir)
    assert step == 3 and saved_config["stage"] == "finetune"
    stats = assets["datasets"]["metaworld"]["statistics"]["action"]
    assert np.asarray(stats["q01"]).shape == (4,) and np.asarray(stats["q99"]).shape == (4,)
    assert int(assets["action_dim"]) == 4 and assets["tokenizer_checkpoint"] == os.path.abspath(tiny_tokenizer)
    # seq_len: one example's tokens, from which a policy derives the same 36-id prompt budget.
    assert int(assets["prompt_tokens"]) == 36
    if variant == "bins_small":
        assert np.asarray(assets["bin_edges"]).shape == (4, 257)
        # ViPRA-AR's 14-action chunks: 36 + 3 + 64 + 1 + 3 + <delta> 3 + 14 x 4 bins + </delta> 3.
        assert int(assets["chunk"]) == 14 and int(assets["execute_steps"]) == 7
        # One example a row: two would pad as much (tests/test_packing.py forces two).
        assert int(assets["seq_len"]) == 169 and int(assets["layout"]["row_len"]) == 169
        assert int(assets["layout"]["examples_per_row"]) == 1
    else:
        assert int(assets["chunk"]) == 14 and assets["action_normalization"] == "q01q99"
        assert int(assets["seq_len"]) == 121 and int(assets["layout"]["examples_per_row"]) == 1


def test_flow_learns(flow_stage, tiny_tokenizer, metaworld_dataset, stats_dir, tmp_path):
    from jaxvla.losses import finetune as losses
    from jaxvla.frozen import FinetuneModels

    config = tiny_finetune_config("flow_small", tiny_tokenizer, metaworld_dataset["out"], stats_dir,
                                  num_steps=100, batch_size=8, log_every=10)
    _, stage = flow_stage
    models = FinetuneModels(config, stage_vocab(stage), 4)
    eval_fn = jax.jit(functools.partial(losses.flow_eval_metrics, **models.flow_modules, num_steps=10))
    batch = next(stage.batches(0))
    start = eval_fn(_unbox(stage.init_variables(jax.random.PRNGKey(config.seed)))["params"], batch,
                    jax.random.PRNGKey(7))
    result = train(config, str(tmp_path), devices=_one_device())
    first, last = result.history[0][1]["loss"], result.metrics["loss"]
    end = eval_fn(jax.device_get(result.state.params), batch, jax.random.PRNGKey(7))
    print(f"flow loss {first:.3f} -> {last:.3f}; sample mse {float(start['sample_mse']):.3f} -> "
          f"{float(end['sample_mse']):.3f} (zero prediction {float(end['zero_mse']):.3f})")
    assert last < 0.7 * first, (first, last)
    assert float(end["sample_mse"]) < float(start["sample_mse"])
    assert float(end["sample_mse"]) < float(end["zero_mse"])


def test_init_from_pretrain_checkpoint_drops_latent(tiny_tokenizer, metaworld_dataset, stats_dir, tmp_path, caplog):
    from jaxvla.data.sequences import Vocab
    from jaxvla.models.llama import Llama
    from jaxvla.stages import Stage, register_stage
    from jaxvla.frozen import backbone_config

    def fake_pretrain(config):
        vocab = Vocab(text_size=32000, image_codes=64, latent_codes=8, action_bins=256)
        model = Llama(backbone_config(config.model, vocab, compute_dtype="float32", remat="none"))

        def init_variables(rng):
            ids = jnp.zeros((1, 4), jnp.int32)
            return {"params": {"backbone": model.init({"params": rng}, ids, ids, ids, ids + 1, ids)["params"]}}

        def loss_fn(params, batch, rng):
            x = batch["tokens"]
            out = model.apply({"params": params["backbone"]}, x, x * 0 + 2, x * 0, x * 0 + 1, x * 0,
                              heads=("latent",))
            loss = jnp.mean(out["logits"]["latent"] ** 2)
            return loss, {}

        def batches(start):
            while True:
                yield {"tokens": np.zeros((2, 4), np.int32)}

        return Stage(init_variables=init_variables, loss_fn=loss_fn, batches=batches)

    register_stage("fake_pretrain", fake_pretrain)
    pre = tiny_finetune_config("bins_small", tiny_tokenizer, metaworld_dataset["out"], stats_dir,
                               num_steps=1, batch_size=2)
    pre.unlock()
    pre.stage = "fake_pretrain"
    pre.lock()
    train(pre, str(tmp_path / "pre"), devices=_one_device())

    caplog.set_level(logging.INFO, logger="jaxvla")
    config = tiny_finetune_config("bins_small", tiny_tokenizer, metaworld_dataset["out"], stats_dir,
                                  num_steps=1, init_from=str(tmp_path / "pre"))
    result = train(config, str(tmp_path / "ft"), devices=_one_device())
    assert np.isfinite(result.metrics["loss"])
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("jaxvla"))
    dropped = [line for line in text.splitlines() if "dropped" in line]
    assert any("embed_latent" in line for line in dropped), text[-3000:]
    assert any("head_latent" in line for line in dropped), text[-3000:]
    assert any("kept" in line and "layers" in line for line in text.splitlines())
