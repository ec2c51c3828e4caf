"""Quality evidence for a trained latent action quantizer (stage 1).

    python scripts/eval_laq.py --checkpoint=runs/laq [--data_dir=runs/data/metaworld_mt10_64] [--out=FILE.json]

On the held-out split it prints the reconstruction PSNR against the copy-the-current-frame baseline,
the code perplexity and fraction of codes used, and the R^2 of a linear probe from one-hot codes to
the ground-truth actions (fitted on the training split) next to the same probe on shuffled codes.
See ``jaxvla/laq_quality.py`` for the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="LAQ workdir or checkpoint step directory")
    parser.add_argument("--data_dir", default="", help="TFDS data_dir (default: the one the LAQ trained on)")
    parser.add_argument("--train_split", default="train", help="split the probe is fitted on")
    parser.add_argument("--eval_split", default="val", help="held-out split")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_batches", type=int, default=0, help="cap per split (0: all)")
    parser.add_argument("--ridge", type=float, default=1e-3, help="probe L2 penalty (times N)")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from jaxvla.laq_quality import evaluate_laq, format_report
    from jaxvla.latent_actions import load_laq

    try:
        laq = load_laq(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    data = laq.config.data
    if args.data_dir:
        data.unlock()
        data.data_dir = args.data_dir
    result = evaluate_laq(
        laq, data, train_split=args.train_split, eval_split=args.eval_split, batch_size=args.batch_size,
        max_batches=args.max_batches, ridge=args.ridge, progress=True,
    )
    print(format_report(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
