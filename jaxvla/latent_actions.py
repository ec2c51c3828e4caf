"""Labelling whole datasets with latent actions from a trained LAQ (the frozen LAQ itself,
``LoadedLAQ`` / ``load_laq``, lives in ``jaxvla.frozen``).

    laq = jaxvla.frozen.load_laq("runs/laq")                      # latest checkpoint of a stage-1 workdir
    codes = laq.encode(frames)                      # uint8 [B, T, S, S, 3] -> int32 [B, T-1, M]
    label_dataset(laq, data_config, out_dir)        # what scripts/label_latent_actions.py runs

Labels (``jaxvla.data.latent_labels`` format) give frame ``t`` of a trajectory the codes of the
LAQ window starting at ``t``: code shape ``[K, M]`` with K = T-1 transitions (lapa: K = 1, the
pair (x_t, x_{t+H}); vipra: the L transitions of the clip t, t+s, ..., t+L*s). Frames too close to
the end for a full window have no label. The labels are stamped with the hash of the LAQ's
config (``latent_labels.config_hash``), and ``meta`` records the checkpoint and its step.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxvla.data import latent_labels as ll
from jaxvla.data import video as video_lib
from jaxvla.data.gaps import HUMAN_GAP_SECONDS, frame_gap
from jaxvla.data.registry import DatasetSpec, dataset_gap, get_dataset_spec
from jaxvla.frozen import LoadedLAQ

log = logging.getLogger("jaxvla")


# ------------------------------------------------------------------------------------------------
# Labelling.


def window_starts(length: int, offsets: np.ndarray) -> np.ndarray:
    """Start frames t of every full window ``t + offsets`` inside a trajectory of ``length``."""
    return np.arange(max(int(length) - int(offsets[-1]), 0), dtype=np.int64)


def trajectory_windows(images: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``images [T, S, S, 3]`` -> (starts [N], windows [N, len(offsets), S, S, 3])."""
    starts = window_starts(len(images), offsets)
    return starts, images[starts[:, None] + offsets[None, :]]


