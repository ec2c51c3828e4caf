"""The shared trainer: sharding invariance, resume, preemption, NaN, surgery, multi-process."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxvla import checkpoint as ckpt_lib
from jaxvla import config as cfg_lib
from jaxvla.trainer import NonFiniteLossError, train
from toy import toy_config

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUN_TOY = os.path.join(HERE, "scripts", "run_toy.py")


def leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def toy_env(**extra):
    env = dict(os.environ)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env.update({"PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", **extra})
    return env


# ---------------------------------------------------------------------------------------------
# Configs and errors.


def parse_cli(argv):
    """Parses the trainer's --config flags in-process (config_flags reads overrides from sys.argv)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
    saved, sys.argv = sys.argv, ["prog", *argv]
    try:
        flag_values(sys.argv)
    finally:
        sys.argv = saved
    return flag_values.config


def test_cli_overrides_and_unknown_key_fails():
    config = parse_cli([f"--config={REPO}/configs/tokenizer.py:small", "--config.num_steps=7", "--config.mesh.fsdp=2"])
    assert config.num_steps == 7 and config.mesh.fsdp == 2 and config.model.variant == "small"
    with pytest.raises(Exception, match="no_such_key"):
        parse_cli([f"--config={REPO}/configs/tokenizer.py", "--config.no_such_key=1"])
    with pytest.raises(AttributeError):
        config.no_such_key = 1  # locked


def test_mesh_and_batch_errors_name_keys_and_numbers():
    config = toy_config(**{"mesh.fsdp": 3})
    with pytest.raises(ValueError, match=r"config\.mesh.*3.*8"):
        cfg_lib.validate(config, num_devices=8, num_processes=1)
    config = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        cfg_lib.validate(config, num_devices=8, num_processes=1)
    config = toy_config(**{"batch_size": 6, "mesh.data": 4, "mesh.tensor": 2})
    with pytest.raises(ValueError, match=r"config\.batch_size=6.*data x fsdp = 4 x 1 = 4"):
        cfg_lib.validate(config, num_devices=8, num_processes=1)
    config = toy_config(**{"batch_size": 16, "optimizer.grad_accum_steps": 3})
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        cfg_lib.validate(config, num_devices=1, num_processes=1)
    assert cfg_lib.validate(toy_config(**{"mesh.data": -1, "mesh.tensor": 2}), 8, 1) == (4, 1, 2)


def test_resolved_config_saved(tmp_path):
    train(toy_config(num_steps=1), str(tmp_path), devices=jax.devices()[:1])
    saved = cfg_lib.from_dict(__import__("json").load(open(tmp_path / "config.json")))
    assert saved.stage == "toy" and saved.num_steps == 1


# ---------------------------------------------------------------------------------------------
# Sharding invariance, accumulation, freezing.


