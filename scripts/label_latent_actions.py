"""Labels action-free video with a trained LAQ's latent actions (stage 1 -> stage 2).

    python scripts/label_latent_actions.py --laq_checkpoint=runs/laq \
        --data_dir=runs/data/metaworld_mt10_64 [--dataset=metaworld | --mixture=NAME] \
        --out=runs/labels [--split=train] [--batch_size=64] [--resume | --overwrite]

Every trajectory of the split is cut into the LAQ's windows (lapa: pairs t, t+H; vipra: clips),
encoded with the jitted encoder over this process's devices, and written (atomically, resumably)
as a latent-label directory the pretraining stage joins by (trajectory, frame), stamped with the
LAQ config's hash. Run it on every host of a pod: each labels its share of the files, host 0 writes
the index. Format: ``jaxvla/data/latent_labels.py``; windows: ``jaxvla/latent_actions.py``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--laq_checkpoint", required=True, help="LAQ workdir or checkpoint step directory")
    parser.add_argument("--out", required=True, help="label directory to write")
    parser.add_argument("--data_dir", default="", help="TFDS data_dir (default: the LAQ's)")
    parser.add_argument("--dataset", default="", help="single dataset name (default: the LAQ's)")
    parser.add_argument("--mixture", default="", help="registered mixture or 'name:weight,...' (overrides --dataset)")
    parser.add_argument("--split", default="train",
                        help="split(s) to label, comma-separated (train,val: pretraining's eval reads val)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=256, help="trajectories per label shard")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--overwrite", action="store_true", help="replace existing labels")
    args = parser.parse_args(argv)

    from jaxvla import sharding
    from jaxvla.latent_actions import label_dataset, load_laq

    sharding.maybe_initialize_distributed()
    try:
        laq = load_laq(args.laq_checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    data = laq.config.data
    data.unlock()
    if args.data_dir:
        data.data_dir = args.data_dir
    if args.mixture:
        data.mixture = args.mixture
    elif args.dataset:
        data.dataset, data.mixture = args.dataset, ""
    try:
        out = label_dataset(
            laq, data, args.out, split=args.split, batch_size=args.batch_size, resume=args.resume,
            overwrite=args.overwrite, shard_size=args.shard_size,
        )
    except (FileExistsError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"latent labels (LAQ config hash {laq.config_hash}, step {laq.step}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
