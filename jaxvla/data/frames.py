"""Single frames for the image tokenizer: an in-memory, random-access set with seeded batches.

Batch ``s`` of a run is a pure function of (seed, s): a resumed run, a run on another mesh and a
multi-process run all see the same global batch, each process taking its contiguous share.
"""

from __future__ import annotations

import os
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


def load_rlds_images(builder_dir: str, split: str = "train", image_key: str = "observation/image", max_frames: int | None = None) -> np.ndarray:
    """All frames of one split of an RLDS (TFDS) dataset -> uint8 [N, H, W, 3].

    ``builder_dir`` is the dataset's version directory (holding ``dataset_info.json``).
    Raises FileNotFoundError / KeyError naming the path, the key and the keys that exist.
    """
    import tensorflow_datasets as tfds

    if not os.path.exists(os.path.join(builder_dir, "dataset_info.json")):
        raise FileNotFoundError(
            f"{builder_dir}: not a TFDS dataset directory (no dataset_info.json); generate one "
            "with scripts/make_metaworld_dataset.py"
        )
    builder = tfds.builder_from_directory(builder_dir)
    if split not in builder.info.splits:
        raise KeyError(f"{builder_dir}: no split {split!r}; splits: {list(builder.info.splits)}")
    observation_keys = image_key.split("/")
    step_features = builder.info.features["steps"].feature
    node = step_features
    for part in observation_keys:
        if part not in node:
            raise KeyError(
                f"{builder_dir}: step feature {image_key!r} not found; step keys: {list(step_features.keys())}"
            )
        node = node[part]

    def images(episode):
        def pick(step):
            value = step
            for part in observation_keys:
                value = value[part]
            return value

        return episode["steps"].map(pick)

    dataset = builder.as_dataset(split=split, shuffle_files=False).flat_map(images)
    if max_frames:
        dataset = dataset.take(max_frames)
    frames = [batch for batch in dataset.batch(256).as_numpy_iterator()]
    if not frames:
        raise ValueError(f"{builder_dir}: split {split!r} has no frames")
    return np.concatenate(frames).astype(np.uint8)