def test_sharded_mesh_matches_single_device(tmp_path):
    single = train(toy_config(num_steps=3), str(tmp_path / "one"), devices=jax.devices()[:1])
    sharded = train(
        toy_config(num_steps=3, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(tmp_path / "eight")
    )
    kernel = sharded.state.params["hidden"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8
    assert_trees_close(single.state.params, sharded.state.params)
    assert_trees_close(single.state.opt_state, sharded.state.opt_state)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full = train(toy_config(num_steps=2), str(tmp_path / "full"), devices=jax.devices()[:2])
    accum = train(toy_config(num_steps=2, **{"optimizer.grad_accum_steps": 4}), str(tmp_path / "acc"), devices=jax.devices()[:2])
    assert_trees_close(full.state.params, accum.state.params, rtol=1e-5, atol=1e-6)
    assert abs(full.metrics["loss"] - accum.metrics["loss"]) < 1e-5


def test_frozen_parameters_do_not_move(tmp_path):
    result = train(toy_config(num_steps=2, **{"optimizer.freeze": "^head/"}), str(tmp_path / "w"), devices=jax.devices()[:1])
    fresh = train(toy_config(num_steps=0 + 1, **{"optimizer.learning_rate": 0.0}), str(tmp_path / "init"), devices=jax.devices()[:1])
    np.testing.assert_array_equal(result.state.params["head"]["kernel"], fresh.state.params["head"]["kernel"])
    assert not np.array_equal(result.state.params["hidden"]["kernel"], fresh.state.params["hidden"]["kernel"])


def test_loss_decreases(tmp_path):
    result = train(toy_config(num_steps=40, log_every=10), str(tmp_path), devices=jax.devices()[:1])
    first = train(toy_config(num_steps=10, log_every=10), str(tmp_path / "short"), devices=jax.devices()[:1])
    assert result.metrics["loss"] < 0.6 * first.metrics["loss"]


# ---------------------------------------------------------------------------------------------
# Checkpoints: resume, kill, restore on another mesh, assets, SIGTERM, NaN.


def test_resume_is_exact(tmp_path):
    straight = train(toy_config(num_steps=6), str(tmp_path / "straight"), devices=jax.devices()[:1])
    train(toy_config(num_steps=3), str(tmp_path / "resumed"), devices=jax.devices()[:1])
    resumed = train(toy_config(num_steps=6), str(tmp_path / "resumed"), devices=jax.devices()[:1])
    assert resumed.step == straight.step == 6
    assert leaves_equal(straight.state.params, resumed.state.params)
    assert leaves_equal(straight.state.opt_state, resumed.state.opt_state)


def test_killed_process_resumes_to_identical_state(tmp_path):
    workdir = tmp_path / "killed"
    progress = tmp_path / "progress"
    proc = subprocess.Popen(
        [sys.executable, RUN_TOY, str(workdir), "num_steps=200", "checkpoint.every=2",
         "data.sleep=0.05", f'data.progress_file="{progress}"'],
        env=toy_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            steps = ckpt_lib.Checkpointer(str(workdir)).all_steps() if (workdir / "checkpoints").exists() else []
            if steps and max(steps) >= 4:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(ckpt_lib.Checkpointer(str(workdir)).all_steps())
    assert 4 <= killed_at < 200
    total = killed_at + 3
    resumed = train(toy_config(num_steps=total, **{"checkpoint.every": 2}), str(workdir), devices=jax.devices()[:1])
    straight = train(toy_config(num_steps=total), str(tmp_path / "straight"), devices=jax.devices()[:1])
    assert leaves_equal(straight.state.params, resumed.state.params)
    assert leaves_equal(straight.state.opt_state, resumed.state.opt_state)


def test_checkpoint_from_eight_devices_restores_on_one(tmp_path, caplog):
    eight = train(toy_config(num_steps=2, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(tmp_path))
    with caplog.at_level(logging.INFO, logger="jaxvla"):
        one = train(toy_config(num_steps=2), str(tmp_path), devices=jax.devices()[:1])
    assert "resuming from step 2" in caplog.text
    assert leaves_equal(eight.state.params, one.state.params)
    assert len(one.state.params["hidden"]["kernel"].sharding.device_set) == 1
    # ... and the reverse: continue the 1-device run on 8 devices.
    again = train(toy_config(num_steps=3, **{"mesh.fsdp": 8}), str(tmp_path))
    assert again.step == 3 and len(again.state.params["hidden"]["kernel"].sharding.device_set) == 8


def test_checkpoint_items_config_and_assets(tmp_path):
    train(toy_config(num_steps=3), str(tmp_path), devices=jax.devices()[:1])
    state, config, assets, step = ckpt_lib.load_checkpoint(str(tmp_path))
    assert step == 3 and config["stage"] == "toy"
    np.testing.assert_array_equal(assets["target_scale"], np.arange(3, dtype=np.float32))
    assert assets["target_scale"].dtype == np.float32
    assert int(state["step"]) == 3 and state["params"]["hidden"]["kernel"].shape == (8, 16)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        ckpt_lib.load_checkpoint(str(tmp_path / "nothing_here"))


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = tmp_path / "preempt"
    progress = tmp_path / "progress"
    proc = subprocess.Popen(
        [sys.executable, RUN_TOY, str(workdir), "num_steps=500", "checkpoint.every=1000",
         "data.sleep=0.05", f'data.progress_file="{progress}"'],
        env=toy_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while not (progress.exists() and len(progress.read_text().split()) >= 5):
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output.decode()
    steps = ckpt_lib.Checkpointer(str(workdir)).all_steps()
    assert len(steps) == 1 and 1 <= steps[0] < 500
    assert f"FINAL_STEP {steps[0]} PREEMPTED True" in output.decode()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = toy_config(num_steps=10, **{"checkpoint.every": 1, "data.nan_at_step": 4})
    with pytest.raises(NonFiniteLossError, match=r"at step 4.*step 3"):
        train(config, str(tmp_path), devices=jax.devices()[:1])
    assert max(ckpt_lib.Checkpointer(str(tmp_path)).all_steps()) == 3


# ---------------------------------------------------------------------------------------------
# init_from surgery.


def test_init_from_surgery(tmp_path, caplog):
    source = train(toy_config(num_steps=2), str(tmp_path / "src"), devices=jax.devices()[:1])
    config = toy_config(num_steps=1, init_from=str(tmp_path / "src"), init_drop="^hidden/bias$", **{"model.extra_head": True, "optimizer.learning_rate": 0.0})
    with caplog.at_level(logging.INFO, logger="jaxvla"):
        result = train(config, str(tmp_path / "dst"), devices=jax.devices()[:1])
    params = result.state.params
    np.testing.assert_array_equal(params["hidden"]["kernel"], source.state.params["hidden"]["kernel"])
    np.testing.assert_array_equal(params["head"]["kernel"], source.state.params["head"]["kernel"])
    assert not np.array_equal(params["hidden"]["bias"], source.state.params["hidden"]["bias"])
    assert "kept        hidden/kernel" in caplog.text
    assert "initialised head2/kernel" in caplog.text
    assert "initialised hidden/bias (16,) (dropped by init_drop" in caplog.text

    # Shape mismatch: names the path and both shapes.
    bad = toy_config(num_steps=1, init_from=str(tmp_path / "src"), **{"model.hidden": 32})
    with pytest.raises(ValueError, match=r"'hidden/kernel' has shape \(8, 16\) in the checkpoint but \(8, 32\)") as error:
        train(bad, str(tmp_path / "bad"), devices=jax.devices()[:1])
    assert "'head/kernel' has shape (16, 4) in the checkpoint but (32, 4)" in str(error.value)


def test_graft_reports_dropped_source_params():
    source = {"a": {"w": np.ones((2, 2))}, "old": {"w": np.zeros(3)}}
    target = {"a": {"w": jax.numpy.zeros((2, 2))}, "new": {"w": jax.numpy.zeros(4)}}
    merged, report = ckpt_lib.graft_params(target, source)
    np.testing.assert_array_equal(merged["a"]["w"], 1.0)
    np.testing.assert_array_equal(merged["new"]["w"], 0.0)
    assert any(line.startswith("dropped     old/w") for line in report)


# ---------------------------------------------------------------------------------------------
# Multi-process.


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    workdir = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            [sys.executable, RUN_TOY, str(workdir), "num_steps=3", "mesh.data=2"],
            env=toy_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        assert "FINAL_STEP 3" in out
    state, _, _, step = ckpt_lib.load_checkpoint(str(workdir))
    single = train(toy_config(num_steps=3, **{"mesh.data": 2}), str(tmp_path / "single"), devices=jax.devices()[:2])
    assert step == 3
    assert_trees_close(state["params"], jax.device_get(single.state.params))


def test_data_statistics_round_trip_as_checkpoint_assets(tmp_path):
    """Normalisation statistics and quantile bin edges from the data pipeline are saved with the
    checkpoint and come back with the same values and dtypes (what finetuning and policies read)."""
    import dataclasses

    from jaxvla.data import stats as stats_lib
    from toy import build_toy

    rng = np.random.default_rng(0)
    trajectories = [
        {"action": rng.normal(size=(20, 4)).astype(np.float32),
         "observation": {"proprio": rng.normal(size=(20, 3)).astype(np.float32)},
         "has_action": np.ones(20, bool)}
        for _ in range(5)
    ]
    statistics = stats_lib.compute_statistics(iter(trajectories), name="toy", progress=False, num_bins=8, binary_dims=(3,))
    config = toy_config(num_steps=1)
    stage = dataclasses.replace(build_toy(config), assets={"statistics": statistics})
    train(config, str(tmp_path), stage=stage, devices=jax.devices()[:1])
    _, _, assets, _ = ckpt_lib.load_checkpoint(str(tmp_path))
    saved = assets["statistics"]["action"]
    for key in ("mean", "std", "min", "max", "q01", "q99", "bin_edges"):
        np.testing.assert_array_equal(saved[key], statistics["action"][key])
        assert saved[key].dtype == statistics["action"][key].dtype
    assert saved["count"] == 100 and list(saved["binary_dims"]) == [3]
    edges = saved["bin_edges"]
    bins = stats_lib.bin_actions(trajectories[0]["action"], edges)
    np.testing.assert_array_equal(bins, stats_lib.bin_actions(trajectories[0]["action"], statistics["action"]["bin_edges"]))
