"""Export a dataset of jaxvla's registry (e.g. the Meta-World demonstrations) as a LeRobot dataset.

    python scripts/export_lerobot.py --data_dir=runs/data/metaworld_mt10_64 --out=runs/lerobot/mt10
        [--dataset=metaworld] [--split=train] [--version=v3.0|v2.1] [--max_episodes=N] [--overwrite]

Trajectories come from the pipeline's reader (``jaxvla.data.pipeline.make_trajectory_dataset``,
standardised to jaxvla's schema) in file order. Every camera present becomes a video feature
(``observation.image`` for ``primary``, as the Hub's ``lerobot/metaworld_mt50`` names it;
``observation.images.<camera>`` for the others), ``observation/proprio`` becomes
``observation.state`` and ``action`` stays ``action``. LeRobot rows pair an observation with the
action taken from it, so steps without an action (the RLDS terminal step that holds only the
final frame) are left out. The frame rate is the dataset's ``control_hz`` (80 for Meta-World).
Read it back with ``config.data.dataset = "lerobot"`` and ``config.data.data_dir = <out>``
(``jaxvla.data.lerobot``).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURE_NAMES = {"primary": "observation.image", "secondary": "observation.images.secondary",
                 "wrist": "observation.images.wrist"}


def episodes_of(dataset: str, data_dir: str, split: str, max_episodes: int = 0):
    """``(LeRobotEpisode, ...)`` of one registry dataset's split, in file order, and its frame rate."""
    import numpy as np
    from PIL import Image

    from jaxvla.data.lerobot import LeRobotEpisode
    from jaxvla.data.pipeline import get_dataset_spec, make_trajectory_dataset

    spec = get_dataset_spec(dataset)
    if not spec.control_hz:
        raise ValueError(f"dataset {dataset!r} has no control_hz in its spec; a LeRobot dataset needs a frame rate")
    trajectories = make_trajectory_dataset(spec, split, False, 0, 0, 1, data_dir=data_dir)

    def decode(images):
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])

    def generate():
        for count, trajectory in enumerate(trajectories.dataset.as_numpy_iterator()):
            if max_episodes and count >= max_episodes:
                return
            keep = np.asarray(trajectory["has_action"], bool)
            if not keep.any():
                continue
            observation = trajectory["observation"]
            frames = {FEATURE_NAMES[camera]: decode(observation[f"image_{camera}"][keep])
                      for camera in FEATURE_NAMES if observation[f"image_{camera}"][0]}
            proprio = np.asarray(observation["proprio"], np.float32)[keep]
            task = trajectory["task"]["language_instruction"][0].decode("utf-8")
            yield LeRobotEpisode(frames=frames, task=task, state=proprio if proprio.shape[1] else None,
                                 action=np.asarray(trajectory["action"], np.float32)[keep])

    return generate(), float(spec.control_hz)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="the dataset's TFDS data_dir (or version directory)")
    parser.add_argument("--out", required=True, help="the LeRobot dataset directory to write")
    parser.add_argument("--dataset", default="metaworld", help="a registry dataset name (default metaworld)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--version", default="v3.0", choices=["v3.0", "v2.1"])
    parser.add_argument("--robot_type", default="sawyer", help="info.json's robot_type (Meta-World's arm: sawyer)")
    parser.add_argument("--max_episodes", type=int, default=0, help="at most this many episodes (0: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from jaxvla.data.lerobot import write_lerobot_dataset

    episodes, fps = episodes_of(args.dataset, args.data_dir, args.split, args.max_episodes)
    info = write_lerobot_dataset(args.out, episodes, fps=fps, version=args.version, robot_type=args.robot_type,
                                 overwrite=args.overwrite, progress=True)
    features = {k: v["shape"] for k, v in info.features.items() if v["dtype"] != "int64" and k != "timestamp"}
    print(f"wrote {info.root}: LeRobot {info.version}, {info.splits['train']} episodes at {info.fps:g} fps, "
          f"features {features}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
