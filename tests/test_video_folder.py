"""Folders of clips: containers / codecs, display rotation, crop / pad, the ``video_folder`` pipeline
entry on video alone (frames, pairs, clips: TensorFlow 2.21's ``unbatch`` used to segfault on their
zero-width proprio), and the labeller (``label_video_folder`` and the script's ``--video_dir``).

Every clip is written here with PyAV; codecs the local FFmpeg cannot encode are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import av

from jaxvla.data import video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_clip(path, frames, fps, codec, rotation=None):
    """uint8 [T, H, W, 3] -> a clip (container from the extension); ``rotation``: display matrix
    rotation, counter-clockwise degrees. Skips the test when this FFmpeg lacks the encoder."""
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder in this FFmpeg")
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = 2_000_000
            if rotation:
                stream.set_display_rotation(rotation)
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (av.error.FFmpegError, ValueError) as error:
        pytest.skip(f"cannot encode {codec} into {os.path.basename(str(path))}: {error}")
    return str(path)


def moving_square(count, height, width, seed=0):
    """A yellow square crossing a blue background, one step per frame."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    frames[..., 2] = 90
    size = min(height, width) // 3
    for t in range(count):
        x = int((width - size) * t / max(count - 1, 1))
        frames[t, (height - size) // 2 : (height + size) // 2, x : x + size] = (250, 210, 0)
    return frames


# (codec, extension): H.264 / mp4, VP9 / webm, HEVC / mkv, MPEG-4 part 2 / avi, VP8 / webm, H.264 / mov.
CONTAINERS = [
    ("libx264", "mp4"),
    ("libvpx-vp9", "webm"),
    ("libx265", "mkv"),
    ("mpeg4", "avi"),
    ("libvpx", "webm"),
    ("libx264", "mov"),
]


@pytest.mark.parametrize("codec,ext", CONTAINERS, ids=[f"{c}-{e}" for c, e in CONTAINERS])
def test_containers_and_codecs(tmp_path, codec, ext):
    # 64 px: this PyAV wheel's libx265 corrupts the heap (the process aborts) on frames below its
    # 64-px coding tree unit.
    source = moving_square(16, 64, 64)
    write_clip(tmp_path / f"clip.{ext}", source, 8, codec)
    reader = video.VideoFolderReader(tmp_path)
    assert reader.video_ids == ["clip"] and reader.video_path("clip").endswith(f".{ext}")
    frames, fps = reader.decode("clip")
    assert fps == pytest.approx(8) and frames.shape == (16, 64, 64, 3)
    error = np.abs(frames.astype(np.float64) - source).mean()
    assert error < 12, error


def test_one_folder_many_extensions_and_ids(tmp_path):
    write_clip(tmp_path / "b.webm", moving_square(6, 32, 32), 6, "libvpx-vp9")
    write_clip(tmp_path / "a.MP4", moving_square(6, 32, 32), 6, "libx264")
    (tmp_path / "notes.txt").write_text("not a clip")
    (tmp_path / "sub").mkdir()
    write_clip(tmp_path / "sub" / "c.mkv", moving_square(6, 32, 32), 6, "libx264")
    assert video.VideoFolderReader(tmp_path).video_ids == ["a", "b"]
    reader = video.VideoFolderReader(tmp_path, recursive=True, dataset_name="clips")
    assert reader.video_ids == ["a", "b", "sub/c"]
    assert reader.traj_key("sub/c") == "clips/train/sub/c"
    assert [t["traj_key"][0].decode() for t in reader] == ["clips/train/a", "clips/train/b", "clips/train/sub/c"]
    assert video.VideoFolderReader(tmp_path, extensions="webm").video_ids == ["b"]
    # Instructions: an {id: text} object (or the SSv2 list); the SSv2 reader takes any extension.
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a": "push the square", "b": "slide it"}))
    reader = video.SomethingSomethingReader(tmp_path, labels)
    assert reader.video_ids == ["a", "b"] and reader.target_fps == video.SSV2_FPS
    assert [t["task"]["language_instruction"][0].decode() for t in reader] == ["push the square", "slide it"]
    write_clip(tmp_path / "a.webm", moving_square(6, 32, 32), 6, "libvpx-vp9")
    with pytest.raises(ValueError, match="two videos for clip id 'a'"):
        video.VideoFolderReader(tmp_path)


def test_display_rotation_comes_out_upright(tmp_path):
    """A portrait scene stored as landscape frames with a 90-degree display rotation (as phones
    record) decodes in its display orientation, marker top-left."""
    upright = np.zeros((8, 64, 48, 3), np.uint8)
    upright[:, :16, :16] = (255, 255, 255)  # top-left marker
    upright[:, 48:, 32:] = (255, 0, 0)  # bottom-right, red
    stored = np.ascontiguousarray(np.rot90(upright, k=-1, axes=(1, 2)))  # [8, 48, 64, 3]: turned clockwise
    path = write_clip(tmp_path / "phone.mp4", stored, 8, "libx264", rotation=90)
    with av.open(path) as container:
        assert next(container.decode(video=0)).rotation == 90
    frames, _ = video.read_video(path)
    assert frames.shape == (8, 64, 48, 3)
    np.testing.assert_allclose(frames.mean(axis=0), upright[0], atol=40)
    raw, _ = video.read_video(path, autorotate=False)
    assert raw.shape == (8, 48, 64, 3)
    square, _ = video.read_video(path, size=32, crop="center")  # rotate, then crop rows 8..56
    assert square.shape == (8, 32, 32, 3)
    assert square[0, :4, :4].mean() > 200 and square[0, -4:, -4:, 0].mean() > 200 and square[0, -4:, -4:, 1].mean() < 60


def test_center_crop_and_pad_keep_the_aspect(tmp_path):
    """A wide frame in three bands (red | green | blue): center crop keeps the green middle, pad
    adds black bars above and below, "none" squashes all three bands into the square."""
    frame = np.zeros((4, 32, 96, 3), np.uint8)
    frame[:, :, :32, 0] = 255
    frame[:, :, 32:64, 1] = 255
    frame[:, :, 64:, 2] = 255
    path = write_clip(tmp_path / "wide.mp4", frame, 4, "libx264")
    crop, _ = video.read_video(path, size=32, crop="center")
    assert crop.shape == (4, 32, 32, 3)
    assert crop[0, :, 4:-4, 1].mean() > 200 and crop[0, :, 4:-4, [0, 2]].mean() < 40
    pad, _ = video.read_video(path, size=48, crop="pad")
    assert pad.shape == (4, 48, 48, 3)
    assert pad[0, :12].max() < 40 and pad[0, -12:].max() < 40  # 96 x 32 padded to 96 x 96: 32-px bars, scaled
    assert pad[0, 20:28, 2:12, 0].mean() > 200 and pad[0, 20:28, -12:-2, 2].mean() > 200
    squash, _ = video.read_video(path, size=32, crop="none")
    assert squash[0, :, :8, 0].mean() > 200 and squash[0, :, -8:, 2].mean() > 200
    wide, _ = video.read_video(path, size=(16, 48), crop="center")  # already 1:3, nothing cropped
    assert wide.shape == (4, 16, 48, 3) and wide[0, :, :12, 0].mean() > 200
    with pytest.raises(ValueError, match="crop must be one of"):
        video.read_video(path, crop="squash")


# -- the pipeline on video alone --------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """Five clips of three containers and rates (one rotated, one undecodable, one too short for a
    2.4 s pair at 12 fps) and their instructions."""
    root = tmp_path_factory.mktemp("clips")
    write_clip(root / "pour.mp4", moving_square(40, 48, 80), 10, "libx264")
    write_clip(root / "slide.webm", moving_square(45, 64, 64, 1), 15, "libvpx-vp9")
    write_clip(root / "phone.mkv", np.ascontiguousarray(np.rot90(moving_square(36, 64, 40), -1, axes=(1, 2))), 12,
               "libx264", rotation=90)
    (root / "broken.avi").write_bytes(np.random.default_rng(0).bytes(3000))
    write_clip(root / "blink.mp4", moving_square(6, 32, 32), 10, "libx264")
    (root / "labels.json").write_text(json.dumps({"pour": "pour the cup", "slide": "slide the block",
                                                  "phone": "pick up the phone", "blink": "blink",
                                                  "broken": "never decoded"}))
    return str(root)


VIDEO_ONLY_BATCHES = r"""
import json, os, sys
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from jaxvla.data.pipeline import default_data_config, make_batches
folder, labels = sys.argv[1], sys.argv[2]
native = len(sys.argv) > 3  # labels made at each clip's own rate (--fps=0): the folder read likewise
out = {}
if native:
    from jaxvla.data.registry import register_video_folder
    register_video_folder("video_folder", folder, fps=None)  # the name the labeller gave the clips
