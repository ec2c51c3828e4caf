"""Roll out Meta-World's scripted experts and write an RLDS (TFDS) dataset.

    python scripts/make_metaworld_dataset.py --tasks=mt10 --episodes_per_task=5 \
        --image_size=64 --out=/data/metaworld_mt10

The dataset lands in ``<out>/metaworld/1.0.0`` (read it with
``tfds.builder_from_directory`` or ``tfds.builder("metaworld", data_dir=<out>)``). See
``jaxvla/data/metaworld_rlds.py`` for the feature spec and the RLDS conventions.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mt10", help="mt10, mt50, or comma-separated task names (-v3 optional)")
    p.add_argument("--episodes_per_task", type=int, default=5, help="episodes per task, train + val")
    p.add_argument("--image_size", type=int, default=64, help="side of the square RGB frames")
    p.add_argument("--out", required=True, help="output directory (a TFDS data_dir), written atomically")
    p.add_argument("--action_noise", type=float, default=0.0, help="std of Gaussian noise added to expert actions")
    p.add_argument("--seed", type=int, default=0, help="base seed; each (task, episode) derives its own")
    p.add_argument(
        "--max_episode_steps", type=int, default=None, help="step limit per episode (default: Meta-World's 500)"
    )
    p.add_argument(
        "--val_episodes_per_task",
        type=int,
        default=None,
        help="last N episodes of each task go to the 'val' split (default 1 if episodes_per_task > 1, else 0)",
    )
    p.add_argument(
        "--steps_after_success", type=int, default=5, help="env steps kept after the first successful step"
    )
    p.add_argument("--camera", default="corner", help="camera preset: corner, corner_left or front")
    p.add_argument("--num_workers", type=int, default=2, help="rollout processes (1 = in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    # Imported here, not at module level: spawned rollout workers re-import this file as
    # their __main__ and must not pay for TensorFlow.
    from jaxvla.data.metaworld_rlds import make_metaworld_dataset

    try:
        make_metaworld_dataset(
            args.tasks,
            args.episodes_per_task,
            args.image_size,
            args.out,
            action_noise=args.action_noise,
            seed=args.seed,
            max_episode_steps=args.max_episode_steps,
            val_episodes_per_task=args.val_episodes_per_task,
            steps_after_success=args.steps_after_success,
            camera=args.camera,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
