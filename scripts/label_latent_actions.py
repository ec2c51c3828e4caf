"""Labels action-free video with a trained LAQ's latent actions (stage 1 -> stage 2).

    python scripts/label_latent_actions.py --laq_checkpoint=runs/laq \
        --data_dir=runs/data/metaworld_mt10_64 [--dataset=metaworld | --mixture=NAME] \
        --out=runs/labels [--split=train] [--batch_size=64] [--resume | --overwrite]

Every trajectory of the split is cut into the LAQ's windows (lapa: pairs t, t+H; vipra: clips),
encoded with the jitted encoder over this process's devices, and written (atomically, resumably)
as a latent-label directory the pretraining stage joins by (trajectory, frame), stamped with the
LAQ config's hash. Run it on every host of a pod: each labels its share of the files, host 0 writes
the index. Format: ``jaxvla/data/latent_labels.py``; windows: ``jaxvla/latent_actions.py``.

A folder of clips instead of a dataset (``latent_actions.label_video_folder``)::

    python scripts/label_latent_actions.py --laq_checkpoint=runs/laq --video_dir=clips/ \
        --out=runs/labels_clips [--instructions=clips/labels.json] [--fps=12 | --fps=0] \
        [--gap_seconds=2.4] [--clip_stride_seconds=S] [--crop=center|pad|none] [--recursive]

Every .mp4 / .webm / .mkv / .avi / .mov / ... file (any codec FFmpeg decodes) is a clip, turned
upright by its display rotation and center-cropped (or padded) to the LAQ's square frames. --fps
resamples every clip to one rate (default 12, the rate of the pipeline's ``video_folder`` entry,
so the labels join onto ``config.data.dataset=video_folder``); --fps=0 keeps each clip's own rate.
The window is in seconds, converted with each clip's rate. Undecodable and too-short clips are
skipped and counted; the summary (N labelled, M skipped with reasons) is printed and written to
``<out>/video_summary-00000.json``, and the labels' info file records the folder, fps and gap.
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
    video = parser.add_argument_group("a folder of clips (instead of --data_dir / --dataset / --mixture)")
    video.add_argument("--video_dir", default="", help="folder of video clips to label")
    video.add_argument("--instructions", "--labels", dest="instructions", default="",
                       help="clip instructions: SSv2 labels JSON list or {id: text} (default: <video_dir>/labels.json "
                            "when present, else none)")
    video.add_argument("--fps", type=float, default=None,
                       help="resample every clip to this rate (default 12, the video_folder dataset's); 0 = each "
                            "clip's own rate")
    video.add_argument("--gap_seconds", type=float, default=0.0, help="lapa: seconds between the pair (0: 2.4)")
    video.add_argument("--clip_stride_seconds", type=float, default=0.0,
                       help="vipra: seconds between clip frames (0: the spacing of the LAQ's training clips)")
    video.add_argument("--crop", default="center", choices=("center", "pad", "none"),
                       help="make frames square by center crop, black padding, or not at all (squash)")
    video.add_argument("--extensions", default="", help="comma list of file extensions (default: all common ones)")
    video.add_argument("--recursive", action="store_true", help="also read clips in subfolders")
    video.add_argument("--dataset_name", default="video_folder", help="dataset name in the traj keys")
    video.add_argument("--num_workers", type=int, default=2, help="clips decoded ahead in threads")
    args = parser.parse_args(argv)
    if args.video_dir and (args.data_dir or args.dataset or args.mixture):
        parser.error("--video_dir labels a folder of clips: it takes no --data_dir, --dataset or --mixture")
    if not args.video_dir and (args.instructions or args.fps is not None or args.gap_seconds or args.clip_stride_seconds
                               or args.extensions or args.recursive):
        parser.error("--instructions, --fps, --gap_seconds, --clip_stride_seconds, --extensions and --recursive "
                     "need --video_dir")

    from jaxvla import sharding
    from jaxvla.frozen import load_laq
    from jaxvla.latent_actions import label_dataset

    sharding.maybe_initialize_distributed()
    try:
        laq = load_laq(args.laq_checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.video_dir:
        return _label_video_folder(laq, args)
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


def _label_video_folder(laq, args) -> int:
    import logging
    import os

    from jaxvla.data import video
    from jaxvla.latent_actions import label_video_folder, video_summary_line

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    instructions = args.instructions or None
    if instructions is None and os.path.isfile(os.path.join(args.video_dir, video.VIDEO_FOLDER_LABELS)):
        instructions = os.path.join(args.video_dir, video.VIDEO_FOLDER_LABELS)
    fps = video.VIDEO_FOLDER_FPS if args.fps is None else args.fps
    if fps < 0:
        print(f"error: --fps={args.fps}: expected a positive rate or 0 (each clip's own)", file=sys.stderr)
        return 2
    try:
        summary = label_video_folder(
            laq, args.video_dir, args.out, instructions=instructions, fps=fps or None, gap_seconds=args.gap_seconds,
            clip_stride_seconds=args.clip_stride_seconds, crop=args.crop, extensions=args.extensions or None,
            recursive=args.recursive, dataset_name=args.dataset_name, split=args.split, batch_size=args.batch_size,
            num_workers=args.num_workers, resume=args.resume, overwrite=args.overwrite, shard_size=args.shard_size,
        )
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for clip in summary["skipped_clips"]:
        print(f"skipped {clip['path']}: {clip['reason']} ({clip['detail']})")
    print(video_summary_line(summary))
    print(f"latent labels (LAQ config hash {laq.config_hash}, step {laq.step}) -> {args.out}")
    return 0 if summary["labelled"] or summary.get("resumed") else 1


if __name__ == "__main__":
    sys.exit(main())
