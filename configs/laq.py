"""Latent action quantizer (stage 1): LAPA's frame-pair model or ViPRA's clip model.

Variants:

* ``lapa_small`` (default) / ``vipra_small``: 64 px Meta-World frames, train on CPU in minutes.
* ``lapa`` / ``vipra``: the paper sizes of REFERENCE.md (256 px patch 32, dim 1024, depth 8/8/8;
  224 px patch 14, dim 768, 8-frame clips), their optimisers and schedules.

    python -m jaxvla.train --config=configs/laq.py:vipra_small --workdir=runs/laq
    python scripts/eval_laq.py --checkpoint=runs/laq
"""

import ml_collections

from jaxvla.config import base_config, finalize
from jaxvla.data.pipeline import default_data_config

VARIANTS = ("lapa_small", "vipra_small", "lapa", "vipra")


def get_config(variant: str = "lapa_small"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/laq.py: unknown variant {variant!r}; expected one of {VARIANTS}")
    c = base_config()
    c.stage = "laq"
    small = variant.endswith("_small")
    vipra = variant.startswith("vipra")

    c.num_steps = 1500 if small else (300_000 if vipra else 100_000)
    c.batch_size = (8 if vipra else 16) if small else (18 if vipra else 64)
    c.log_every = 20 if small else 100
    c.eval_every = 500 if small else 5000
    c.eval_batches = 4
    c.image_every = 1000 if small else 5000
    c.checkpoint.every = 500 if small else 5000
    c.compute_dtype = "float32" if small else "bfloat16"
    c.optimizer.name = "adam" if not vipra else "adamw"
    c.optimizer.learning_rate = 1e-3 if small else 1e-4
    c.optimizer.schedule = "warmup_cosine" if small else "constant"
    c.optimizer.warmup_steps = 100 if small else 0
    c.optimizer.end_lr_ratio = 0.05
    c.optimizer.grad_clip_norm = (6.0 if vipra else 0.5) if not small else 1.0

    c.model = ml_collections.ConfigDict(
        dict(
            size=variant,  # jaxvla.models.laq sizes
            # 0: the size's value.
            image_size=0,
            patch_size=0,
            dim=0,
            num_heads=0,
            head_dim=0,
            encoder_depth=0,
            temporal_depth=0,
            decoder_depth=0,
            quant_dim=0,
            code_grid=0,
            codebook_size=0,
            num_frames=0,
            residual=True,
            recon_loss="l1" if vipra else "mse",
            lpips_weight=0.5 if vipra else 0.0,
            lpips_net="alex" if small else "vgg",  # VGG costs 5x AlexNet on CPU
            lpips_weights_dir="",
            flow_weight=0.1 if vipra else 0.0,
            flow_start=(750 if small else 60_000) if vipra else 0,
            flow_warmup=(250 if small else 10_000) if vipra else 0,
            flow_samples=4 if small else 0,  # clips of the batch in the flow term (0: all)
            # NSVQ dead-code replacement: LAPA's schedule (10..100/10, 100..1000/100, 1000..5000/500).
            replace_threshold=0.015 if vipra else 0.1,
            replace_stop_after=120_000 if vipra else 0,  # 0: never stop (the schedule ends at 5000)
        )
    )
    data = default_data_config()
    data.sample = "clips" if vipra else "pairs"
    data.image_size = 64 if small else (224 if vipra else 256)
    # Meta-World runs at 80 Hz. lapa: 16 frames (0.2 s) between x_t and x_{t+H} on the small runs;
    # the paper size keeps LAPA's 0.6 s (gap_seconds). vipra: clips of 4 frames 8 steps apart.
    data.gap_frames = 16 if (small and not vipra) else 0
    data.clip_length = 3 if small else 7
    data.clip_stride = 8 if small else 1
    data.shuffle_buffer = 2000 if small else 10_000
    # The embedded dataset (generated on first use when data.dataset is metaworld).
    data.generate_metaworld = True
    data.metaworld_tasks = "mt10"
    data.metaworld_episodes_per_task = 5
    c.data = data
    return finalize(c)
