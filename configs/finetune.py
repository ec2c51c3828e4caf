"""Stage 3: action finetuning of the backbone (LAPA bins / ViPRA-FM flow matching).

Variants (``[scratch_]<head>_<size>``):

* ``flow_small`` (default): ViPRA-FM: a chunk of ``model.chunk`` = 14 normalised actions (q01/q99
  -> [-1, 1]) enters as 14 action-encoder tokens after the prefix (prompt + image tokens); a
  velocity head reads them back. 10 Euler steps at inference, prefix in a KV cache.
* ``bins_small``: ViPRA-AR: a chunk of ``model.chunk`` = 14 actions decoded as discrete tokens, 256
  equal-frequency bins per dim (gripper binary), 14 x A bin tokens time-major after the prefix,
  cross-entropy on the action head (padded steps past the episode's end carry no loss), decoded
  greedily with the prefix in a KV cache; a policy executes ``model.execute_steps`` = 7 of the 14
  before replanning. LAPA / OpenVLA predict one action: ``--config.model.chunk=1`` (A tokens;
  ``data.chunk_size`` follows ``model.chunk``, they are one linked value).
* ``scratch_flow_small`` / ``scratch_bins_small``: the same, and documented as the SCRATCH
  baseline: never pass ``--config.init_from`` to them.
* ``flow_lwm7b`` / ``bins_lwm7b``: the LWM 7B backbone, bf16, remat, FSDP; ViPRA FT (AdamW 4e-4,
  30k steps, rows of at most 768 tokens) and LAPA FT's schedule (2000 steps; 14-action chunks
  like ``bins_small``, LAPA's single action with ``--config.model.chunk=1``).

Sequences are sized to the real need: the longest example has a ``model.prompt_tokens``-id prompt
(a longer instruction is an error naming the key). Flow keeps one example a row of exactly that
length (its fixed prefix feeds the KV-cached sampler); bins (``model.pack``) uses pretraining's
packed layout, rows of at most ``model.seq_len`` tokens (``jaxvla/stages/finetune.py``), one
example a row unless several pad less: at small an example is 169 tokens with 14-action chunks,
117 with ``chunk=1``.

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
            # Layers per nn.scan iteration (LlamaConfig.scan_unroll; 0 = fully unrolled); the stacked
            # parameter layout is the same. 1: fully unrolled, the KV-cached flow sampler was no faster
            # on the 2-core CPU (scripts/bench_flow_inference.py --config.model.scan_unroll=0).
            scan_unroll=1,
            # The most tokens a row may hold: the longest example (bins 169 tokens at small with
            # 14-action chunks, flow 121) must fit it; packed bins rows hold it once (several only
            # where that would pad less: sequences.packing_layout).
            seq_len=(192 if flow else 384) if small else 768,
            # The prompt budget in ids (bos and LAPA's template included; pretraining's
            # pack_prompt_tokens): the longest example, the one every row is sized to, is
            # prompt_tokens + <vision> (3) + the image tokens (small: 64) + eov + </vision> (3)
            # + 14 flow slots (small: 121 tokens), or + <delta> (3) + chunk x 4 bins + </delta> (3)
            # (small: 169 tokens with 14-action chunks, 117 with chunk=1).
            # A longer instruction is an error naming this key; a policy gets the same budget from
            # its checkpoint. Meta-World MT10's prompts are 26-34 ids (MT50's up to 41).
            prompt_tokens=36 if small else 64,
            # bins: the packed layout (jaxvla/data/sequences.py pack_examples: segment ids, rows
            # sized to the longest example, the loss the mean over examples). False: always one
            # example a row (the same layout while rows are not rounded). Flow never packs (its
            # KV-cached sampler reads one prefix a row).
            pack=not flow,
            # K actions per chunk: flow (ViPRA-FM) and bins (ViPRA-AR) K = 14; LAPA / OpenVLA's bins
            # predict one action: chunk=1. data.chunk_size is linked to it (a FieldReference).
            chunk=14,
            flow_steps=10,  # Euler steps at inference
            time_alpha=1.5,  # s ~ Beta(alpha, beta)
            time_beta=1.0,
            time_dim=0,  # action encoder's time embedding (0: min(256, the backbone width))
            # for policies: actions executed of each chunk before replanning (7 of ViPRA's 14; a
            # policy clips it to the chunk, so chunk=1 executes every prediction)
            execute_steps=7,
            # Frame history (ViPRA's o_{t-k}): 1 puts the frame history_stride control steps before
            # o_t into the vision block, "<vision> o_{t-k} eof o_t eov </vision>" (frame 0 when
            # t < k; a policy keeps each episode's frames to feed the same). +65 tokens per example
            # at small (64 codes + eof): raise seq_len where rows would not fit. The protocol: 1, k = 7.
            history_frames=0,
            history_stride=7,
            # Proprioceptive state in the prompt (pi0-FAST style, ours: LAPA / ViPRA read images and
            # text only): "" off; "4" (or "0:4", "0,1,2,3") the first 4 dims of Meta-World's 39-d
            # state (hand xyz, gripper opening; never object poses), each as one of 256 bins over the
            # finetuning data's q01..q99: "...? State: 12 200 45 3. ASSISTANT:". The state text
            # takes up to 19 more prompt ids for 4 dims: raise prompt_tokens by that much (36 -> 55
            # for MT10's prompts, 60 for MT50's; a budget without room is an error naming it).
            state_dims="",
            text_tokenizer="",  # "" = the SentencePiece model of the mistral-common wheel
            tokenizer_checkpoint="runs/tokenizer",
            tokenizer_config="configs/tokenizer.py:small",
            tokenizer_steps=300,
        )
    )
    data = default_data_config()
    data.sample = "chunks"
    # One value: --config.model.chunk=1 (LAPA's single action) sets the pipeline's chunk too.
    data.chunk_size = c.model.get_ref("chunk")
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
