"""Evidence that an LAQ's codes mean something, and the gate in front of latent pretraining.

    report = probe("runs/laq_vipra")                 # or a LoadedLAQ; data: the LAQ's own config.data
    passed, reasons = gate(report, config.gate)      # configs/laq.py gate.* thresholds
    print(format_report(report))                     # scripts/eval_laq.py is the CLI

**Rows.** One row per latent action: lapa's pair (x_t, x_{t+H}) is one latent (its M = 4 code
tokens); vipra's clip t, t+s, ..., t+L*s has L latents, transition k's M = 16 tokens. A latent
*spans* the control steps between its two frames: [t, t+H) for lapa, [t+k*s, t+(k+1)*s) for vipra.
With the setting ``level="window"`` a row is a whole LAQ window instead (all K x M tokens, the
span [t, t+L*s)): with H = L*s lapa's and vipra's rows then coincide.

**Target (the same definition for both kinds).** The mean of the ground-truth actions over the
control steps the latent spans (Meta-World: xyz hand-displacement command and gripper effort,
each in [-1, 1]). Figures are given for the position (the xyz dims, pooled R^2 = 1 - sum SSE /
sum SST over the three dims) apart from the gripper (R^2 of its dim, and the sign accuracy:
sign(prediction) == sign(target) over rows whose target is non-zero; a prediction of exactly 0
counts as wrong).

**Predictors** (fitted on the episodes of ``train_split``, scored on the held-out episodes of
``eval_split``; nothing is scored on what it was fitted on):

* ``linear``: ridge regression (penalty ``ridge * N``, intercept free) on one-hot features:
  ``codes`` (M x K one-hot code tokens), ``shuffled_codes`` (codes permuted across rows: chance),
  ``task`` (task identity one-hot), ``task_phase`` (one-hot of task x phase bin, phase =
  latent start step / episode length in ``phase_bins`` equal bins: per task and phase bin a mean),
  ``task_phase_codes`` (task_phase and codes features together).
* ``knn``: k-nearest-neighbour regression (mean target of the ``knn_k`` nearest fit rows):
  ``codes`` and ``shuffled_codes`` by code-token Hamming distance (ties broken at random);
  ``task_phase``: among the fit rows of the same task x phase-bin cell, the nearest in phase;
  ``task_phase_codes``: among the same cell's rows, the nearest in codes (ties: nearest in phase).
  Both take k rows of the row's own cell and differ only in how they choose them, so random codes
  gain nothing (slightly less than nothing) and codes that carry the action gain.
* ``gain_over_task_phase``: R^2(task_phase_codes) - R^2(task_phase) (accuracy likewise), per
  probe: what the codes add to what task identity and episode phase already explain.

**Intervals.** Every figure has an episode-bootstrap 95 % interval: the held-out episodes are
resampled with replacement ``bootstrap`` times, each figure (and each gain, paired) recomputed
on the resampled rows with the fitted predictors fixed; the interval is the 2.5 / 97.5 percentile.

**Code usage** over all held-out code tokens: fraction of the codebook used and perplexity
(``exp`` of the entropy of the token distribution, 1..K), with the same bootstrap; the number of
distinct code tuples. **Reconstruction**: PSNR of the hard-code predictions of the held-out
windows next to the copy-the-context-frame baseline.

The probe reads the episodes' actions (through ``make_trajectory_dataset``, whatever
``data.drop_actions`` says): they are the yardstick, never an input of the LAQ.

``frame_gap_scan`` is the untrained measurement behind the Meta-World frame gap (README, stage 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxvla.data.registry import get_dataset_spec
from jaxvla.frozen import load_laq
from jaxvla.losses.tokenizer import images_to_float

# TensorFlow (the dataset readers) loads inside the function that reads episodes: the predictors,
# report and gate need none of it.

log = logging.getLogger("jaxvla")

POSITION_DIMS = (0, 1, 2)
GRIPPER_DIM = 3
PREDICTORS = ("codes", "shuffled_codes", "task", "task_phase", "task_phase_codes")
KNN_PREDICTORS = ("codes", "shuffled_codes", "task_phase", "task_phase_codes")
FIGURES = ("xyz_r2", "gripper_r2", "gripper_acc")
PROBES = ("linear", "knn")
TARGET = ("mean ground-truth action over the control steps the latent spans (lapa [t, t+H); "
          "vipra transition k [t+k*s, t+(k+1)*s))")

DEFAULT_SETTINGS = dict(level="latent", phase_bins=10, ridge=1e-3, knn_k=16, knn_max_fit=20_000, bootstrap=1000,
                        seed=0)
DEFAULT_GATE = dict(min_code_usage=0.9, min_xyz_r2=0.5, min_gain_over_task_phase=0.1, probe="linear",
                    use_lower_bound=False)


# ------------------------------------------------------------------------------------------------
# Small numerical pieces (pure numpy).


def one_hot_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """``[N, M]`` int codes -> ``[N, M * K]`` float64 one-hot features."""
    codes = np.asarray(codes)
    flat = np.zeros((codes.shape[0], codes.shape[1] * codebook_size), np.float64)
    rows = np.arange(codes.shape[0])[:, None]
    flat[rows, np.arange(codes.shape[1])[None, :] * codebook_size + codes] = 1.0
    return flat


def one_hot(index: np.ndarray, size: int) -> np.ndarray:
    """``[N]`` ints in [0, size) (or -1: all zeros) -> ``[N, size]`` float64."""
    index = np.asarray(index, np.int64)
    out = np.zeros((len(index), size), np.float64)
    valid = (index >= 0) & (index < size)
    out[np.nonzero(valid)[0], index[valid]] = 1.0
    return out


def phase_bin(phase: np.ndarray, bins: int) -> np.ndarray:
    """Phase in [0, 1] -> bin index in [0, bins)."""
    return np.clip((np.asarray(phase, np.float64) * bins).astype(np.int64), 0, bins - 1)


def fit_ridge(features: np.ndarray, targets: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Least squares with an intercept and an L2 penalty ``ridge * N`` on the weights (not the
    intercept): ``features [N, F]``, ``targets [N, A]`` -> (weights [F, A], intercept [A])."""
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * len(x) * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, xc.T @ yc)
    return weights, y_mean - x_mean @ weights


