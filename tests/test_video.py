"""Human-video reader: PyAV decode, frame-rate resampling, SSv2 layout -> standardised trajectories.

Videos are written by the tests themselves (PyAV, VP8/VP9 webm and H.264/MPEG-4 mp4) from frames
of the rendered Meta-World fixture dataset.
"""

import io
import json
import os
import threading

import numpy as np
import pytest

import av
import tensorflow as tf

from jaxvla.data import schema  # noqa: E402
from jaxvla.data import video  # noqa: E402
from jaxvla.data.latent_labels import LatentLabelWriter, join_latent_labels  # noqa: E402

SIZE = 64
STAMP = 6  # gray level step of the frame-index stamp (40 frames -> 0..234)


def write_video(path, frames, fps, codec):
    """uint8 [T, H, W, 3] -> a video file at ``fps`` (container from the file's extension)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def stamped(frames):
    """Marks frame j with a flat 16x16 block of gray level STAMP * j (readable despite the codec)."""
    out = frames.copy()
    for j in range(len(out)):
        out[j, :16, :16] = STAMP * j
    return out


def stamp_of(frame):
    return int(round(frame[:16, :16].astype(np.float64).mean() / STAMP))


@pytest.fixture(scope="module")
def rendered(metaworld_dataset):
    """Rendered Meta-World episodes of the fixture dataset: list of uint8 [T, 64, 64, 3]."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(metaworld_dataset["version_dir"]))
    episodes = []
    for split in ("train", "val"):
        for episode in builder.as_dataset(split=split):
            steps = next(iter(episode["steps"].batch(1000)))
            episodes.append(steps["observation"]["image"].numpy())
    assert all(e.shape[1:] == (SIZE, SIZE, 3) for e in episodes)
    return sorted(episodes, key=len, reverse=True)


@pytest.fixture(scope="module")
def source(rendered):
    frames = rendered[0][:40]
    assert len(frames) == 40, [len(e) for e in rendered]
    return frames


# (codec, extension, fps, frames)
CODECS = [
    ("libvpx-vp9", "webm", 10, 30),
    ("libvpx", "webm", 12, 24),
    ("libx264", "mp4", 30, 40),
    ("mpeg4", "mp4", 30, 20),
]


@pytest.mark.parametrize("codec,ext,fps,count", CODECS, ids=[c[0] for c in CODECS])
def test_decode_count_fps_and_fidelity(tmp_path, source, codec, ext, fps, count):
    path = write_video(tmp_path / f"clip.{ext}", source[:count], fps, codec)
    frames, got_fps = video.read_video(path)
    assert frames.dtype == np.uint8 and frames.shape == (count, SIZE, SIZE, 3)
    assert got_fps == pytest.approx(fps)
    per_frame = [psnr(a, b) for a, b in zip(frames, source[:count])]
    assert min(per_frame) > 25, per_frame


def expected_indices(source_fps, target_fps, count):
    """Nearest source frame j / source_fps to each k / target_fps (integer arithmetic, ties to the
    earlier frame), for every k / target_fps <= the last frame's time."""
    j = np.arange(count)
    out = []
    k = 0
    while k * source_fps <= (count - 1) * target_fps:
        out.append(int(np.argmin(np.abs(j * target_fps - k * source_fps))))
        k += 1
    return out


@pytest.mark.parametrize("target_fps", [12, 10, 7.5, 60])
def test_target_fps_picks_nearest_timestamps(tmp_path, source, target_fps):
    path = write_video(tmp_path / "stamped.mp4", stamped(source), 30, "libx264")
    frames, fps = video.read_video(path, target_fps=target_fps)
    assert fps == target_fps
    want = expected_indices(30, target_fps, len(source))
    assert [stamp_of(f) for f in frames] == want
    if target_fps == 12:  # 30 -> 12 fps: 0, 2 (tie 2/3 -> earlier), 5, 7, 10, ...
        assert want[:5] == [0, 2, 5, 7, 10] and len(want) == 16


