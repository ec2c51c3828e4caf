"""Latent action quantizer (stage 1): LAPA's frame-pair model or ViPRA's clip model.

Variants:

* ``lapa_small`` (default) / ``vipra_small``: 64 px Meta-World frames, train on CPU in minutes.
* ``lapa`` / ``vipra``: the paper sizes of REFERENCE.md (256 px patch 32, dim 1024, depth 8/8/8;
  224 px patch 14, dim 768; clips of 15 consecutive frames here, see below), their optimisers and
  schedules.

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
            # vipra: transition k's latent is P(e_{k+1}) - P(e_k) (the reference's encode_deltas flag,
            # off in ViPRA's released config and at the paper sizes; on at the small ones: at the day budget it lifts the held-out
            # position R^2 of the codes from 0.03 to 0.32, README stage 1); lapa always subtracts.
            encode_deltas=vipra and small,
            # Transformer blocks per nn.scan iteration (jaxvla.models.transformer.scan_unroll): 1 a loop
            # over one compiled block, 0 every block inlined. The parameters stay stacked on the `layers`
            # axis whatever it is, so checkpoints load either way. Small sizes: 0, their depth-2 stacks
            # train 13-18 % faster a step unrolled on the 2-core CPU (interleaved steps, both variants;
            # XLA fuses and schedules across blocks and drops the loop's per-iteration weight slices)
            # at no compile-time cost. Paper sizes (depth 8, accelerators): 1, not measured unrolled.
            scan_unroll=0 if small else 1,
            recon_loss="l1" if vipra else "mse",
            lpips_weight=0.5 if vipra else 0.0,
            lpips_net="alex" if small else "vgg",  # VGG costs 5x AlexNet on CPU
            lpips_weights_dir="",
            flow_weight=0.1 if vipra else 0.0,
            flow_start=(750 if small else 60_000) if vipra else 0,
            flow_warmup=(250 if small else 10_000) if vipra else 0,
            flow_samples=4 if small else 0,  # clips of the batch in the flow term (0: all)
            # Reconstruction weighted by 1 + motion_weight * |x_{t+1} - x_t| per pixel (our addition,
            # jaxvla/losses/laq.py); 0: the papers' plain mean. vipra keeps 50, the setting of the
            # measured encode_deltas run; alone it changed neither LAQ's probe (README stage 1).
            motion_weight=50.0 if (vipra and small) else 0.0,
            # NSVQ dead-code replacement: LAPA's schedule (10..100/10, 100..1000/100, 1000..5000/500).
            replace_threshold=0.015 if vipra else 0.1,
            replace_stop_after=120_000 if vipra else 0,  # 0: never stop (the schedule ends at 5000)
        )
    )
    data = default_data_config()
    data.sample = "clips" if vipra else "pairs"
    data.image_size = 64 if small else (224 if vipra else 256)
    # Meta-World runs at 80 Hz (12.5 ms per env step). Both LAQs' windows span the finetuning chunk
    # (configs/finetune.py model.chunk = 14 control steps, 0.175 s): lapa_small pairs x_t, x_{t+14};
    # vipra_small clips of 3 frames 7 steps apart (2 latents of 7 steps). The measurement behind 14
    # and 7 (scripts/eval_laq.py --gap_scan) is in the README (stage 1). The paper sizes: lapa keeps
    # LAPA's 0.6 s (gap_seconds); vipra 15 consecutive frames (14 latent steps for the 14-action chunk).
    data.gap_frames = 14 if (small and not vipra) else 0
    data.clip_length = 2 if small else 14
    data.clip_stride = 7 if small else 1
    data.shuffle_buffer = 2000 if small else 10_000
    # The embedded dataset (generated on first use when data.dataset is metaworld).
    data.generate_metaworld = True
    data.metaworld_tasks = "mt10"
    data.metaworld_episodes_per_task = 5
    c.data = data
    # The quality probe (jaxvla/laq_quality.py probe(), scripts/eval_laq.py) and the gate that must
    # pass before latent pretraining (laq_quality.gate(report, config.gate)); defaults of the `day`
    # protocol. A threshold of None is not checked.
    c.probe = ml_collections.ConfigDict(
        dict(
            level="latent",  # latent: a row per latent; window: a row per LAQ window (all its codes)
            phase_bins=10,  # episode phase t / T in equal bins (the task x phase baseline)
            ridge=1e-3,  # linear probe penalty (x N)
            knn_k=16,  # kNN probe neighbours (task_phase / task_phase_codes: within the task x phase cell)
            knn_max_fit=20_000,  # kNN neighbours drawn from at most this many fit rows
            bootstrap=1000,  # episode-bootstrap resamples for the 95 % intervals
            seed=0,
        )
    )
    c.gate = ml_collections.ConfigDict(
        dict(
            min_code_usage=0.9,  # fraction of the codebook used on held-out episodes
            min_xyz_r2=0.5,  # held-out position R^2 from the codes
            min_gain_over_task_phase=0.1,  # position R^2 the codes add over task identity + episode phase
            probe="linear",  # linear | knn | best
            use_lower_bound=False,  # compare the 95 % interval's lower end instead of the point estimate
        ),
        type_safe=False,
    )
    return finalize(c)
