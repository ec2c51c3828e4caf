"""Converts a Hugging Face ``LlamaForCausalLM`` checkpoint to jaxvla's LLaMA backbone params.

    python scripts/convert_hf_llama.py --input=HF_DIR_OR_FILE --output=llama.npz \
        [--config=config.json] [--scan_layers=true] [--strict=true]

``--input`` is a checkpoint directory (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin``) or one ``.safetensors`` / ``.bin`` /
``.pt`` file. torch files are read with ``torch.load(weights_only=True)`` (no code runs).
``--config`` defaults to ``config.json`` beside the input. The output (.npz with "/"-joined keys,
or .msgpack) holds the bare text-only ``params`` collection (``embed_text``, ``layers``,
``final_norm``, ``head_text``) and is written atomically; other modality tables are left out for
the trainer's ``init_from`` surgery to initialise.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from jaxvla.io.hf_llama import hf_config_to_llama, hf_to_params, read_hf_config, read_hf_state_dict
from jaxvla.io.weights import flatten_dict, save_param_tree


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="HF checkpoint directory or .safetensors/.bin/.pt file")
    parser.add_argument("--config", default="", help="HF config.json (default: beside --input)")
    parser.add_argument("--output", required=True, help="converted params (.npz or .msgpack)")
    parser.add_argument("--scan_layers", type=_bool, default=True, help="stack layers on axis 0 (default true)")
    parser.add_argument("--strict", type=_bool, default=True, help="unexpected tensors are an error (default true)")
    args = parser.parse_args(argv)

    suffix = os.path.splitext(args.output)[1].lower()
    if suffix not in (".npz", ".msgpack"):
        parser.error(f"--output must end in .npz or .msgpack, got '{args.output}'")
    try:
        config_path = args.config or (args.input if os.path.isdir(args.input)
                                      else os.path.join(os.path.dirname(os.path.abspath(args.input)), "config.json"))
        config = hf_config_to_llama(read_hf_config(config_path), scan_layers=args.scan_layers)
        params = hf_to_params(read_hf_state_dict(args.input), config, strict=args.strict)
    except (OSError, ValueError) as error:  # missing files, bad config, layout mismatch, unreadable file
        print(f"error: {error}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_param_tree(args.output, params)
    count = int(sum(np.size(v) for v in flatten_dict(params).values()))
    print(f"converted {count:,} parameters ({config.num_layers} layers, dim {config.dim}, "
          f"vocab {config.text_vocab}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
