"""Stage 3: action finetuning of the backbone (LAPA bins / ViPRA-FM flow matching).

Variants (``[scratch_]<head>_<size>``):

* ``flow_small`` (default): ViPRA-FM: a chunk of ``model.chunk`` = 14 normalised actions (q01/q99
  -> [-1, 1]) enters as 14 action-encoder tokens after the prefix (prompt + image tokens); a
  velocity head reads them back. 10 Euler steps at inference, prefix in a KV cache.
* ``bins_small``: LAPA / OpenVLA: the first action of the chunk (``chunk`` = 1, A tokens) as 256
  equal-frequency bins per dim (gripper binary), cross-entropy on the action head.
* ``scratch_flow_small`` / ``scratch_bins_small``: the same, and documented as the SCRATCH
  baseline: never pass ``--config.init_from`` to them.
* ``flow_lwm7b`` / ``bins_lwm7b``: the LWM 7B backbone, bf16, remat, FSDP; ViPRA FT (AdamW 4e-4,
  30k steps, rows of at most 768 tokens) and LAPA FT (2000 steps).

Sequences are sized to the real need: the longest example has a ``model.prompt_tokens``-id prompt
(a longer instruction is an error naming the key). Flow keeps one example a row of exactly that
length (its fixed prefix feeds the KV-cached sampler); bins packs ``model.pack`` several examples
a row of at most ``model.seq_len`` tokens (``jaxvla/stages/finetune.py``).

``init_from`` is "" in every variant: finetuning from latent pretraining is the command line's
``--config.init_from=<pretrain workdir>`` (the backbone is kept; the latent table / head are
dropped, the flow heads or a fresh action table are initialised, all logged):

    python -m jaxvla.train --config=configs/pretrain.py:vipra_small --workdir=runs/pretrain
    python -m jaxvla.train --config=configs/finetune.py:flow_small --workdir=runs/ft_flow \
        --config.init_from=runs/pretrain
    python -m jaxvla.train --config=configs/finetune.py:scratch_flow_small --workdir=runs/ft_flow_scratch

The small variants read 2 demonstrations per Meta-World task (``data.few_demos_per_task``).
"""

import ml_collections

from jaxvla.config import base_config, finalize
from jaxvla.data.pipeline import default_data_config

HEADS = ("flow", "bins")
SIZES = ("small", "lwm7b")


def get_config(variant: str = "flow_small"):
    name = variant
    scratch = name.startswith("scratch_")
    if scratch:
        name = name[len("scratch_"):]
    head, _, size = name.partition("_")
    if head not in HEADS or size not in SIZES or (scratch and size != "small"):
        raise ValueError(
            f"configs/finetune.py: unknown variant {variant!r}; expected [scratch_]<head>_small or <head>_lwm7b "
            f"with head in {HEADS}"
        )
    small = size == "small"
    flow = head == "flow"
    c = base_config()
    c.stage = "finetune"
    c.num_steps = 300 if small else (30_000 if flow else 2000)
    c.batch_size = 8 if small else (512 if flow else 256)
    c.log_every = 10 if small else 50
    c.eval_every = 100 if small else 2000
    c.eval_batches = 2
    c.image_every = 0
    c.checkpoint.every = 100 if small else 2000
    c.compute_dtype = "float32" if small else "bfloat16"
    c.remat_policy = "none" if small else "nothing_saveable"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-4 if small else (4e-4 if flow else 2e-5)
    c.optimizer.schedule = "warmup_cosine" if small else ("warmup_cosine" if flow else "constant")
    c.optimizer.warmup_steps = 30 if small else (1000 if flow else 0)
    c.optimizer.end_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    if not small:
        c.mesh.data, c.mesh.fsdp = 1, -1

    c.model = ml_collections.ConfigDict(
        dict(
            head=head,  # flow | bins
            scratch=scratch,  # informational: the SCRATCH baseline (no init_from)
            size=size,  # jaxvla.models.llama sizes: tiny | small | lwm7b
            # 0: the size's value.
            dim=0,
            num_layers=0,
            num_heads=0,
            num_kv_heads=0,
            mlp_dim=0,
            max_len=0,
            rope_theta=0.0,
            attention="",  # "" (einsum on CPU, JAX's choice elsewhere) | einsum | xla | cudnn
            # The most tokens a row may hold: packed bins rows take as many examples as fit (and
            # divide the batch, as in pretraining: 2 of 117 tokens at small); flow's one-example
            # rows (121 tokens at small) must fit it.
            seq_len=(192 if flow else 256) if small else 768,
            # The prompt budget in ids (bos and LAPA's template included; pretraining's
            # pack_prompt_tokens): the longest example, the one every row is sized to, is
            # prompt_tokens + <vision> (3) + the image tokens (small: 64) + eov + </vision> (3)
            # + 14 flow slots (small: 121 tokens), or + <delta> (3) + 4 bins + </delta> (3) (117).
            # A longer instruction is an error naming this key; a policy gets the same budget from
            # its checkpoint. Meta-World MT10's prompts are 26-34 ids (MT50's up to 41).
            prompt_tokens=36 if small else 64,
            # bins: several examples a row (jaxvla/data/sequences.py pack_examples: segment ids
            # 1, 2, ..., positions restarting per example), the loss the mean over examples. False:
            # one example a row. Flow never packs (its KV-cached sampler reads one prefix a row).
            pack=not flow,
            # flow: K actions per chunk (ViPRA K = 14); bins: LAPA / OpenVLA predict one action.
            chunk=14 if flow else 1,
            flow_steps=10,  # Euler steps at inference
            time_alpha=1.5,  # s ~ Beta(alpha, beta)
            time_beta=1.0,
            time_dim=0,  # action encoder's time embedding (0: min(256, the backbone width))
            execute_steps=7,  # for policies: actions executed of each chunk before replanning
            text_tokenizer="",  # "" = the SentencePiece model of the mistral-common wheel
            tokenizer_checkpoint="runs/tokenizer",
            tokenizer_config="configs/tokenizer.py:small",
            tokenizer_steps=300,
        )
    )
    data = default_data_config()
    data.sample = "chunks"
    data.chunk_size = c.model.chunk
    data.chunk_pad = "zero"
    data.image_size = 64 if small else 256
    data.shuffle_buffer = 1000 if small else 10_000
    data.few_demos_per_task = 2 if small else 0
    data.action_normalization = "q01q99" if flow else "none"
    data.num_bins = 0 if flow else 256
    data.generate_metaworld = True
    data.metaworld_tasks = "mt10"
    data.metaworld_episodes_per_task = 5
    c.data = data
    return finalize(c)
