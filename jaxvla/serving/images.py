"""Fitting a client's camera frames to the policy's square input size (numpy only, no JAX).

A uint8 ``[H, W, C]`` frame is center-cropped to a square (side ``min(H, W)``, the excess of the
longer side split evenly, an odd pixel left at the bottom / right), then resized to
``[size, size, C]``:

* shrinking: area averaging (each output pixel is the mean of the input area it covers, partial
  pixels weighted by their overlap), as OpenCV's ``INTER_AREA``;
* enlarging: bilinear interpolation with half-pixel centres and clamped edges (as PIL's
  ``BILINEAR`` when enlarging).

Both are separable, integer-weighted sums, computed exactly (float64 holds them without
rounding) and rounded half up once to uint8, so the result does not depend on summation order.
"""

from __future__ import annotations

import numpy as np


def center_crop_square(frame: np.ndarray) -> np.ndarray:
    """The central ``[s, s, ...]`` square of ``frame`` ``[H, W, ...]``, s = min(H, W) (a view)."""
    height, width = frame.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return frame[top : top + side, left : left + side]


def resize_weights(src: int, dst: int) -> tuple[np.ndarray, int]:
    """Integer weights ``[dst, src]`` (as float64) and their common row sum: output pixel i of a
    length-``dst`` axis is ``weights[i] @ input / row_sum`` for a length-``src`` input axis."""
    if src < 1 or dst < 1:
        raise ValueError(f"cannot resize an axis of {src} pixels to {dst}")
    out = np.arange(dst)[:, None]
    if src == dst:
        return np.eye(dst), 1
    if src > dst:
        # Area: in units of 1/dst input pixels, input pixel j spans [j*dst, (j+1)*dst) and output
        # pixel i spans [i*src, (i+1)*src); a weight is their overlap, a row sums to src.
        j = np.arange(src)[None, :]
        overlap = np.minimum((j + 1) * dst, (out + 1) * src) - np.maximum(j * dst, out * src)
        return np.maximum(overlap, 0).astype(np.float64), src
    # Bilinear: output pixel i samples input position (i + 1/2) * src / dst - 1/2, in units of
    # 1 / (2 dst) input pixels (2i + 1) * src - dst; the two neighbours share 2 dst by distance.
    row_sum = 2 * dst
    position = (2 * out[:, 0] + 1) * src - dst
    left = position // row_sum  # floor, also for the negative positions before pixel 0's centre
    frac = position - left * row_sum
    weights = np.zeros((dst, src), np.float64)
    rows = np.arange(dst)
    np.add.at(weights, (rows, np.clip(left, 0, src - 1)), row_sum - frac)
    np.add.at(weights, (rows, np.clip(left + 1, 0, src - 1)), frac)
    return weights, row_sum


def resize_square(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[s, s, C]`` -> uint8 ``[size, size, C]`` (area when shrinking, bilinear when
    enlarging; see the module docstring)."""
    side = frame.shape[0]
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[1] != side:
        raise ValueError(f"expected a square uint8 [s, s, C] frame, got {frame.dtype} {frame.shape}")
    if side == size:
        return frame
    weights, row_sum = resize_weights(side, size)
    channels = frame.shape[2]
    rows = weights @ frame.reshape(side, side * channels).astype(np.float64)  # [size, side * C]
    # Columns: one [size * C, side] @ [side, size] product, back to [size, size, C].
    columns = rows.reshape(size, side, channels).transpose(0, 2, 1).reshape(-1, side) @ weights.T
    total = columns.reshape(size, channels, size).transpose(0, 2, 1).astype(np.int64)  # exact
    denominator = row_sum * row_sum
    return np.minimum((2 * total + denominator) // (2 * denominator), 255).astype(np.uint8)


def fit_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """Center-crop uint8 ``[H, W, C]`` to a square and resize it to ``[size, size, C]``; a frame
    already that size is returned as is."""
    if frame.ndim != 3 or min(frame.shape[:2]) < 1:
        raise ValueError(f"expected a uint8 [H, W, C] frame with H, W >= 1, got shape {frame.shape}")
    if frame.shape[:2] == (size, size):
        return frame
    return resize_square(np.ascontiguousarray(center_crop_square(frame)), size)
