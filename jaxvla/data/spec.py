"""``DatasetSpec``: how the pipeline reads one dataset (the one definition of the type).

No imports beyond the standard library, so the modules that build specs (``jaxvla.data.video``,
``jaxvla.data.lerobot``) and the registry that holds them (``jaxvla.data.registry``, which
re-exports ``DatasetSpec``) import it at module level without a cycle.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from jaxvla.data.oxe import RawLayout  # the ``layout`` annotation only: this module imports nothing

DATASET_KINDS = ("robot", "human")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset.

    name: dataset name (traj keys, statistics, logs).
    builder_dir: TFDS version dir; absolute, or relative to ``data_dir``; "" -> ``<data_dir>/<name>``
      (its newest version), or ``data_dir`` itself when that is a version dir.
    standardize_fn: raw RLDS trajectory -> schema dict (callable, e.g. a ``RawLayout``, or
      "module:function").
    control_hz: control frequency (robot) or frames per second (video), for the frame gap.
    kind: "robot" (default gap ``gaps.ROBOT_GAP_SECONDS``) or "human" (``gaps.HUMAN_GAP_SECONDS``).
    gap_frames: a fixed gap in frames (e.g. 3 on Bridge), overriding seconds x hz.
    train_split, val_split: split names (TFDS slices allowed).
    image_shape: expected decoded (H, W) of this dataset's images (checked), or None.
    gripper_dims: binary action dims (bin edges; left unnormalised by default).
    normalize_mask: per action dim, True = normalised (None: every dim but ``gripper_dims``).
    fingerprint: a hash of the standardisation mapping (part of the statistics cache key).
    few_demo_task_key / few_demo_order_key: keys identifying an episode's task and its order for
      ``few_demos_per_task`` ("episode_metadata/..." keys read the raw layout).
    trajectories_fn: for non-RLDS sources (e.g. human video): ``(split=, train=, seed=,
      process_index=, process_count=, data_dir=) -> TrajDataset`` of schema trajectories;
      replaces the RLDS reader. ``data_dir`` is ``config.data.data_dir`` (the
      ``video_folder`` entry's ``video.VideoFolderSource`` reads that folder; others may ignore it).
    layout: the ``oxe.RawLayout`` behind ``standardize_fn`` when there is one (its ``raw_keys()``,
      cameras, action parts, conventions), else None.
    """

    name: str
    builder_dir: str = ""
    standardize_fn: Callable | str | None = None
    control_hz: float | None = None
    kind: str = "robot"
    gap_frames: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    image_shape: tuple[int, ...] | None = None
    gripper_dims: tuple[int, ...] = (-1,)
    normalize_mask: tuple[bool, ...] | None = None
    fingerprint: str = ""
    few_demo_task_key: str = "task/language_instruction"
    few_demo_order_key: str | None = None
    trajectories_fn: Callable[..., Any] | None = None
    layout: RawLayout | None = None

    def __post_init__(self):
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"dataset {self.name!r}: kind {self.kind!r} not in {DATASET_KINDS}")
        # Sequences given as lists become tuples (the spec stays hashable).
        for field in ("gripper_dims", "image_shape", "normalize_mask"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, tuple):
                cast = bool if field == "normalize_mask" else int
                object.__setattr__(self, field, tuple(cast(v) for v in value))
