"""Stage 2: latent pretraining of the LWM-style backbone.

Variants (``objective_size``):

* ``vipra_small`` (default): ViPRA's objective, latent-action sequences for the clip's H steps +
  the future frame's tokens + a little text, on a small backbone; CPU minutes.
* ``lapa_small``: LAPA's objective, the 4 latent codes of (o_t, o_{t+H}) + a little text.
* ``actionvla_small``: the upper-bound baseline, LAPA's layout with ground-truth action bins.
* ``vipra_lwm7b``, ``lapa_lwm7b``, ``actionvla_lwm7b``: the LWM 7B backbone with the papers'
  sequence lengths and optimisers (LAPA: AdamW 2e-5 constant, wd 0, batch 256, seq 384; ViPRA:
  4e-5, batch 320, seq 1536), bf16, scanned layers with remat.

On a fresh machine the default command trains what it needs first (and says so): the image
tokenizer into ``model.tokenizer_checkpoint`` and the LAQ into ``model.laq_checkpoint``, with
``model.tokenizer_steps`` / ``model.laq_steps`` steps, unless checkpoints are already there.

    python -m jaxvla.train --config=configs/pretrain.py --workdir=runs/pretrain
"""

import ml_collections

from jaxvla.config import base_config, finalize
from jaxvla.data.pipeline import default_data_config

OBJECTIVES = ("vipra", "lapa", "actionvla")
SIZES = ("small", "lwm7b")


def get_config(variant: str = "vipra_small"):
    objective, _, size = variant.partition("_")
    if objective not in OBJECTIVES or size not in SIZES:
        raise ValueError(
            f"configs/pretrain.py: unknown variant {variant!r}; expected <objective>_<size> with objective in "
            f"{OBJECTIVES} and size in {SIZES}"
        )
    small = size == "small"
    vipra = objective == "vipra"
    c = base_config()
    c.stage = "pretrain"
    c.num_steps = 300 if small else (50_000 if vipra else 70_000)
    c.batch_size = 8 if small else (320 if vipra else 256)
    c.log_every = 10 if small else 50
    c.eval_every = 100 if small else 5000
    c.eval_batches = 2
    c.image_every = 0
    c.checkpoint.every = 100 if small else 5000
    c.compute_dtype = "float32" if small else "bfloat16"
    c.remat_policy = "none" if small else "nothing_saveable"
    c.optimizer.learning_rate = 3e-4 if small else (4e-5 if vipra else 2e-5)
    c.optimizer.schedule = "warmup_cosine" if small else "constant"
    c.optimizer.warmup_steps = 30 if small else 0
    c.optimizer.end_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    if not small:
        c.mesh.data, c.mesh.fsdp = 1, -1  # LAPA: (dp, fsdp, tp) = (1, 8, 1) on 8 H100s

    laq_variant = "lapa_small" if objective == "lapa" else "vipra_small"
    c.model = ml_collections.ConfigDict(
        dict(
            objective=objective,
            size=size,  # jaxvla.models.llama sizes: tiny | small | lwm7b
            # 0: the size's value.
            dim=0,
            num_layers=0,
            num_heads=0,
            num_kv_heads=0,
            mlp_dim=0,
            max_len=0,
            rope_theta=0.0,
            scan_layers=True,  # nn.scan over layers (one compiled body); False unrolls them
            attention="",  # "" JAX's choice | "xla" | "cudnn" (fused GPU kernel, bf16)
            # Layers per nn.scan iteration (LlamaConfig.scan_unroll; 0 = fully unrolled); the stacked
            # parameter layout is the same. 1: fully unrolled, the KV-cached flow sampler was no faster
            # on the 2-core CPU (scripts/bench_flow_inference.py --config.model.scan_unroll=0).
            scan_unroll=1,
            # The row length; packed (pack=True), the most tokens a row of packed examples holds.
            seq_len=256 if small else (1536 if vipra else 384),
            # Packing (jaxvla/data/sequences.py pack_examples): the batch's batch_size examples go
            # into rows sized to the longest possible example (segment ids 1, 2, ... where a row
            # holds several: only where that pads less, packing_layout; one a row here),
            # the one with a pack_prompt_tokens-id prompt (bos and template included; a longer
            # prompt is an error naming this key; Meta-World MT10's prompts are 26-34 ids, MT50's
            # up to 41). The loss's per-row target caps follow from that example (max_targets is
            # then unused, except max_targets.image as synthetic frames' tokens). False: one example
            # a [batch_size, seq_len] row.
            pack=small,
            pack_prompt_tokens=36,
            # Loss group weights (spread over each group's targets by the sequence builders).
            latent_weight=0.48 if vipra else 0.99,
            future_weight=0.48,
            action_weight=0.99,
            text_weight=0.02 if vipra else 0.01,
            # Targets of each modality gathered per sequence before its head (see losses/pretrain.py).
            # ViPRA at 7B: 14 steps x (16 codes + separator) = 238 latent targets.
            max_targets=dict(text=64 if small else 96, image=64 if small else 256,
                             latent=256 if vipra and not small else 64, action=16),
            # Frame history (ViPRA's o_{t-k}): 1 puts the frame history_stride control steps before
            # o_t into the vision block, "<vision> o_{t-k} eof o_t ...", in every objective (frame 0
            # when t < k, as finetuning and policies do). The protocol uses 1 with k = 7 (ViPRA's
            # clip stride; our ViPRA LAQ's clips span 2 x 7 steps). 0: o_t only.
            history_frames=0,
            history_stride=7,
            # [H, M] latent codes of latent_source="synthetic" sequences (LAPA 1 x 4; ViPRA 14 x 16).
            synthetic_latent_shape=(1, 4) if not vipra else ((2, 4) if small else (14, 16)),
            text_tokenizer="",  # "" = the SentencePiece model of the mistral-common wheel
            tokenizer_checkpoint="runs/tokenizer",
            tokenizer_config="configs/tokenizer.py:small",
            tokenizer_steps=300,
            # Latent actions: "laq" encodes the clips on the fly with the LAQ checkpoint; "labels"
            # reads scripts/label_latent_actions.py's output from labels_dir; "synthetic" trains on
            # random ids in the objective's layout (no data, tokenizer or LAQ: plan.py, benchmarks).
            latent_source="laq",
            labels_dir="",
            laq_checkpoint=f"runs/laq_{laq_variant.split('_')[0]}",
            laq_config=f"configs/laq.py:{laq_variant}",
            laq_steps=300,
        )
    )
    data = default_data_config()
    data.sample = "pairs"  # replaced by the LAQ's window (pairs / clips) in the stage
    data.image_size = 64 if small else 256
    data.shuffle_buffer = 1000 if small else 10_000
    data.num_bins = 256 if objective == "actionvla" else 0
    data.generate_metaworld = True
    data.metaworld_tasks = "mt10"
    data.metaworld_episodes_per_task = 5
    c.data = data
    return finalize(c)
