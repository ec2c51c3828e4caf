"""LeRobot datasets: write then read (v3.0 and v2.1), image-dtype tables built by hand, the export of
Meta-World demonstrations, the pipeline entry, and errors that name the file."""

import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxvla.data import lerobot as lr

FPS = 80.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moving_frames(length: int, size: int = 64, phase: int = 0) -> np.ndarray:
    """Smooth frames that change every step (so a frame one step off is measurably different)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    out = []
    for t in range(phase, phase + length):
        red = 127.5 + 100 * np.sin(x / 9.0 + t / 2.0)
        green = 127.5 + 100 * np.cos(y / 7.0 - t / 3.0)
        blue = np.full_like(x, 40 + 15 * (t % 10))
        out.append(np.stack([red, green, blue], -1))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_episodes(lengths=(7, 12, 9), state_dim=5, action_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        lr.LeRobotEpisode(
            frames={"observation.image": moving_frames(length, phase=3 * i)},
            task=f"task {i % 2}",
            state=rng.normal(size=(length, state_dim)).astype(np.float32),
            action=rng.normal(size=(length, action_dim)).astype(np.float32),
        )
        for i, length in enumerate(lengths)
    ]


def decode(images) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_write_then_read_round_trip(tmp_path, version):
    episodes = make_episodes()
    info = lr.write_lerobot_dataset(tmp_path / "ds", episodes, fps=FPS, version=version)
    assert info.version == version and info.fps == FPS
    with open(tmp_path / "ds" / "meta" / "info.json") as f:
        written = json.load(f)
    assert written["total_episodes"] == 3 and written["total_frames"] == 28
    assert written["features"]["observation.state"]["shape"] == [5]

    trajectories = list(lr.LeRobotSource().trajectories("train", data_dir=str(tmp_path / "ds")))
    assert len(trajectories) == 3
    for index, (episode, trajectory) in enumerate(zip(episodes, trajectories)):
        # Actions and state exactly; instructions, keys and timesteps as written.
        np.testing.assert_array_equal(trajectory["action"], episode.action)
        np.testing.assert_array_equal(trajectory["observation"]["proprio"], episode.state)
        assert trajectory["has_action"].all()
        assert {t.decode() for t in trajectory["task"]["language_instruction"]} == {episode.task}
        assert trajectory["traj_key"][0].decode() == f"lerobot/train/{index}"
        np.testing.assert_array_equal(trajectory["observation"]["timestep"], np.arange(episode.length))
        assert set(trajectory["observation"]["image_wrist"]) == {b""}
        # Frames within codec tolerance, and each nearer its own source frame than its neighbours'
        # (an off-by-one in the span or the timestamps would fail here).
        frames = decode(trajectory["observation"]["image_primary"]).astype(np.float64)
        source = episode.frames["observation.image"].astype(np.float64)
        errors = np.abs(frames - source).mean(axis=(1, 2, 3))
        assert errors.max() < 6.0, errors
        for t in range(1, episode.length):
            assert errors[t] < np.abs(frames[t] - source[t - 1]).mean()
            assert np.abs(frames[t - 1] - source[t - 1]).mean() < np.abs(frames[t - 1] - source[t]).mean()


def test_statistics_match_numpy(tmp_path):
    episodes = make_episodes()
    lr.write_lerobot_dataset(tmp_path / "ds", episodes, fps=FPS)
    with open(tmp_path / "ds" / "meta" / "stats.json") as f:
        stats = json.load(f)
    actions = np.concatenate([e.action for e in episodes]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["action"]["std"], actions.std(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["action"]["min"], actions.min(0))
    assert stats["action"]["count"] == [28]
    pixels = np.concatenate([e.frames["observation.image"] for e in episodes]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(np.ravel(stats["observation.image"]["mean"]), pixels.mean(0), rtol=1e-6)


def test_training_passes_reorder_episodes_and_processes_split_them(tmp_path):
    lr.write_lerobot_dataset(tmp_path / "ds", make_episodes(lengths=(3, 4, 5, 6, 7)), fps=FPS)
    source = lr.LeRobotSource(root=str(tmp_path / "ds"))

    def keys(**kwargs):
        return [t["traj_key"][0].decode().rsplit("/", 1)[1] for t in source.trajectories("train", **kwargs)]

    assert keys() == ["0", "1", "2", "3", "4"]
    shares = [keys(process_index=i, process_count=2) for i in range(2)]
    assert shares == [["0", "2", "4"], ["1", "3"]]
    orders = {tuple(keys(train=True, seed=3, pass_index=p)) for p in range(6)}
    assert all(sorted(order) == ["0", "1", "2", "3", "4"] for order in orders) and len(orders) > 1


def _write_image_table_dataset(root, frames, actions, task="stack the blocks"):
    """A v2.1 dataset whose camera is an ``image`` feature (PNG bytes in the table), the layout of
    openpi's converted LIBERO data, written here with pyarrow directly (not with jaxvla's writer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    length = len(frames)
    os.makedirs(root / "meta")
    os.makedirs(root / "data" / "chunk-000")
    cells = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    table = pa.table({
        "image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "actions": pa.array(actions.tolist(), pa.list_(pa.float32(), actions.shape[1])),
        "timestamp": pa.array(np.arange(length) / 10.0, pa.float32()),
        "frame_index": pa.array(range(length), pa.int64()),
        "episode_index": pa.array([0] * length, pa.int64()),
        "index": pa.array(range(length), pa.int64()),
        "task_index": pa.array([0] * length, pa.int64()),
    })
    pq.write_table(table, root / "data" / "chunk-000" / "episode_000000.parquet")
    info = {"codebase_version": "v2.1", "fps": 10, "chunks_size": 1000, "total_episodes": 1,
            "splits": {"train": "0:1"}, "video_path": None,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "features": {"image": {"dtype": "image", "shape": [32, 32, 3], "names": ["height", "width", "channel"]},
                         "actions": {"dtype": "float32", "shape": [actions.shape[1]]}}}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "episodes.jsonl").write_text(json.dumps({"episode_index": 0, "tasks": [task], "length": length}) + "\n")
    (root / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": task}) + "\n")


def test_image_features_read_from_the_table(tmp_path):
    rng = np.random.default_rng(1)
    frames = moving_frames(4, size=32)
    actions = rng.normal(size=(4, 7)).astype(np.float32)
    _write_image_table_dataset(tmp_path / "libero", frames, actions)
    source = lr.LeRobotSource(root=str(tmp_path / "libero"), action_key="actions", jpeg_quality=100)
    (trajectory,) = source.trajectories("train")
    np.testing.assert_array_equal(trajectory["action"], actions)
    assert trajectory["observation"]["proprio"].shape == (4, 0)
    assert trajectory["task"]["language_instruction"][0] == b"stack the blocks"
    # PNG in, JPEG (quality 100) out: close, not exact.
    assert np.abs(decode(trajectory["observation"]["image_primary"]).astype(int) - frames).mean() < 3.0


def test_nothing_half_written_on_error(tmp_path):
    episodes = make_episodes()
    episodes[2].action = episodes[2].action[:, :3]  # a width that disagrees with the first episode
    with pytest.raises(ValueError, match="episode 2: action has shape"):
        lr.write_lerobot_dataset(tmp_path / "ds", episodes, fps=FPS)
    assert os.listdir(tmp_path) == []
    lr.write_lerobot_dataset(tmp_path / "ds", make_episodes(), fps=FPS)
    with pytest.raises(FileExistsError, match="overwrite"):
        lr.write_lerobot_dataset(tmp_path / "ds", make_episodes(), fps=FPS)


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta/info.json"):
        lr.read_info(tmp_path)
    lr.write_lerobot_dataset(tmp_path / "ds", make_episodes(), fps=FPS)
    info_path = tmp_path / "ds" / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(dict(info, codebase_version="v1.6")))
    with pytest.raises(lr.LeRobotFormatError, match="v1.6"):
        lr.read_info(tmp_path / "ds")
    info_path.write_text(json.dumps(info))
    with pytest.raises(KeyError, match="no split 'val'"):
        list(lr.LeRobotSource().trajectories("val", data_dir=str(tmp_path / "ds")))
    # A table longer than its video: the reader names the file instead of repeating frames.
    episodes_dir = tmp_path / "ds" / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(episodes_dir).to_pydict()
    table["videos/observation.image/from_timestamp"][2] += 5.0
    import pyarrow as pa

    pq.write_table(pa.table(table), episodes_dir)
    with pytest.raises(lr.LeRobotFormatError, match="file-000.mp4"):
        list(lr.LeRobotSource().trajectories("train", data_dir=str(tmp_path / "ds")))


