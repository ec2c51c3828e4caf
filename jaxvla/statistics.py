"""Statistics of the comparison (issue 15): success rates with cluster-bootstrap intervals,
paired contrasts between rows and the fraction of the gap to the upper bound closed.

Design. Every row is evaluated at the *same* placements (task, placement index) with several
training seeds. Two sources of randomness make a row's success rate uncertain: which
placements were drawn (shared by all rows: the design is paired over placements) and which
training seeds were drawn (independent per row: each row's seeds are its own training runs).
The cluster bootstrap resamples both: one draw of placements with replacement, shared by every
row in a replicate, and one draw of seeds with replacement per row. A seed is a cluster: its
episodes are resampled together, never episode by episode, because episodes of one trained
policy are correlated. Rows that are the *same* training runs evaluated at another checkpoint
(a ``seed_groups`` group, e.g. SCRATCH and its equal-finetuning control) share their seed draw
too, so their contrast is paired over seeds as well as placements.

What the intervals do not cover: anything shared by all of a row's seeds (the comparison's
pretraining is one run per pretrained row, so its contrasts are conditional on that run; where a
run directory was trained again, a row's seeds may come from two pretraining runs, and its seed
clusters mix them: ``reproduce.py`` says which). With
few seeds the seed part is itself uncertain: one seed gives no seed spread at all, and the
bootstrap of n seeds understates their variance by the factor (n - 1) / n.

A row's records become a success matrix ``S [num_seeds, num_placements]`` (0/1) in a fixed
placement order; a replicate with seed counts ``w_s [num_seeds]`` and placement counts
``w_p [num_placements]`` (multinomial counts of the resampled indices) has mean
``w_s^T S w_p / (sum(w_s) * sum(w_p))``, computed for all replicates in one einsum. A task's
rate uses the columns of its placements, and so the weights of those placements that the
replicate drew (their number varies from replicate to replicate).

Records (the raw per-episode results, ``docs/results/*/episodes.jsonl``) are dicts with at least
``row``, ``seed``, ``task``, ``placement`` and ``success``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_REPLICATES = 10_000
# A gap-closed ratio gets an interval only when its denominator (upper bound - baseline) is
# positive in at least 95 % of the replicates: where it crosses zero the ratio has no interval
# that means anything (near-zero denominators send it to +-infinity).
MAX_UNDEFINED_FRACTION = 0.05


def success_matrix(records: Iterable[Mapping[str, Any]], row: str,
                   placements: Sequence[tuple[str, int]] | None = None) -> tuple[np.ndarray, list, list]:
    """``(S [num_seeds, num_placements] float64, seeds, placements)`` of ``row``'s records.

    ``placements`` fixes the column order (default: sorted (task, placement) pairs of the row).
    Every seed must have exactly one record per placement: a missing or duplicated episode
    raises ``ValueError`` naming the row, seed and placement, since a silently unbalanced
    matrix would bias the paired comparison.
    """
    cells: dict[tuple[int, tuple[str, int]], float] = {}
    for r in records:
        if r["row"] != row:
            continue
        key = (int(r["seed"]), (str(r["task"]), int(r["placement"])))
        if key in cells:
            raise ValueError(f"row {row!r}: seed {key[0]} has two records for placement {key[1]}")
        cells[key] = float(bool(r["success"]))
    if not cells:
        raise ValueError(f"no records for row {row!r}")
    seeds = sorted({s for s, _ in cells})
    if placements is None:
        placements = sorted({p for _, p in cells})
    placements = [(str(t), int(i)) for t, i in placements]
    matrix = np.empty((len(seeds), len(placements)))
    for a, seed in enumerate(seeds):
        for b, place in enumerate(placements):
            if (seed, place) not in cells:
                raise ValueError(f"row {row!r}: seed {seed} has no record for placement {place}")
            matrix[a, b] = cells[(seed, place)]
    extra = {p for _, p in cells} - set(placements)
    if extra:
        raise ValueError(f"row {row!r}: placements {sorted(extra)[:3]} are not in the shared placement list")
    return matrix, seeds, placements


def resample_counts(rng: np.random.Generator, size: int, replicates: int) -> np.ndarray:
    """``[replicates, size]`` counts of ``size`` indices drawn with replacement (each row sums to
    ``size``): the weights of one bootstrap resample per replicate."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=replicates).astype(np.float64)


