"""The dataset registry: one ``DatasetSpec`` per dataset name, the one place names are resolved.

    from jaxvla.data.registry import get_dataset_spec, register_dataset, dataset_gap
    spec = get_dataset_spec("bridge")          # alias -> the "bridge_dataset" entry
    spec.layout.raw_keys()                     # its Open-X raw layout (jaxvla.data.oxe.RawLayout)
    dataset_gap(spec)                          # 3: LAPA's H, 0.6 s at 5 Hz

A ``DatasetSpec`` says how the pipeline (``jaxvla.data.pipeline``) reads one dataset: where its
TFDS builder lives, the function that standardises a raw RLDS trajectory to the schema
(``jaxvla.data.schema``), its control rate, its gripper dims, ... The registry holds

* every Open-X layout of ``jaxvla.data.oxe.OXE_LAYOUTS`` (``spec_from_layout``: the layout is the
  ``standardize_fn`` and stays introspectable as ``spec.layout``);
* ``metaworld``: the Meta-World RLDS data of ``jaxvla.data.metaworld_rlds``, standardised by
  ``oxe.METAWORLD_LAYOUT`` (``metaworld_mt10`` / ``metaworld_mt50`` are aliases: same builder, same
  mapping);
* ``video_folder``: any folder of clips named by ``config.data.data_dir`` (``jaxvla.data.video``);
* ``lerobot``: any LeRobot dataset directory named by ``config.data.data_dir``
  (``jaxvla.data.lerobot``);
* whatever ``register_dataset`` adds (``register_video_folder``: a folder of clips,
  ``register_lerobot``: a LeRobot directory, under names of their own).

``DatasetSpec`` itself is defined in ``jaxvla.data.spec`` (no dependencies, so ``video`` and
``lerobot`` build specs without importing this module) and re-exported here.

``get_dataset_spec`` accepts registry names and ``ALIASES``, case-insensitively; unknown names
raise a KeyError listing close and known names. Mixtures of these names are resolved by
``jaxvla.data.mixtures.resolve_mixture`` (the only mixture parser). The frame gap of a spec is
``dataset_gap`` (``jaxvla.data.gaps.frame_gap`` of its rate and the robot / human span).

No TensorFlow here (``jaxvla.data.oxe`` imports it lazily).
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Mapping

from jaxvla.data import lerobot as lerobot_lib
from jaxvla.data import oxe
from jaxvla.data import video as video_lib
from jaxvla.data.gaps import HUMAN_GAP_SECONDS, ROBOT_GAP_SECONDS, frame_gap
from jaxvla.data.oxe import RawLayout
from jaxvla.data.spec import DatasetSpec  # defined there (no dependencies), re-exported here


def spec_from_layout(layout: RawLayout, **overrides: Any) -> DatasetSpec:
    """The registry entry of an RLDS dataset described by ``layout``: its builder directory is
    ``<data_dir>/<layout.tfds_name>`` (newest version), the layout standardises it."""
    fields = dict(
        name=layout.name,
        builder_dir=layout.tfds_name,
        standardize_fn=layout,
        control_hz=layout.control_hz,
        gripper_dims=layout.gripper_dims,
        normalize_mask=layout.normalize_mask,
        fingerprint=layout.fingerprint(),
        layout=layout,
    )
    fields.update(overrides)
    return DatasetSpec(**fields)


# Meta-World (jaxvla.data.metaworld_rlds): episodes of a task ordered by their id for few-demo
# subsets; the builder is written as metaworld/1.0.0.
METAWORLD_SPEC = spec_from_layout(
    oxe.METAWORLD_LAYOUT,
    builder_dir="metaworld/1.0.0",
    few_demo_task_key="episode_metadata/task",
    few_demo_order_key="episode_metadata/episode_id",
)

# Any folder of clips, named by config.data.data_dir (jaxvla.data.video: 12 fps, center-cropped
# square frames, the folder's labels.json as instructions when present); register_video_folder
# adds folders under names of their own (other rates, crops, labels, or several in a mixture).
VIDEO_FOLDER_SPEC = video_lib.video_folder_spec()
# Any LeRobot dataset directory (v2.x / v3.0), named by config.data.data_dir (jaxvla.data.lerobot);
# register_lerobot adds directories under names of their own (with their fps, cameras, gripper).
LEROBOT_SPEC = lerobot_lib.lerobot_spec()

_DATASETS: dict[str, DatasetSpec] = {
    **{name: spec_from_layout(layout) for name, layout in oxe.OXE_LAYOUTS.items()},
    METAWORLD_SPEC.name: METAWORLD_SPEC,
    VIDEO_FOLDER_SPEC.name: VIDEO_FOLDER_SPEC,
    LEROBOT_SPEC.name: LEROBOT_SPEC,
}

# Short names accepted by get_dataset_spec (and in mixture strings).
ALIASES: dict[str, str] = {
    "fractal": "fractal20220817_data",
    "rt1": "fractal20220817_data",
    "bridge": "bridge_dataset",
    "nyu_door_opening": "nyu_door_opening_surprising_effectiveness",
    "cable_routing": "berkeley_cable_routing",
    "stanford_hydra": "stanford_hydra_dataset_converted_externally_to_rlds",
    "austin_buds": "austin_buds_dataset_converted_externally_to_rlds",
    "nyu_franka_play": "nyu_franka_play_dataset_converted_externally_to_rlds",
    "furniture_bench": "furniture_bench_dataset_converted_externally_to_rlds",
    "ucsd_kitchen": "ucsd_kitchen_dataset_converted_externally_to_rlds",
    "austin_sailor": "austin_sailor_dataset_converted_externally_to_rlds",
    "austin_sirius": "austin_sirius_dataset_converted_externally_to_rlds",
    "dlr_edan_shared_control": "dlr_edan_shared_control_converted_externally_to_rlds",
    "iamlab_cmu_pickup_insert": "iamlab_cmu_pickup_insert_converted_externally_to_rlds",
    "berkeley_fanuc": "berkeley_fanuc_manipulation",
    "fmb": "fmb_dataset",
    "berkeley_fmb": "fmb_dataset",
    "metaworld_mt10": "metaworld",  # the MT10 / MT50 task sets: the same builder and mapping
    "metaworld_mt50": "metaworld",
}
for _alias, _target in ALIASES.items():
    if _target not in _DATASETS or _alias in _DATASETS:
        raise RuntimeError(f"bad alias {_alias!r} -> {_target!r}")


def register_dataset(spec: DatasetSpec | RawLayout) -> DatasetSpec:
    """Makes ``spec`` available by name (``config.data.dataset``, mixtures); a ``RawLayout``
    becomes ``spec_from_layout(layout)``. Returns the registered spec."""
    if isinstance(spec, RawLayout):
        spec = spec_from_layout(spec)
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset takes a DatasetSpec or an oxe.RawLayout, got {type(spec).__name__}")
    if spec.name in ALIASES:
        raise ValueError(f"dataset name {spec.name!r} is an alias of {ALIASES[spec.name]!r}")
    _DATASETS[spec.name] = spec
    return spec


def register_video_folder(name: str, video_dir: str | os.PathLike, **settings: Any) -> DatasetSpec:
    """Registers a folder of clips as pipeline dataset ``name`` (``video.video_folder_spec(video_dir,
    name, **settings)``: labels, fps, crop, image_size, extensions, recursive, num_workers,
    action_dim), so ``config.data.dataset = name`` (or a mixture naming it) reads it; returns the
    spec."""
    return register_dataset(video_lib.video_folder_spec(video_dir, name, **settings))


def register_lerobot(name: str, root: str | os.PathLike, **settings: Any) -> DatasetSpec:
    """Registers the LeRobot dataset at ``root`` as pipeline dataset ``name``
    (``lerobot.lerobot_spec(root, name, **settings)``: cameras, state_key, action_key, gripper_dims,
    kind), so ``config.data.dataset = name`` (or a mixture naming it) reads it; returns the spec."""
    return register_dataset(lerobot_lib.lerobot_spec(root, name, **settings))


def dataset_names(include_aliases: bool = False) -> list[str]:
    names = sorted(_DATASETS)
    return sorted(names + list(ALIASES)) if include_aliases else names


def canonical_name(name: Any) -> str | None:
    """Registry name for ``name`` (exact, alias, case-insensitive), or None."""
    if not isinstance(name, str):
        return None
    key = name.strip()
    for candidate in (key, key.lower()):
        if candidate in _DATASETS:
            return candidate
        if candidate in ALIASES:
            return ALIASES[candidate]
    return None


def unknown_name_message(kind: str, name: Any, known: Mapping[str, list[str]]) -> str:
    """"unknown <kind> 'x'. Did you mean [...]? Known <label>: a, b, ..." for each label."""
    candidates = sorted({n for names in known.values() for n in names})
    close = difflib.get_close_matches(str(name).strip().lower(), candidates, n=5, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    listed = " ".join(f"Known {label}: {', '.join(names)}." for label, names in known.items())
    return f"unknown {kind} {name!r}.{hint} {listed}"


def get_dataset_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The spec registered under ``name`` (or an alias; a spec is returned as is); KeyError lists
    close and known names."""
    if isinstance(name, DatasetSpec):
        return name
    canonical = canonical_name(name)
    if canonical is None:
        raise KeyError(
            unknown_name_message("dataset", name, {"datasets": dataset_names(), "aliases": sorted(ALIASES)})
        )
    return _DATASETS[canonical]


