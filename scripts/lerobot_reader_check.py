"""A dataset written by jaxvla, read by LeRobot's own LeRobotDataset (run it in a venv with lerobot).

    python scripts/export_lerobot.py --data_dir=runs/data/metaworld_mt10_64 --out=/tmp/mt10_lerobot
    python3 -m venv /tmp/lerobot && /tmp/lerobot/bin/pip install lerobot==0.4.4
    HF_HUB_OFFLINE=1 /tmp/lerobot/bin/python scripts/lerobot_reader_check.py /tmp/mt10_lerobot [expected.npz]

Prints what LeRobot reads (episodes, frames, fps, one item's keys, shapes and task). With
``expected.npz`` (arrays ``action``, ``state`` [N, .], ``frames`` uint8 [N, H, W, 3] and ``task``
strings in LeRobot's frame order, e.g. written by ``tests/test_lerobot.py``) it checks every frame:
actions and states equal, tasks equal, pixels within codec tolerance, and prints the largest
differences. Imports nothing from jaxvla.
"""

import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset


def main() -> int:
    root = sys.argv[1]
    dataset = LeRobotDataset("local/jaxvla_export", root=root, video_backend="pyav")
    import lerobot

    print(f"lerobot {lerobot.__version__}: {dataset.num_episodes} episodes, {dataset.num_frames} frames, "
          f"{dataset.fps} fps")
    item = dataset[0]
    print({k: tuple(v.shape) if hasattr(v, "shape") else v for k, v in item.items()})
    if len(sys.argv) < 3:
        return 0
    expected = np.load(sys.argv[2])
    camera = next(k for k in item if k.startswith("observation.image"))
    worst_pixel, worst_vector = 0.0, 0.0
    for index in range(dataset.num_frames):
        item = dataset[index]
        worst_vector = max(worst_vector, float(np.abs(item["action"].numpy() - expected["action"][index]).max()),
                           float(np.abs(item["observation.state"].numpy() - expected["state"][index]).max()))
        frame = np.rint(item[camera].numpy().transpose(1, 2, 0) * 255.0)
        worst_pixel = max(worst_pixel, float(np.abs(frame - expected["frames"][index]).mean()))
        if item["task"] != str(expected["task"][index]):
            print(f"frame {index}: task {item['task']!r}, expected {expected['task'][index]!r}")
            return 1
    print(f"all {dataset.num_frames} frames: largest action/state difference {worst_vector}, "
          f"largest mean pixel difference {worst_pixel:.2f}")
    return 0 if worst_vector == 0.0 and worst_pixel < 6.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