def test_export_metaworld_demonstrations(metaworld_dataset, tmp_path):
    """scripts/export_lerobot.py writes the Meta-World RLDS episodes; reading them back gives the
    RLDS actions and states exactly (the terminal step without an action left out)."""
    import tensorflow_datasets as tfds

    spec = importlib.util.spec_from_file_location("export_lerobot", os.path.join(ROOT, "scripts", "export_lerobot.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = script.main
    out = tmp_path / "mw"
    assert main(["--data_dir", str(metaworld_dataset["out"]), "--out", str(out)]) == 0
    builder = tfds.builder_from_directory(str(metaworld_dataset["version_dir"]))
    expected = []
    for episode in builder.as_dataset(split="train", shuffle_files=False):
        steps = list(episode["steps"].as_numpy_iterator())
        keep = [s for s in steps if not s["is_last"]]
        expected.append((np.stack([s["action"] for s in keep]), np.stack([s["observation"]["state"] for s in keep]),
                         np.stack([s["observation"]["image"] for s in keep])))
    trajectories = list(lr.LeRobotSource().trajectories("train", data_dir=str(out)))
    assert len(trajectories) == len(expected) >= 2
    assert lr.read_info(out).fps == 80.0
    for (action, state, images), trajectory in zip(expected, trajectories):
        np.testing.assert_array_equal(trajectory["action"], action.astype(np.float32))
        np.testing.assert_array_equal(trajectory["observation"]["proprio"], state.astype(np.float32))
        frames = decode(trajectory["observation"]["image_primary"]).astype(np.float64)
        assert np.abs(frames - images).mean() < 8.0


def test_pipeline_reads_a_registered_lerobot_dataset(tmp_path):
    """make_batches over a registered LeRobot dataset: chunks whose actions are the written ones at
    the sample's own timesteps, and pairs whose gap comes from info.json's fps."""
    from jaxvla.data.registry import register_lerobot
    from jaxvla.data.pipeline import make_batches

    lengths = (30, 26)
    episodes = make_episodes(lengths=lengths)
    for index, episode in enumerate(episodes):  # actions that name their episode and step
        t = np.arange(episode.length, dtype=np.float32)
        episode.action = np.stack([np.full_like(t, index), t, t / 2, (t % 2)], 1)
    lr.write_lerobot_dataset(tmp_path / "ds", episodes, fps=10.0)
    register_lerobot("test_lerobot_chunks", tmp_path / "ds", gripper_dims=(3,))

    data = {"dataset": "test_lerobot_chunks", "sample": "chunks", "chunk_size": 3, "image_size": 32,
            "shuffle_buffer": 4, "traj_shuffle_buffer": 0}
    batch = next(iter(make_batches(data, batch_size=8, train=True, seed=0)))
    assert batch["observation"]["image_primary"].shape == (8, 32, 32, 3)
    for row in range(8):
        episode = int(batch["action"][row, 0, 0])
        start = int(batch["observation"]["timestep"][row])
        valid = batch["action_pad_mask"][row]
        expected = episodes[episode].action[start:start + 3]
        np.testing.assert_array_equal(batch["action"][row][valid], expected[: int(valid.sum())])

    pairs = next(iter(make_batches(dict(data, sample="pairs", gap_seconds=0.6), batch_size=4, train=False)))
    assert set(pairs["gap"].tolist()) == {6}  # 0.6 s at info.json's 10 fps


@pytest.mark.skipif(not os.environ.get("JAXVLA_LEROBOT_PYTHON"),
                    reason="set JAXVLA_LEROBOT_PYTHON to a Python with the lerobot package (it pins its own torch)")
def test_lerobot_package_reads_what_we_write(tmp_path):
    """LeRobot's own LeRobotDataset (scripts/lerobot_reader_check.py in lerobot's interpreter) reads
    the written v3.0 dataset: every action, state and task equal, pixels within codec tolerance.
    (lerobot 0.4 reads v3.0 only; it refuses v2.1 and points at its converter.)"""
    import subprocess

    episodes = make_episodes()
    lr.write_lerobot_dataset(tmp_path / "ds", episodes, fps=FPS, version="v3.0")
    np.savez(tmp_path / "expected.npz",
             action=np.concatenate([e.action for e in episodes]), state=np.concatenate([e.state for e in episodes]),
             frames=np.concatenate([e.frames["observation.image"] for e in episodes]),
             task=np.asarray([e.task for e in episodes for _ in range(e.length)]))
    result = subprocess.run(
        [os.environ["JAXVLA_LEROBOT_PYTHON"], os.path.join(ROOT, "scripts", "lerobot_reader_check.py"),
         str(tmp_path / "ds"), str(tmp_path / "expected.npz")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 28 frames: largest action/state difference 0.0" in result.stdout
