"""Evidence that an LAQ's codes are used and carry action information (``scripts/eval_laq.py``).

On held-out episodes:

* reconstruction PSNR with hard codes vs the copy-the-current-frame baseline (predicting
  x_{t+H} = x_t), from the mean squared error over all held-out transitions;
* code perplexity (``exp`` of the entropy of code usage over all held-out tokens) and the fraction
  of the codebook used;
* a linear probe: ridge regression from the one-hot codes of a transition (``M x K`` features) to
  the ground-truth action of that transition (lapa: the actions summed over the gap H; vipra: summed
  over the clip stride, i.e. per transition), fitted on the training split and scored (R^2, mean
  over action dimensions with non-zero variance) on the held-out split; and the same probe with the
  codes shuffled across transitions (the chance level, about 0 or below).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def one_hot_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """``[N, M]`` int codes -> ``[N, M * K]`` float64 one-hot features."""
    codes = np.asarray(codes)
    flat = np.zeros((codes.shape[0], codes.shape[1] * codebook_size), np.float64)
    rows = np.arange(codes.shape[0])[:, None]
    flat[rows, np.arange(codes.shape[1])[None, :] * codebook_size + codes] = 1.0
    return flat


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


def r2_scores(targets: np.ndarray, predictions: np.ndarray, min_variance: float = 1e-12) -> np.ndarray:
    """Per-dimension coefficient of determination ``1 - SSE / SST``; NaN where the targets are constant."""
    y = np.asarray(targets, np.float64)
    sse = np.sum(np.square(y - predictions), 0)
    sst = np.sum(np.square(y - y.mean(0)), 0)
    return np.where(sst > min_variance * len(y), 1.0 - sse / np.maximum(sst, 1e-300), np.nan)


def probe_r2(train_codes, train_actions, test_codes, test_actions, codebook_size: int, *, ridge: float = 1e-3,
             shuffle_seed: int | None = None) -> dict[str, Any]:
    """R^2 of the linear probe codes -> actions (fit on train, scored on test). With
    ``shuffle_seed`` the codes of both sets are permuted across transitions first (chance level)."""
    train_codes, test_codes = np.asarray(train_codes), np.asarray(test_codes)
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        train_codes = train_codes[rng.permutation(len(train_codes))]
        test_codes = test_codes[rng.permutation(len(test_codes))]
    weights, intercept = fit_ridge(one_hot_codes(train_codes, codebook_size), train_actions, ridge)
    predictions = one_hot_codes(test_codes, codebook_size) @ weights + intercept
    per_dim = r2_scores(test_actions, predictions)
    return {"r2": float(np.nanmean(per_dim)) if np.any(~np.isnan(per_dim)) else float("nan"),
            "r2_per_dim": [None if np.isnan(v) else float(v) for v in per_dim]}


def transition_actions(batch: dict, variant: str, num_transitions: int) -> np.ndarray:
    """Ground-truth action of every transition of a pipeline batch: ``[B, K, A]`` (masked sums)."""
    action = np.asarray(batch["action"], np.float64)
    mask = np.asarray(batch["has_action"], bool)[..., None]
    action = np.where(mask, action, 0.0)
    if variant == "lapa":
        return action.sum(1, keepdims=True)
    rows, steps, dims = action.shape
    stride = steps // num_transitions
    return action[:, : stride * num_transitions].reshape(rows, num_transitions, stride, dims).sum(2)


def _split_config(data_config, split: str):
    import ml_collections

    config = ml_collections.ConfigDict(data_config.to_dict())
    config.eval_split = split
    config.eval_repeat = False
    config.shuffle_buffer = 0
    config.check_nonempty = True
    return config


def collect(laq, data_config, split: str, *, batch_size: int, max_batches: int = 0, progress: bool = False) -> dict:
    """Runs the LAQ over one split (in order, no augmentation): codes [N, M] and actions [N, A] per
    transition, plus squared-error sums of the reconstruction and of the copy-frame baseline."""
    from tqdm import tqdm

    from jaxvla.data.pipeline import make_batches
    from jaxvla.losses.tokenizer import images_to_float

    model = laq.model

    @jax.jit
    def run(params, frames):
        x = images_to_float(frames)
        out = model.apply({"params": params}, x, train=False)
        target = x[:, 1:]
        recon = jnp.clip(out["recon"], -1.0, 1.0)
        return out["indices"], jnp.sum(jnp.square(recon - target)), jnp.sum(jnp.square(x[:, :-1] - target))

    params = jax.device_put(laq.params)
    batches = make_batches(_split_config(data_config, split), batch_size=batch_size, train=False, seed=0)
    codes, actions = [], []
    recon_se = copy_se = 0.0
    values = 0
    for index, batch in enumerate(tqdm(batches, desc=f"LAQ on {split}", unit="batch", disable=not progress)):
        if max_batches and index >= max_batches:
            break
        frames = batch["observation"]["image_primary"]
        indices, r, c = run(params, frames)
        codes.append(np.asarray(indices).reshape(-1, model.code_tokens))
        actions.append(transition_actions(batch, model.variant, model.num_transitions).reshape(-1, batch["action"].shape[-1]))
        recon_se += float(r)
        copy_se += float(c)
        values += int(np.prod(frames.shape)) // frames.shape[1] * (frames.shape[1] - 1)
    if not codes:
        raise ValueError(f"split {split!r} gave no batch of {batch_size}; lower --batch_size")
    return {"codes": np.concatenate(codes), "actions": np.concatenate(actions), "recon_mse": recon_se / values,
            "copy_mse": copy_se / values}


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(4.0 / max(mse, 1e-10))


def code_usage(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size).astype(np.float64)
    probs = counts / max(counts.sum(), 1.0)
    nonzero = probs[probs > 0]
    return {"perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
            "used_fraction": float(np.mean(counts > 0))}


def evaluate_laq(laq, data_config=None, *, train_split: str = "train", eval_split: str = "val", batch_size: int = 32,
                 max_batches: int = 0, ridge: float = 1e-3, shuffle_seed: int = 0, progress: bool = False) -> dict:
    """All figures of the module docstring for a ``LoadedLAQ`` (``jaxvla.latent_actions.load_laq``).
    ``data_config`` defaults to the LAQ's own ``config.data``."""
    data_config = data_config or laq.config.data
    held_out = collect(laq, data_config, eval_split, batch_size=batch_size, max_batches=max_batches, progress=progress)
    fit = collect(laq, data_config, train_split, batch_size=batch_size, max_batches=max_batches, progress=progress)
    k = laq.model.codebook_size
    probe = probe_r2(fit["codes"], fit["actions"], held_out["codes"], held_out["actions"], k, ridge=ridge)
    chance = probe_r2(fit["codes"], fit["actions"], held_out["codes"], held_out["actions"], k, ridge=ridge,
                      shuffle_seed=shuffle_seed)
    usage = code_usage(held_out["codes"], k)
    return {
        "checkpoint": laq.checkpoint,
        "step": laq.step,
        "variant": laq.model.variant,
        "eval_split": eval_split,
        "train_split": train_split,
        "held_out_transitions": int(len(held_out["codes"])),
        "probe_fit_transitions": int(len(fit["codes"])),
        "psnr": _psnr(held_out["recon_mse"]),
        "psnr_copy_baseline": _psnr(held_out["copy_mse"]),
        "code_perplexity": usage["perplexity"],
        "codes_used_fraction": usage["used_fraction"],
        "codebook_size": k,
        "probe_r2": probe["r2"],
        "probe_r2_per_dim": probe["r2_per_dim"],
        "shuffled_probe_r2": chance["r2"],
        "shuffled_probe_r2_per_dim": chance["r2_per_dim"],
    }


def format_report(result: dict) -> str:
    """The figures as a small Markdown table."""
    rows = [
        ("reconstruction PSNR (dB)", f"{result['psnr']:.2f}"),
        ("copy-frame baseline PSNR (dB)", f"{result['psnr_copy_baseline']:.2f}"),
        ("code perplexity", f"{result['code_perplexity']:.2f} of {result['codebook_size']}"),
        ("codes used", f"{result['codes_used_fraction']:.0%}"),
        ("linear probe R^2 (actions from codes)", f"{result['probe_r2']:.3f}"),
        ("same probe, shuffled codes", f"{result['shuffled_probe_r2']:.3f}"),
    ]
    lines = [f"LAQ {result['variant']} at step {result['step']}: {result['held_out_transitions']} held-out transitions "
             f"({result['eval_split']}), probe fitted on {result['probe_fit_transitions']} ({result['train_split']})",
             "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)
