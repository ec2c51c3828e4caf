"""The LAQ quality probe and gate (jaxvla/laq_quality.py) on synthetic latent rows with known
answers, checked against independent computations, and the frame gap measurement on rendered
Meta-World frames."""

from __future__ import annotations

import numpy as np
import pytest

from jaxvla import laq_quality as q

FAST = dict(bootstrap=200, knn_k=8)


def synthetic(num_episodes: int, *, codes: str, seed: int, tasks: int = 4, steps: int = 60, noise: float = 0.1,
              effect: float = 0.6, episode_offset: int = 0) -> q.LatentRows:
    """Rows whose position target is a task x phase mean plus ``effect * z`` (z in {-1, 0, 1}^3 per
    row, independent of task and phase) plus noise. ``codes="z"``: token m is z_m + 1 (the codes
    carry exactly z); ``"random"``: uniform codes independent of everything."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(1234).normal(size=(tasks, 10, 4))  # the same base for every split
    rows = dict(codes=[], targets=[], phase=[], task=[], episode=[])
    for e in range(num_episodes):
        task = e % tasks
        phase = np.arange(steps) / steps
        z = rng.integers(-1, 2, (steps, 3))
        y = table[task, q.phase_bin(phase, 10)] + noise * rng.normal(size=(steps, 4))
        y[:, :3] += effect * z
        y[:, 3] = np.where(y[:, 3] >= 0, 1.0, -1.0)  # gripper: a sign set by task and phase
        c = z + 1 if codes == "z" else rng.integers(0, 3, (steps, 3))
        rows["codes"].append(c)
        rows["targets"].append(y)
        rows["phase"].append(phase)
        rows["task"].append(np.full(steps, f"task {task}", object))
        rows["episode"].append(np.full(steps, episode_offset + e))
    return q.LatentRows(**{k: np.concatenate(v) for k, v in rows.items()})


def test_gain_over_task_phase_is_high_for_informative_codes_and_zero_for_random_ones():
    fit, test = synthetic(40, codes="z", seed=0), synthetic(20, codes="z", seed=1, episode_offset=100)
    good = q.score(fit, test, 3, FAST)
    # Independent expectation: the z term's share of the held-out position variance.
    y = test.targets[:, :3]
    sst = np.sum(np.square(y - y.mean(0)))
    z_share = np.sum(np.square(0.6 * (test.codes - 1))) / sst
    noise_share = np.sum(np.square(0.1 * np.ones_like(y))) / sst  # E[noise^2] x rows, as a fraction
    gain = good["linear"]["gain_over_task_phase"]["xyz_r2"]["value"]
    assert gain == pytest.approx(z_share, abs=0.03)
    assert good["linear"]["task_phase_codes"]["xyz_r2"]["value"] == pytest.approx(1 - noise_share, abs=0.02)
    assert good["knn"]["gain_over_task_phase"]["xyz_r2"]["value"] > 0.5 * z_share
    assert good["linear"]["shuffled_codes"]["xyz_r2"]["value"] < 0.02

    fit_r, test_r = synthetic(40, codes="random", seed=0), synthetic(20, codes="random", seed=1, episode_offset=100)
    bad = q.score(fit_r, test_r, 3, FAST)
    assert abs(bad["linear"]["gain_over_task_phase"]["xyz_r2"]["value"]) < 0.01
    assert bad["knn"]["gain_over_task_phase"]["xyz_r2"]["value"] < 0.01
    assert abs(bad["linear"]["codes"]["xyz_r2"]["value"]) < 0.02
    # Task and phase explain the same for both; the gripper is theirs alone.
    for report in (good, bad):
        assert report["linear"]["task_phase"]["gripper_acc"]["value"] > 0.95
        assert report["linear"]["task_phase"]["xyz_r2"]["value"] > report["linear"]["task"]["xyz_r2"]["value"]


def test_linear_probe_of_one_token_equals_per_code_means():
    """With one token, the one-hot ridge probe (tiny penalty) is the per-code mean of the fit
    targets: check the reported R^2 against that independent computation."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, (900, 1))
    y = np.stack([np.sin(codes[:, 0]), np.cos(codes[:, 0]), codes[:, 0] / 5.0, np.sign(codes[:, 0] - 2.5)], 1)
    y = y + 0.2 * rng.normal(size=y.shape)
    rows = lambda s: q.LatentRows(codes[s], y[s], np.linspace(0, 1, 900)[s], np.full(900, "t", object)[s],  # noqa: E731
                                  np.arange(900)[s] // 30)
    fit, test = rows(slice(0, 600)), rows(slice(600, None))
    report = q.score(fit, test, 5, {**FAST, "ridge": 1e-10})
    means = np.stack([fit.targets[fit.codes[:, 0] == c].mean(0) for c in range(5)])
    prediction = means[test.codes[:, 0]]
    yt = test.targets[:, :3]
    expected = 1 - np.sum(np.square(yt - prediction[:, :3])) / np.sum(np.square(yt - yt.mean(0)))
    assert report["linear"]["codes"]["xyz_r2"]["value"] == pytest.approx(expected, abs=1e-6)
    expected_acc = np.mean(np.sign(prediction[:, 3]) == np.sign(test.targets[:, 3]))
    assert report["linear"]["codes"]["gripper_acc"]["value"] == pytest.approx(expected_acc)


def test_knn_probe_finds_what_the_linear_probe_cannot():
    """Target = +1 when two tokens agree, else -1: no additive (one-hot linear) function of the
    tokens predicts it, the kNN probe does."""
    rng = np.random.default_rng(0)
    n = 1200
    codes = rng.integers(0, 4, (n, 2))
    same = np.where(codes[:, 0] == codes[:, 1], 1.0, -1.0)
    y = np.stack([same, -same, 0.5 * same, same], 1) + 0.05 * rng.normal(size=(n, 4))
    rows = lambda s: q.LatentRows(codes[s], y[s], rng.uniform(size=n)[s], np.full(n, "t", object)[s],  # noqa: E731
                                  np.arange(n)[s] // 40)
    report = q.score(rows(slice(0, 800)), rows(slice(800, None)), 4, FAST)
    assert report["knn"]["codes"]["xyz_r2"]["value"] > 0.95
    assert report["knn"]["codes"]["gripper_acc"]["value"] > 0.99
    assert report["linear"]["codes"]["xyz_r2"]["value"] < 0.3
    assert report["knn"]["shuffled_codes"]["xyz_r2"]["value"] < 0.1


def test_knn_predict_by_hand():
    fit_codes = np.asarray([[0, 0], [0, 1], [1, 1], [2, 2]])
    fit_y = np.asarray([[1.0], [2.0], [4.0], [8.0]])
    # Test [0, 0]: exact match (1.0) then one of the two rows one token away (2.0): k=1 -> 1.0.
    out = q.knn_predict(fit_y, 1, fit_codes=fit_codes, test_codes=np.asarray([[0, 0], [2, 2]]), codebook_size=3)
    np.testing.assert_allclose(out[:, 0], [1.0, 8.0])
    # k=2 from [0, 1]: itself (2.0), then [0, 0] or [1, 1] (both one token away) -> 1.5 or 3.0.
    out = q.knn_predict(fit_y, 2, fit_codes=fit_codes, test_codes=np.asarray([[0, 1]]), codebook_size=3)
    assert out[0, 0] in (1.5, 3.0)
    # Groups and phases: only same-group rows, nearest phase.
    out = q.knn_predict(fit_y, 1, fit_groups=np.asarray([0, 0, 1, 1]), test_groups=np.asarray([1, 0, 5]),
                        fit_phase=np.asarray([0.0, 0.5, 0.0, 0.9]), test_phase=np.asarray([0.8, 0.1, 0.0]),
                        phase_weight=1.0)
    np.testing.assert_allclose(out[:, 0], [8.0, 1.0, fit_y.mean()])  # group 5 has no fit row: the mean


def test_bootstrap_intervals_hold_the_point_and_narrow_with_more_episodes():
    fit = synthetic(40, codes="z", seed=0)
    widths = {}
    for episodes in (8, 64):
        report = q.score(fit, synthetic(episodes, codes="z", seed=1, episode_offset=100), 3, FAST)
        for probe in q.PROBES:
            for name, row in report[probe].items():
                for figure, entry in row.items():
                    low, high = entry["ci95"]
                    assert low <= entry["value"] <= high, (probe, name, figure)
        entry = report["linear"]["gain_over_task_phase"]["xyz_r2"]
        widths[episodes] = entry["ci95"][1] - entry["ci95"][0]
        usage = report["usage"]["code_perplexity"]
        assert usage["ci95"][0] <= usage["value"] <= usage["ci95"][1]
    assert widths[64] < 0.6 * widths[8], widths  # ~ 1 / sqrt(8) expected
    assert report["held_out_episodes"] == 64 and report["fit_episodes"] == 40


def test_code_usage_matches_an_independent_count():
    rng = np.random.default_rng(0)
    codes = rng.choice([0, 1, 2, 5, 6, 7], size=(500, 4), p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.1])
    rows = q.LatentRows(codes, rng.normal(size=(500, 4)), rng.uniform(size=500), np.full(500, "t", object),
                        np.arange(500) // 50)
    report = q.score(rows, rows, 8, {**FAST, "bootstrap": 0})
    counts = np.asarray([np.sum(codes == c) for c in range(8)], float)
    p = counts[counts > 0] / counts.sum()
    assert report["usage"]["codes_used_fraction"]["value"] == pytest.approx(6 / 8)
    assert report["usage"]["code_perplexity"]["value"] == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    assert report["usage"]["distinct_code_tuples"] == len({tuple(r) for r in codes.tolist()})


def test_span_targets_and_windows():
    actions = np.arange(20, dtype=float).reshape(10, 2)
    np.testing.assert_allclose(q.span_targets(actions, np.asarray([0, 3]), np.asarray([2, 10])),
                               [actions[0:2].mean(0), actions[3:10].mean(0)])
    starts, spans = q.episode_spans(10, [0, 3, 6])  # 11 frames: windows start at 0..4
    np.testing.assert_array_equal(starts, np.arange(5))
    np.testing.assert_array_equal(spans[4], [[4, 7], [7, 10]])
    starts, spans = q.episode_spans(10, [0, 7], window_stride=2)
    np.testing.assert_array_equal(starts, [0, 2])
    with pytest.raises(ValueError, match="inside the episode"):
        q.span_targets(actions, np.asarray([5]), np.asarray([11]))


def _report(usage=1.0, xyz=0.6, gain=0.15, knn_xyz=0.7, knn_gain=0.05, ci=0.05):
    entry = lambda v: {"value": v, "ci95": [v - ci, v + ci]}  # noqa: E731
    return {"variant": "lapa", "checkpoint": "x",
            "usage": {"codes_used_fraction": entry(usage)},
            "linear": {"codes": {"xyz_r2": entry(xyz)}, "gain_over_task_phase": {"xyz_r2": entry(gain)}},
            "knn": {"codes": {"xyz_r2": entry(knn_xyz)}, "gain_over_task_phase": {"xyz_r2": entry(knn_gain)}}}


def test_gate_passes_and_fails_with_the_right_reasons():
    assert q.gate(_report()) == (True, [])
    passed, reasons = q.gate(_report(usage=0.75, xyz=0.3))
    assert not passed and len(reasons) == 2
    assert "codes used" in reasons[0] and "0.750" in reasons[0] and "< 0.9" in reasons[0]
    assert "position R^2 from the codes (linear probe" in reasons[1] and "< 0.5" in reasons[1]
    passed, reasons = q.gate(_report(gain=0.04))
    assert not passed and len(reasons) == 1 and "over task + phase" in reasons[0] and "0.040" in reasons[0]
    # The kNN probe: its gain 0.05 fails; "best" takes the larger of the two per figure.
    assert q.gate(_report(), {"probe": "knn"})[0] is False
    assert q.gate(_report(gain=0.04, knn_gain=0.12), {"probe": "best"}) == (True, [])
    # Lower bound: 0.6 - 0.15 < 0.5 fails where the point passes.
    passed, reasons = q.gate(_report(ci=0.15), {"use_lower_bound": True})
    assert not passed and any("lower end" in r for r in reasons)
    # Thresholds: custom values, None skips a check, a missing figure fails.
    assert q.gate(_report(xyz=0.3), {"min_xyz_r2": 0.25})[0]
    assert q.gate(_report(xyz=0.3), {"min_xyz_r2": None})[0]
    passed, reasons = q.gate({"usage": {}, "linear": {}})
    assert not passed and len(reasons) == 3 and all("missing" in r for r in reasons)
    with pytest.raises(ValueError, match="probe="):
        q.gate(_report(), {"probe": "svm"})


def test_gate_thresholds_come_from_the_laq_config():
    import os

    from jaxvla.config import load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for variant in ("lapa_small", "vipra_small"):
        config = load_config(os.path.join(repo, f"configs/laq.py:{variant}"))
        assert dict(config.gate) == q.DEFAULT_GATE
        assert dict(config.probe) == q.DEFAULT_SETTINGS
    # The LAQ windows span the finetuning chunk (14 control steps).
    lapa, vipra = (load_config(os.path.join(repo, f"configs/laq.py:{v}_small")) for v in ("lapa", "vipra"))
    chunk = load_config(os.path.join(repo, "configs/finetune.py:flow_small")).model.chunk
    assert lapa.data.gap_frames == chunk == vipra.data.clip_length * vipra.data.clip_stride


def test_frame_gap_scan_on_rendered_frames(metaworld_dataset):
    from jaxvla.data.pipeline import default_data_config

    data = default_data_config()
    data.data_dir = str(metaworld_dataset["out"])
    results = q.frame_gap_scan(data, [4, 1])
    assert [r["gap"] for r in results] == [1, 4]
    assert results[0]["seconds"] == pytest.approx(1 / 80)
    assert results[1]["pixel_change"] > results[0]["pixel_change"] > 0
    # Independent: the mean absolute one-step difference of the held-out frames, in levels of 255.
    diffs = [np.abs(e.images[1:].astype(float) - e.images[:-1].astype(float)) for e in q.iter_episodes(data, "val")]
    expected = np.concatenate([d.reshape(len(d), -1) for d in diffs]).mean()
    assert results[0]["pixel_change"] == pytest.approx(expected, rel=1e-4)
    for r in results:
        assert np.isfinite(r["task_phase_xyz_r2"]) and np.isfinite(r["pixels_xyz_r2"])


def test_probe_of_an_untrained_vipra_laq_at_both_levels(metaworld_dataset):
    """The whole probe path on clips (K = 2 transitions of 16 tokens): latent rows and window rows."""
    import os

    import jax
    import jax.numpy as jnp

    from jaxvla.config import apply_overrides, load_config
    from jaxvla.frozen import LoadedLAQ, laq_model

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = apply_overrides(load_config(os.path.join(repo, "configs/laq.py:vipra_small")), {
        "model.dim": 32, "model.num_heads": 1, "model.head_dim": 32, "model.encoder_depth": 1,
        "model.decoder_depth": 1, "data.data_dir": str(metaworld_dataset["out"]), "data.clip_stride": 4})
    model = laq_model(config)
    frames = jnp.zeros((1, model.num_frames, model.image_size, model.image_size, 3))
    variables = model.init({"params": jax.random.PRNGKey(0)}, frames)
    params = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, variables,
                          is_leaf=lambda a: hasattr(a, "unbox"))["params"]
    laq = LoadedLAQ(model, params, config, 0, "untrained", "hash")
    assert list(laq.frame_offsets) == [0, 4, 8]
    settings = {"bootstrap": 50, "knn_k": 4}
    latent = q.probe(laq, settings=settings, batch_size=16, window_stride=4)
    window = q.probe(laq, settings={**settings, "level": "window"}, batch_size=16, window_stride=4)
    assert latent["held_out_latents"] == 2 * window["held_out_latents"] > 0
    assert latent["usage"]["code_tokens"] == 16 and window["usage"]["code_tokens"] == 32
    assert latent["psnr"] == pytest.approx(latent["psnr_copy_baseline"], abs=1e-3)  # residual head at zero
    assert latent["frame_offsets"] == [0, 4, 8] and latent["held_out_episodes"] == 2
    for report in (latent, window):
        assert np.isfinite(report["linear"]["task_phase"]["xyz_r2"]["value"])
    assert "| knn | codes |" in q.format_report(window)
