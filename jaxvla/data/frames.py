"""Single frames for the image tokenizer: an in-memory, random-access set with seeded batches
(the frames come from ``jaxvla.stages.tokenizer.load_frames``: the data pipeline's reader,
``jaxvla.data.pipeline.trajectory_frames``, or procedural scenes).

Batch ``s`` of a run is a pure function of (seed, s): a resumed run, a run on another mesh and a
multi-process run all see the same global batch, each process taking its contiguous share.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class FrameDataset:
    """Frames uint8 [N, H, W, 3] served as ``{"image": [B_local, H, W, 3]}`` batches."""

    def __init__(self, frames: np.ndarray, name: str = "frames"):
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"{name}: expected uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}"
            )
        if len(frames) == 0:
            raise ValueError(f"{name}: no frames")
        self.frames = frames
        self.name = name

    def __len__(self) -> int:
        return len(self.frames)

    def batch_indices(self, step: int, global_batch: int, seed: int) -> np.ndarray:
        """The global batch's frame indices at ``step`` (same on every process)."""
        return np.random.default_rng([seed, step]).integers(0, len(self.frames), size=global_batch)

    def batches(
        self, start_step: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict]:
        """This process's rows of each global batch from ``start_step`` on, forever."""
        local = global_batch // process_count
        step = start_step
        while True:
            rows = self.batch_indices(step, global_batch, seed)[process_index * local : (process_index + 1) * local]
            yield {"image": self.frames[rows]}
            step += 1