for sample in () if native else ("frames", "pairs", "clips"):
    data = default_data_config()
    data.update(dict(dataset="video_folder", data_dir=folder, sample=sample, image_size=32, clip_length=2,
                     clip_stride=6, shuffle_buffer=16, traj_shuffle_buffer=0))
    batches = make_batches(data, batch_size=8, train=True, seed=0, process_index=0, process_count=1)
    batch = next(iter(batches))
    out[sample] = {"image": list(batch["observation"]["image_primary"].shape),
                   "proprio": list(batch["observation"]["proprio"].shape),
                   "timestep": batch["observation"]["timestep"].tolist(),
                   "keys": sorted({k.decode() for k in batch["traj_key"]}),
                   "text": sorted({t.decode() for t in batch["task"]["language_instruction"]}),
                   "has_action": bool(batch["has_action"].any()), "gaps": batches.gaps}
if labels:
    data = default_data_config()
    data.update(dict(dataset="video_folder", data_dir=folder, sample="pairs", image_size=32, gap_frames=12,
                     shuffle_buffer=0, latent_labels=labels))
    batch = next(iter(make_batches(data, batch_size=4, train=False, seed=0, process_index=0, process_count=1)))
    out["labelled"] = {"keys": [k.decode() for k in batch["traj_key"]], "t": batch["observation"]["timestep"].tolist(),
                       "codes": batch["latent_action"].tolist(), "has": batch["has_latent"].tolist()}
