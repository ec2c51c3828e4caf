"""Stage 3: action finetuning of the backbone. Config ``configs/finetune.py``; losses
``jaxvla/losses/finetune.py``.

``config.model.head``:

* ``flow`` (ViPRA-FM): params ``{"backbone": Llama (no latent, no action vocabulary),
  "action_encoder": ActionEncoder(width=dim), "velocity_head": VelocityHead(A)}``; sequences of
  ``build_flow`` (prefix + ``chunk`` placeholder slots in one bidirectional block); actions
  normalised by ``data.action_normalization`` (q01q99 -> [-1, 1], gripper untouched).
* ``bins`` (LAPA / OpenVLA): params ``{"backbone": Llama (no latent vocabulary, 256 action
  bins)}``; sequences of ``build_bins`` with the A bins of the chunk's first action
  (``chunk`` = 1), quantile edges from ``data.num_bins``; actions unnormalised.

``init_from`` (a stage 2 workdir whose params are ``{"backbone": ...}`` with the latent table and
head) keeps the backbone, drops ``embed_latent`` / ``head_latent`` (and, for flow, the action
table / head), initialises what is new; the trainer logs every decision.

Frames are tokenized host-side in the batch iterator by the frozen image tokenizer
(``model.tokenizer_checkpoint``, trained first with ``model.tokenizer_steps`` when missing), the
instruction by the SentencePiece model, then packed, so the loss sees int arrays only.

Batch (numpy, per process): the ``SEQUENCE_KEYS`` arrays ``[B, L]``, ``action_positions``
``[B, K]`` (flow; bins: ``[B, A]``), ``action`` ``[B, K, A]`` float32, ``action_pad_mask`` ``[B, K]``;
bins add ``action_bins`` ``[B, A]`` and, in eval batches, ``bin_centres`` ``[B, A, V]``.

Assets (everything a policy needs to turn outputs into robot actions): ``head``, ``chunk``,
``action_dim``, ``execute_steps``, ``image_size``, ``seq_len``, ``vocab`` sizes and special ids,
``tokenizer_checkpoint``, ``text_tokenizer``, ``action_normalization``, per dataset
``statistics`` (action / proprio mean, std, min, max, q01, q99 (+ ``bin_edges`` when bins)),
``normalize_mask``, ``gripper_dims``, and for bins ``bin_edges`` / ``bin_centres`` of the first
dataset.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvla.data.embedded import ensure_configured_dataset
from jaxvla.stages import DataStream, Stage

log = logging.getLogger("jaxvla")

TEXT_VOCAB = 32000
LATENT_CODES = 8


class Models:
    """The modules of the finetuning model (bound into the losses by keyword)."""

    def __init__(self, config, vocab, action_dim: int):
        from jaxvla.models.action_heads import ActionEncoder, VelocityHead
        from jaxvla.models.llama import Llama
        from jaxvla.stages.vla import backbone_config

        mc = config.model
        self.head = mc.head
        self.llama_config = backbone_config(mc, vocab, compute_dtype=config.compute_dtype,
                                            remat=config.remat_policy, latent=False, action=mc.head == "bins")
        self.backbone = Llama(self.llama_config)
        dtype = jnp.dtype(config.compute_dtype)
        dim = self.llama_config.dim
        time_dim = int(mc.get("time_dim") or min(256, dim))
        time_dim += time_dim % 2
        self.action_encoder = ActionEncoder(width=dim, time_dim=time_dim, dtype=dtype)
        self.velocity_head = VelocityHead(action_dim, dtype=dtype)

    @property
    def flow_modules(self) -> dict:
        return dict(backbone=self.backbone, action_encoder=self.action_encoder, velocity_head=self.velocity_head)


def check_config(config) -> None:
    mc, data = config.model, config.data
    if mc.head not in ("flow", "bins"):
        raise ValueError(f"config.model.head={mc.head!r}; expected 'flow' or 'bins'")
    if data.sample != "chunks":
        raise ValueError(f"config.data.sample={data.sample!r}; finetuning reads 'chunks'")
    if int(data.chunk_size) != int(mc.chunk):
        raise ValueError(f"config.data.chunk_size={data.chunk_size} but config.model.chunk={mc.chunk}; set them equal")
    if int(data.get("history", 1)) != 1:
        raise ValueError(f"config.data.history={data.history}: finetuning reads one frame (history 1)")
    if mc.head == "bins" and int(data.num_bins) <= 0:
        raise ValueError("config.model.head='bins' needs config.data.num_bins > 0 (e.g. 256)")
    if mc.head == "bins" and (data.action_normalization or "none") != "none":
        raise ValueError(f"config.model.head='bins' bins raw actions: set config.data.action_normalization='none' "
                         f"(got {data.action_normalization!r})")


class SequencePacker:
    """Pipeline chunk batches -> packed sequence batches (host side)."""

    def __init__(self, config, frames, prompts, vocab, datasets: dict):
        self.config = config
        self.head = config.model.head
        self.frames = frames
        self.prompts = prompts
        self.vocab = vocab
        self.seq_len = int(config.model.seq_len)
        self.chunk = int(config.model.chunk)
        self.datasets = datasets  # name -> {"edges", "gripper_dims", "centres"} (bins)
        self.default = next(iter(datasets)) if datasets else None

    def _dataset(self, name) -> dict:
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        return self.datasets.get(str(name)) or self.datasets[self.default]

    def __call__(self, batch: dict, eval: bool = False) -> dict:
        from jaxvla.data import stats as stats_lib
        from jaxvla.data.sequences import batch_sequences, build_bins, build_flow

        images = _lookup(batch, "observation/image_primary")
        codes = self.frames.tokens(images)  # [B, N]
        instructions = _lookup(batch, "task/language_instruction")
        actions = np.asarray(batch["action"], np.float32)
        pad_mask = np.asarray(batch["action_pad_mask"], bool)
        names = batch.get("dataset_name", [None] * len(actions))
        seqs, extra = [], {"action_bins": [], "bin_centres": []}
        for i in range(len(actions)):
            prompt = self.prompts(instructions[i])
            if self.head == "flow":
                seqs.append(build_flow(prompt, codes[i], self.prompts.markers, self.vocab, self.seq_len,
                                       chunk=self.chunk))
            else:
                info = self._dataset(names[i])
                bins = stats_lib.bin_actions(actions[i, :1], info["edges"], info["gripper_dims"])[0]
                extra["action_bins"].append(bins.astype(np.int32))
                extra["bin_centres"].append(info["centres"])
                seqs.append(build_bins(prompt, codes[i], bins, self.prompts.markers, self.vocab, self.seq_len))
        out = batch_sequences(seqs)
        out["action"] = actions
        out["action_pad_mask"] = pad_mask
        if self.head == "bins":
            out["action_bins"] = np.stack(extra["action_bins"])
            if eval:
                out["bin_centres"] = np.stack(extra["bin_centres"]).astype(np.float32)
        return out


def _lookup(tree: dict, key: str):
    """``tree["a/b"]`` or ``tree["a"]["b"]``."""
    if key in tree:
        return tree[key]
    node = tree
    for part in key.split("/"):
        node = node[part]
    return node


def _norm_mask(spec, action_dim: int) -> np.ndarray:
    if spec.normalize_mask is not None:
        return np.asarray(spec.normalize_mask, bool)
    mask = np.ones((action_dim,), bool)
    for d in spec.gripper_dims:
        if -action_dim <= d < action_dim:
            mask[d] = False
    return mask


def build(config) -> Stage:
    from jaxvla.data.pipeline import make_batches as pipeline_batches
    from jaxvla.losses import finetune as losses
    from jaxvla.losses.actions import bin_centres
    from jaxvla.stages import vla

    check_config(config)
    ensure_configured_dataset(config.data)
    mc = config.model
    head = mc.head
    frames = vla.image_tokenizer(config)
    prompts = vla.TextPrompts(mc.text_tokenizer)
    action_bins = int(config.data.num_bins) if head == "bins" else 256
    vocab = vla.make_vocab(mc.size, frames, LATENT_CODES, action_bins, text_size=TEXT_VOCAB)

    per_process = config.batch_size // jax.process_count()

    def pipeline(train: bool, start_step: int = 0, seed_offset: int = 0):
        return pipeline_batches(config.data, batch_size=per_process, train=train, seed=config.seed + seed_offset,
                                start_step=start_step)

    # Statistics come with the pipeline (computed / cached on first use); the action dim from
    # them, or from a first batch when there are none.
    probe = pipeline(True)
    statistics = dict(probe.statistics)
    specs = [spec for spec, _ in probe.specs]
    dims = {int(np.asarray(s["action"]["q01"]).shape[-1]) for s in statistics.values()}
    action_dim = max(dims) if dims else int(next(iter(probe))["action"].shape[-1])
    del probe

    datasets, dataset_assets = {}, {}
    for spec in specs:
        entry = {"gripper_dims": np.asarray(spec.gripper_dims, np.int32),
                 "normalize_mask": _norm_mask(spec, action_dim)}
        if spec.name in statistics:
            entry["statistics"] = statistics[spec.name]
        if head == "bins":
            edges = np.asarray(statistics[spec.name]["action"]["bin_edges"], np.float32)
            centres = bin_centres(edges, tuple(spec.gripper_dims))
            datasets[spec.name] = {"edges": edges, "gripper_dims": tuple(spec.gripper_dims), "centres": centres}
        dataset_assets[spec.name] = entry
    if head == "flow" and (config.data.action_normalization or "none") == "none":
        log.warning("flow finetuning on unnormalised actions (config.data.action_normalization='none')")

    models = Models(config, vocab, action_dim)
    packer = SequencePacker(config, frames, prompts, vocab, datasets)
    layout = "flow" if head == "flow" else "bins"
    log.info(
        "finetune (%s): backbone %s dim %d x %d layers, vocab text %d / image %d / action %d (no latent); "
        "chunk %d x %d action dims, sequences of %d, image tokenizer %s (%d tokens per frame)",
        layout, mc.size, models.llama_config.dim, models.llama_config.num_layers, vocab.text_size, vocab.image_size,
        models.llama_config.action_vocab, int(mc.chunk), action_dim, int(mc.seq_len), frames.checkpoint,
        frames.tokens_per_frame,
    )

    seq_len = int(mc.seq_len)
    chunk = int(mc.chunk)

    def init_variables(rng):
        ids = jnp.zeros((1, seq_len), jnp.int32)
        b_rng, e_rng, v_rng = jax.random.split(rng, 3)
        params = {"backbone": models.backbone.init({"params": b_rng}, ids, ids, ids, ids + 1, ids)["params"]}
        if head == "flow":
            dim = models.llama_config.dim
            params["action_encoder"] = models.action_encoder.init(
                {"params": e_rng}, jnp.zeros((1, chunk, action_dim), jnp.float32), jnp.zeros((1,), jnp.float32))["params"]
            params["velocity_head"] = models.velocity_head.init(
                {"params": v_rng}, jnp.zeros((1, chunk, dim), jnp.float32))["params"]
        return {"params": params}

    if head == "flow":
        loss_fn = functools.partial(losses.flow_matching_loss, **models.flow_modules,
                                    time_alpha=float(mc.time_alpha), time_beta=float(mc.time_beta))
        eval_fn = functools.partial(losses.flow_eval_metrics, **models.flow_modules, time_alpha=float(mc.time_alpha),
                                    time_beta=float(mc.time_beta), num_steps=int(mc.flow_steps))
    else:
        loss_fn = functools.partial(losses.binned_action_loss, backbone=models.backbone)
        eval_fn = functools.partial(losses.bins_eval_metrics, backbone=models.backbone)

    def train_batches(start_step: int):
        return DataStream(pipeline(True, start_step), packer)

    def eval_batches():
        return (packer(b, eval=True) for b in pipeline(False, seed_offset=1))

    assets = {
        "head": head,
        "chunk": np.asarray(chunk),
        "action_dim": np.asarray(action_dim),
        "execute_steps": np.asarray(int(mc.get("execute_steps", chunk))),
        "flow_steps": np.asarray(int(mc.flow_steps)),
        "image_size": np.asarray(frames.image_size),
        "image_tokens": np.asarray(frames.tokens_per_frame),
        "seq_len": np.asarray(seq_len),
        "vocab": {"text": np.asarray(vocab.text_size), "image": np.asarray(vocab.image_size),
                  "image_codes": np.asarray(vocab.image_codes), "action": np.asarray(vocab.action_bins),
                  "eof_id": np.asarray(vocab.eof_id), "eov_id": np.asarray(vocab.eov_id)},
        "tokenizer_checkpoint": os.path.abspath(frames.checkpoint),
        "text_tokenizer": str(mc.text_tokenizer or ""),
        "action_normalization": str(config.data.action_normalization or "none"),
        "datasets": dataset_assets,
    }
    if head == "bins":
        name = next(iter(datasets))
        assets["bin_edges"] = datasets[name]["edges"]
        assets["bin_centres"] = datasets[name]["centres"]

    return Stage(
        init_variables=init_variables,
        loss_fn=loss_fn,
        batches=train_batches,
        eval_batches=eval_batches,
        eval_fn=eval_fn,
        assets=assets,
    )
