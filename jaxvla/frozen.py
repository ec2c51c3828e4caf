"""The frozen pieces trained stages hand on: what later stages, the labeller
(``jaxvla.latent_actions``) and a policy (``jaxvla.policy``) load and run without training them.

* ``FrameTokenizer``: stage 0's image tokenizer (VQGAN) from its checkpoint: uint8 frames ->
  VQGAN codes, jitted (pretraining and finetuning run it host-side in their data iterators).
* ``LoadedLAQ`` / ``load_laq``: stage 1's latent action quantizer from its checkpoint: uint8 frame
  windows -> latent codes.
* ``TextPrompts``: instruction -> prompt ids (bounded LRU cache: datasets repeat instructions;
  optional token budget), marker ids.
* ``backbone_config`` / ``make_vocab`` / ``FinetuneModels``: the LLaMA backbone of stages 2 and 3
  (``config.model`` -> ``LlamaConfig`` with vocabularies from ``Vocab``) and the finetuning model's
  modules (backbone, action encoder, velocity head).
* ``vqgan_model`` / ``laq_model``: a stage config -> its Flax module (the stages build theirs with
  them too, so a checkpoint restores into the module that trained it).

Imports no training code (``jaxvla.stages``, ``jaxvla.trainer``, losses): inference reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxvla import checkpoint as ckpt
from jaxvla.config import from_dict
from jaxvla.data.latent_labels import config_hash
from jaxvla.data.registry import clip_stride, dataset_gap, get_dataset_spec
from jaxvla.data.sequences import Vocab
from jaxvla.data import text as text_lib
from jaxvla.losses.tokenizer import images_to_float
from jaxvla.models.action_heads import ActionEncoder, VelocityHead
from jaxvla.models.laq import LAQ, laq_size
from jaxvla.models.llama import Llama, llama_config
from jaxvla.models.vqgan import VQGAN, vqgan_variant

log = logging.getLogger("jaxvla")

DEFAULT_TEXT_CACHE_SIZE = 1024
TEXT_VOCAB = 32000  # the SentencePiece model's ids (LLaMA's)
LATENT_CODES = 8  # the latent table finetuning's vocabulary keeps (the backbone drops it)

_LAQ_SIZE_KEYS = ("image_size", "patch_size", "dim", "num_heads", "head_dim", "encoder_depth", "temporal_depth",
                  "decoder_depth", "quant_dim", "code_grid", "codebook_size", "num_frames")


# ------------------------------------------------------------------------------------------------
# Stage 0: the image tokenizer.


def vqgan_model(model_config, compute_dtype: str = "float32") -> VQGAN:
    """The VQGAN of a tokenizer ``config.model``: its ``variant`` with non-zero overrides."""
    kwargs = vqgan_variant(model_config.variant)
    for key in ("codebook_size", "embed_dim", "hidden_channels", "num_res_blocks"):
        if model_config.get(key):
            kwargs[key] = model_config[key]
    return VQGAN(**kwargs, dtype=jnp.dtype(compute_dtype))


class FrameTokenizer:
    """Stage 0's VQGAN, frozen: ``tokens(frames uint8 [..., S, S, 3]) -> int32 [..., N]``."""

    def __init__(self, model, params, checkpoint: str):
        self.model = model
        self.params = jax.device_put(params)
        self.checkpoint = checkpoint
        self.image_size = int(model.resolution)
        self.codebook_size = int(model.codebook_size)
        grid = self.image_size // model.downsample_factor
        self.tokens_per_frame = grid * grid

        def encode(params, frames):
            return model.apply({"params": params}, images_to_float(frames), method=model.encode)

        self._encode = jax.jit(encode)

    @classmethod
    def from_checkpoint(cls, path: str) -> "FrameTokenizer":
        state, config_dict, _, step = ckpt.load_checkpoint(path)
        if config_dict.get("stage") != "tokenizer":
            raise ValueError(f"{path}: a {config_dict.get('stage')!r} checkpoint, expected the image tokenizer")
        config = from_dict(config_dict)
        model = vqgan_model(config.model, "float32")
        log.info("image tokenizer: %s (step %d), %d codes", path, step, model.codebook_size)
        return cls(model, state["params"], path)

    def tokens(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        lead = frames.shape[:-3]
        if frames.shape[-3:-1] != (self.image_size, self.image_size):
            raise ValueError(
                f"the image tokenizer reads {self.image_size} px frames, got {frames.shape[-3]}x{frames.shape[-2]}"
            )
        flat = frames.reshape(-1, *frames.shape[-3:])
        codes = np.asarray(self._encode(self.params, flat))
        return codes.reshape(*lead, self.tokens_per_frame).astype(np.int32)


# Checkpoints that travel: a finetuning workdir carries the image tokenizer it reads.

TOKENIZER_BUNDLE = os.path.join("assets", "tokenizer")  # in a finetuning workdir


def _manifest_sha256(step_dir: str) -> str:
    """SHA-256 of a step's digest manifest (which holds every file's digest): one value that
    pins the whole step; "" when the step has none."""
    path = os.path.join(step_dir, ckpt.MANIFEST)
    return ckpt.file_digest(path)[1] if os.path.isfile(path) else ""


def bundle_image_tokenizer(source: str, workdir: str) -> dict:
    """Writes the image tokenizer ``source`` reads (its params, config and assets; no optimizer
    state) as a checkpoint of its own under ``<workdir>/assets/tokenizer`` (digest manifest and
    all, ``jaxvla.checkpoint``) and returns the finetuning assets that point at it:

    * ``tokenizer_relative``: the bundle's step directory relative to the finetuning checkpoint's
      step directory (``../../assets/tokenizer/checkpoints/<step>``), so a workdir copied or moved
      anywhere still finds it,
    * ``tokenizer_manifest_sha256``: the SHA-256 of that step's digest manifest; the policy refuses
      a bundle whose manifest differs (and ``load_checkpoint`` a file that differs from it).

    A bundle already there (a resumed run) is kept when it verifies and was made from the same
    tokenizer step; one made from another tokenizer is an error naming both."""
    source_dir, source_step = ckpt.find_checkpoint(source)
    source_sha = _manifest_sha256(source_dir)
    dest = os.path.join(os.path.abspath(workdir), TOKENIZER_BUNDLE)
    step_dir = None
    if os.path.isdir(os.path.join(dest, ckpt.CHECKPOINT_SUBDIR)):
        try:
            step_dir, _ = ckpt.find_checkpoint(dest)
        except (ckpt.CheckpointError, FileNotFoundError) as e:
            log.warning("image tokenizer bundle %s is rewritten: %s", dest, e)
    if step_dir is not None:
        made_from = ckpt.decode_assets(ckpt._read_json_item(step_dir, "assets")).get("bundled_from", {})
        if made_from.get("manifest_sha256") != source_sha:
            raise ValueError(
                f"{dest} bundles the image tokenizer {made_from.get('checkpoint')} (manifest SHA-256 "
                f"{str(made_from.get('manifest_sha256'))[:16]}...) but this run reads {source_dir} "
                f"({source_sha[:16]}...); finetune into a fresh workdir, or move {dest} away")
    else:
        state, config_dict, assets, _ = ckpt.load_checkpoint(source_dir)
        if config_dict.get("stage") != "tokenizer":
            raise ValueError(f"{source}: a {config_dict.get('stage')!r} checkpoint, expected the image tokenizer")
        assets = {**assets, "bundled_from": {"checkpoint": source_dir, "step": source_step,
                                             "manifest_sha256": source_sha}}
        writer = ckpt.Checkpointer(dest, max_to_keep=1, async_save=False)
        if source_step in writer.all_steps():  # a step left that does not verify: keep it aside
            writer.set_aside(source_step, "unverified")
        writer.save(source_step, {"params": state["params"]}, config_dict, assets)
        writer.close()
        step_dir = writer.step_dir(source_step)
        log.info("image tokenizer %s (step %d) bundled into %s", source_dir, source_step, dest)
    # The finetuning checkpoint's step directories are <workdir>/checkpoints/<step>.
    step_base = os.path.join(os.path.abspath(workdir), ckpt.CHECKPOINT_SUBDIR, "0")
    return {"tokenizer_relative": os.path.relpath(step_dir, step_base).replace(os.sep, "/"),
            "tokenizer_manifest_sha256": _manifest_sha256(step_dir)}


def resolve_image_tokenizer(checkpoint: str, step: int | None, assets, override: str | None = None) -> str:
    """The image tokenizer checkpoint a finetuned policy reads, in this order: ``override``
    (``tokenizer_checkpoint=`` / ``--tokenizer_checkpoint``; must exist), the bundle inside the
    checkpoint's workdir (``tokenizer_relative``, from the finetuning step directory; its manifest
    must match ``tokenizer_manifest_sha256``), the absolute path finetuning recorded
    (``tokenizer_checkpoint``; checkpoints written before bundles). None there: FileNotFoundError
    naming every path tried and the flag."""
    if override:
        if not os.path.exists(override):
            raise FileNotFoundError(f"{checkpoint}: tokenizer_checkpoint={override} does not exist")
        return override
    tried = []
    relative = assets.get("tokenizer_relative")
    if relative and checkpoint:
        step_dir, _ = ckpt.resolve_checkpoint(checkpoint, step)
        bundled = os.path.normpath(os.path.join(step_dir, str(relative)))
        if os.path.isdir(bundled):
            expected, found = str(assets.get("tokenizer_manifest_sha256", "")), _manifest_sha256(bundled)
            if expected and found != expected:
                raise ckpt.CorruptCheckpointError(
                    bundled, ckpt._is_step_dir(bundled),
                    f"its digest manifest has SHA-256 {found[:16] or 'none'}..., the finetuning checkpoint "
                    f"{step_dir} recorded {expected[:16]}... (the bundled image tokenizer was replaced or "
                    "changed); pass --tokenizer_checkpoint (tokenizer_checkpoint=) to use another")
            return bundled
        tried.append(f"{bundled} (bundled, relative to {step_dir})")
    recorded = str(assets.get("tokenizer_checkpoint", ""))
    if recorded and os.path.exists(recorded):
        return recorded
    tried.append(f"{recorded or '(none recorded)'} (recorded at finetuning)")
    raise FileNotFoundError(
        f"{checkpoint}: the image tokenizer checkpoint is not found; tried " + ", ".join(tried)
        + "; pass tokenizer_checkpoint= (or --tokenizer_checkpoint) pointing at it")


TEXT_TOKENIZER_BUNDLE = os.path.join("assets", "text_tokenizer")


def bundle_text_tokenizer(path: str, workdir: str) -> dict:
    """Copies a custom SentencePiece model (``config.model.text_tokenizer``; "" is the one in the
    mistral-common wheel, nothing to bundle) to ``<workdir>/assets/text_tokenizer/<file name>``
    (atomically; an identical copy already there is kept) and returns the finetuning assets that
    point at it: ``text_tokenizer_relative`` (relative to the finetuning checkpoint's step
    directory, like ``tokenizer_relative``) and ``text_tokenizer_sha256``. A missing file raises
    FileNotFoundError naming ``config.model.text_tokenizer``."""
    if not path:
        return {}
    source = os.path.abspath(os.fspath(path))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"config.model.text_tokenizer={path}: no such SentencePiece file")
    _, sha = ckpt.file_digest(source)
    name = os.path.basename(source)
    dest_dir = os.path.join(os.path.abspath(workdir), TEXT_TOKENIZER_BUNDLE)
    dest = os.path.join(dest_dir, name)
    if not (os.path.isfile(dest) and ckpt.file_digest(dest)[1] == sha):
        os.makedirs(dest_dir, exist_ok=True)
        partial = f"{dest}.partial-{os.getpid()}"
        shutil.copyfile(source, partial)
        os.replace(partial, dest)
    return {"text_tokenizer_relative": os.path.join("..", "..", TEXT_TOKENIZER_BUNDLE, name),
            "text_tokenizer_sha256": sha}


