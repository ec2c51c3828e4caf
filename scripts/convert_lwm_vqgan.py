"""Converts LWM's published VQGAN weights to jaxvla's parameter names.

    python scripts/convert_lwm_vqgan.py --input=vqgan.pkl --output=vqgan_jaxvla.npz [--variant=lwm]

The input is read with the restricted unpickler (containers and numpy arrays only), so a
tampered file cannot run code. The output (.npz with "/"-joined keys, or .msgpack) holds the
bare ``params`` collection of ``jaxvla.models.vqgan.VQGAN`` and is written atomically;
``jaxvla.io.lwm.load_vqgan_params`` reads it back.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

from jaxvla.io.lwm import count_params, load_lwm_vqgan
from jaxvla.io.weights import save_param_tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="LWM VQGAN weights (.pkl, .npz or .msgpack)")
    parser.add_argument("--output", required=True, help="converted params (.npz or .msgpack)")
    parser.add_argument("--variant", default="lwm", help="VQGAN variant the weights belong to")
    args = parser.parse_args(argv)

    suffix = os.path.splitext(args.output)[1].lower()
    if suffix not in (".npz", ".msgpack"):
        parser.error(f"--output must end in .npz or .msgpack, got '{args.output}'")
    try:
        params = load_lwm_vqgan(args.input, args.variant)
    # Missing file, unknown suffix, layout mismatch, or a pickle naming a non-allow-listed global.
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    output_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(output_dir, exist_ok=True)
    save_param_tree(args.output, params)
    print(f"converted {count_params(params):,} parameters -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
