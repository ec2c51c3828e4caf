"""Image tokenizer (LWM-style VQGAN).

Variants: ``small`` (64x64 -> 8x8 tokens, trains on CPU in minutes; the default) and ``lwm``
(256x256 -> 16x16 tokens, codebook 8192 x 64: LWM's shape, loadable from LWM's weights).

    python -m jaxvla.train --config=configs/tokenizer.py:small --workdir=runs/tokenizer
"""

import ml_collections

from jaxvla.config import base_config, finalize


def get_config(variant: str = "small"):
    c = base_config()
    c.stage = "tokenizer"
    if variant not in ("small", "lwm"):
        raise ValueError(f"configs/tokenizer.py: unknown variant {variant!r}; expected small or lwm")
    small = variant == "small"

    c.num_steps = 2000 if small else 100_000
    c.batch_size = 16 if small else 64
    c.log_every = 10 if small else 50
    c.eval_every = 200 if small else 5000
    c.image_every = 500 if small else 5000
    c.checkpoint.every = 500 if small else 5000
    c.compute_dtype = "float32" if small else "bfloat16"
    c.optimizer.learning_rate = 3e-4 if small else 1e-4
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 100 if small else 2000
    c.optimizer.end_lr_ratio = 0.1
    c.optimizer.b2 = 0.99

    c.model = ml_collections.ConfigDict(
        dict(
            variant=variant,
            # 0: the variant's value.
            codebook_size=0,
            embed_dim=0,
            hidden_channels=0,
            num_res_blocks=0,
            l1_weight=1.0,
            codebook_weight=1.0,
            commitment_weight=0.25,
            lpips_weight=0.0 if small else 0.1,
            lpips_net="vgg",
            lpips_weights_dir="",
            restart_every=50 if small else 1000,
            restart_decay=0.95 if small else 0.99,
            restart_threshold=0.03,
        )
    )
    # What load_frames reads (jaxvla/stages/tokenizer.py); metaworld and dataset read through the
    # data pipeline's reader (jaxvla.data.pipeline.trajectory_frames).
    c.data = ml_collections.ConfigDict(
        dict(
            source="metaworld",  # metaworld | dataset (rlds: the same) | procedural
            # metaworld: a TFDS data_dir (generated on first use); dataset / rlds: the directory
            # holding the TFDS datasets, or one dataset's version directory.
            data_dir="runs/data/metaworld_mt10_64",
            dataset="metaworld",  # dataset / rlds: a registered dataset (jaxvla.data.registry)
            mixture="",  # dataset / rlds: a mixture name or "name:weight,..." (overrides dataset)
            cameras="primary",  # the first camera is read
            tasks="mt10",  # metaworld: which tasks to generate
            episodes_per_task=5,
            split="",  # "": each dataset's train split
            eval_split="",  # "": each dataset's val split (missing: 10% of the train frames)
            max_frames=0,  # 0: all (train and eval frames each)
            num_frames=2048,  # procedural scenes
            seed=0,
        )
    )
    return finalize(c)