def resolve_text_tokenizer(checkpoint: str, step: int | None, assets, override: str | None = None) -> str:
    """The SentencePiece file a finetuned policy reads ("" = the wheel's default), in this order:
    ``override`` (must exist), the copy bundled in the checkpoint's workdir
    (``text_tokenizer_relative``; its SHA-256 must match ``text_tokenizer_sha256``), the path
    finetuning recorded (``text_tokenizer``). A custom tokenizer found nowhere: FileNotFoundError
    naming every path tried."""
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"{checkpoint}: text_tokenizer={override} does not exist")
        return override
    recorded = str(assets.get("text_tokenizer", "") or "")
    relative = assets.get("text_tokenizer_relative")
    tried = []
    if relative and checkpoint:
        step_dir, step_number = ckpt.resolve_checkpoint(checkpoint, step)
        bundled = os.path.normpath(os.path.join(step_dir, str(relative)))
        if os.path.isfile(bundled):
            expected, found = str(assets.get("text_tokenizer_sha256", "")), ckpt.file_digest(bundled)[1]
            if expected and found != expected:
                raise ckpt.CorruptCheckpointError(
                    step_dir, step_number, f"its bundled text tokenizer {bundled} has SHA-256 {found[:16]}..., "
                    f"the checkpoint recorded {expected[:16]}... (the file was replaced or changed); pass "
                    "text_tokenizer= to use another")
            return bundled
        tried.append(f"{bundled} (bundled, relative to {step_dir})")
    if not recorded or os.path.isfile(recorded):
        return recorded
    tried.append(f"{recorded} (recorded at finetuning)")
    raise FileNotFoundError(f"{checkpoint}: the text tokenizer is not found; tried {', '.join(tried)}; pass "
                            "text_tokenizer= pointing at the SentencePiece file")


