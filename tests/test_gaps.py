"""The one frame-gap function (``jaxvla.data.gaps``) and the one spec-level helper
(``registry.dataset_gap``) give every caller the gaps it computed before they existed: the Open-X
registry (``max(1, round(s * hz))``, Python's round), the pipeline (``max(1, floor(s * hz +
0.5))``) and human video (``max(1, round(s * fps))``), each formula written out here again rather
than read from the code."""

from __future__ import annotations

import math

import pytest

from jaxvla.data import gaps, oxe, pipeline, registry, video
from jaxvla.data.registry import DatasetSpec, dataset_gap

# Frame rates of real video sources (SSv2's 12 fps first) and a few odd ones.
VIDEO_FPS = (12.0, 0.1, 1.0, 5.0, 10.0, 12.5, 15.0, 23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 59.94, 60.0)


def old_oxe_gap(hz, seconds=0.6):
    return max(1, int(round(seconds * hz)))


def old_pipeline_gap(hz, seconds):
    return max(1, int(math.floor(seconds * hz + 0.5)))


def old_video_gap(fps, seconds=2.4):
    return max(1, int(round(seconds * fps)))


def test_one_constant_for_each_span():
    assert gaps.ROBOT_GAP_SECONDS == 0.6 and gaps.HUMAN_GAP_SECONDS == 2.4
    assert registry.ROBOT_GAP_SECONDS is gaps.ROBOT_GAP_SECONDS
    assert registry.HUMAN_GAP_SECONDS is gaps.HUMAN_GAP_SECONDS
    # One helper: the pipeline uses the registry's, the duplicates are gone.
    assert pipeline.dataset_gap is registry.dataset_gap
    assert not hasattr(oxe, "frame_gap") and not hasattr(oxe.RawLayout, "frame_gap")
    assert not hasattr(video, "human_video_frame_gap")


def test_known_gaps():
    assert dataset_gap("metaworld") == dataset_gap("metaworld_mt10") == 48  # 80 Hz x 0.6 s
    assert dataset_gap("bridge_dataset") == 3  # 5 Hz: LAPA's H = 3
    assert dataset_gap("fractal20220817_data") == 2  # 3 Hz
    assert dataset_gap(registry.METAWORLD_SPEC) == 48
    assert dataset_gap(video.video_folder_spec(fps=video.SSV2_FPS)) == 29  # 12 fps x 2.4 s = 28.8
    assert dataset_gap("video_folder") == 29


@pytest.mark.parametrize("name", sorted(set(oxe.OXE_LAYOUTS) | {"metaworld"}))
def test_registry_gaps_unchanged(name):
    spec = registry.get_dataset_spec(name)
    hz = spec.control_hz
    assert hz == spec.layout.control_hz
    assert dataset_gap(spec) == dataset_gap(name) == old_oxe_gap(hz)
    for seconds in (0.6, 2.4):
        # The registry's rate gives the Open-X registry's and the pipeline's old gaps.
        assert dataset_gap(spec, seconds) == old_oxe_gap(hz, seconds) == old_pipeline_gap(hz, seconds)
    assert dataset_gap(DatasetSpec(name, control_hz=hz)) == old_pipeline_gap(hz, 0.6)
    assert dataset_gap(DatasetSpec(name, control_hz=hz, kind="human")) == old_pipeline_gap(hz, 2.4)


def test_pipeline_gaps_unchanged():
    hz = registry.METAWORLD_SPEC.control_hz
    for seconds in (0.05, 0.1, 0.175, 0.25, 0.6, 2.4):
        assert dataset_gap(registry.METAWORLD_SPEC, seconds) == old_pipeline_gap(hz, seconds)
    assert dataset_gap(registry.METAWORLD_SPEC, 0.6, gap_frames=7) == 7
    assert dataset_gap(DatasetSpec("fixed", control_hz=5.0, gap_frames=3), 0.6) == 3
    for fps in VIDEO_FPS:
        spec = DatasetSpec("video", control_hz=fps, kind="human")
        assert dataset_gap(spec) == old_pipeline_gap(fps, 2.4)


@pytest.mark.parametrize("fps", VIDEO_FPS)
def test_video_gaps_unchanged(fps):
    """``video.human_video_frame_gap(fps, seconds=2.4)`` was ``round(seconds * fps)``: a video
    folder's spec at that rate gives the same gaps."""
    spec = video.video_folder_spec(fps=fps)
    assert dataset_gap(spec) == gaps.frame_gap(fps, gaps.HUMAN_GAP_SECONDS) == old_video_gap(fps)
    assert dataset_gap(spec, 0.6) == old_video_gap(fps, 0.6)


def test_invalid_rates_and_spans_raise():
    for hz in (0, -1, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="fps"):
            gaps.frame_gap(hz, 0.6)
    with pytest.raises(ValueError, match="fps"):
        dataset_gap(DatasetSpec("video", control_hz=-1.0, kind="human"))
    for seconds in (0, -0.6, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            gaps.frame_gap(10, seconds)