print("RESULT " + json.dumps(out))
"""


def run_video_only_batches(folder, labels="", native=False):
    """make_batches on the video_folder entry (``native``: only the labels' join, on the folder
    registered with fps=None) in a subprocess (a crash must not take pytest down)."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", VIDEO_ONLY_BATCHES, folder, labels] + (["native"] if native else []),
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_video_only_frames_pairs_clips(clip_folder):
    """The built-in ``video_folder`` entry (config.data.dataset / data_dir) alone gives batches of
    every video sample kind; the proprio stays zero-wide; undecodable clips are skipped."""
    out = run_video_only_batches(clip_folder)
    assert out["frames"]["image"] == [8, 32, 32, 3] and out["frames"]["proprio"] == [8, 0]
    assert out["pairs"]["image"] == [8, 2, 32, 32, 3] and out["pairs"]["proprio"] == [8, 2, 0]
    assert out["clips"]["image"] == [8, 3, 32, 32, 3] and out["clips"]["proprio"] == [8, 3, 0]
    assert out["pairs"]["gaps"] == {"video_folder": 29}  # 2.4 s at the entry's 12 fps
    assert all(b - a == 29 for a, b in out["pairs"]["timestep"])
    assert all(row == [t, t + 6, t + 12] for row in out["clips"]["timestep"] for t in row[:1])
    for sample in ("frames", "pairs", "clips"):
        assert not out[sample]["has_action"]
        assert set(out[sample]["keys"]) <= {f"video_folder/train/{c}" for c in ("pour", "slide", "phone", "blink")}
        assert set(out[sample]["text"]) <= {"pour the cup", "slide the block", "pick up the phone", "blink"}


# -- the labeller ------------------------------------------------------------------------------------


