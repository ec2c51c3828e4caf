"""Procedurally rendered tabletop scenes: frames with no simulator dependency.

Each scene is a wall with a light gradient, a table plane seen in perspective, soft shadows and
3-6 shaded objects (boxes, discs, a two-finger gripper). Used by tests and as a fallback image
source; real training uses Meta-World renders (``scripts/make_metaworld_dataset.py``).
"""

from __future__ import annotations

import numpy as np


def _smoothstep(edge0, edge1, x):
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def render_scene(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One scene -> uint8 [size, size, 3]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    horizon = rng.uniform(0.3, 0.45)
    wall = rng.uniform(0.45, 0.8, 3)
    table = rng.uniform(0.3, 0.7, 3) * np.array([1.0, 0.85, 0.7])
    light = 1.0 - 0.35 * x[..., None] * rng.uniform(0.3, 1.0)
    is_table = _smoothstep(horizon - 0.01, horizon + 0.01, y)[..., None]
    depth = np.clip((y - horizon) / (1 - horizon), 0, 1)[..., None]
    grain = 0.04 * np.sin(2 * np.pi * (x * rng.uniform(6, 14) + 3 * depth[..., 0] ** 2))[..., None]
    image = (1 - is_table) * wall * light + is_table * (table * (0.7 + 0.3 * depth) + grain)

    for _ in range(rng.integers(3, 7)):
        cx, cy = rng.uniform(0.15, 0.85), rng.uniform(horizon + 0.1, 0.92)
        scale = 0.05 + 0.12 * (cy - horizon) / (1 - horizon)
        color = rng.uniform(0.05, 1.0, 3)
        # Soft contact shadow under the object.
        shadow = np.exp(-(((x - cx - 0.02) / (1.3 * scale)) ** 2 + ((y - cy - 0.015) / (0.5 * scale)) ** 2))
        image *= 1 - 0.35 * shadow[..., None]
        kind = rng.integers(0, 3)
        if kind == 0:  # box with a lit top face
            half_w, half_h = scale * rng.uniform(0.6, 1.2), scale * rng.uniform(0.6, 1.4)
            body = _smoothstep(-0.01, 0.0, half_w - np.abs(x - cx)) * _smoothstep(-0.01, 0.0, half_h - np.abs(y - cy))
            top = body * (y < cy - 0.5 * half_h)
            shade = 0.75 + 0.25 * (x - cx) / max(half_w, 1e-3)
            image = image * (1 - body[..., None]) + body[..., None] * color * shade[..., None]
            image += 0.15 * top[..., None]
        elif kind == 1:  # disc / puck with a specular highlight
            r = np.hypot((x - cx) / scale, (y - cy) / (0.8 * scale))
            body = _smoothstep(1.02, 0.98, r)
            highlight = np.exp(-((x - cx + 0.3 * scale) ** 2 + (y - cy + 0.3 * scale) ** 2) / (0.1 * scale**2))
            image = image * (1 - body[..., None]) + body[..., None] * (color * (1 - 0.3 * r[..., None]) + 0.4 * highlight[..., None])
        else:  # gripper: a bar with two fingers
            bar = (np.abs(y - cy) < 0.25 * scale) & (np.abs(x - cx) < scale)
            gap = rng.uniform(0.3, 0.8) * scale
            fingers = (np.abs(np.abs(x - cx) - gap) < 0.15 * scale) & (y > cy) & (y < cy + 1.5 * scale)
            mask = (bar | fingers).astype(np.float32)[..., None]
            image = image * (1 - mask) + mask * np.array([0.2, 0.22, 0.25]) * (0.8 + 0.4 * (1 - y[..., None]))
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def render_scenes(num: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """``num`` scenes -> uint8 [num, size, size, 3], deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([render_scene(rng, size) for _ in range(num)])