def test_max_frames_and_size(tmp_path, source):
    path = write_video(tmp_path / "clip.webm", stamped(source[:30]), 10, "libvpx-vp9")
    frames, fps = video.read_video(path, target_fps=5, max_frames=4, size=(32, 48))
    assert frames.shape == (4, 32, 48, 3) and fps == 5
    full, _ = video.read_video(path, size=32)
    assert full.shape == (30, 32, 32, 3)
    # Downscaling with area averaging keeps each frame's stamp block identifiable (8x8 now).
    assert [int(round(f[:8, :8].mean() / STAMP)) for f in full] == list(range(30))


def test_human_video_gap_facts():
    from jaxvla.data.gaps import HUMAN_GAP_SECONDS
    from jaxvla.data.registry import dataset_gap

    assert HUMAN_GAP_SECONDS == 2.4
    assert video.SSV2_FPS == 12 and video.SSV2_FRAME_OFFSET == 30
    assert dataset_gap(video.video_folder_spec(fps=12)) == 29  # 2.4 s * 12 fps = 28.8
    assert dataset_gap(video.video_folder_spec(fps=10)) == 24
    assert dataset_gap(video.video_folder_spec(fps=0.1)) == 1


# -- the SSv2 layout ------------------------------------------------------------------------

SSV2_IDS = ["100", "3", "21", "7", "10"]  # numeric order: 3, 7, 10, 21, 100


def ssv2_entry(video_id, i):
    thing = f"object {i}"
    return {
        "id": video_id,
        "label": f"pushing {thing} from left to right",
        "template": "Pushing [something] from left to right",
        "placeholders": [thing],
    }


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory, rendered):
    """An SSv2-layout folder: five 12 fps VP9 webm clips (18-30 frames) and a labels JSON."""
    root = tmp_path_factory.mktemp("ssv2")
    video_dir = root / "20bn-something-something-v2"
    video_dir.mkdir()
    sources = {}
    for i, video_id in enumerate(SSV2_IDS):
        episode = rendered[i % len(rendered)]
        frames = episode[i : i + 18 + 3 * i]
        write_video(video_dir / f"{video_id}.webm", frames, 12, "libvpx-vp9")
        sources[video_id] = frames
    labels = root / "something-something-v2-train.json"
    labels.write_text(json.dumps([ssv2_entry(v, i) for i, v in enumerate(SSV2_IDS)]))
    return {"video_dir": str(video_dir), "labels": str(labels), "sources": sources, "root": root}


def decode_jpeg(data):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_trajectory(traj, video_id, source, action_dim=7, split="train"):
    schema.check_standardized(traj, "ssv2")
    length = len(source)
    obs = traj["observation"]
    assert obs["image_primary"].shape == (length,)
    assert obs["proprio"].shape == (length, 0) and obs["proprio"].dtype == np.float32
    assert obs["timestep"].dtype == np.int32 and list(obs["timestep"]) == list(range(length))
    for camera in ("secondary", "wrist"):
        assert list(obs[f"image_{camera}"]) == [b""] * length
    assert traj["action"].shape == (length, action_dim) and traj["action"].dtype == np.float32
    assert not traj["action"].any()
    assert traj["has_action"].dtype == bool and not traj["has_action"].any()
    label = ssv2_entry(video_id, SSV2_IDS.index(video_id))["label"]
    assert list(traj["task"]["language_instruction"]) == [label.encode()] * length
    assert list(traj["dataset_name"]) == [b"ssv2"] * length
    assert list(traj["traj_key"]) == [f"ssv2/{split}/{video_id}".encode()] * length
    images = np.stack([decode_jpeg(x) for x in obs["image_primary"]])
    assert images.shape == source.shape
    assert psnr(images, source) > 25


def test_ssv2_reader_trajectories(ssv2):
    reader = video.SomethingSomethingReader(ssv2["video_dir"], ssv2["labels"], "train")
    assert reader.video_ids == ["3", "7", "10", "21", "100"]
    trajectories = list(reader)
    assert [t["traj_key"][0].decode() for t in trajectories] == [f"ssv2/train/{i}" for i in reader.video_ids]
    for video_id, traj in zip(reader.video_ids, trajectories):
        check_trajectory(traj, video_id, ssv2["sources"][video_id])
    assert reader.stats["yielded"] == 5 and reader.stats["decode_errors"] == 0