def ridge_predict(fit_x: np.ndarray, fit_y: np.ndarray, test_x: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    weights, intercept = fit_ridge(fit_x, fit_y, ridge)
    return np.asarray(test_x, np.float64) @ weights + intercept


def r2_scores(targets: np.ndarray, predictions: np.ndarray, min_variance: float = 1e-12) -> np.ndarray:
    """Per-dimension coefficient of determination ``1 - SSE / SST``; NaN where the targets are constant."""
    y = np.asarray(targets, np.float64)
    sse = np.sum(np.square(y - predictions), 0)
    sst = np.sum(np.square(y - y.mean(0)), 0)
    return np.where(sst > min_variance * len(y), 1.0 - sse / np.maximum(sst, 1e-300), np.nan)


def pooled_r2(targets: np.ndarray, predictions: np.ndarray, dims: Sequence[int]) -> float:
    """``1 - sum_d SSE_d / sum_d SST_d`` over ``dims`` (NaN when the targets are constant)."""
    y = np.asarray(targets, np.float64)[:, list(dims)]
    p = np.asarray(predictions, np.float64)[:, list(dims)]
    sst = float(np.sum(np.square(y - y.mean(0))))
    if sst <= 1e-12 * max(len(y), 1):
        return float("nan")
    return 1.0 - float(np.sum(np.square(y - p))) / sst


def sign_accuracy(targets: np.ndarray, predictions: np.ndarray) -> float:
    """Fraction of rows with a non-zero target whose prediction has the same sign."""
    y, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
    keep = y != 0
    return float(np.mean(np.sign(p[keep]) == np.sign(y[keep]))) if np.any(keep) else float("nan")


def code_usage(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size).astype(np.float64)
    return _usage_from_counts(counts[None])[0]


def _usage_from_counts(counts: np.ndarray) -> list[dict[str, float]]:
    """``[R, K]`` token counts -> per row {perplexity, used_fraction}."""
    counts = np.asarray(counts, np.float64)
    probs = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)
    entropy = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), -1)
    used = np.mean(counts > 0, -1)
    return [{"perplexity": float(np.exp(e)), "used_fraction": float(u)} for e, u in zip(entropy, used)]


def knn_predict(
    fit_y: np.ndarray,
    k: int,
    *,
    fit_codes: np.ndarray | None = None,
    test_codes: np.ndarray | None = None,
    codebook_size: int = 0,
    fit_groups: np.ndarray | None = None,
    test_groups: np.ndarray | None = None,
    fit_phase: np.ndarray | None = None,
    test_phase: np.ndarray | None = None,
    phase_weight: float = 0.0,
    seed: int = 0,
    num_test: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Mean target of the ``k`` nearest fit rows of every test row.

    Distance: the fraction of code tokens that differ (when codes are given) + ``phase_weight`` x
    |phase difference| (when phases are given) + a uniform jitter in [0, 1e-6) that breaks ties at
    random; with groups, only fit rows of the test row's group are neighbours (a test row whose
    group has no fit row gets the mean of all fit targets). ``-> [N_test, A]``."""
    fit_y = np.asarray(fit_y, np.float64)
    if test_codes is not None:
        num_test = len(test_codes)
    elif test_phase is not None:
        num_test = len(test_phase)
    if num_test is None:
        raise ValueError("knn_predict: give test codes or test phases")
    rng = np.random.default_rng(seed)
    out = np.empty((num_test, fit_y.shape[1]), np.float64)
    if fit_groups is None:
        groups = [(np.arange(len(fit_y)), np.arange(num_test))]
    else:
        fit_groups, test_groups = np.asarray(fit_groups), np.asarray(test_groups)
        groups = []
        for g in np.unique(test_groups):
            test_rows = np.nonzero(test_groups == g)[0]
            fit_rows = np.nonzero(fit_groups == g)[0]
            if len(fit_rows) == 0:
                out[test_rows] = fit_y.mean(0)
                continue
            groups.append((fit_rows, test_rows))
    fit_hot = one_hot_codes(fit_codes, codebook_size).astype(np.float32) if fit_codes is not None else None
    test_hot = one_hot_codes(test_codes, codebook_size).astype(np.float32) if test_codes is not None else None
    tokens = fit_codes.shape[1] if fit_codes is not None else 1
    for fit_rows, test_rows in groups:
        kk = min(int(k), len(fit_rows))
        for start in range(0, len(test_rows), chunk):
            rows = test_rows[start:start + chunk]
            distance = rng.uniform(0.0, 1e-6, (len(rows), len(fit_rows)))
            if fit_hot is not None:
                matches = test_hot[rows] @ fit_hot[fit_rows].T  # [n, m] tokens equal
                distance += (tokens - matches) / tokens
            if fit_phase is not None and phase_weight:
                phase_gap = np.asarray(test_phase)[rows, None] - np.asarray(fit_phase)[None, fit_rows]
                distance += phase_weight * np.abs(phase_gap)
            nearest = np.argpartition(distance, kk - 1, axis=1)[:, :kk]
            out[rows] = fit_y[fit_rows][nearest].mean(1)
    return out


# ------------------------------------------------------------------------------------------------
# Latent rows and the figures.


@dataclasses.dataclass
class LatentRows:
    """One row per latent: ``codes`` int [N, M], ``targets`` float [N, A] (mean action over the
    span), ``phase`` [N] (span start / episode length), ``task`` [N] (task name: the episode's
    instruction), ``episode`` int [N] (episode index within the split)."""

    codes: np.ndarray
    targets: np.ndarray
    phase: np.ndarray
    task: np.ndarray
    episode: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def num_episodes(self) -> int:
        return int(len(np.unique(self.episode)))


def span_targets(actions: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mean of ``actions [T, A]`` over ``[starts, ends)`` per row -> ``[N, A]`` (cumulative sums)."""
    actions = np.asarray(actions, np.float64)
    cumulative = np.concatenate([np.zeros((1, actions.shape[1])), np.cumsum(actions, 0)], 0)
    starts, ends = np.asarray(starts), np.asarray(ends)
    if np.any(ends <= starts) or np.any(ends > len(actions)) or np.any(starts < 0):
        raise ValueError("span_targets: spans must be non-empty and inside the episode")
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)[:, None]


