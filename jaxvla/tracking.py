"""Where metrics and pictures go: TensorBoard event files, optional wandb, PNG grids.

Only process 0 writes; the other processes get a writer that does nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

from jaxvla.io.files import atomic_path

log = logging.getLogger("jaxvla")


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] images (uint8, or float in [-1, 1]) -> one uint8 grid image [H', W', C]."""
    images = to_uint8(np.asarray(images))
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 passes through; floats are read as [-1, 1]."""
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_figure(fig, path: str) -> str:
    """Writes a matplotlib figure as PNG atomically and closes it; returns ``path``."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def save_png(path: str, image: np.ndarray) -> None:
    """Writes an [H, W, 3] image atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(to_uint8(image)).save(tmp)
    os.replace(tmp, path)


class MetricWriter:
    """Scalars and images to TensorBoard (``<workdir>/tb``) and, if enabled, wandb."""

    def __init__(self, workdir: str, enabled: bool = True, wandb_config: Any = None, run_config: dict | None = None):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
        if wandb_config is not None and wandb_config.enabled:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "config.wandb.enabled=True but wandb is not installed: pip install 'jaxvla[wandb]'"
                ) from e
            self._wandb = wandb.init(
                project=wandb_config.project,
                entity=wandb_config.entity or None,
                name=wandb_config.name or os.path.basename(os.path.abspath(workdir)),
                config=run_config,
                dir=workdir,
            )

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            self._tb.add_scalar(key, float(value), step)
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in metrics.items()}, step=step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
        """Writes each [N, H, W, 3] batch as a grid PNG under ``<workdir>/images``; returns paths."""
        if not self.enabled:
            return []
        paths = []
        for key, batch in images.items():
            grid = image_grid(batch)
            path = os.path.join(self.workdir, "images", f"{key.replace('/', '_')}_{step:07d}.png")
            save_png(path, grid)
            paths.append(path)
            self._tb.add_image(key, grid, step, dataformats="HWC")
            if self._wandb is not None:
                import wandb

                self._wandb.log({key: wandb.Image(grid)}, step=step)
        return paths

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
