"""Export a checkpoint's parameters as a safetensors file for PyTorch users.

    python scripts/export_safetensors.py --checkpoint=runs/ft_flow --out=ft_flow.safetensors
        [--step=N] [--ema] [--keep_dtype]

``--checkpoint`` is any jaxvla workdir (a stage's checkpoints, e.g. a finetuned policy), its
checkpoints directory or a step directory; its digests are verified first (a corrupt step is
refused, ``jaxvla.checkpoint``). Every parameter is written under its path joined with "."
(``backbone.layers.attention.wq``; Flax's layout: a Dense kernel is ``[in, out]``, the transpose of
``torch.nn.Linear.weight``; scanned layers keep their leading layer axis) as float32 (``--keep_dtype``
keeps float16 / float64 / integer arrays; bfloat16 is always widened to float32). The file's
``__metadata__`` names the checkpoint, its step and stage. Read it with
``safetensors.torch.load_file(path)`` (or ``jaxvla.io.safetensor_files.read_safetensors``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # reading arrays to the host needs no accelerator


def export_tensors(checkpoint: str, step: int | None = None, ema: bool = False,
                   keep_dtype: bool = False) -> tuple[dict, dict]:
    """(name -> numpy array, metadata) of a checkpoint's params (``ema_params`` with ``ema``)."""
    import numpy as np

    from jaxvla import checkpoint as ckpt
    from jaxvla.io.weights import flatten_dict

    state, config, _, step = ckpt.load_checkpoint(checkpoint, step)
    which = "ema_params" if ema else "params"
    params = state.get(which)
    if not params:
        raise ValueError(f"{checkpoint} (step {step}): the saved state has no {which!r} (it has {sorted(state)})")
    tensors = {}
    for path, value in flatten_dict(params).items():
        array = np.asarray(value)
        if (not keep_dtype and np.issubdtype(array.dtype, np.floating)) or array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        tensors[path.replace("/", ".")] = array
    metadata = {"format": "jaxvla", "checkpoint": os.path.abspath(checkpoint), "step": str(step),
                "stage": str(config.get("stage", "")), "params": which,
                "layout": "flax: Dense kernels are [in, out]; '.'-joined parameter paths"}
    return tensors, metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a workdir, its checkpoints directory or a step directory")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--step", type=int, default=None, help="this step (default: the newest that verifies)")
    parser.add_argument("--ema", action="store_true", help="export ema_params instead of params")
    parser.add_argument("--keep_dtype", action="store_true", help="keep float16/float64 (bfloat16 still widens)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from jaxvla.io.safetensor_files import write_safetensors

    tensors, metadata = export_tensors(args.checkpoint, args.step, args.ema, args.keep_dtype)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_safetensors(out, tensors, metadata)
    total = sum(int(t.size) for t in tensors.values())
    print(f"wrote {len(tensors)} tensors ({total:,} values, {os.path.getsize(out):,} bytes) of "
          f"{metadata['checkpoint']} step {metadata['step']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