def tiny_laq(variant: str):
    """An untrained LoadedLAQ (random init) of 32 px frames: enough to exercise the labeller."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from jaxvla import latent_actions
    from jaxvla.models.laq import LAQ

    model = LAQ(variant=variant, image_size=32, patch_size=8, dim=32, num_heads=2, head_dim=16, encoder_depth=1,
                temporal_depth=0 if variant == "vipra" else 1, decoder_depth=1, quant_dim=8, code_grid=2,
                codebook_size=8, num_frames=3 if variant == "vipra" else 2)
    frames = jnp.zeros((1, model.num_frames, 32, 32, 3))
    params = model.init({"params": jax.random.PRNGKey(0)}, frames)["params"]
    params = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, params,
                          is_leaf=lambda a: hasattr(a, "unbox"))
    config = ml_collections.ConfigDict({"data": {"dataset": "metaworld", "mixture": "", "clip_stride": 4}})
    return latent_actions.LoadedLAQ(model, params, config, 0, "memory", f"tiny-{variant}")


def test_label_video_folder_lapa_and_join(clip_folder, tmp_path):
    from jaxvla.data.latent_labels import load_latent_labels
    from jaxvla.latent_actions import label_video_folder
    from jaxvla.latent_actions import video_summary_line as latent_actions_line

    laq = tiny_laq("lapa")
    out = str(tmp_path / "labels")
    summary = label_video_folder(laq, clip_folder, out, instructions=os.path.join(clip_folder, "labels.json"),
                                 fps=12, gap_seconds=1.0, batch_size=8, progress=False)
    assert summary["labelled"] == 3 and summary["skipped"] == 2
    assert latent_actions_line(summary).startswith("3 labelled, 2 skipped (1 too short, 1 undecodable) of 5 clips in ")
    assert summary["reasons"] == {"too short": 1, "undecodable": 1}
    assert {c["id"] for c in summary["skipped_clips"]} == {"broken", "blink"}
    info, labels = load_latent_labels(out)
    meta = info["meta"]
    assert meta["video_dir"] == os.path.abspath(clip_folder) and meta["fps"] == 12.0
    assert meta["gap_seconds"] == 1.0 and meta["frame_offsets"] == [0, 12] and meta["crop"] == "center"
    assert meta["summary"]["labelled"] == 3
    # pour: 40 frames at 10 fps = 3.9 s -> 47 frames at 12 fps, 35 pairs; blink: too short, no frames.
    assert summary["labelled_clips"]["video_folder/train/pour"]["frames"] == 47
    frames, codes = labels["video_folder/train/pour"]
    assert list(frames) == list(range(35)) and codes.shape == (35, 1, 4)
    assert len(labels["video_folder/train/blink"][0]) == 0
    assert "video_folder/train/broken" not in set(labels.keys)
    with open(os.path.join(out, "video_summary-00000.json")) as f:
        assert json.load(f)["labelled"] == 3
    # The labels join onto the video_folder entry read from config.data (same keys and timesteps).
    joined = run_video_only_batches(clip_folder, out)["labelled"]
    assert all(joined["has"])
    for key, t, code in zip(joined["keys"], joined["t"], joined["codes"]):
        np.testing.assert_array_equal(code, labels[key][1][list(labels[key][0]).index(t[0])])


def test_label_video_folder_vipra_native_rates(clip_folder, tmp_path):
    """--fps 0: every clip at its own rate, the clip stride (seconds) converted per clip."""
    from jaxvla.latent_actions import label_video_folder

    summary = label_video_folder(tiny_laq("vipra"), clip_folder, str(tmp_path / "labels"), fps=None,
                                 clip_stride_seconds=0.4, batch_size=4, progress=False)
    clips = summary["labelled_clips"]
    assert clips["video_folder/train/pour"]["fps"] == 10 and clips["video_folder/train/pour"]["frame_offsets"] == [0, 4, 8]
    assert clips["video_folder/train/slide"]["fps"] == 15 and clips["video_folder/train/slide"]["frame_offsets"] == [0, 6, 12]
    assert clips["video_folder/train/pour"]["labelled_frames"] == 40 - 8
    assert clips["video_folder/train/phone"]["frame_offsets"] == [0, 5, 10]  # 0.4 s at 12 fps = 4.8 frames
    assert summary["labelled"] == 3 and summary["reasons"] == {"too short": 1, "undecodable": 1}
    from jaxvla.data.latent_labels import load_latent_labels

    info, labels = load_latent_labels(str(tmp_path / "labels"))
    assert info["meta"]["fps"] is None and info["meta"]["frame_offsets"] is None
    assert info["meta"]["clip_stride_seconds"] == 0.4 and info["code_shape"] == [2, 4]
    # Native-rate labels join onto the folder registered with fps=None (each clip at its own rate),
    # named as the labeller names its trajectories (dataset_name, default video_folder).
    joined = run_video_only_batches(clip_folder, str(tmp_path / "labels"), native=True)["labelled"]
    assert all(joined["has"]) and len(joined["keys"]) == 4
    for key, t, code in zip(joined["keys"], joined["t"], joined["codes"]):
        np.testing.assert_array_equal(code, labels[key][1][list(labels[key][0]).index(t[0])])


def test_label_script_video_dir(clip_folder, tmp_path, monkeypatch, capsys):
    from jaxvla import frozen

    laq = tiny_laq("lapa")
    monkeypatch.setattr(frozen, "load_laq", lambda checkpoint: laq)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import label_latent_actions as script
    finally:
        sys.path.pop(0)
    out = str(tmp_path / "labels")
    assert script.main(["--laq_checkpoint=unused", f"--video_dir={clip_folder}", f"--out={out}", "--gap_seconds=0.5",
                        "--crop=pad", "--batch_size=8"]) == 0
    printed = capsys.readouterr().out
    assert "4 labelled, 1 skipped (1 undecodable) of 5 clips in" in printed  # blink: 7 frames, a 0.5 s pair needs 7
    assert "skipped " + os.path.join(clip_folder, "broken.avi") + ": undecodable" in printed
    with open(os.path.join(out, "labels_info.json")) as f:
        meta = json.load(f)["meta"]
    assert meta["fps"] == 12.0 and meta["frame_offsets"] == [0, 6] and meta["crop"] == "pad"
    assert meta["instructions"] == os.path.join(os.path.abspath(clip_folder), "labels.json")
    with pytest.raises(SystemExit):
        script.main(["--laq_checkpoint=x", f"--video_dir={clip_folder}", "--out=y", "--dataset=metaworld"])
