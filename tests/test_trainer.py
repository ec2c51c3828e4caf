"""The shared trainer: sharding invariance, resume, preemption, NaN, surgery, multi-process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
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


BAD_VALUES = [
    ({"checkpoint.max_to_keep": 0}, r"config\.checkpoint\.max_to_keep=0 is not allowed: expected an integer >= 1"),
    ({"checkpoint.every": 0}, r"config\.checkpoint\.every=0 .*>= 1"),
    ({"log_every": 0}, r"config\.log_every=0 .*>= 1"),
    ({"num_steps": -1}, r"config\.num_steps=-1 .*>= 1"),
    ({"eval_every": -1}, r"config\.eval_every=-1 .*>= 0"),
    ({"image_every": -5}, r"config\.image_every=-5 .*>= 0"),
    ({"eval_every": 2, "eval_batches": 0}, r"config\.eval_batches=0 .*>= 1 when config\.eval_every=2"),
    ({"compute_dtype": "float7"}, r"config\.compute_dtype='float7' .*one of float32, bfloat16"),
    ({"remat_policy": "some"}, r"config\.remat_policy='some' .*one of none, full"),
    ({"optimizer.name": "adamx"}, r"config\.optimizer\.name='adamx' .*adamw, adam, sgd"),
    ({"optimizer.learning_rate": -1e-3}, r"config\.optimizer\.learning_rate=-0\.001 .*>= 0"),
    ({"optimizer.b2": 1.0}, r"config\.optimizer\.b2=1\.0 .*\[0, 1\)"),
    ({"ema_decay": 1.5}, r"config\.ema_decay=1\.5 .*\[0, 1\)"),
    ({"optimizer.freeze": "(head"}, r"config\.optimizer\.freeze='\(head' is not a valid regular expression"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[",".join(o) for o, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg_lib.validate(toy_config(**overrides), num_devices=1, num_processes=1)


def test_bad_value_fails_before_anything_is_written_or_compiled(tmp_path):
    # max_to_keep=0 used to train and then delete every checkpoint, exiting 0.
    with pytest.raises(ValueError, match=r"config\.checkpoint\.max_to_keep=0"):
        train(toy_config(num_steps=2, **{"checkpoint.max_to_keep": 0}), str(tmp_path), devices=jax.devices()[:1])
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()


def test_cli_config_mistakes_are_one_line(tmp_path):
    def run(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "jaxvla.train", f"--config={REPO}/configs/tokenizer.py:small",
             f"--workdir={tmp_path / 'w'}", *overrides],
            env=toy_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
        )

    typo = run("--config.checkpoint.max_to_kep=1")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert typo.stderr.strip().splitlines() == [
        "error: unknown config key config.checkpoint.max_to_kep; closest valid keys: "
        "config.checkpoint.max_to_keep, config.checkpoint.async_save, config.checkpoint.every"
    ]
    unknown = run("--config.nosuchkey=1")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    (line,) = unknown.stderr.strip().splitlines()
    assert line.startswith("error: unknown config key config.nosuchkey; closest valid keys: config.")
    bad_value = run("--config.checkpoint.max_to_keep=0")
    assert bad_value.returncode == 2 and "Traceback" not in bad_value.stderr
    assert bad_value.stderr.strip().splitlines() == [
        "error: config.checkpoint.max_to_keep=0 is not allowed: expected an integer >= 1"
    ]
    assert not (tmp_path / "w").exists()


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


def test_evaluate_checkpoints_measures_kept_steps_as_training_did(tmp_path):
    from jaxvla.trainer import evaluate_checkpoints
    from toy import HELDOUT_SEED_OFFSET, build_toy_heldout, toy_batches

    config = toy_config(stage="toy_heldout", num_steps=6, eval_every=2, eval_batches=2, **{"checkpoint.every": 2})
    one = jax.devices()[:1]
    stage = build_toy_heldout(config)
    streams = []
    stage.eval_batches = lambda stream=stage.eval_batches: streams.append(1) or stream()
    result = train(config, str(tmp_path), stage=stage, devices=one)
    logged = {s: m["eval/mse"] for s, m in result.history if "eval/mse" in m}
    assert sorted(logged) == [2, 4, 6] and len(streams) == 1  # the held-out batches are read once a run
    # The same 2 batches as training's periodic evaluation: the same values.
    again = dict(evaluate_checkpoints(str(tmp_path), [2, 4, 6], eval_batches=2, devices=one))
    for step in (2, 4, 6):
        np.testing.assert_allclose(again[step]["eval/mse"], logged[step], rtol=1e-6)
    # 5 batches: the mean of the toy model's error written out in numpy on the first 5 held-out batches.
    (step, metrics), = evaluate_checkpoints(str(tmp_path), [4], eval_batches=5, devices=one)
    params = ckpt_lib.load_checkpoint(str(tmp_path), step=4)[0]["params"]
    w1, b1 = np.asarray(params["hidden"]["kernel"]), np.asarray(params["hidden"]["bias"])
    w2, b2 = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
    batches = toy_batches(config, 0, HELDOUT_SEED_OFFSET)
    errors = []
    for _ in range(5):
        b = next(batches)
        errors.append(np.mean(np.square(np.tanh(b["x"] @ w1 + b1) @ w2 + b2 - b["y"])))
    assert step == 4
    np.testing.assert_allclose(metrics["eval/mse"], np.mean(errors), rtol=1e-5)
    assert abs(np.mean(errors) - np.mean(errors[:2])) > 1e-6  # more batches measure something else
    with pytest.raises(FileNotFoundError, match=r"step\(s\) \[5\]"):
        evaluate_checkpoints(str(tmp_path), [5], eval_batches=2, devices=one)
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate_checkpoints(str(tmp_path / "nothing"), [2], eval_batches=2)


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
    # Step 4's loss is the loss of the parameters after step 3: step 3's checkpoint is not "good"
    # (the trainer cannot tell a poisoned batch from poisoned parameters), so it is moved aside
    # and step 2 is the last good one.
    config = toy_config(num_steps=10, **{"checkpoint.every": 1, "data.nan_at_step": 4})
    with pytest.raises(NonFiniteLossError, match=r"at step 4.*checkpoint of step 3 .*moved aside.*last good checkpoint \(step 2\)"):
        train(config, str(tmp_path), devices=jax.devices()[:1])
    assert max(ckpt_lib.Checkpointer(str(tmp_path)).all_steps()) == 2
    assert [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("nonfinite-3-")]


def test_exploding_update_is_not_kept_as_last_good_checkpoint(tmp_path):
    """learning_rate=1e30: step 4's update makes the parameters +-1e30 (finite), step 5's loss is
    inf. Step 4's checkpoint must not survive as the last good one; step 3's does, and resuming
    from it gives finite losses."""
    workdir = str(tmp_path)
    train(toy_config(num_steps=3, **{"checkpoint.every": 1}), workdir, devices=jax.devices()[:1])
    exploding = toy_config(num_steps=10, **{"checkpoint.every": 1, "optimizer.learning_rate": 1e30})
    with pytest.raises(NonFiniteLossError, match=r"loss \(inf\) at step 5.*step 4 .*moved aside.*last good checkpoint \(step 3\)"):
        train(exploding, workdir, devices=jax.devices()[:1])
    assert max(ckpt_lib.Checkpointer(workdir).all_steps()) == 3
    state, _, _, step = ckpt_lib.load_checkpoint(workdir)
    assert step == 3
    # Three steps of lr 1e-2 from a LeCun-normal init of fan-in 8/16: nowhere near 1e30.
    assert all(np.all(np.isfinite(x)) and np.max(np.abs(x)) < 100 for x in jax.tree.leaves(state["params"]))
    resumed = train(toy_config(num_steps=5, **{"checkpoint.every": 1}), workdir, devices=jax.devices()[:1])
    assert resumed.history[0][0] == 4 and all(np.isfinite(m["loss"]) for _, m in resumed.history)


def test_non_finite_update_is_never_saved(tmp_path):
    """A finite loss with an infinite gradient (d sqrt|b| / db at b = 0) gives NaN parameters
    after step 1: the run stops at step 1, before the step-1 checkpoint is written."""
    from toy import build_toy

    config = toy_config(num_steps=5, **{"checkpoint.every": 1})
    stage = dataclasses.replace(
        build_toy(config),
        loss_fn=lambda params, batch, rng: (jax.numpy.sum(jax.numpy.sqrt(jax.numpy.abs(params["hidden"]["bias"]))), {}),
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite parameters or gradient norm \(grad_norm=inf\) after step 1's update.*no good checkpoint"):
        train(config, str(tmp_path), stage=stage, devices=jax.devices()[:1])
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == []


# ---------------------------------------------------------------------------------------------
# Checkpoint integrity: digests, refusing damaged steps, falling back past them.

# hidden=512 puts the arrays in OCDBT data files (small ones are inlined in b-tree nodes, which
# TensorStore checks itself); async saves exercise the background digests.
DIGEST_RUN = {"model.hidden": 512, "checkpoint.async_save": True}
DAMAGES = ("flip", "truncate", "no_metadata", "garbage_config", "garbage_assets")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 6-step toy run saving steps 3 and 6: {workdir, result, clean: {step: load_checkpoint}}."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    result = train(toy_config(num_steps=6, **DIGEST_RUN), str(workdir), devices=jax.devices()[:1])
    clean = {s: ckpt_lib.load_checkpoint(str(workdir / "checkpoints" / str(s)))[0] for s in (3, 6)}
    return {"workdir": workdir, "result": result, "clean": clean}


def copy_run(saved_run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved_run["workdir"], target)
    return target


def files_under(step_dir, items=("state", "config", "assets")):
    return sorted(
        os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
        for item in items for root, _, names in os.walk(step_dir / item) for name in names
    )


def damage(step_dir, kind) -> str:
    """Damages one file of ``step_dir``; returns its path relative to the step directory."""
    if kind in ("flip", "truncate"):
        # The largest state file: an OCDBT data file holding parameter / optimizer arrays.
        rel = max(files_under(step_dir, ("state",)), key=lambda f: os.path.getsize(step_dir / f))
        data = bytearray((step_dir / rel).read_bytes())
        if kind == "flip":
            data[len(data) // 2] ^= 0x40
        else:
            data = data[: len(data) // 2]
        (step_dir / rel).write_bytes(bytes(data))
    elif kind == "no_metadata":
        rel = "state/_METADATA"
        (step_dir / rel).unlink()
    else:
        rel = f"{kind.split('_')[1]}/metadata"
        (step_dir / rel).write_text('{"not json": ')
    return rel


def test_each_step_records_digests_of_every_file(saved_run):
    for step in (3, 6):
        step_dir = saved_run["workdir"] / "checkpoints" / str(step)
        manifest = json.loads((step_dir / "jaxvla_digests.json").read_text())
        assert manifest["step"] == step and manifest["algorithm"] == "sha256"
        assert sorted(manifest["files"]) == files_under(step_dir)
        assert "state/_METADATA" in manifest["files"] and "config/metadata" in manifest["files"]
        for rel, entry in manifest["files"].items():
            data = (step_dir / rel).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel


def test_flipped_byte_is_refused_naming_step_and_file(saved_run, tmp_path):
    workdir = copy_run(saved_run, tmp_path)
    step_dir = workdir / "checkpoints" / "6"
    rel = damage(step_dir, "flip")
    expected = rf"step 6 .*{re.escape(rel)} has SHA-256"
    with pytest.raises(ValueError, match=expected):
        ckpt_lib.load_checkpoint(str(step_dir))
    state = saved_run["result"].state
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    checkpointer = ckpt_lib.Checkpointer(str(workdir), async_save=False)
    try:
        with pytest.raises(ValueError, match=expected):
            checkpointer.restore(6, abstract)
        # Without the digests the flip goes unnoticed (different numbers) or fails deep in TensorStore.
        try:
            unverified, *_ = ckpt_lib.load_checkpoint(str(step_dir), verify=False)
        except ckpt_lib.CheckpointError as e:
            assert "step 6" in str(e)
        else:
            assert not leaves_equal(unverified, saved_run["clean"][6])
        # The step-3 checkpoint is untouched and restores.
        restored, _, _ = checkpointer.restore(3, abstract)
        assert leaves_equal(restored.params, saved_run["clean"][3]["params"])
    finally:
        checkpointer.close()


@pytest.mark.parametrize("kind", DAMAGES)
def test_load_checkpoint_falls_back_past_a_damaged_latest_step(saved_run, tmp_path, caplog, kind):
    workdir = copy_run(saved_run, tmp_path)
    rel = damage(workdir / "checkpoints" / "6", kind)
    with caplog.at_level(logging.WARNING, logger="jaxvla"):
        state, config, assets, step = ckpt_lib.load_checkpoint(str(workdir))
    assert step == 3 and config["stage"] == "toy" and int(state["step"]) == 3
    assert leaves_equal(state, saved_run["clean"][3])
    np.testing.assert_array_equal(assets["target_scale"], np.arange(3, dtype=np.float32))
    assert re.search(rf"checkpoint step 6 is skipped: .*{re.escape(rel)}", caplog.text)
    # An explicit step never falls back.
    for path, step in ((workdir, 6), (workdir / "checkpoints" / "6", None)):
        with pytest.raises(ValueError, match=rf"checkpoint step 6 .*{re.escape(rel)}"):
            ckpt_lib.load_checkpoint(str(path), step=step)


@pytest.mark.parametrize("kind", ("flip", "truncate", "no_metadata", "garbage_config"))
def test_resume_falls_back_past_a_damaged_latest_step(saved_run, tmp_path, caplog, kind):
    workdir = copy_run(saved_run, tmp_path)
    rel = damage(workdir / "checkpoints" / "6", kind)
    with caplog.at_level(logging.INFO, logger="jaxvla"):
        resumed = train(toy_config(num_steps=6, **DIGEST_RUN), str(workdir), devices=jax.devices()[:1])
    assert re.search(rf"checkpoint step 6 is skipped: .*{re.escape(rel)}", caplog.text)
    assert "resuming from step 3" in caplog.text
    # Steps 4-6 again from step 3 give the uninterrupted run's state, bit for bit ...
    straight = saved_run["result"].state
    assert resumed.step == 6
    assert leaves_equal(resumed.state.params, straight.params) and leaves_equal(resumed.state.opt_state, straight.opt_state)
    # ... the damaged step was moved aside, not deleted, and step 6 was saved again and verifies.
    aside = [d for d in os.listdir(workdir / "checkpoints") if d.startswith("corrupt-6-")]
    assert len(aside) == 1 and files_under(workdir / "checkpoints" / aside[0]) != []
    assert ckpt_lib.Checkpointer(str(workdir)).all_steps() == [3, 6]
    assert ckpt_lib.load_checkpoint(str(workdir))[3] == 6


def test_step_without_manifest_is_refused_unless_verify_false(saved_run, tmp_path):
    workdir = copy_run(saved_run, tmp_path)
    (workdir / "checkpoints" / "6" / "jaxvla_digests.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint step 6 .*no digest manifest jaxvla_digests\.json.*verify=False"):
        ckpt_lib.load_checkpoint(str(workdir), step=6)
    state, _, _, step = ckpt_lib.load_checkpoint(str(workdir), step=6, verify=False)
    assert step == 6 and leaves_equal(state, saved_run["clean"][6])
    assert ckpt_lib.load_checkpoint(str(workdir))[3] == 3  # the latest without a step: falls back


def test_init_from_verifies_the_source(saved_run, tmp_path, caplog):
    workdir = copy_run(saved_run, tmp_path)
    rel = damage(workdir / "checkpoints" / "6", "flip")
    params = saved_run["result"].state.params
    with pytest.raises(ValueError, match=rf"checkpoint step 6 .*{re.escape(rel)}"):
        ckpt_lib.graft_from_checkpoint(params, str(workdir / "checkpoints" / "6"))
    with caplog.at_level(logging.WARNING, logger="jaxvla"):
        grafted, _, step = ckpt_lib.graft_from_checkpoint(params, str(workdir))
    assert step == 3 and "checkpoint step 6 is skipped" in caplog.text
    assert leaves_equal(grafted, saved_run["clean"][3]["params"])


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