def _open_out_dir(out_dir: str, overwrite: bool, process_index: int) -> None:
    """Creates ``out_dir`` for new labels; finished labels there are refused unless ``overwrite``
    (then process 0 removes their index, so a crash mid-labelling leaves them unfinished, not stale)."""
    if ll.is_complete(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds finished latent labels; pass --overwrite to replace them")
        if process_index == 0:
            os.remove(os.path.join(out_dir, ll.INFO_FILE))
    os.makedirs(out_dir, exist_ok=True)


def label_dataset(
    laq: LoadedLAQ,
    data_config: Any,
    out_dir: str,
    *,
    split: str = "train",
    batch_size: int = 64,
    mixture=None,
    resume: bool = False,
    overwrite: bool = False,
    shard_size: int = 256,
    progress: bool = True,
) -> str:
    """Labels every trajectory of ``data_config``'s dataset(s) with ``laq``; see the module docstring.
    The frames come from the pipeline's reader (``jaxvla.data.pipeline.trajectory_frames``).

    Each process labels its share of the files with its local devices into ``out_dir/part-<i>``
    (atomic, resumable: ``LatentLabelWriter``); process 0 then writes ``out_dir``'s index
    (``merge_label_parts``). ``split`` may list several splits (``"train,val"``: pretraining's
    held-out evaluation reads the val split's labels); each gets its own parts
    (``part-<split>-<i>``) in the one directory. Returns ``out_dir``.
    """
    process_index, process_count = jax.process_index(), jax.process_count()
    out_dir = os.fspath(out_dir).rstrip("/\\")
    _open_out_dir(out_dir, overwrite, process_index)
    splits = [part.strip() for part in str(split).split(",") if part.strip()]
    if not splits:
        raise ValueError(f"label_dataset: no split in {split!r}")
    part_names = [f"part-{process_index:05d}" if len(splits) == 1 else f"part-{name}-{process_index:05d}"
                  for name in splits]
    for name, part_name in zip(splits, part_names):
        _label_split(laq, data_config, os.path.join(out_dir, part_name), name, batch_size=batch_size,
                     mixture=mixture, resume=resume, overwrite=overwrite, shard_size=shard_size,
                     progress=progress and process_index == 0, process_index=process_index,
                     process_count=process_count)
    return _finish(out_dir, process_index, process_count, splits)


def _label_split(laq: LoadedLAQ, data_config: Any, part_dir: str, split: str, *, batch_size: int, mixture,
                 resume: bool, overwrite: bool, shard_size: int, progress: bool, process_index: int,
                 process_count: int) -> None:
    """One split's share of this process, into ``part_dir``."""
    offsets = laq.frame_offsets
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_size = -(-int(batch_size) // len(devices)) * len(devices)
    encode = laq.encode_fn(mesh)
    model = laq.model
    meta = {"checkpoint": laq.checkpoint, "step": laq.step, "split": split, "variant": model.variant,
            "frame_offsets": offsets.tolist(), "data_dir": str(data_config.get("data_dir"))}
    code_shape = (model.num_transitions, model.code_tokens)
    weights = laq.weights_fingerprint
    if resume and ll.is_complete(part_dir):
        ll.check_finished_part(part_dir, laq.config_hash, weights, code_shape, model.codebook_size)
        log.info("%s: this process's part is already complete", part_dir)
        return
    writer = ll.LatentLabelWriter(part_dir, laq.config_hash, code_shape, model.codebook_size, meta,
                                  resume=resume, overwrite=overwrite, shard_size=shard_size,
                                  laq_weights=weights)
    done = writer.done_keys()
    from jaxvla.data.pipeline import trajectory_frames  # TensorFlow

    bar = tqdm(desc=f"labelling {split} ({model.variant})", unit="traj", disable=not progress)
    try:
        with writer:
            for traj_key, images in trajectory_frames(
                data_config, split, image_size=model.image_size, process_index=process_index,
                process_count=process_count, mixture=mixture,
            ):
                bar.update(1)
                if traj_key in done:
                    continue
                starts, windows = trajectory_windows(images, offsets)
                codes = np.zeros((len(starts), *code_shape), np.int32)
                for begin in range(0, len(starts), batch_size):
                    chunk = windows[begin : begin + batch_size]
                    padded = np.zeros((batch_size, *chunk.shape[1:]), np.uint8)
                    padded[: len(chunk)] = chunk  # one compiled shape for every batch
                    codes[begin : begin + len(chunk)] = np.asarray(encode(padded))[: len(chunk)]
                writer.add(traj_key, starts, codes)
    finally:
        bar.close()


def _finish(out_dir: str, process_index: int, process_count: int, splits: list[str] | None = None) -> str:
    if process_count > 1:
        multihost_utils.sync_global_devices(f"latent labels {out_dir}")
    if process_index == 0:
        if splits is None or len(splits) == 1:
            names = [f"part-{i:05d}" for i in range(process_count)]
        else:
            names = [f"part-{name}-{i:05d}" for name in splits for i in range(process_count)]
        ll.merge_label_parts(out_dir, [os.path.join(out_dir, name) for name in names])
    return out_dir


# ------------------------------------------------------------------------------------------------
# Labelling a folder of clips (scripts/label_latent_actions.py --video_dir).


def _laq_clip_stride_seconds(laq: Any) -> float:
    """The spacing in seconds of the LAQ's training clips: its ``clip_stride_seconds`` when set, else
    ``clip_stride`` frames of its dataset's rate (single-dataset LAQ configs whose dataset has a
    ``control_hz``)."""
    data = laq.config.data
    if float(data.get("clip_stride_seconds", 0.0) or 0.0) > 0:
        return float(data.clip_stride_seconds)
    stride = int(data.get("clip_stride") or 1)
    hz = None
    if not data.get("mixture") and data.get("dataset"):
        try:
            hz = get_dataset_spec(data.dataset).control_hz
        except KeyError:
            hz = None
    if not hz:
        raise ValueError(
            "cannot tell the LAQ's clip spacing in seconds (its config.data names no single dataset with a "
            "frame rate); pass clip_stride_seconds (--clip_stride_seconds)"
        )
    return stride / float(hz)


def video_window_offsets(variant: str, num_frames: int, fps: float, *, gap_seconds: float | None = None,
                         clip_stride_seconds: float | None = None) -> np.ndarray:
    """Frame offsets of one LAQ window in a clip at ``fps``: lapa ``[0, H]`` with H =
    ``registry.dataset_gap`` of a human-video spec at ``fps`` (default 2.4 s, LAPA's human-video gap); vipra
    ``[0, s, ..., (num_frames - 1) s]`` with s = ``frame_gap(fps, clip_stride_seconds)``."""
    if variant == "vipra":
        if not clip_stride_seconds:
            raise ValueError("vipra windows need clip_stride_seconds")
        return np.arange(int(num_frames)) * frame_gap(fps, clip_stride_seconds)
    return np.asarray([0, dataset_gap(DatasetSpec("video", control_hz=fps, kind="human"), gap_seconds or 0.0)])


def label_video_folder(
    laq: LoadedLAQ,
    video_dir: str,
    out_dir: str,
    *,
    instructions: str | None = None,
    fps: float | None = None,
    gap_seconds: float | None = None,
    clip_stride_seconds: float | None = None,
    crop: str = "center",
    extensions: Any = None,
    recursive: bool = False,
    dataset_name: str = "video_folder",
    split: str = "train",
    batch_size: int = 64,
    num_workers: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    shard_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Labels every clip of ``video_dir`` (``jaxvla.data.video.VideoFolderReader``: any container
    and codec FFmpeg decodes, display rotation applied, ``crop`` to square at the LAQ's image size)
    with ``laq`` into the latent label directory ``out_dir``; returns the summary (also logged).

    ``fps`` resamples every clip to that rate (default ``video.VIDEO_FOLDER_FPS``, the rate the
    pipeline's ``video_folder`` entry reads, so the labels join onto it); 0 / None keeps each clip's
    own rate. The window is given in seconds and converted with each clip's rate: lapa pairs
    ``gap_seconds`` apart (default 2.4 s), vipra clips of the LAQ's frame count ``clip_stride_seconds``
    apart (default: the spacing of the LAQ's own training clips). Traj keys are
    ``<dataset_name>/<split>/<clip id>``, as the ``video_folder`` entry (or ``register_video_folder``
    with that name) produces. Labelled ids without a file and undecodable clips are skipped;
    clips too short for one window are recorded with no labelled frame (so the pipeline's join
    finds them) and counted as skipped. The labels' ``meta`` records the source folder, the
    instructions file, fps, gap / stride in seconds and frames, crop and the part's summary.
    Several processes each label their share (``part-<i>``), as ``label_dataset``.
    """
    process_index, process_count = jax.process_index(), jax.process_count()
    out_dir = os.fspath(out_dir).rstrip("/\\")
    if "," in str(split):
        raise ValueError(f"label_video_folder: one split name, got {split!r} (a folder of clips has one split)")
    model = laq.model
    fps = float(fps) if fps else None
    if model.variant == "vipra":
        clip_stride_seconds = float(clip_stride_seconds) if clip_stride_seconds else _laq_clip_stride_seconds(laq)
        gap_seconds = None
    else:
        gap_seconds = float(gap_seconds) if gap_seconds else HUMAN_GAP_SECONDS
        clip_stride_seconds = None

    def offsets_at(rate: float) -> np.ndarray:
        return video_window_offsets(model.variant, getattr(model, "num_frames", 2), rate, gap_seconds=gap_seconds,
                                    clip_stride_seconds=clip_stride_seconds)

    reader = video_lib.VideoFolderReader(
        video_dir, instructions, split, target_fps=fps, image_size=int(model.image_size), crop=crop,
        dataset_name=dataset_name, extensions=extensions, recursive=recursive, missing_videos="skip",
        ignore_errors=True, process_index=process_index, process_count=process_count,
    )
    _open_out_dir(out_dir, overwrite, process_index)
    part_dir = os.path.join(out_dir, f"part-{process_index:05d}")

    meta = {
        "checkpoint": laq.checkpoint, "step": laq.step, "split": split, "variant": model.variant,
        "source": "video_folder", "video_dir": os.path.abspath(video_dir),
        "instructions": None if instructions is None else os.path.abspath(instructions),
        "dataset_name": dataset_name, "fps": fps, "crop": crop, "image_size": int(model.image_size),
        "extensions": list(reader.extensions), "recursive": bool(recursive),
        "gap_seconds": gap_seconds, "clip_stride_seconds": clip_stride_seconds,
        # One window for every clip when they are resampled to one rate; per clip otherwise.
        "frame_offsets": offsets_at(fps).tolist() if fps else None,
    }
    if fps is None:
        log.warning("labelling every clip at its own frame rate: windows differ in frames between clips, so "
                    "meta.frame_offsets is null (pretraining from these labels needs one rate: pass --fps)")
    code_shape = (model.num_transitions, model.code_tokens)
    summary: dict[str, Any] = {"video_dir": meta["video_dir"], "clips": len(reader.video_ids) + len(reader.missing_ids),
                               "labelled": 0, "skipped": 0, "reasons": {}, "skipped_clips": [], "labelled_clips": {}}

    def skip(video_id: str, reason: str, detail: str) -> None:
        summary["skipped"] += 1
        summary["reasons"][reason] = summary["reasons"].get(reason, 0) + 1
        summary["skipped_clips"].append({"id": video_id, "path": reader.video_path(video_id), "reason": reason,
                                         "detail": detail})
        log.warning("skipping %s (%s): %s", reader.video_path(video_id), reason, detail)

    for video_id in reader.missing_ids:
        skip(video_id, "missing", "listed in the instructions file, no video file")

    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_size = -(-int(batch_size) // len(devices)) * len(devices)
    encode = laq.encode_fn(mesh)
    weights = laq.weights_fingerprint
    if resume and ll.is_complete(part_dir):
        ll.check_finished_part(part_dir, laq.config_hash, weights, code_shape, model.codebook_size)
        log.info("%s: this process's part is already complete", part_dir)
        summary["resumed"] = len(reader.video_ids)
        return _finish_video(out_dir, process_index, process_count, summary)
    writer = ll.LatentLabelWriter(part_dir, laq.config_hash, code_shape, model.codebook_size, meta,
                                  resume=resume, overwrite=overwrite, shard_size=shard_size,
                                  laq_weights=weights)
    done = writer.done_keys()
    todo = [i for i in reader.video_ids if reader.traj_key(i) not in done]
    summary["resumed"] = len(reader.video_ids) - len(todo)

    def decode(video_id: str):
        try:
            return video_id, reader.decode(video_id), None
        except (video_lib.VideoDecodeError, FileNotFoundError) as error:
            return video_id, None, error

    bar = tqdm(desc=f"labelling {os.path.basename(os.path.abspath(video_dir))} ({model.variant})", unit="clip",
               total=len(todo), disable=not (progress and process_index == 0))
    try:
        with writer:
            for video_id, decoded, error in video_lib.map_ahead(decode, todo, max(1, int(num_workers))):
                bar.update(1)
                if error is not None:
                    skip(video_id, "undecodable", str(error))
                    continue
                frames, rate = decoded
                offsets = offsets_at(rate)
                key = reader.traj_key(video_id)
                starts = window_starts(len(frames), offsets)
                if not len(starts):
                    writer.add(key, starts, np.zeros((0, *code_shape), np.int32))
                    skip(video_id, "too short",
                         f"{len(frames)} frames at {rate:g} fps, a window needs {int(offsets[-1]) + 1}")
                    continue
                codes = np.zeros((len(starts), *code_shape), np.int32)
                for begin in range(0, len(starts), batch_size):
                    index = starts[begin : begin + batch_size, None] + offsets[None, :]
                    padded = np.zeros((batch_size, len(offsets), *frames.shape[1:]), np.uint8)
                    padded[: len(index)] = frames[index]  # one compiled shape for every batch
                    codes[begin : begin + len(index)] = np.asarray(encode(padded))[: len(index)]
                writer.add(key, starts, codes)
                summary["labelled"] += 1
                summary["labelled_clips"][key] = {"fps": float(rate), "frames": int(len(frames)),
                                                  "frame_offsets": offsets.tolist(), "labelled_frames": int(len(starts))}
            writer.meta["summary"] = {k: summary[k] for k in ("clips", "labelled", "skipped", "reasons")}
    finally:
        bar.close()
    return _finish_video(out_dir, process_index, process_count, summary)


def _finish_video(out_dir: str, process_index: int, process_count: int, summary: dict[str, Any]) -> dict[str, Any]:
    """Merges the parts (``_finish``), writes this process's ``video_summary-<i>.json`` next to them
    and logs the summary line."""
    path = os.path.join(out_dir, f"video_summary-{process_index:05d}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    _finish(out_dir, process_index, process_count)
    log.info("%s", video_summary_line(summary))
    return summary


def video_summary_line(summary: dict[str, Any]) -> str:
    """"N labelled, M skipped (k undecodable, j too short, ...) of C clips in DIR"."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(summary["reasons"].items()))
    resumed = f", {summary['resumed']} labelled before (resumed)" if summary.get("resumed") else ""
    return (f"{summary['labelled']} labelled, {summary['skipped']} skipped{f' ({reasons})' if reasons else ''}"
            f"{resumed} of {summary['clips']} clips in {summary['video_dir']}")
