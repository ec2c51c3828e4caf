"""scripts/plan.py and jaxvla/planning.py against real CPU runs; the backbone train step over two
processes against one."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.pretrain import get_config
from jaxvla import checkpoint as ckpt_lib
from jaxvla.data import sequences as seq
from jaxvla.stages import build_stage
from jaxvla.config import with_overrides
from jaxvla.planning import _compile, _flops, plan
from jaxvla.trainer import train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# A backbone small enough for a unit test; the 32000-row text table stays.
TINY = {"model.latent_source": "synthetic", "model.dim": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 4, "model.mlp_dim": 128}
# plan.py's stated tolerance for the measured step memory (the README quotes it).
STEP_MEMORY_TOLERANCE = 0.15


def tiny_config(**overrides):
    return with_overrides(get_config("vipra_small"), {**TINY, **overrides})


def env(**extra):
    environment = dict(os.environ)
    environment.pop("JAX_COORDINATOR_ADDRESS", None)
    environment.update({"PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", **extra})
    return environment


def test_synthetic_batch_has_the_real_layout():
    vocab = seq.Vocab(image_codes=512, latent_codes=8)
    batch = seq.synthetic_batch(np.random.default_rng(0), 3, "vipra", vocab, 256, frame_tokens=16,
                                latent_shape=(2, 4))
    assert set(batch) == set(seq.SEQUENCE_KEYS) and batch["tokens"].shape == (3, 256)
    weighted = batch["loss_weight"] > 0
    future = weighted & (batch["target_modality"] == seq.IMAGE)
    latent = weighted & (batch["target_modality"] == seq.LATENT)
    assert future.sum(axis=1).tolist() == [16] * 3  # the future frame's codes
    assert latent.sum(axis=1).tolist() == [2 * 5] * 3  # 2 steps x (4 codes + separator)
    np.testing.assert_allclose(batch["loss_weight"].sum(axis=1), 0.48 + 0.48 + 0.02, rtol=1e-5)
    assert not np.array_equal(batch["tokens"][0], batch["tokens"][1])  # random ids, same layout
    np.testing.assert_array_equal(batch["modality"][0], batch["modality"][1])
    with pytest.raises(ValueError, match="objective 'nope'"):
        seq.synthetic_batch(np.random.default_rng(0), 1, "nope", vocab, 256, frame_tokens=16)


def test_plan_agrees_with_real_cpu_memory():
    """Params and optimizer state per device equal the real state's shards exactly; the step's
    growth of the resident set matches temporaries + outputs - donated within the tolerance."""
    overrides = {"mesh.data": 1, "mesh.fsdp": 2, "batch_size": 16, **TINY}
    args = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "scripts", "step_memory.py"), "2", *args],
        env=env(MALLOC_MMAP_THRESHOLD_="65536"), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    planned, real = result["planned"], result["real"]
    assert planned["params"] == real["params"] > 0
    assert planned["opt_state"] == real["opt_state"] > 0
    # fsdp=2 keeps half of each sharded parameter on a device.
    whole = plan(tiny_config(), jax.devices()[:1], flops=False)
    assert whole.params_bytes > planned["params"] > 0.5 * whole.params_bytes - 4096
    assert planned["argument"] == planned["params"] + planned["opt_state"] + planned["other"] + planned["batch"]
    step_bytes = real["devices"] * (planned["temp"] + planned["output"] - planned["alias"])
    measured = float(np.median(real["step_growth"]))
    assert abs(measured - step_bytes) <= STEP_MEMORY_TOLERANCE * step_bytes, (measured, step_bytes)


def test_flops_extrapolated_from_two_depths_match_the_unrolled_model():
    """XLA counts a scan body once; the plan's 1-and-2-layer extrapolation must equal the cost
    analysis of the real depth unrolled, and remat adds recomputation on top."""
    devices = jax.devices()[:1]
    config = tiny_config(**{"model.num_layers": 3, "batch_size": 4})
    p = plan(config, devices, remat="nothing_saveable")
    unrolled, *_ = _compile(with_overrides(config, {"remat_policy": "none", "model.scan_layers": False}), devices)
    scanned, *_ = _compile(with_overrides(config, {"remat_policy": "none"}), devices)
    assert p.model_flops == pytest.approx(_flops(unrolled), rel=1e-3)
    assert _flops(scanned) < 0.8 * p.model_flops  # what the scan alone would report
    assert p.hardware_flops > 1.05 * p.model_flops  # the layers' forward again (the text head dominates here)
    # Analytic check: about 6 x body params x tokens dominate (the tokens of the packed rows).
    body = 3 * (4 * 64 * 64 + 3 * 64 * 128)
    tokens = next(build_stage(config).batches(0))["tokens"].size
    assert p.model_flops > 6 * body * tokens


def test_plan_script_reports_fit_and_rejects_a_bad_mesh():
    args = [sys.executable, os.path.join(REPO, "scripts", "plan.py"), "--config=configs/pretrain.py:vipra_small",
            "--devices=2", "--remat=config", "--device_memory_gb=0.05", "--flops=false",
            *[f"--config.{k}={v}" for k, v in TINY.items() if k != "model.latent_source"]]
    out = subprocess.run([*args, "--mesh=data=1,fsdp=2"], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "data=1,fsdp=2,tensor=1" in out.stdout
    assert "verdict: does NOT fit in 0 GB per device" in out.stdout
    bad = subprocess.run([*args, "--mesh=data=1,fdsp=2"], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "--mesh" in bad.stderr and "fdsp" in bad.stderr


def test_backbone_train_step_two_processes_match_one(tmp_path):
    """python -m jaxvla.train on two loopback processes (one CPU device each, mesh data=2) ends
    with the parameters of one process over two devices."""
    from test_trainer import _free_port, assert_trees_close

    flags = [f"--config.{k}={v}" for k, v in TINY.items()] + [
        "--config.num_steps=3", "--config.batch_size=4", "--config.mesh.data=2", "--config.mesh.fsdp=1",
        "--config.eval_every=0", "--config.log_every=1", "--config.checkpoint.every=3"]
    port = _free_port()
    workdir = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxvla.train", "--config=configs/pretrain.py:vipra_small",
             f"--workdir={workdir}", *flags],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                    JAX_PLATFORMS="cpu"),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    state, _, _, step = ckpt_lib.load_checkpoint(str(workdir))
    assert step == 3
    config = tiny_config(**{"num_steps": 3, "batch_size": 4, "eval_every": 0, "log_every": 1, "mesh.data": 2,
                            "mesh.fsdp": 1})
    single = train(config, str(tmp_path / "one"), devices=jax.devices()[:2])
    assert single.step == 3
    assert_trees_close(state["params"], jax.device_get(single.state.params), rtol=1e-4, atol=1e-6)
    # Each step made a real update (the comparison is not of two initialisations)...
    assert len(single.history) == 3 and all(m["grad_norm"] > 0 for _, m in single.history)
    assert single.history[-1][1]["learning_rate"] > 0  # (warm-up starts at 0)
    # ... and the main process logged the same step-3 loss.
    loss = float(re.findall(r"\] step 3: .*[ ,]loss=([-+.e0-9]+)", outputs[0])[-1])
    assert loss == pytest.approx(single.metrics["loss"], rel=1e-3)


def test_init_from_a_converted_weights_file(tmp_path):
    """``--config.init_from=llama.npz`` (what scripts/convert_hf_llama.py writes: a bare backbone
    tree) grafts into the stage's ``backbone``; init_drop keeps fresh tables; a wrong shape names
    the file and the parameter."""
    import flax.linen as nn

    from jaxvla.io.weights import flatten_dict, save_param_tree
    from jaxvla.stages import build_stage
    from jaxvla.trainer import _init_from

    config = tiny_config()
    stage = build_stage(config)
    fresh = nn.meta.unbox(stage.init_variables(jax.random.PRNGKey(0))["params"])
    other = jax.device_get(nn.meta.unbox(stage.init_variables(jax.random.PRNGKey(1))["params"])["backbone"])
    save_param_tree(str(tmp_path / "llama.npz"), other)
    grafted = _init_from(with_overrides(config, {"init_from": str(tmp_path / "llama.npz"), "init_drop": "head_latent"}), fresh)
    flat, want, before = flatten_dict(grafted["backbone"]), flatten_dict(other), flatten_dict(fresh["backbone"])
    assert set(flat) == set(want)
    for path in flat:
        expected = before[path] if path.startswith("head_latent") else want[path]
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(expected), err_msg=path)
    assert not np.array_equal(np.asarray(before["layers/mlp/up_proj/kernel"]), want["layers/mlp/up_proj/kernel"])
    other["embed_text"]["embedding"] = other["embed_text"]["embedding"][:100]
    save_param_tree(str(tmp_path / "bad.npz"), other)
    with pytest.raises(ValueError, match=r"bad.npz.*embed_text/embedding.*\(100, 64\)"):
        _init_from(with_overrides(config, {"init_from": str(tmp_path / "bad.npz")}), fresh)