def test_video_trajectory_dataset(ssv2):
    dataset = video.video_trajectory_dataset(
        ssv2["video_dir"], ssv2["labels"], "val", num_workers=2, action_dim=4, image_size=32
    )
    spec = dataset.element_spec
    assert spec["observation"]["image_primary"] == tf.TensorSpec([None], tf.string)
    assert spec["action"] == tf.TensorSpec([None, 4], tf.float32)
    assert spec["observation"]["proprio"] == tf.TensorSpec([None, 0], tf.float32)
    trajectories = list(dataset.as_numpy_iterator())
    assert [t["traj_key"][0].decode() for t in trajectories] == [f"ssv2/val/{i}" for i in ["3", "7", "10", "21", "100"]]
    for traj in trajectories:
        video_id = traj["traj_key"][0].decode().rsplit("/", 1)[1]
        source = ssv2["sources"][video_id]
        small = tf.image.resize(source, (32, 32), method="area").numpy().round().astype(np.uint8)
        check_trajectory(
            {**traj, "observation": {**traj["observation"]}}, video_id, small, action_dim=4, split="val"
        )


def test_target_fps_in_reader(ssv2):
    reader = video.SomethingSomethingReader(ssv2["video_dir"], ssv2["labels"], target_fps=6)
    traj = reader.trajectory("3")
    source = ssv2["sources"]["3"]  # 12 fps -> 6 fps keeps every other frame
    assert len(traj["traj_key"]) == (len(source) - 1) // 2 + 1
    images = np.stack([decode_jpeg(x) for x in traj["observation"]["image_primary"]])
    assert psnr(images, source[::2]) > 25


def test_process_shards_disjoint_and_covering(ssv2):
    for count in (1, 2, 3):
        shares = [
            video.SomethingSomethingReader(ssv2["video_dir"], ssv2["labels"], process_index=i, process_count=count).video_ids
            for i in range(count)
        ]
        flat = [v for share in shares for v in share]
        assert len(flat) == len(set(flat)) == 5
        assert set(flat) == set(SSV2_IDS)
    shares = [
        video.video_trajectory_dataset(ssv2["video_dir"], ssv2["labels"], process_index=i, process_count=2)
        for i in range(2)
    ]
    keys = [[t["traj_key"][0].decode() for t in ds.as_numpy_iterator()] for ds in shares]
    assert keys == [["ssv2/train/3", "ssv2/train/10", "ssv2/train/100"], ["ssv2/train/7", "ssv2/train/21"]]
    with pytest.raises(ValueError, match="process_index"):
        video.SomethingSomethingReader(ssv2["video_dir"], ssv2["labels"], process_index=2, process_count=2)