def episode_spans(num_actions: int, offsets: Sequence[int], window_stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """LAQ window starts of an episode with ``num_actions`` steps (``num_actions + 1`` frames) and,
    per window and transition, the span [start, end): -> (starts [W], spans [W, K, 2])."""
    offsets = np.asarray(offsets, np.int64)
    starts = np.arange(0, max(num_actions + 1 - int(offsets[-1]), 0), max(int(window_stride), 1))
    spans = np.stack([starts[:, None] + offsets[None, :-1], starts[:, None] + offsets[None, 1:]], -1)
    return starts, spans


def _task_index(fit_tasks: np.ndarray, test_tasks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    names = sorted(set(np.asarray(fit_tasks).tolist()))
    lookup = {name: i for i, name in enumerate(names)}
    return (np.asarray([lookup[t] for t in fit_tasks], np.int64),
            np.asarray([lookup.get(t, -1) for t in test_tasks], np.int64), len(names))


def predictions(fit: LatentRows, test: LatentRows, codebook_size: int, settings: Mapping[str, Any] | None = None
                ) -> dict[str, dict[str, np.ndarray]]:
    """Held-out predictions ``{probe: {predictor: [N_test, A]}}`` of every predictor of the module
    docstring, fitted on ``fit``."""
    s = {**DEFAULT_SETTINGS, **dict(settings or {})}
    bins, ridge, seed = int(s["phase_bins"]), float(s["ridge"]), int(s["seed"])
    fit_task, test_task, num_tasks = _task_index(fit.task, test.task)
    rng = np.random.default_rng(seed)
    shuffled_fit = fit.codes[rng.permutation(len(fit))]
    shuffled_test = test.codes[rng.permutation(len(test))]

    def cell(task, phase):
        return np.where(task >= 0, task * bins + phase_bin(phase, bins), -1)

    features = {
        "codes": (one_hot_codes(fit.codes, codebook_size), one_hot_codes(test.codes, codebook_size)),
        "shuffled_codes": (one_hot_codes(shuffled_fit, codebook_size), one_hot_codes(shuffled_test, codebook_size)),
        "task": (one_hot(fit_task, num_tasks), one_hot(test_task, num_tasks)),
        "task_phase": (one_hot(cell(fit_task, fit.phase), num_tasks * bins),
                       one_hot(cell(test_task, test.phase), num_tasks * bins)),
    }
    features["task_phase_codes"] = tuple(np.concatenate([a, b], 1) for a, b in zip(features["task_phase"],
                                                                                 features["codes"]))
    linear = {name: ridge_predict(fx, fit.targets, tx, ridge) for name, (fx, tx) in features.items()}

    # kNN: a random subset of at most knn_max_fit fit rows (the distances are N_test x N_fit).
    keep = np.arange(len(fit))
    if 0 < int(s["knn_max_fit"]) < len(fit):
        keep = np.sort(rng.choice(len(fit), int(s["knn_max_fit"]), replace=False))
    k = int(s["knn_k"])
    y = fit.targets[keep]
    fit_cell, test_cell = cell(fit_task, fit.phase)[keep], cell(test_task, test.phase)
    knn = {
        "codes": knn_predict(y, k, fit_codes=fit.codes[keep], test_codes=test.codes, codebook_size=codebook_size,
                             seed=seed),
        "shuffled_codes": knn_predict(y, k, fit_codes=shuffled_fit[keep], test_codes=shuffled_test,
                                      codebook_size=codebook_size, seed=seed + 1),
        "task_phase": knn_predict(y, k, fit_groups=fit_cell, test_groups=test_cell, fit_phase=fit.phase[keep],
                                  test_phase=test.phase, phase_weight=1.0, seed=seed + 2),
        # Phase only breaks ties: within a cell |dphase| <= 1 / phase_bins, times 0.01 < 1 / M.
        "task_phase_codes": knn_predict(y, k, fit_codes=fit.codes[keep], test_codes=test.codes,
                                        codebook_size=codebook_size, fit_groups=fit_cell, test_groups=test_cell,
                                        fit_phase=fit.phase[keep], test_phase=test.phase, phase_weight=0.01,
                                        seed=seed + 3),
    }
    return {"linear": linear, "knn": knn}


class _EpisodeSums:
    """Per-episode sufficient statistics of one predictor, so that any resampling of the
    episodes (a weight per episode) gives the pooled figures without touching the rows again."""

    def __init__(self, targets: np.ndarray, prediction: np.ndarray, episode: np.ndarray, num_episodes: int):
        y = np.asarray(targets, np.float64)
        p = np.asarray(prediction, np.float64)
        e = np.asarray(episode)

        def per_episode(values):  # [N, ...] -> [E, ...]
            out = np.zeros((num_episodes,) + values.shape[1:], np.float64)
            np.add.at(out, e, values)
            return out

        pos, grip = list(POSITION_DIMS), GRIPPER_DIM
        self.count = per_episode(np.ones(len(y)))
        self.sum_y = per_episode(y)  # [E, A]
        self.sum_yy = per_episode(np.square(y))  # [E, A]
        self.sse = per_episode(np.square(y - p))  # [E, A]
        nonzero = y[:, grip] != 0
        self.signs = per_episode((nonzero & (np.sign(p[:, grip]) == np.sign(y[:, grip]))).astype(np.float64))
        self.signed = per_episode(nonzero.astype(np.float64))
        self.pos, self.grip = pos, grip

    def figures(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``weights [R, E]`` (episode multiplicities) -> {figure: [R]}."""
        n = weights @ self.count
        sst = weights @ self.sum_yy - np.square(weights @ self.sum_y) / np.maximum(n, 1e-300)[:, None]  # [R, A]
        sse = weights @ self.sse

        def r2(dims):
            total = sst[:, dims].sum(-1)
            return np.where(total > 1e-12 * n, 1.0 - sse[:, dims].sum(-1) / np.maximum(total, 1e-300), np.nan)

        signed = weights @ self.signed
        return {"xyz_r2": r2(self.pos), "gripper_r2": r2([self.grip]),
                "gripper_acc": np.where(signed > 0, (weights @ self.signs) / np.maximum(signed, 1e-300), np.nan)}


def _interval(values: np.ndarray) -> list[float | None]:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return [None, None]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _figure(point: float, samples: np.ndarray) -> dict[str, Any]:
    return {"value": None if not np.isfinite(point) else float(point), "ci95": _interval(samples)}


def bootstrap_weights(num_episodes: int, resamples: int, seed: int = 0) -> np.ndarray:
    """``[resamples, E]`` multiplicities of the episodes in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_episodes, np.full(num_episodes, 1.0 / num_episodes), size=resamples).astype(np.float64)


def score(fit: LatentRows, test: LatentRows, codebook_size: int, settings: Mapping[str, Any] | None = None) -> dict:
    """Every figure of the module docstring from latent rows: ``{"linear": {predictor: {figure:
    {"value", "ci95"}}, "gain_over_task_phase": {...}}, "knn": {...}, "usage": {...}}``."""
    s = {**DEFAULT_SETTINGS, **dict(settings or {})}
    if len(fit) == 0 or len(test) == 0:
        raise ValueError(f"the probe needs fit and held-out latents, got {len(fit)} and {len(test)}")
    preds = predictions(fit, test, codebook_size, s)
    episodes, episode = np.unique(test.episode, return_inverse=True)
    num = len(episodes)
    weights = bootstrap_weights(num, int(s["bootstrap"]), int(s["seed"]) + 7) if int(s["bootstrap"]) > 0 \
        else np.zeros((0, num))
    ones = np.ones((1, num))
    report: dict[str, Any] = {}
    for probe_name, table in preds.items():
        out: dict[str, Any] = {}
        points, samples = {}, {}
        for name, prediction in table.items():
            sums = _EpisodeSums(test.targets, prediction, episode, num)
            points[name] = {k: v[0] for k, v in sums.figures(ones).items()}
            samples[name] = sums.figures(weights)
            out[name] = {f: _figure(points[name][f], samples[name][f]) for f in FIGURES}
        out["gain_over_task_phase"] = {
            f: _figure(points["task_phase_codes"][f] - points["task_phase"][f],
                       samples["task_phase_codes"][f] - samples["task_phase"][f]) for f in FIGURES}
        report[probe_name] = out

    counts = np.zeros((num, codebook_size))
    np.add.at(counts, episode, one_hot(test.codes.reshape(-1), codebook_size).reshape(len(test), -1,
                                                                                     codebook_size).sum(1))
    point = _usage_from_counts(counts.sum(0, keepdims=True))[0]
    resampled = _usage_from_counts(weights @ counts)
    tuples = len({tuple(row) for row in np.asarray(test.codes).tolist()})
    report["usage"] = {
        "codes_used_fraction": _figure(point["used_fraction"], np.asarray([u["used_fraction"] for u in resampled])),
        "code_perplexity": _figure(point["perplexity"], np.asarray([u["perplexity"] for u in resampled])),
        "codebook_size": int(codebook_size),
        "code_tokens": int(test.codes.shape[1]),
        "distinct_code_tuples": int(tuples),
    }
    report["settings"] = {k: s[k] for k in DEFAULT_SETTINGS}
    report["fit_latents"], report["held_out_latents"] = len(fit), len(test)
    report["fit_episodes"], report["held_out_episodes"] = fit.num_episodes, num
    report["target"] = TARGET
    return report


# ------------------------------------------------------------------------------------------------
# Episodes and the LAQ.


@dataclasses.dataclass
class Episode:
    """A decoded episode: ``images`` uint8 [T+1, S, S, 3] (frame t is seen before action t; None
    when not decoded), ``actions`` [T, A] (the steps that have one), ``task`` its instruction."""

    key: str
    task: str
    actions: np.ndarray
    images: np.ndarray | None


def iter_episodes(data_config: Any, split: str, *, image_size: int | None = None, images: bool = True,
                  episodes_per_task: int = 0) -> Iterator[Episode]:
    """The episodes of ``data_config``'s dataset split in file order (one process reads all), with
    their actions whatever ``data.drop_actions`` says. ``episodes_per_task`` > 0 keeps the first N
    episodes of every task (instruction)."""
    import tensorflow as tf  # TensorFlow

    from jaxvla.data import frame_transforms as ft  # TensorFlow
    from jaxvla.data.pipeline import make_trajectory_dataset  # TensorFlow

    get = data_config.get
    if get("mixture"):
        raise ValueError("the LAQ probe reads one dataset (config.data.dataset); mixtures are not supported")
    spec = get_dataset_spec(get("dataset"))
    camera = str(get("cameras", "primary")).split(",")[0].strip() or "primary"
    size = int(image_size or get("image_size"))
    shape = np.asarray(list(spec.image_shape or (0, 0))[:2], np.int32)
    trajectories = make_trajectory_dataset(spec, split, False, 0, 0, 1, data_dir=get("data_dir"), deterministic=True)

    def decode(t):
        out = {"traj_key": t["traj_key"][0], "action": t["action"], "has_action": t["has_action"],
               "task": t["task"]["language_instruction"][0]}
        if images:
            out["images"] = ft.decode_and_resize(t["observation"][f"image_{camera}"], size, expected_shape=shape,
                                                 context=f"dataset '{spec.name}' image_{camera}")
        return out

    seen: dict[str, int] = {}
    for item in trajectories.traj_map(decode).dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        task = item["task"].decode("utf-8")
        if episodes_per_task and seen.get(task, 0) >= episodes_per_task:
            continue
        seen[task] = seen.get(task, 0) + 1
        has = np.asarray(item["has_action"], bool)
        steps = int(np.argmin(has)) if not has.all() else len(has)  # the leading steps with an action
        yield Episode(item["traj_key"].decode("utf-8"), task, np.asarray(item["action"][:steps], np.float64),
                      item["images"][: steps + 1] if images else None)


def _load(laq):
    if isinstance(laq, str):
        return load_laq(laq)
    return laq


@dataclasses.dataclass
class LatentWindows:
    """The LAQ windows of a split: ``codes`` int [W, K, M] (K transitions of M tokens),
    ``latent_targets`` [W, K, A] and ``latent_phase`` [W, K] per transition, ``window_targets``
    [W, A] and ``window_phase`` [W] over the whole window, ``task`` [W], ``episode`` [W]."""

    codes: np.ndarray
    latent_targets: np.ndarray
    latent_phase: np.ndarray
    window_targets: np.ndarray
    window_phase: np.ndarray
    task: np.ndarray
    episode: np.ndarray

    def rows(self, level: str = "latent") -> LatentRows:
        """``latent``: a row per transition (its M tokens, the mean action over its span);
        ``window``: a row per window (all K x M tokens, the mean action over the whole window;
        for lapa the two are the same)."""
        windows, steps, tokens = self.codes.shape
        if level == "latent":
            return LatentRows(self.codes.reshape(windows * steps, tokens),
                              self.latent_targets.reshape(windows * steps, -1), self.latent_phase.reshape(-1),
                              np.repeat(self.task, steps), np.repeat(self.episode, steps))
        if level == "window":
            return LatentRows(self.codes.reshape(windows, steps * tokens), self.window_targets, self.window_phase,
                              self.task, self.episode)
        raise ValueError(f"probe level {level!r} is unknown; expected 'latent' or 'window'")


def collect(laq, data_config: Any, split: str, *, batch_size: int = 64, window_stride: int = 1,
            episodes_per_task: int = 0, reconstruction: bool = False, progress: bool = False
            ) -> tuple[LatentWindows, dict]:
    """Runs the LAQ over every window of ``split``'s episodes (every ``window_stride``-th start):
    (windows, reconstruction sums {"recon_se", "copy_se", "values"}, filled when ``reconstruction``)."""
    laq = _load(laq)
    model = laq.model
    offsets = np.asarray(laq.frame_offsets, np.int64)

    def forward(params, frames):
        x = images_to_float(frames)
        if not reconstruction:
            indices = model.apply({"params": params}, x, method=model.encode)["indices"]
            return indices, jnp.zeros(()), jnp.zeros(())
        out = model.apply({"params": params}, x, train=False)
        target = x[:, 1:]
        recon_se = jnp.sum(jnp.square(jnp.clip(out["recon"], -1.0, 1.0) - target), axis=(1, 2, 3, 4))
        copy_se = jnp.sum(jnp.square(x[:, :-1] - target), axis=(1, 2, 3, 4))
        return out["indices"], recon_se, copy_se

    # One compiled function per LAQ and mode, kept on the LAQ object (probe() collects twice).
    cache = laq.__dict__.setdefault("_quality_fns", {})
    if reconstruction not in cache:
        cache[reconstruction] = (jax.jit(forward), jax.device_put(laq.params))
    forward, params = cache[reconstruction]
    codes: list[np.ndarray] = []
    fields: dict[str, list[np.ndarray]] = {k: [] for k in ("latent_targets", "latent_phase", "window_targets",
                                                            "window_phase", "task", "episode")}
    sums = {"recon_se": 0.0, "copy_se": 0.0, "values": 0}
    pending: list[np.ndarray] = []

    def flush():
        if not pending:
            return
        frames = np.concatenate(pending)
        pending.clear()
        for start in range(0, len(frames), batch_size):
            chunk = frames[start:start + batch_size]
            rows = len(chunk)
            if rows < batch_size:  # one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - rows, 0)])
            indices, recon_se, copy_se = forward(params, chunk)
            codes.append(np.asarray(indices)[:rows])
            if reconstruction:
                sums["recon_se"] += float(np.sum(np.asarray(recon_se)[:rows]))
                sums["copy_se"] += float(np.sum(np.asarray(copy_se)[:rows]))
                sums["values"] += rows * int(np.prod(chunk.shape[2:])) * model.num_transitions

    iterator = iter_episodes(data_config, split, image_size=model.image_size, episodes_per_task=episodes_per_task)
    count = 0
    for index, episode in enumerate(tqdm(iterator, desc=f"LAQ on {split}", unit="episode", disable=not progress)):
        steps = len(episode.actions)
        starts, spans = episode_spans(steps, offsets, window_stride)
        if len(starts) == 0:
            continue
        count += 1
        pending.append(episode.images[starts[:, None] + offsets[None, :]])
        flat = spans.reshape(-1, 2)
        fields["latent_targets"].append(span_targets(episode.actions, flat[:, 0], flat[:, 1]).reshape(
            len(starts), len(offsets) - 1, -1))
        fields["latent_phase"].append(spans[..., 0] / float(steps))
        fields["window_targets"].append(span_targets(episode.actions, starts, starts + offsets[-1]))
        fields["window_phase"].append(starts / float(steps))
        fields["task"].append(np.full(len(starts), episode.task, object))
        fields["episode"].append(np.full(len(starts), index, np.int64))
        if sum(len(p) for p in pending) >= 4 * batch_size:
            flush()
    flush()
    if not count:
        raise ValueError(f"split {split!r} of {data_config.get('data_dir')} has no episode long enough for the LAQ "
                         f"window (frame offsets {offsets.tolist()})")
    windows = LatentWindows(np.concatenate(codes).astype(np.int64), **{k: np.concatenate(v) for k, v in fields.items()})
    return windows, sums


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(4.0 / max(mse, 1e-10))


def probe(laq, data_config: Any = None, *, train_split: str = "train", eval_split: str = "val",
          settings: Mapping[str, Any] | None = None, batch_size: int = 64, window_stride: int = 1,
          train_episodes_per_task: int = 0, progress: bool = False) -> dict:
    """The LAQ quality report (module docstring) of ``laq`` (a stage-1 workdir / checkpoint path or
    a ``LoadedLAQ``) on ``data_config`` (default: the LAQ's own ``config.data``); ``settings``
    overrides ``DEFAULT_SETTINGS`` (configs/laq.py ``probe.*``). ``window_stride`` > 1 keeps every
    n-th LAQ window of each episode, ``train_episodes_per_task`` > 0 the first N fit episodes of
    every task (cheaper on a big pool)."""
    laq = _load(laq)
    data_config = data_config if data_config is not None else laq.config.data
    s = {**DEFAULT_SETTINGS, **dict(settings or {})}
    held_out, sums = collect(laq, data_config, eval_split, batch_size=batch_size, window_stride=window_stride,
                             reconstruction=True, progress=progress)
    fit, _ = collect(laq, data_config, train_split, batch_size=batch_size, window_stride=window_stride,
                     episodes_per_task=train_episodes_per_task, progress=progress)
    report = score(fit.rows(s["level"]), held_out.rows(s["level"]), laq.model.codebook_size, s)
    report.update({
        "checkpoint": laq.checkpoint,
        "step": laq.step,
        "variant": laq.model.variant,
        "frame_offsets": [int(o) for o in np.asarray(laq.frame_offsets)],
        "train_split": train_split,
        "eval_split": eval_split,
        "data_dir": str(data_config.get("data_dir")),
        "psnr": _psnr(sums["recon_se"] / max(sums["values"], 1)),
        "psnr_copy_baseline": _psnr(sums["copy_se"] / max(sums["values"], 1)),
    })
    return report


# ------------------------------------------------------------------------------------------------
# The gate.


def gate(report: Mapping[str, Any], thresholds: Mapping[str, Any] | None = None, *, log_result: bool = True
         ) -> tuple[bool, list[str]]:
    """Whether an LAQ's codes are good enough to pretrain on: ``(passed, reasons)``, one reason per
    failed check (empty when passed). ``thresholds`` overrides ``DEFAULT_GATE`` (configs/laq.py
    ``gate.*``): ``min_code_usage`` (fraction of the codebook used on held-out episodes),
    ``min_xyz_r2`` (held-out position R^2 of the ``probe`` predictor "codes"),
    ``min_gain_over_task_phase`` (its position R^2 gain over task + phase), ``probe`` ("linear",
    "knn" or "best": the larger of the two per figure), ``use_lower_bound`` (compare the 95 %
    interval's lower end instead of the point estimate). A threshold set to None is not checked;
    a missing or NaN figure fails its check. Every check is logged."""
    t = {**DEFAULT_GATE, **dict(thresholds or {})}
    probe_name = str(t["probe"])
    if probe_name not in PROBES + ("best",):
        raise ValueError(f"gate: probe={probe_name!r} is unknown; expected one of {PROBES + ('best',)}")
    lower = bool(t["use_lower_bound"])

    def read(entry) -> tuple[float, str]:
        if not isinstance(entry, Mapping):
            return float("nan"), ""
        value = entry.get("ci95", [None])[0] if lower else entry.get("value")
        value = float("nan") if value is None else float(value)
        low, high = (entry.get("ci95") or [None, None])[:2]
        ci = f" (95% CI {low:.3f}..{high:.3f})" if low is not None and high is not None else ""
        return value, ci

    def probe_figure(*path) -> tuple[float, str, str]:
        names = PROBES if probe_name == "best" else (probe_name,)
        best = (float("nan"), "", probe_name)
        for name in names:
            node: Any = report.get(name, {})
            for key in path:
                node = node.get(key, {}) if isinstance(node, Mapping) else {}
            value, ci = read(node)
            if not np.isfinite(best[0]) or (np.isfinite(value) and value > best[0]):
                best = (value, ci, name)
        return best

    what = "95% CI lower end" if lower else "value"
    checks = []
    if t["min_code_usage"] is not None:
        value, ci = read(report.get("usage", {}).get("codes_used_fraction"))
        checks.append(("codes used (fraction of the codebook, held-out)", value, ci, float(t["min_code_usage"])))
    if t["min_xyz_r2"] is not None:
        value, ci, name = probe_figure("codes", "xyz_r2")
        checks.append((f"position R^2 from the codes ({name} probe, held-out)", value, ci, float(t["min_xyz_r2"])))
    if t["min_gain_over_task_phase"] is not None:
        value, ci, name = probe_figure("gain_over_task_phase", "xyz_r2")
        checks.append((f"position R^2 the codes add over task + phase ({name} probe)", value, ci,
                       float(t["min_gain_over_task_phase"])))
    reasons = []
    for label, value, ci, threshold in checks:
        ok = bool(np.isfinite(value) and value >= threshold)
        line = f"{label}: {what} {value:.3f}{ci} {'>=' if ok else '<'} {threshold:g}"
        if not ok:
            reasons.append(line if np.isfinite(value) else f"{label}: missing from the report (needs >= {threshold:g})")
        if log_result:
            log.info("LAQ gate %s: %s", "ok" if ok else "FAILED", line)
    passed = not reasons
    if log_result:
        log.info("LAQ gate (%s %s): %s", report.get("variant", "?"), report.get("checkpoint", ""),
                 "passed" if passed else f"failed ({len(reasons)} of {len(checks)} checks)")
    return passed, reasons


# ------------------------------------------------------------------------------------------------
# The frame gap measurement (untrained features).


def _pooled_difference(images: np.ndarray, starts: np.ndarray, gap: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F]: the frame difference x_{t+H} - x_t average-pooled over pool x pool pixel
    blocks, together with its absolute value pooled likewise; mean |difference| per row in /255)."""
    a = images[starts].astype(np.float32)
    b = images[starts + gap].astype(np.float32)
    difference = b - a
    n, size = len(starts), images.shape[1]
    grid = size // pool
    blocks = difference[:, : grid * pool, : grid * pool].reshape(n, grid, pool, grid, pool, 3)
    signed = blocks.mean((2, 4)).reshape(n, -1) / 255.0
    absolute = np.abs(blocks).mean((2, 4)).reshape(n, -1) / 255.0
    return np.concatenate([signed, absolute], 1), np.abs(difference).mean((1, 2, 3))  # pixel levels of 255


def frame_gap_scan(data_config: Any, gaps: Iterable[int], *, train_split: str = "train", eval_split: str = "val",
                   image_size: int | None = None, pool: int = 8, episodes_per_task: int = 0,
                   settings: Mapping[str, Any] | None = None, progress: bool = False) -> list[dict]:
    """How visible the action over a span is in the frames, per frame gap H (no LAQ, no training).

    For every gap H and every start t of every episode (rows: the pairs (x_t, x_{t+H}); the target
    is the probe's, the mean action over [t, t+H)):

    * ``pixel_change``: mean |x_{t+H} - x_t| in /255 units over all pixels of all held-out pairs;
    * ``target_std_xyz``: standard deviation of the position target (how much there is to predict);
    * ``task_phase_xyz_r2``: held-out R^2 of the linear task x phase-bin predictor;
    * ``pixels_xyz_r2``: held-out R^2 of ridge regression on the pooled frame difference (signed and
      absolute, ``pool`` x ``pool`` blocks), and ``pixels_gain_over_task_phase``: what those
      features add over task x phase (the untrained analogue of the probe's gain);
    * ``pixels_gripper_acc``: gripper sign accuracy of the pixel + task x phase predictor.
    """
    s = {**DEFAULT_SETTINGS, **dict(settings or {})}
    control_hz = get_dataset_spec(data_config.get("dataset")).control_hz
    gaps = sorted({int(g) for g in gaps})
    if not gaps or gaps[0] < 1:
        raise ValueError(f"frame_gap_scan: gaps must be positive, got {gaps}")
    splits = {}
    for split in (train_split, eval_split):
        splits[split] = list(iter_episodes(data_config, split, image_size=image_size,
                                           episodes_per_task=episodes_per_task if split == train_split else 0))
    bins, ridge = int(s["phase_bins"]), float(s["ridge"])
    results = []
    for gap in gaps:
        rows = {}
        for split, episodes in splits.items():
            feats, change, targets, phase, task = [], [], [], [], []
            for episode in episodes:
                steps = len(episode.actions)
                starts = np.arange(0, max(steps + 1 - gap, 0))
                if len(starts) == 0:
                    continue
                f, c = _pooled_difference(episode.images, starts, gap, pool)
                feats.append(f)
                change.append(c)
                targets.append(span_targets(episode.actions, starts, starts + gap))
                phase.append(starts / float(steps))
                task.append(np.full(len(starts), episode.task, object))
            if not feats:
                raise ValueError(f"frame_gap_scan: no episode of split {split!r} is longer than the gap {gap}")
            rows[split] = [np.concatenate(v) for v in (feats, change, targets, phase, task)]
        (fx, _, fy, fphase, ftask), (tx, tchange, ty, tphase, ttask) = rows[train_split], rows[eval_split]
        fit_task, test_task, num_tasks = _task_index(ftask, ttask)
        cell_f = one_hot(fit_task * bins + phase_bin(fphase, bins), num_tasks * bins)
        cell_t = one_hot(np.where(test_task >= 0, test_task * bins + phase_bin(tphase, bins), -1), num_tasks * bins)
        base = ridge_predict(cell_f, fy, cell_t, ridge)
        pixels = ridge_predict(fx, fy, tx, ridge)
        both = ridge_predict(np.concatenate([cell_f, fx], 1), fy, np.concatenate([cell_t, tx], 1), ridge)
        base_r2, both_r2 = pooled_r2(ty, base, POSITION_DIMS), pooled_r2(ty, both, POSITION_DIMS)
        result = {
            "gap": gap,
            "seconds": gap / control_hz if control_hz else None,
            "pairs_fit": int(len(fy)),
            "pairs_held_out": int(len(ty)),
            "pixel_change": float(np.mean(tchange)),
            "target_std_xyz": float(np.sqrt(np.mean(np.var(ty[:, list(POSITION_DIMS)], 0)))),
            "task_phase_xyz_r2": base_r2,
            "pixels_xyz_r2": pooled_r2(ty, pixels, POSITION_DIMS),
            "pixels_gain_over_task_phase": both_r2 - base_r2,
            "pixels_gripper_acc": sign_accuracy(ty[:, GRIPPER_DIM], both[:, GRIPPER_DIM]),
        }
        results.append(result)
        if progress:
            log.info("frame gap %d: %s", gap, result)
    return results


def format_gap_scan(results: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| gap H (steps) | seconds | mean abs pixel change (/255) | position target std | task x phase R^2 "
             "| pooled-difference R^2 | its gain over task x phase | gripper sign acc. |", "|---" * 8 + "|"]
    for r in results:
        seconds = f"{r['seconds']:.3f}" if r.get("seconds") else "-"
        lines.append(f"| {r['gap']} | {seconds} | {r['pixel_change']:.2f} | {r['target_std_xyz']:.3f} | "
                     f"{r['task_phase_xyz_r2']:.3f} | {r['pixels_xyz_r2']:.3f} | "
                     f"{r['pixels_gain_over_task_phase']:.3f} | "
                     f"{r['pixels_gripper_acc']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Printing.


def _fmt(entry: Any, percent: bool = False) -> str:
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return "n/a"
    value, (low, high) = entry["value"], entry.get("ci95") or (None, None)
    if percent:
        text = f"{value:.0%}"
        return text + (f" [{low:.0%}, {high:.0%}]" if low is not None else "")
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def format_report(report: Mapping[str, Any]) -> str:
    """The figures as Markdown tables (point estimate [95 % episode-bootstrap interval])."""
    usage = report["usage"]
    lines = [
        f"LAQ {report.get('variant', '?')} at step {report.get('step', '?')} (frame offsets "
        f"{report.get('frame_offsets', '?')}): {report['held_out_latents']} held-out latents from "
        f"{report['held_out_episodes']} episodes ({report.get('eval_split', '?')}), predictors fitted on "
        f"{report['fit_latents']} latents from {report['fit_episodes']} episodes ({report.get('train_split', '?')})",
        f"target: {report.get('target', TARGET)}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    if "psnr" in report:
        lines += [f"| reconstruction PSNR (dB) | {report['psnr']:.2f} |",
                  f"| copy-frame baseline PSNR (dB) | {report['psnr_copy_baseline']:.2f} |"]
    lines += [
        f"| codes used | {_fmt(usage['codes_used_fraction'], percent=True)} of {usage['codebook_size']} |",
        f"| code perplexity | {_fmt(usage['code_perplexity'])} of {usage['codebook_size']} |",
        f"| distinct code tuples ({usage['code_tokens']} tokens) | {usage['distinct_code_tuples']} |",
        "",
        "| probe | predictor | position (xyz) R^2 | gripper R^2 | gripper sign accuracy |",
        "|---|---|---|---|---|",
    ]
    for probe_name in PROBES:
        table = report.get(probe_name, {})
        for name in (*PREDICTORS, "gain_over_task_phase"):
            if name not in table:
                continue
            row = table[name]
            lines.append(f"| {probe_name} | {name} | {_fmt(row['xyz_r2'])} | {_fmt(row['gripper_r2'])} | "
                         f"{_fmt(row['gripper_acc'])} |")
    return "\n".join(lines)
