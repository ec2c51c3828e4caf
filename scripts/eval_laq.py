"""Quality evidence for a trained latent action quantizer (stage 1), and the gate before pretraining.

    python scripts/eval_laq.py --checkpoint=runs/laq_vipra [--data_dir=DIR] [--json=FILE.json] [--gate]
    python scripts/eval_laq.py --gap_scan=1,2,4,7,14,16,32 --data_dir=runs/data/metaworld_mt10_64

With ``--checkpoint`` it fits the probes on the training episodes and prints, on the held-out
episodes: reconstruction PSNR vs the copy-frame baseline, code usage (fraction used, perplexity),
and for the position (xyz) and the gripper the R^2 of linear and kNN probes from the codes, from
task identity, from task x episode phase, from task x phase + codes, and what the codes add over
task x phase, each with an episode-bootstrap 95 % interval (definitions: ``jaxvla/laq_quality.py``).
``--gate`` then applies the LAQ config's ``gate.*`` thresholds (exit status 3 when it fails).

``--gap_scan`` measures, without any LAQ, how the frame difference and its linear
predictability of the action over the span vary with the frame gap H (``frame_gap_scan``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="LAQ workdir or checkpoint step directory")
    parser.add_argument("--data_dir", default="", help="TFDS data_dir (default: the one the LAQ trained on)")
    parser.add_argument("--train_split", default="train", help="split the probes are fitted on")
    parser.add_argument("--eval_split", default="val", help="held-out split")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--window_stride", type=int, default=1, help="every n-th LAQ window of each episode")
    parser.add_argument("--train_episodes_per_task", type=int, default=0, help="cap on fit episodes (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="probe setting (configs/laq.py probe.*), e.g. --set=level=window --set=bootstrap=200")
    parser.add_argument("--gate", action="store_true", help="apply the LAQ config's gate.* thresholds")
    parser.add_argument("--gap_scan", default="", help="comma list of frame gaps: the measurement without a LAQ")
    parser.add_argument("--json", "--out", dest="json", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from jaxvla import laq_quality as quality

    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in quality.DEFAULT_SETTINGS:
            print(f"error: --set {key!r}: unknown probe setting; known: {sorted(quality.DEFAULT_SETTINGS)}",
                  file=sys.stderr)
            return 2
        default = quality.DEFAULT_SETTINGS[key]
        if isinstance(default, str):
            settings[key] = value
        elif isinstance(default, int):
            settings[key] = int(float(value))
        else:
            settings[key] = float(value)

    if args.gap_scan:
        from jaxvla.data.pipeline import default_data_config

        data = default_data_config()
        if args.data_dir:
            data.data_dir = args.data_dir
        gaps = [int(g) for g in args.gap_scan.split(",") if g.strip()]
        results = quality.frame_gap_scan(data, gaps, train_split=args.train_split, eval_split=args.eval_split,
                                         settings=settings)
        print(quality.format_gap_scan(results))
        if args.json:
            _write_json(args.json, results)
        return 0

    if not args.checkpoint:
        print("error: give --checkpoint (or --gap_scan)", file=sys.stderr)
        return 2
    from jaxvla.frozen import load_laq

    try:
        laq = load_laq(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    data = laq.config.data
    if args.data_dir:
        data.unlock()
        data.data_dir = args.data_dir
    config_settings = dict(laq.config.probe) if "probe" in laq.config else {}
    report = quality.probe(
        laq, data, train_split=args.train_split, eval_split=args.eval_split,
        settings={**config_settings, **settings}, batch_size=args.batch_size, window_stride=args.window_stride,
        train_episodes_per_task=args.train_episodes_per_task, progress=True,
    )
    print(quality.format_report(report))
    status = 0
    if args.gate:
        thresholds = dict(laq.config.gate) if "gate" in laq.config else {}
        passed, reasons = quality.gate(report, thresholds)
        report["gate"] = {"passed": passed, "reasons": reasons, "thresholds": {**quality.DEFAULT_GATE, **thresholds}}
        print("\nLAQ gate: " + ("passed" if passed else "FAILED\n  " + "\n  ".join(reasons)))
        status = 0 if passed else 3
    if args.json:
        _write_json(args.json, report)
    return status


if __name__ == "__main__":
    sys.exit(main())