def test_shuffle_seed_orders_each_pass(ssv2):
    def reader():
        return video.SomethingSomethingReader(ssv2["video_dir"], ssv2["labels"], shuffle_seed=3)

    orders = [reader().pass_order(i) for i in range(4)]
    assert all(sorted(o, key=int) == ["3", "7", "10", "21", "100"] for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert reader().pass_order(2) == orders[2]  # a function of (seed, process, pass) only
    dataset = reader().as_dataset()
    passes = [[t["traj_key"][0].decode().rsplit("/", 1)[1] for t in dataset.as_numpy_iterator()] for _ in range(2)]
    assert passes == orders[:2]


# -- bad input ----------------------------------------------------------------------------------


def test_missing_dir_and_labels_file(tmp_path, ssv2):
    with pytest.raises(FileNotFoundError, match="video directory not found: .*no_such_dir"):
        video.SomethingSomethingReader(tmp_path / "no_such_dir", ssv2["labels"])
    with pytest.raises(FileNotFoundError, match="labels file not found: .*no_labels.json"):
        video.SomethingSomethingReader(ssv2["video_dir"], tmp_path / "no_labels.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        video.SomethingSomethingReader(ssv2["video_dir"], bad)
    bad.write_text(json.dumps([{"label": "no id"}]))
    with pytest.raises(ValueError, match="entry 0 has no 'id'"):
        video.SomethingSomethingReader(ssv2["video_dir"], bad)
    bad.write_text(json.dumps([{"id": "3", "label": "a"}, {"id": 3, "label": "b"}]))
    with pytest.raises(ValueError, match="id 3 appears more than once"):
        video.SomethingSomethingReader(ssv2["video_dir"], bad)
    with pytest.raises(FileNotFoundError, match="video file not found: .*nothing.webm"):
        video.read_video(tmp_path / "nothing.webm")


def test_label_without_video(tmp_path, ssv2):
    labels = tmp_path / "labels.json"
    entries = [ssv2_entry(v, i) for i, v in enumerate(SSV2_IDS)] + [{"id": "999", "label": "gone"}]
    labels.write_text(json.dumps(entries))
    with pytest.raises(FileNotFoundError, match=r"1 of 6 labelled videos missing .*999\.webm"):
        video.SomethingSomethingReader(ssv2["video_dir"], labels)
    reader = video.SomethingSomethingReader(ssv2["video_dir"], labels, missing_videos="skip")
    assert "999" not in reader.video_ids and len(reader) == 5
    assert reader.missing_ids == ["999"] and reader.stats["missing_videos"] == 1
    only_missing = tmp_path / "only_missing.json"
    only_missing.write_text(json.dumps([{"id": "999", "label": "gone"}]))
    with pytest.raises(ValueError, match="no videos to read.*1 of them missing"):
        video.SomethingSomethingReader(ssv2["video_dir"], only_missing, missing_videos="skip")


@pytest.fixture()
def with_corrupt(tmp_path, ssv2):
    """The SSv2 folder plus a corrupt clip '5' (random bytes) and a truncated-header clip '6'."""
    video_dir = tmp_path / "videos"
    video_dir.mkdir()
    for name in os.listdir(ssv2["video_dir"]):
        os.symlink(os.path.join(ssv2["video_dir"], name), video_dir / name)
    (video_dir / "5.webm").write_bytes(np.random.default_rng(0).bytes(4000))
    with open(os.path.join(ssv2["video_dir"], "3.webm"), "rb") as f:
        (video_dir / "6.webm").write_bytes(f.read()[:200])
    labels = tmp_path / "labels.json"
    entries = [ssv2_entry(v, i) for i, v in enumerate(SSV2_IDS)]
    labels.write_text(json.dumps(entries + [{"id": "5", "label": "corrupt"}, {"id": "6", "label": "cut"}]))
    return str(video_dir), str(labels)


def test_undecodable_video(with_corrupt):
    video_dir, labels = with_corrupt
    with pytest.raises(video.VideoDecodeError, match=r"5\.webm: cannot decode video"):
        video.read_video(os.path.join(video_dir, "5.webm"))
    reader = video.SomethingSomethingReader(video_dir, labels)
    with pytest.raises(video.VideoDecodeError, match=r"5\.webm"):
        list(reader)
    # Through tf.data the generator's error surfaces with the file name in the message.
    with pytest.raises(tf.errors.OpError, match=r"5\.webm"):
        list(video.video_trajectory_dataset(video_dir, labels).as_numpy_iterator())

    reader = video.SomethingSomethingReader(video_dir, labels, ignore_errors=True, num_workers=2)
    keys = [t["traj_key"][0].decode() for t in reader]
    assert keys == [f"ssv2/train/{i}" for i in ["3", "7", "10", "21", "100"]]
    assert reader.stats["decode_errors"] == 2 and reader.stats["yielded"] == 5
    assert any("5.webm" in f for f in reader.stats["failed_files"])
    assert any("6.webm" in f for f in reader.stats["failed_files"])


def test_all_undecodable_is_an_error(with_corrupt, tmp_path):
    video_dir, _ = with_corrupt
    labels = tmp_path / "corrupt_only.json"
    labels.write_text(json.dumps([{"id": "5", "label": "corrupt"}]))
    reader = video.SomethingSomethingReader(video_dir, labels, ignore_errors=True)
    with pytest.raises(ValueError, match="no trajectories .* 1 undecodable"):
        list(reader)


def test_min_frames_skips_short_clips(ssv2):
    reader = video.SomethingSomethingReader(ssv2["video_dir"], ssv2["labels"], min_frames=25)
    lengths = {v: len(s) for v, s in ssv2["sources"].items()}
    kept = [t["traj_key"][0].decode().rsplit("/", 1)[1] for t in reader]
    assert kept == [v for v in reader.video_ids if lengths[v] >= 25]
    assert reader.stats["too_short"] == sum(1 for n in lengths.values() if n < 25)


def test_latent_labels_join_onto_video(ssv2, tmp_path):
    """End to end: label SSv2 pairs at a gap H (no label for the last H frames) and join them."""
    gap = 3
    reader = video.SomethingSomethingReader(ssv2["video_dir"], ssv2["labels"])
    rng = np.random.default_rng(0)
    codes = {}
    with LatentLabelWriter(tmp_path / "labels", "laq-test", (4,), 8, {"target_fps": 12, "gap": gap}) as writer:
        for video_id in reader.video_ids:
            length = len(ssv2["sources"][video_id])
            codes[video_id] = rng.integers(0, 8, (length - gap, 4))
            writer.add(reader.traj_key(video_id), np.arange(length - gap), codes[video_id])
    joined = join_latent_labels(reader.as_dataset(), tmp_path / "labels", expected_hash="laq-test")
    for traj in joined.as_numpy_iterator():
        video_id = traj["traj_key"][0].decode().rsplit("/", 1)[1]
        length = len(ssv2["sources"][video_id])
        assert list(traj["has_latent"]) == [True] * (length - gap) + [False] * gap
        np.testing.assert_array_equal(traj["latent_action"][: length - gap], codes[video_id])
        assert not traj["latent_action"][length - gap :].any()


def test_schema_trajectory_fills_the_schema_and_refuses_mismatched_lengths():
    frames = np.array([b"a", b"b", b"c"], dtype=object)
    action = np.arange(6, dtype=np.float32).reshape(3, 2)
    traj = video.schema_trajectory({"wrist": frames}, ["x", "y", "z"], "toy/train/0", "toy", action=action,
                                   proprio=np.ones((3, 1)), timestep=np.array([4, 5, 6]))
    assert list(traj["observation"]["image_wrist"]) == [b"a", b"b", b"c"]
    assert list(traj["observation"]["image_primary"]) == [b""] * 3
    np.testing.assert_array_equal(traj["action"], action)
    assert traj["has_action"].tolist() == [True] * 3
    assert traj["observation"]["timestep"].tolist() == [4, 5, 6]
    assert list(traj["task"]["language_instruction"]) == [b"x", b"y", b"z"]
    assert list(traj["traj_key"]) == [b"toy/train/0"] * 3
    free = video.video_trajectory(frames, "go", "k", "toy", action_dim=7)
    assert free["action"].shape == (3, 7) and not free["action"].any() and not free["has_action"].any()
    assert free["observation"]["proprio"].shape == (3, 0) and free["observation"]["timestep"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="camera 'wrist' has 2 frames, expected 3"):
        video.schema_trajectory({"primary": frames, "wrist": frames[:2]}, "go", "k", "toy")
    with pytest.raises(ValueError, match="2 strings for a trajectory of 3 steps"):
        video.schema_trajectory({"primary": frames}, ["a", "b"], "k", "toy")
    with pytest.raises(ValueError, match="cameras \\['side'\\]"):
        video.schema_trajectory({"side": frames}, "go", "k", "toy")


def test_map_ahead_closed_on_one_of_its_own_workers():
    """The garbage collector may finalize an abandoned ``map_ahead`` generator on any thread, also
    on one of its own pool's workers, which cannot join itself: closing there must not raise."""
    suspended, closed = threading.Event(), threading.Event()
    errors, generator = [], {}

    def decode(item):
        if item == 2:  # runs ahead on a worker while the generator waits at its first yield
            assert suspended.wait(10)
            try:
                generator["it"].close()
            except Exception as error:  # noqa: BLE001 -- recorded and asserted below
                errors.append(error)
            closed.set()
        return item * 10

    generator["it"] = video.map_ahead(decode, list(range(8)), num_workers=2)
    assert next(generator["it"]) == 0
    suspended.set()
    assert closed.wait(10)
    assert errors == []
    with pytest.raises(StopIteration):  # closed: nothing more comes out
        next(generator["it"])

