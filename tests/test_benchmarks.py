"""The benchmarks' figures: what they count and what they write (no timing targets here).

* ``jaxvla.planning.real_token_flops`` against an independent count on a tiny packed batch (the
  attention pairs enumerated from the mask rule, the matmul parameters read off the initialised
  Flax parameters);
* ``jaxvla.planning.scan_unrolled_flops``: the LAQ's scanned blocks all count (linear in depth,
  above XLA's scanned count);
* each ``scripts/bench_*.py`` run at tiny sizes writes ``--json`` with its keys and sane values;
* ``scripts/device_check.sh`` is valid bash (its CPU run: ``JAXVLA_DEVICE_CHECK_TEST=1``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Real-token FLOPs


def _tiny_llama():
    from jaxvla.models.llama import LlamaConfig

    return LlamaConfig(text_vocab=50, image_vocab=20, latent_vocab=9, action_vocab=0, dim=32, num_layers=2,
                       num_heads=4, num_kv_heads=2, mlp_dim=48, max_len=64)


def _packed_batch():
    """Two rows of 12 slots: row 0 holds a 5-token causal example and a 4-token one whose last 3
    tokens form a bidirectional block, then 3 padding slots; row 1 one 7-token example."""
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1] * 7 + [0] * 5])
    pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0], list(range(7)) + [0] * 5])
    bid = np.array([[0, 0, 0, 0, 0, 0, 2, 2, 2, 0, 0, 0], [0] * 12])
    weight = np.zeros((2, 12), np.float32)
    modality = np.zeros((2, 12), np.int32)
    weight[0, [1, 2, 3, 6]] = 0.5  # text, text, latent, text targets
    modality[0, 3] = 2
    weight[1, [0, 4, 5]] = 0.3  # latent, latent, text
    modality[1, [0, 4]] = 2
    return {"segment_ids": seg, "positions": pos, "bidirectional_ids": bid, "loss_weight": weight,
            "target_modality": modality}


def test_real_token_flops_equal_an_independent_count():
    from flax.core import unfreeze

    from jaxvla.models.llama import Llama
    from jaxvla.planning import real_token_flops

    cfg = _tiny_llama()
    ids = jnp.zeros((1, 4), jnp.int32)
    params = unfreeze(jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), ids, ids, ids, ids + 1, ids)))
    params = params["params"]
    unbox = lambda x: getattr(x, "value", x)  # noqa: E731
    layers = jax.tree.leaves(jax.tree.map(unbox, params["layers"], is_leaf=lambda x: hasattr(x, "value")))
    # Every layer matmul kernel (rank >= 3 stacked: [layers, ...]); the norm scales are [layers, D].
    matmul_params = sum(math.prod(x.shape) for x in layers if len(x.shape) >= 3)

    batch = _packed_batch()
    expected = 0.0
    tokens = 0
    for row in range(2):
        for segment in (1, 2):
            member = np.flatnonzero(batch["segment_ids"][row] == segment)
            if not member.size:
                continue
            pairs = sum(1 for i in member for j in member
                        if batch["positions"][row, j] <= batch["positions"][row, i]
                        or batch["bidirectional_ids"][row, i] == batch["bidirectional_ids"][row, j] > 0)
            targets = [(batch["loss_weight"][row, i] > 0, batch["target_modality"][row, i]) for i in member]
            head = sum({0: 50, 2: 9}[m] for weighted, m in targets if weighted)
            expected += 6 * matmul_params * len(member)  # all layers' matmuls, forward + backward
            expected += 12 * cfg.num_heads * cfg.head_dim * cfg.num_layers * pairs
            expected += 6 * cfg.dim * head
            tokens += len(member)
    # Pairs by hand: 15 (5 causal) + 10 + 3 (the block's later keys) + 28.
    count = real_token_flops(cfg, batch)
    assert count.flops == pytest.approx(expected, rel=1e-12)
    assert (count.tokens, count.examples, count.slots) == (tokens, 3, 24) == (16, 3, 24)
    assert count.padding_fraction == pytest.approx(8 / 24)


def test_attention_pairs_follow_the_mask_rule():
    from jaxvla.data.sequences import attention_mask
    from jaxvla.planning import attended_pairs

    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(1, 30))
        bid = np.zeros(n, np.int32)
        start = int(rng.integers(0, n))
        bid[start:start + int(rng.integers(0, n - start + 1))] = 2
        mask = attention_mask({"segment_ids": np.ones(n, np.int32), "bidirectional_ids": bid})
        assert attended_pairs(np.arange(n), bid) == int(mask.sum())


# ----------------------------------------------------------------------------------------------
# Scanned blocks (the LAQ)


def _laq_flops(depth: int, unrolled: bool) -> float:
    from jaxvla.models.laq import make_laq
    from jaxvla.planning import _flops, scan_unrolled_flops

    model = make_laq("lapa_small", image_size=16, patch_size=4, dim=16, num_heads=2, head_dim=8,
                     encoder_depth=depth, temporal_depth=depth, decoder_depth=depth, quant_dim=8)
    frames = jnp.zeros((2, 2, 16, 16, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), frames))

    def forward(p, x):
        return jnp.mean(model.apply(p, x)["recon"])

    make = lambda: jax.jit(forward)  # noqa: E731  (a new function each time: no trace reuse)
    if unrolled:
        return scan_unrolled_flops(make, params, frames)
    return _flops(make().lower(params, frames).compile())


def test_laq_flops_count_every_scanned_block():
    one, two, three = (_laq_flops(d, unrolled=True) for d in (1, 2, 3))
    # Blocks are identical: each adds the same FLOPs, so N blocks cost N times one block above the
    # rest of the model.
    block = two - one
    assert block > 0.3 * one
    assert three - two == pytest.approx(block, rel=0.02)
    # XLA's own count of the scanned step sees one loop body per stack.
    scanned = _laq_flops(3, unrolled=False)
    assert three > scanned + 1.5 * block


# ----------------------------------------------------------------------------------------------
# The scripts' JSON


TINY_BACKBONE = ("--config=configs/pretrain.py:lapa_small", "--config.model.latent_source=synthetic",
                 "--config.model.dim=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
                 "--config.model.num_kv_heads=2", "--config.model.mlp_dim=64", "--config.batch_size=4")

# Each script at tiny sizes; they run concurrently (most of each run is imports and compiling).
RUNS = {
    "backbone": ("bench_train_step.py", *TINY_BACKBONE, "--steps=1", "--matmul_size=128", "--noexecuted_flops"),
    "laq": ("bench_train_step.py", "--config=configs/laq.py:lapa_small", "--synthetic_frames",
            "--config.batch_size=2", "--config.model.dim=32", "--config.model.num_heads=2",
            "--config.model.head_dim=16", "--steps=1", "--matmul_size=128"),
    "flow": ("bench_flow_inference.py", "--config.model.dim=32", "--config.model.num_layers=1",
             "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=64",
             "--repeats=1"),
    "bins": ("bench_bins_decode.py", "--config.model.dim=32", "--config.model.num_layers=1",
             "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=64",
             "--config.model.chunk=2", "--rows=2", "--prefix=8", "--longer=24", "--repeats=1"),
    "torch": ("bench_vs_torch.py", "--dim=16", "--layers=1", "--heads=2", "--mlp_dim=32", "--examples=2",
              "--steps=1", "--batch=1", "--seq_len=8"),
}


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """{name: (returncode, stdout + stderr, JSON results or None, last stdout line)} of ``RUNS``."""
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    procs = {}
    for name, (script, *args) in RUNS.items():
        out = tmp / f"{name}.json"
        procs[name] = (out, subprocess.Popen(
            [sys.executable, os.path.join(REPO, "scripts", script), *args, f"--json={out}"], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    runs = {}
    for name, (out, proc) in procs.items():
        text, _ = proc.communicate(timeout=900)
        lines = text.strip().splitlines()
        last = [line for line in lines if not line.startswith(("I1", "W1"))][-1] if lines else ""
        runs[name] = (proc.returncode, text, json.loads(out.read_text()) if out.exists() else None, last)
    return runs


def _run(runs, name: str) -> tuple[dict, str]:
    code, text, results, last = runs[name]
    assert code == 0 and results is not None, text[-4000:]
    return results, last


def _finite_positive(results, *keys):
    for key in keys:
        assert isinstance(results[key], (int, float)) and math.isfinite(results[key]) and results[key] > 0, key


def test_bench_train_step_backbone_json(script_runs):
    results, last = _run(script_runs, "backbone")
    _finite_positive(results, "mfu", "real_tokens_per_s", "step_s", "peak_gflops", "flops_per_step")
    # Real Meta-World prompts (26-34 ids) packed in rows sized for a 36-id prompt: a little padding.
    assert 0 < results["padding_fraction"] < 0.2
    # One example of <= 117 tokens a row (two a row would pad as much).
    assert results["rows"] == 4 and results["row_len"] < 128
    assert last.startswith("MFU (real tokens") and last.endswith(f"{results['mfu']:.3f}")


def test_bench_train_step_laq_json(script_runs):
    results, last = _run(script_runs, "laq")
    _finite_positive(results, "mfu", "step_s", "peak_gflops", "flops_per_step")
    assert results["padding_fraction"] == 0.0 and results["real_tokens_per_s"] is None
    # lapa_small's stacks are unrolled by default (model.scan_unroll=0): XLA's count of the compiled
    # step already sees every block (test_laq_flops_count_every_scanned_block covers the loop).
    assert results["flops_per_step"] == pytest.approx(results["xla_scanned_flops_per_step"], rel=1e-3)
    assert last.startswith("MFU")


def test_bench_flow_inference_json(script_runs):
    results, last = _run(script_runs, "flow")
    _finite_positive(results, "speedup", "cached_ms", "recompute_ms")
    # Unpadded: the prompt, <vision> (3 ids), 64 image tokens, eov, </vision> (3 ids) and 14 slots.
    assert results["sequence_tokens"] == results["prompt_tokens"] + 3 + 64 + 1 + 3 + 14 < results["seq_len"]
    assert results["max_abs_difference"] < 1e-4
    assert "speed-up" in last


def test_bench_bins_decode_json(script_runs):
    results, last = _run(script_runs, "bins")
    # At these sizes the per-token cost is timing noise (no speed is asserted in a unit test).
    assert math.isfinite(results["per_token_ratio"])
    _finite_positive(results, "cache_ratio")
    assert results["prefix_tokens"] == 8 and results["longer_tokens"] == 24
    # The cache holds the prefix and the chunk's 2 x 4 bin slots; the longer rows 24 more tokens.
    assert results["bins"] == 8 and results["real"]["cache_slots"] == 8 + 8
    assert results["longer"]["cache_slots"] == 8 + 24 + 8
    assert results["cache_ratio"] == pytest.approx(40 / 16)
    for name in ("real", "longer"):
        _finite_positive(results[name], "prefill_ms", "decoder_ms")
    assert last.startswith("per-token cost")


def test_bench_vs_torch_json(script_runs):
    results, last = _run(script_runs, "torch")
    _finite_positive(results, "speedup", "speedup_same_shape")
    workload = results["workload"]
    assert workload["name"] == "lapa" and workload["examples_per_step"] == 2
    assert 0 <= workload["jaxvla_padding_fraction"] < 1 and 0 <= workload["torch_padding_fraction"] < 1
    assert results["machine"]["omp_wait_policy"] == "PASSIVE"
    assert results["machine"]["torch_threads"] == results["machine"]["jax_threads"]
    # Same weights, same targets: the first losses agree.
    first = results["first_loss"]
    assert first["torch_lapa"] == pytest.approx(first["jaxvla_lapa"], abs=1e-4)
    assert first["torch_same"] == pytest.approx(first["jaxvla_same"], abs=1e-4)
    assert "LAPA workload" in last


# ----------------------------------------------------------------------------------------------
# The GPU script


def test_device_check_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "device_check.sh")], check=True)


@pytest.mark.skipif(os.environ.get("JAXVLA_DEVICE_CHECK_TEST") != "1",
                    reason="runs every sub-benchmark on CPU (minutes); JAXVLA_DEVICE_CHECK_TEST=1 enables it")
def test_device_check_runs_on_cpu_at_tiny_sizes(tmp_path):
    env = dict(os.environ, DEVICE_CHECK_ALLOW_CPU="1", DEVICE_CHECK_OUT=str(tmp_path), PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("backbone_cudnn", "backbone_xla", "flow", "laq", "vs_torch"):
        assert (tmp_path / f"{name}.json").exists(), name


def test_device_check_refuses_a_cpu_only_jax(tmp_path):
    env = dict(os.environ, DEVICE_CHECK_OUT=str(tmp_path), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               JAX_PLATFORMS="cpu")
    env.pop("DEVICE_CHECK_ALLOW_CPU", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no GPU jax backend" in proc.stderr
