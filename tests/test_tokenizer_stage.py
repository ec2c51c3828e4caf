"""The image-tokenizer stage end to end: sharding invariance, learning, code restarts, the CLI."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.config import apply_overrides, load_config
from jaxvla.losses.tokenizer import code_statistics, make_code_restarts
from jaxvla.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_tokenizer_config(**overrides):
    """The ``small`` variant shrunk so a CPU step takes a few tens of milliseconds."""
    config = load_config(os.path.join(REPO, "configs", "tokenizer.py:small"))
    values = {
        "batch_size": 8,
        "log_every": 1,
        "eval_every": 0,
        "image_every": 0,
        "checkpoint.async_save": False,
        "optimizer.warmup_steps": 0,
        "optimizer.schedule": "constant",
        "optimizer.learning_rate": 1e-3,
        "model.hidden_channels": 8,
        "model.codebook_size": 64,
        "model.embed_dim": 16,
        "data.source": "procedural",
        "data.num_frames": 96,
        **overrides,
    }
    return apply_overrides(config, values)


def test_two_steps_sharded_match_single_device(tmp_path):
    # SGD: Adam's first step is ~lr * sign(g), which turns the rounding noise of gradients that are
    # ~0 (e.g. an L1 loss's output bias) into full-size steps in either direction, so with Adam
    # two runs that differ only in reduction order differ by O(lr) on such parameters.
    sgd = {"optimizer.name": "sgd", "optimizer.learning_rate": 0.05, "optimizer.b1": 0.9}
    one = train(tiny_tokenizer_config(num_steps=2, **sgd), str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = train(
        tiny_tokenizer_config(num_steps=2, **sgd, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
        str(tmp_path / "eight"),
    )
    codebook = eight.state.params["quantizer"]["codebook"]
    assert len(codebook.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(eight.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert abs(one.metrics["loss"] - eight.metrics["loss"]) < 1e-4


def test_reconstruction_loss_falls_over_50_steps(tmp_path, rendered_frames_config):
    config = tiny_tokenizer_config(num_steps=50, log_every=5, **rendered_frames_config)
    result = train(config, str(tmp_path), devices=jax.devices()[:1])
    first_step, first = result.history[0]
    assert first_step == 5 and [step for step, _ in result.history] == list(range(5, 55, 5))
    assert result.metrics["l1"] < 0.7 * first["l1"], (first["l1"], result.metrics["l1"])
    assert result.metrics["psnr"] > first["psnr"] + 2.0
    assert 0 < result.metrics["codes_used_fraction"] <= 1
    pngs = glob.glob(str(tmp_path / "images" / "reconstructions_*.png"))
    assert pngs, "a reconstruction grid PNG is written at the end of training"
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


def test_code_statistics_values():
    stats = code_statistics(jnp.array([[0, 0], [1, 3]]), codebook_size=4)
    np.testing.assert_array_equal(stats["counts"], [2, 1, 0, 1])
    probs = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(stats["perplexity"], np.exp(-(probs * np.log(probs)).sum()), rtol=1e-6)
    assert float(stats["used_fraction"]) == 0.75


def test_dead_codes_are_restarted_onto_encoder_outputs():
    size, dim = 8, 4
    init_aux, post_step = make_code_restarts(("quantizer", "codebook"), size, every=2, decay=0.5, threshold=0.5)
    codebook = jnp.arange(size * dim, dtype=jnp.float32).reshape(size, dim)
    params = {"quantizer": {"codebook": codebook}, "other": jnp.ones(3)}
    aux = init_aux(params)
    counts = jnp.array([10.0, 10, 0, 0, 0, 0, 0, 0])  # only codes 0 and 1 are used
    candidates = jnp.full((5, dim), 100.0) + jnp.arange(5.0)[:, None]
    outputs = {"aux/code_counts": counts, "aux/candidates": candidates}

    # Step 0 is not a restart step: usage decays, nothing moves.
    params, aux, metrics = post_step(params, aux, outputs, jnp.int32(0), jax.random.PRNGKey(0))
    assert float(metrics["codes_replaced"]) == 0
    np.testing.assert_array_equal(params["quantizer"]["codebook"], codebook)
    # Step 1 ((step + 1) % 2 == 0): the six unused codes move next to candidates.
    params, aux, metrics = post_step(params, aux, outputs, jnp.int32(1), jax.random.PRNGKey(1))
    assert float(metrics["codes_replaced"]) == 6
    new = np.asarray(params["quantizer"]["codebook"])
    np.testing.assert_array_equal(new[:2], codebook[:2])
    assert np.all(np.abs(new[2:] - 100) < 6), "dead codes land near encoder outputs"
    np.testing.assert_allclose(aux["code_usage"][2:], 1.0 / size)
    np.testing.assert_array_equal(params["other"], 1.0)


def test_restarts_revive_codes_in_training(tmp_path):
    """A codebook initialised far from the encoder's outputs collapses onto few codes; restarts
    bring the alive fraction back up."""
    config = tiny_tokenizer_config(num_steps=30, **{"model.restart_every": 5, "model.restart_decay": 0.5})
    result = train(config, str(tmp_path), devices=jax.devices()[:1])
    no_restart = train(
        tiny_tokenizer_config(num_steps=30, **{"model.restart_every": 0}), str(tmp_path / "none"), devices=jax.devices()[:1]
    )
    assert result.metrics["codes_used_fraction"] > no_restart.metrics["codes_used_fraction"]


def test_cli_trains_then_resumes(tmp_path):
    workdir = tmp_path / "cli"
    common = [
        sys.executable, "-m", "jaxvla.train", f"--config={REPO}/configs/tokenizer.py:small", f"--workdir={workdir}",
        "--config.batch_size=4", "--config.model.hidden_channels=8", "--config.model.codebook_size=32",
        "--config.data.num_frames=40", "--config.eval_every=0", "--config.log_every=1",
        # The schedule's length fixed, so both runs compile the same step: the second loads it from
        # the persistent compilation cache the first filled.
        "--config.optimizer.decay_steps=10",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_NUM_CPU_DEVICES": "1"}
    first = subprocess.run(common + ["--config.num_steps=2"], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(common + ["--config.num_steps=3"], env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 2" in second.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
    assert (workdir / "config.json").exists()

    bad = subprocess.run(common + ["--config.num_steps=3", "--config.mesh.fsdp=3"], env=env, capture_output=True, text=True, timeout=900)
    assert bad.returncode != 0 and "config.mesh" in bad.stderr