# ------------------------------------------------------------------------------------------------
# Stage 1: the latent action quantizer.


def laq_model(config) -> LAQ:
    """The LAQ of a stage-1 ``config`` (``config.model.size`` with non-zero overrides); vipra's clip
    length comes from ``config.data.clip_length`` unless ``model.num_frames`` is set."""
    kwargs = laq_size(config.model.size)
    for key in _LAQ_SIZE_KEYS:
        if config.model.get(key):
            kwargs[key] = config.model[key]
    if kwargs["variant"] == "vipra" and not config.model.get("num_frames"):
        kwargs["num_frames"] = int(config.data.clip_length) + 1
    if kwargs["image_size"] != int(config.data.image_size):
        raise ValueError(
            f"config.data.image_size={config.data.image_size} but the LAQ reads {kwargs['image_size']} px frames "
            "(config.model.image_size); set them equal"
        )
    return LAQ(**kwargs, residual=bool(config.model.residual), encode_deltas=bool(config.model.get("encode_deltas", False)),
               remat=config.remat_policy,
               scan_unroll=int(config.model.get("scan_unroll", 1)), dtype=jnp.dtype(config.compute_dtype))


@dataclasses.dataclass
class LoadedLAQ:
    """A restored LAQ: ``model`` (Flax module), ``params`` (numpy tree), ``config`` (ConfigDict of
    the run), ``step``, ``checkpoint`` (the step directory), ``config_hash``."""

    model: Any
    params: Any
    config: Any
    step: int
    checkpoint: str
    config_hash: str

    @property
    def weights_fingerprint(self) -> str | None:
        """SHA-256 of the checkpoint step's digest manifest (``checkpoint.checkpoint_fingerprint``):
        the same config trained again has another; None for a step saved without a manifest."""
        return ckpt.checkpoint_fingerprint(self.checkpoint)

    @property
    def frame_offsets(self) -> np.ndarray:
        """Frame offsets of one window from its start: lapa ``[0, H]``, vipra ``[0, s, ..., L*s]``.
        lapa's H is the Meta-World / dataset gap of the LAQ's data config (``dataset_gap``)."""
        data = self.config.data
        if self.model.variant == "vipra":
            seconds = float(data.get("clip_stride_seconds", 0.0) or 0.0)
            if seconds and data.get("mixture"):
                raise ValueError("the LAQ was trained on a mixture with config.data.clip_stride_seconds: its stride in "
                                 "frames differs per dataset; pass the window explicitly")
            stride = clip_stride(data.dataset, seconds, data.clip_stride) if seconds else int(data.clip_stride or 1)
            return np.arange(self.model.num_frames) * stride
        spec = get_dataset_spec(data.dataset) if not data.get("mixture") else None
        if spec is None:
            if not data.gap_frames:
                raise ValueError(
                    "the LAQ was trained on a mixture without config.data.gap_frames: pass the gap explicitly"
                )
            return np.asarray([0, int(data.gap_frames)])
        return np.asarray([0, dataset_gap(spec, data.gap_seconds, data.gap_frames)])

    def encode_fn(self, mesh: jax.sharding.Mesh | None = None):
        """A jitted ``frames uint8 [B, T, S, S, 3] -> codes int32 [B, T-1, M]``; with ``mesh`` the
        batch is split over all its devices (B must divide by their number)."""
        model = self.model

        def encode(params, frames):
            return model.apply({"params": params}, images_to_float(frames), method=model.encode)["indices"]

        if mesh is None:
            params = jax.device_put(self.params)
            fn = jax.jit(encode)
            return lambda frames: fn(params, frames)
        replicated = NamedSharding(mesh, PartitionSpec())
        batch = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        params = jax.device_put(self.params, replicated)
        fn = jax.jit(encode, in_shardings=(replicated, batch), out_shardings=batch)
        return lambda frames: fn(params, jax.device_put(frames, batch))

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Codes of ``frames`` uint8 ``[B, T, S, S, 3]`` -> int32 ``[B, T-1, M]`` (one device)."""
        if not hasattr(self, "_encode"):
            self._encode = self.encode_fn()
        return np.asarray(self._encode(frames))


def load_laq(checkpoint: str, use_ema: bool = False) -> LoadedLAQ:
    """Restores an LAQ from a stage-1 workdir or step directory (``checkpoint.load_checkpoint``)."""
    state, config_dict, _, step = ckpt.load_checkpoint(checkpoint)
    if config_dict.get("stage") != "laq":
        raise ValueError(f"{checkpoint}: a {config_dict.get('stage')!r} checkpoint, expected an LAQ (stage 'laq')")
    config = from_dict(config_dict)
    params = state["ema_params"] if use_ema and state.get("ema_params") is not None else state["params"]
    step_dir, _ = ckpt.resolve_checkpoint(checkpoint, step=int(step))  # the step load_checkpoint verified
    return LoadedLAQ(laq_model(config), params, config, int(step), str(step_dir), config_hash(config_dict))


# ------------------------------------------------------------------------------------------------
# Text prompts.


class TextPrompts:
    """Prompt ids per instruction and the layout markers' ids.

    Ids are kept in an LRU cache of ``cache_size`` instructions (0: no cache); the returned arrays
    are read-only. With a token budget (``max_tokens`` or :meth:`set_budget`) an instruction whose
    prompt (bos and LAPA's template included) is longer raises ValueError. Failed instructions are
    never cached. Thread-safe: one lock guards the cache and the tokenizer.
    """

    def __init__(self, tokenizer_path: str = "", cache_size: int = DEFAULT_TEXT_CACHE_SIZE,
                 max_tokens: int | None = None):
        if int(cache_size) < 0:
            raise ValueError(f"text cache_size={cache_size}: expected >= 0 instructions (0 disables the cache)")
        self.cache_size = int(cache_size)
        self.tokenizer = text_lib.load_text_tokenizer(tokenizer_path or None)
        self.markers = text_lib.marker_ids(self.tokenizer)
        self.max_tokens: int | None = None
        self._budget_reason = "max_tokens"
        if max_tokens is not None:
            self.set_budget(max_tokens)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def set_budget(self, max_tokens: int | None, reason: str = "max_tokens") -> None:
        """Refuse prompts longer than ``max_tokens`` ids (None: no limit); ``reason`` says where the
        limit comes from in the error message."""
        if max_tokens is not None and int(max_tokens) < 1:
            raise ValueError(f"max_tokens={max_tokens} ({reason}): expected >= 1 prompt token")
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self._budget_reason = reason

    def cached(self) -> list[str]:
        """The cached instructions, least recently used first."""
        with self._lock:
            return list(self._cache)

    def __call__(self, instruction: Any, state_bins=None) -> np.ndarray:
        """Prompt ids (int32, read-only) of ``instruction``; with ``state_bins`` (the discretized
        proprioceptive state, ints in [0, 255], ``jaxvla.data.text.prompt_text``) the state prompt,
        which is never cached (states rarely repeat) but is held to the same budget."""
        if isinstance(instruction, bytes):
            instruction = instruction.decode("utf-8")
        instruction = str(instruction)
        if state_bins is not None:
            with self._lock:
                ids = text_lib.prompt_ids(self.tokenizer, instruction, state_bins=state_bins)
            ids.flags.writeable = False
            if self.max_tokens is not None and ids.size > self.max_tokens:
                raise ValueError(
                    f"instruction of {len(instruction)} characters with the state's {np.size(state_bins)} bins is "
                    f"{ids.size} prompt tokens (bos, LAPA's template and the state text included); at most "
                    f"{self.max_tokens} fit ({self._budget_reason})")
            return ids
        with self._lock:
            ids = self._cache.get(instruction)
            if ids is None:
                ids = text_lib.prompt_ids(self.tokenizer, instruction)
                ids.flags.writeable = False
            else:
                self._cache.move_to_end(instruction)
            if self.max_tokens is not None and ids.size > self.max_tokens:
                self._cache.pop(instruction, None)  # cached before the budget was set
                raise ValueError(
                    f"instruction of {len(instruction)} characters is {ids.size} prompt tokens (bos and "
                    f"LAPA's template included); at most {self.max_tokens} fit ({self._budget_reason})")
            if self.cache_size and instruction not in self._cache:
                self._cache[instruction] = ids
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return ids


# ------------------------------------------------------------------------------------------------
# The backbone (stages 2 and 3) and the finetuning model.


def backbone_config(model_config, vocab, *, compute_dtype: str, remat: str, latent: bool = True,
                    action: bool = True):
    """``config.model`` (``size`` + non-zero overrides) -> ``LlamaConfig`` whose tables match
    ``vocab`` (a ``jaxvla.data.sequences.Vocab``)."""
    overrides = {}
    for key in ("dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "max_len"):
        if model_config.get(key):
            overrides[key] = int(model_config[key])
    if model_config.get("rope_theta"):
        overrides["rope_theta"] = float(model_config.rope_theta)
    if "scan_layers" in model_config:
        overrides["scan_layers"] = bool(model_config.scan_layers)
    if "scan_unroll" in model_config:
        overrides["scan_unroll"] = int(model_config.scan_unroll)
    if model_config.get("attention"):
        overrides["attention"] = str(model_config.attention)
    text, image, latent_size, action_size = vocab.sizes
    return llama_config(
        model_config.size,
        text_vocab=text,
        image_vocab=image,
        latent_vocab=latent_size if latent else 0,
        action_vocab=action_size if action else 0,
        dtype=compute_dtype,
        remat=remat,
        **overrides,
    )


def make_vocab(size: str, frames: FrameTokenizer, latent_codes: int, action_bins: int, text_size: int = TEXT_VOCAB):
    """The ``Vocab`` of stages 2 and 3. The image table is the backbone size's when it has room
    (LWM: 8192 codes + 256 extra ids = 8448 rows), so both stages size it alike and init_from keeps it."""
    table = llama_config(size).image_vocab
    return Vocab(text_size=text_size, image_codes=frames.codebook_size, latent_codes=latent_codes,
                 action_bins=action_bins, image_vocab=table if table >= frames.codebook_size + 2 else None)


class FinetuneModels:
    """The modules of the finetuning model (stage 3; bound into its losses and a policy's sampler
    by keyword): ``backbone`` (Llama without latent vocabulary; with the action table for
    ``head="bins"``), ``action_encoder`` (noisy chunk ``[B, K, A]`` + time ``[B]`` -> ``[B, K, dim]``)
    and ``velocity_head`` (``[B, K, dim]`` -> ``[B, K, A]``)."""

    def __init__(self, config, vocab, action_dim: int):
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
