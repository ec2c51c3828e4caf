"""The one frame-gap function (``jaxvla.data.gaps``) gives every caller the gaps it computed before
it existed: the Open-X registry (``max(1, round(s * hz))``, Python's round), the pipeline
(``max(1, floor(s * hz + 0.5))``) and human video (``max(1, round(s * fps))``), each formula written
out here again rather than read from the code."""

from __future__ import annotations

import math

import pytest

from jaxvla.data import gaps, oxe, pipeline, video

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
    assert pipeline.ROBOT_GAP_SECONDS is gaps.ROBOT_GAP_SECONDS
    assert pipeline.HUMAN_GAP_SECONDS is gaps.HUMAN_GAP_SECONDS
    assert video.HUMAN_GAP_SECONDS is gaps.HUMAN_GAP_SECONDS


def test_known_gaps():
    assert oxe.get_dataset_spec("metaworld").frame_gap() == 48  # 80 Hz x 0.6 s
    assert oxe.get_dataset_spec("bridge_dataset").frame_gap() == 3  # 5 Hz: LAPA's H = 3
    assert oxe.get_dataset_spec("fractal20220817_data").frame_gap() == 2  # 3 Hz
    assert pipeline.dataset_gap(pipeline.METAWORLD_SPEC) == 48
    assert video.human_video_frame_gap(video.SSV2_FPS) == 29  # 12 fps x 2.4 s = 28.8


@pytest.mark.parametrize("name", sorted(oxe.OXE_DATASETS))
def test_registry_gaps_unchanged(name):
    spec = oxe.OXE_DATASETS[name]
    hz = spec.control_hz
    assert spec.frame_gap() == oxe.frame_gap(name) == old_oxe_gap(hz)
    for seconds in (0.6, 2.4):
        assert spec.frame_gap(seconds) == old_oxe_gap(hz, seconds)
        # The pipeline, reading the same rate, agrees.
        assert pipeline.dataset_gap(pipeline.as_spec(spec), seconds) == old_pipeline_gap(hz, seconds)
    assert pipeline.dataset_gap(pipeline.DatasetSpec(name, control_hz=hz)) == old_pipeline_gap(hz, 0.6)
    assert pipeline.dataset_gap(pipeline.DatasetSpec(name, control_hz=hz, kind="human")) == old_pipeline_gap(hz, 2.4)


def test_pipeline_gaps_unchanged():
    hz = pipeline.METAWORLD_SPEC.control_hz
    for seconds in (0.05, 0.1, 0.175, 0.25, 0.6, 2.4):
        assert pipeline.dataset_gap(pipeline.METAWORLD_SPEC, seconds) == old_pipeline_gap(hz, seconds)
    assert pipeline.dataset_gap(pipeline.METAWORLD_SPEC, 0.6, gap_frames=7) == 7
    for fps in VIDEO_FPS:
        spec = pipeline.DatasetSpec("video", control_hz=fps, kind="human")
        assert pipeline.dataset_gap(spec) == old_pipeline_gap(fps, 2.4)


@pytest.mark.parametrize("fps", VIDEO_FPS)
def test_video_gaps_unchanged(fps):
    assert video.human_video_frame_gap(fps) == old_video_gap(fps)
    assert video.human_video_frame_gap(fps, 0.6) == old_video_gap(fps, 0.6)


def test_invalid_rates_and_spans_raise():
    for hz in (0, -1, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="fps"):
            gaps.frame_gap(hz, 0.6)
    with pytest.raises(ValueError, match="fps"):
        video.human_video_frame_gap(0)
    for seconds in (0, -0.6, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            gaps.frame_gap(10, seconds)