def replicate_means(matrix: np.ndarray, seed_counts: np.ndarray, place_counts: np.ndarray) -> np.ndarray:
    """``[R]`` resampled means of ``matrix [S, P]`` under ``seed_counts [R, S]`` and
    ``place_counts [R, P]``: each replicate's weighted mean, divided by the weight it drew (a
    subset of the placements, e.g. one task's, may draw any number of them); NaN where it drew none."""
    weight = seed_counts.sum(axis=1) * place_counts.sum(axis=1)
    total = np.einsum("rs,sp,rp->r", seed_counts, matrix, place_counts)
    return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of the finite ``samples``; ``[nan, nan]`` when none is finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(finite, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def compare(records: Sequence[Mapping[str, Any]], rows: Sequence[str], *,
            contrasts: Sequence[tuple[str, str]] = (), gaps: Sequence[tuple[str, str, str]] = (),
            seed_groups: Sequence[Sequence[str]] = (),
            replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Means, intervals, per-task rates and seed spread of ``rows``; paired ``contrasts``
    ``(a, b)`` as ``a - b``; ``gaps`` ``(x, base, top)`` as ``(x - base) / (top - base)``.

    All rows must share one placement list (the comparison's design); each row may have its
    own seeds. The rows of a ``seed_groups`` group are the same training runs (another
    checkpoint of each) and must have the same seeds: they share one seed draw per replicate.
    Returns ``{"rows": {row: {...}}, "contrasts": {"a - b": {...}}, "gaps": {...},
    "placements": N, "replicates": R}``; every interval is a percentile interval over the same
    ``replicates`` cluster-bootstrap replicates (``seed`` fixes the draws, so the figures are
    reproducible from the records). A contrast or gap naming a row not in ``rows`` is an error.
    """
    missing = sorted({r for pair in [*contrasts, *gaps, *seed_groups] for r in pair} - set(rows))
    if missing:
        raise ValueError(f"contrasts, gaps or seed groups name rows that are not compared: {missing}")
    group_of = {}
    for group in seed_groups:
        for row in group:
            if row in group_of:
                raise ValueError(f"row {row!r} is in two seed groups")
            group_of[row] = tuple(group)
    rng = np.random.default_rng(seed)
    first, _, placements = success_matrix(records, rows[0])
    del first
    matrices = {row: success_matrix(records, row, placements) for row in rows}
    for group in seed_groups:
        seed_lists = {row: matrices[row][1] for row in group}
        if len({tuple(v) for v in seed_lists.values()}) > 1:
            raise ValueError(f"seed group {list(group)}: the rows must have the same seeds, got {seed_lists}")
    place_counts = resample_counts(rng, len(placements), replicates)
    samples, out_rows, group_draws = {}, {}, {}
    tasks = sorted({t for t, _ in placements})
    for row in rows:
        matrix, seeds, _ = matrices[row]
        group = group_of.get(row, (row,))
        if group not in group_draws:
            group_draws[group] = resample_counts(rng, len(seeds), replicates)
        seed_counts = group_draws[group]
        samples[row] = replicate_means(matrix, seed_counts, place_counts)
        per_task = {}
        for task in tasks:
            cols = np.array([t == task for t, _ in placements])
            # NaN (no estimate) in a replicate that drew none of the task's placements.
            task_samples = replicate_means(matrix[:, cols], seed_counts, place_counts[:, cols])
            per_task[task] = {"success_rate": float(matrix[:, cols].mean()),
                              "ci95": interval(task_samples, level)}
        per_seed = matrix.mean(axis=1)
        out_rows[row] = {
            "success_rate": float(matrix.mean()), "ci95": interval(samples[row], level),
            "episodes": int(matrix.size), "successes": int(matrix.sum()), "seeds": seeds,
            "per_seed": {str(s): float(v) for s, v in zip(seeds, per_seed)},
            "seed_std": float(per_seed.std(ddof=1)) if len(seeds) > 1 else 0.0,
            "tasks": per_task,
        }
    out_contrasts = {}
    for a, b in contrasts:
        diff = samples[a] - samples[b]
        out_contrasts[f"{a} - {b}"] = {
            "difference": out_rows[a]["success_rate"] - out_rows[b]["success_rate"], "ci95": interval(diff, level),
            # The bootstrap's one-sided share of replicates at or below zero (a > b is supported
            # when it is small).
            "p_not_greater": float(np.mean(diff <= 0)),
        }
    out_gaps = {}
    for x, base, top in gaps:
        denom = samples[top] - samples[base]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(denom > 0, (samples[x] - samples[base]) / denom, np.nan)
        point_denom = out_rows[top]["success_rate"] - out_rows[base]["success_rate"]
        point = ((out_rows[x]["success_rate"] - out_rows[base]["success_rate"]) / point_denom
                 if point_denom > 0 else float("nan"))
        # Replicates where the upper bound did not beat the baseline leave the ratio undefined.
        undefined = float(np.mean(~np.isfinite(ratio)))
        out_gaps[f"({x} - {base}) / ({top} - {base})"] = {
            "gap_closed": point, "undefined_fraction": undefined,
            "ci95": (interval(ratio, level) if undefined <= MAX_UNDEFINED_FRACTION
                     else [float("nan"), float("nan")]),
        }
    return {"rows": out_rows, "contrasts": out_contrasts, "gaps": out_gaps, "placements": len(placements),
            "replicates": int(replicates), "level": level}
