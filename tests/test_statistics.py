"""The comparison's statistics (jaxvla/statistics.py) against direct computations."""

import numpy as np
import pytest

from jaxvla import statistics

TASKS = ("reach", "push", "door-open")


def _records(row, matrix, tasks=TASKS):
    """Records of a [seeds, placements] 0/1 matrix; placements cycle through ``tasks``."""
    out = []
    per_task = matrix.shape[1] // len(tasks)
    for s in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            out.append({"row": row, "seed": s, "task": tasks[j // per_task], "placement": j % per_task,
                        "success": bool(matrix[s, j]), "length": 10})
    return out


def test_replicate_means_equal_explicit_resampling():
    rng = np.random.default_rng(1)
    matrix = rng.integers(0, 2, size=(4, 9)).astype(float)
    draws = np.random.default_rng(2)
    seed_idx = draws.integers(0, 4, size=(50, 4))
    place_idx = draws.integers(0, 9, size=(50, 9))
    expected = np.array([matrix[s][:, p].mean() for s, p in zip(seed_idx, place_idx)])
    seed_counts = np.stack([np.bincount(s, minlength=4) for s in seed_idx]).astype(float)
    place_counts = np.stack([np.bincount(p, minlength=9) for p in place_idx]).astype(float)
    np.testing.assert_allclose(statistics.replicate_means(matrix, seed_counts, place_counts), expected, atol=1e-12)
    # A subset of the columns (one task's placements): the mean over the drawn indices that fall
    # in it, however many that is; NaN where none does.
    cols = np.array([0, 4, 7])
    subset = [matrix[s][:, [j for j in p if j in cols]] for s, p in zip(seed_idx, place_idx)]
    expected = np.array([m.mean() if m.size else np.nan for m in subset])
    got = statistics.replicate_means(matrix[:, cols], seed_counts, place_counts[:, cols])
    assert np.isnan(expected).any()
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_resample_counts_sum_to_size():
    counts = statistics.resample_counts(np.random.default_rng(0), 7, 100)
    assert counts.shape == (100, 7)
    assert (counts.sum(axis=1) == 7).all()
    assert counts.std() > 0


def test_success_matrix_orders_and_checks_balance():
    recs = _records("A", np.array([[1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 1]]))
    matrix, seeds, places = statistics.success_matrix(recs, "A")
    assert seeds == [0, 1]
    assert places == sorted(places) and len(places) == 6
    by_key = {(r["seed"], r["task"], r["placement"]): r["success"] for r in recs}
    for a, s in enumerate(seeds):
        for b, (t, i) in enumerate(places):
            assert matrix[a, b] == by_key[(s, t, i)]
    with pytest.raises(ValueError, match="seed 1 has no record for placement"):
        statistics.success_matrix(recs[:-1], "A")
    with pytest.raises(ValueError, match="two records"):
        statistics.success_matrix(recs + recs[:1], "A")
    with pytest.raises(ValueError, match="no records for row 'B'"):
        statistics.success_matrix(recs, "B")


def test_point_estimates_per_task_and_seed_spread():
    matrix = np.array([[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])
    out = statistics.compare(_records("A", matrix), ["A"], replicates=2000)
    row = out["rows"]["A"]
    assert row["success_rate"] == pytest.approx(matrix.mean())
    assert row["successes"] == 9 and row["episodes"] == 18
    assert row["seed_std"] == pytest.approx(np.std(matrix.mean(axis=1), ddof=1))
    # Placements cycle through TASKS two at a time: columns 0-1 are reach, 2-3 push, 4-5 door-open.
    assert row["tasks"]["reach"]["success_rate"] == pytest.approx(matrix[:, :2].mean())
    assert row["tasks"]["door-open"]["success_rate"] == pytest.approx(matrix[:, 4:].mean())
    lo, hi = row["ci95"]
    assert lo < row["success_rate"] < hi


def test_seed_clusters_widen_the_interval():
    """The same 1/3 success rate is far less certain when it comes from one lucky seed than when
    every seed succeeds on a third of the placements: seeds are resampled as clusters."""
    places = 30
    clustered = np.zeros((3, places))
    clustered[0] = 1
    spread = np.zeros((3, places))
    for s in range(3):
        spread[s, s::3] = 1
    recs = _records("clustered", clustered) + _records("spread", spread)
    out = statistics.compare(recs, ["clustered", "spread"], replicates=4000)
    width = {r: np.diff(out["rows"][r]["ci95"])[0] for r in ("clustered", "spread")}
    assert out["rows"]["clustered"]["success_rate"] == pytest.approx(out["rows"]["spread"]["success_rate"])
    assert width["clustered"] > 2 * width["spread"]


def test_identical_rows_have_a_zero_contrast_and_gaps_follow_the_definition():
    rng = np.random.default_rng(3)
    base = np.zeros((3, 12))
    top = np.ones((3, 12))
    # Every seed of X and Y has the same outcomes: seed resampling (independent per row) cannot
    # separate them and placement resampling is shared, so their contrast is exactly zero.
    mid = np.tile(rng.integers(0, 2, size=(1, 12)), (3, 1)).astype(float)
    recs = _records("BASE", base) + _records("TOP", top) + _records("X", mid) + _records("Y", mid)
    out = statistics.compare(recs, ["BASE", "TOP", "X", "Y"], contrasts=[("X", "Y"), ("X", "BASE")],
                             gaps=[("X", "BASE", "TOP")], replicates=3000)
    same = out["contrasts"]["X - Y"]
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert out["contrasts"]["X - BASE"]["difference"] == pytest.approx(mid.mean())
    gap = out["gaps"]["(X - BASE) / (TOP - BASE)"]
    assert gap["gap_closed"] == pytest.approx(mid.mean())  # (x - 0) / (1 - 0)
    assert gap["undefined_fraction"] == 0.0


def test_gap_is_undefined_when_the_upper_bound_does_not_beat_the_baseline():
    zeros = np.zeros((3, 6))
    recs = _records("BASE", zeros) + _records("TOP", zeros) + _records("X", zeros)
    out = statistics.compare(recs, ["BASE", "TOP", "X"], gaps=[("X", "BASE", "TOP")], replicates=200)
    gap = out["gaps"]["(X - BASE) / (TOP - BASE)"]
    assert np.isnan(gap["gap_closed"]) and gap["undefined_fraction"] == 1.0


def test_rows_must_share_placements():
    a = _records("A", np.ones((2, 6)))
    b = [dict(r, row="B", placement=r["placement"] + 100) for r in a]
    with pytest.raises(ValueError, match="row 'B'"):
        statistics.compare(a + b, ["A", "B"], replicates=10)


def test_same_seed_reproduces_the_intervals():
    recs = _records("A", np.random.default_rng(4).integers(0, 2, size=(3, 9)))
    first = statistics.compare(recs, ["A"], replicates=500, seed=7)
    second = statistics.compare(recs, ["A"], replicates=500, seed=7)
    other = statistics.compare(recs, ["A"], replicates=500, seed=8)
    assert first["rows"]["A"]["ci95"] == second["rows"]["A"]["ci95"]
    assert first["rows"]["A"]["ci95"] != other["rows"]["A"]["ci95"]


def test_task_intervals_stay_within_the_tasks_outcomes():
    """A task every seed always solves has the interval [1, 1], one never solved [0, 0]: a
    replicate's task rate is over the task's placements it drew, not a fixed number of them."""
    matrix = np.zeros((3, 30))
    matrix[:, :10] = 1  # reach: always
    matrix[:, 20:] = np.random.default_rng(5).integers(0, 2, size=(3, 10))  # door-open: mixed
    tasks = statistics.compare(_records("A", matrix), ["A"], replicates=3000)["rows"]["A"]["tasks"]
    assert tasks["reach"]["ci95"] == [1.0, 1.0]
    assert tasks["push"]["ci95"] == [0.0, 0.0]
    lo, hi = tasks["door-open"]["ci95"]
    assert 0.0 <= lo < tasks["door-open"]["success_rate"] < hi <= 1.0


def test_seed_groups_pair_the_same_runs_over_seeds():
    """Two checkpoints of the same runs share their seed draw: identical rows whose seeds differ
    have an exactly zero contrast only when grouped; resampled apart, the seed spread shows."""
    matrix = np.zeros((3, 12))
    matrix[0] = 1
    matrix[2, ::2] = 1
    recs = _records("SCRATCH", matrix) + _records("SCRATCH@ft", matrix)
    rows = ["SCRATCH", "SCRATCH@ft"]
    grouped = statistics.compare(recs, rows, contrasts=[("SCRATCH", "SCRATCH@ft")],
                                 seed_groups=[rows], replicates=2000)["contrasts"]["SCRATCH - SCRATCH@ft"]
    apart = statistics.compare(recs, rows, contrasts=[("SCRATCH", "SCRATCH@ft")],
                               replicates=2000)["contrasts"]["SCRATCH - SCRATCH@ft"]
    assert grouped["ci95"] == [0.0, 0.0]
    assert apart["ci95"][0] < -0.2 and apart["ci95"][1] > 0.2
    fewer = [r for r in recs if not (r["row"] == "SCRATCH@ft" and r["seed"] == 2)]
    with pytest.raises(ValueError, match="must have the same seeds"):
        statistics.compare(fewer, rows, seed_groups=[rows], replicates=10)
    with pytest.raises(ValueError, match=r"not compared: \['LAPA'\]"):
        statistics.compare(recs, rows, contrasts=[("LAPA", "SCRATCH")], replicates=10)


def test_gap_interval_only_where_the_upper_bound_is_reliably_above():
    """The ratio's interval is given when ACTIONVLA beats SCRATCH in >= 95 % of the replicates;
    with a denominator that crosses zero it is NaN and the undefined share says why."""
    rng = np.random.default_rng(6)
    base = (rng.random((3, 42)) < 0.3).astype(float)
    close = (rng.random((3, 42)) < 0.3).astype(float)  # the same rate: the denominator crosses zero
    far = np.ones((3, 42))
    x = (rng.random((3, 42)) < 0.5).astype(float)
    recs = _records("BASE", base) + _records("CLOSE", close) + _records("FAR", far) + _records("X", x)
    out = statistics.compare(recs, ["BASE", "CLOSE", "FAR", "X"],
                             gaps=[("X", "BASE", "CLOSE"), ("X", "BASE", "FAR")], replicates=2000)["gaps"]
    near, clear = out["(X - BASE) / (CLOSE - BASE)"], out["(X - BASE) / (FAR - BASE)"]
    assert near["undefined_fraction"] > statistics.MAX_UNDEFINED_FRACTION and np.isnan(near["ci95"]).all()
    assert clear["undefined_fraction"] == 0.0
    lo, hi = clear["ci95"]
    assert lo < clear["gap_closed"] < hi
    assert clear["gap_closed"] == pytest.approx((x.mean() - base.mean()) / (1 - base.mean()))