def dataset_gap(spec: DatasetSpec | str, gap_seconds: float = 0.0, gap_frames: int = 0) -> int:
    """The frame gap H of ``spec`` (the pair offset of LAPA): ``gap_frames`` > 0 (the config's),
    else the spec's ``gap_frames``, else ``gaps.frame_gap(control_hz, seconds)`` with seconds =
    ``gap_seconds`` or, when 0, ``gaps.ROBOT_GAP_SECONDS`` for robot data and
    ``gaps.HUMAN_GAP_SECONDS`` for human video (the spec's ``kind``)."""
    spec = get_dataset_spec(spec)
    if gap_frames and int(gap_frames) > 0:
        return int(gap_frames)
    if spec.gap_frames:
        return int(spec.gap_frames)
    seconds = float(gap_seconds) if gap_seconds else (HUMAN_GAP_SECONDS if spec.kind == "human" else ROBOT_GAP_SECONDS)
    if not spec.control_hz:
        raise ValueError(
            f"dataset {spec.name!r}: no control_hz / fps in its spec, so the frame gap cannot be derived "
            "from seconds; set the spec's gap_frames or config.data.gap_frames"
        )
    return frame_gap(spec.control_hz, seconds)


def clip_stride(spec: DatasetSpec | str, clip_stride_seconds: float = 0.0, clip_stride_frames: int = 1) -> int:
    """Steps between consecutive frames of a ViPRA clip of ``spec``: ``gaps.frame_gap(control_hz,
    clip_stride_seconds)`` when the seconds are > 0 (datasets at different rates then span the
    same time), else ``clip_stride_frames`` (config.data.clip_stride) for every dataset."""
    spec = get_dataset_spec(spec)
    if clip_stride_seconds and float(clip_stride_seconds) > 0:
        if not spec.control_hz:
            raise ValueError(
                f"dataset {spec.name!r}: no control_hz / fps in its spec, so config.data.clip_stride_seconds "
                "cannot become frames; set config.data.clip_stride (frames) instead"
            )
        return frame_gap(spec.control_hz, float(clip_stride_seconds))
    return max(1, int(clip_stride_frames or 1))
