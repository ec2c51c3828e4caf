"""What the backbone stages (2: latent pretraining, 3: action finetuning) share.

* ``ensure_checkpoint``: an earlier stage's checkpoint under a default runs directory, trained
  first (and said so) when it is missing, so the default commands work on a fresh machine.
* ``FrameTokenizer``: the frozen image tokenizer (stage 0's VQGAN) from its checkpoint: uint8
  frames -> VQGAN codes, jitted, on the host side of the data iterator.
* ``TextPrompts``: instruction -> prompt ids (bounded LRU cache: datasets repeat instructions;
  optional token budget), marker ids.
* ``backbone_config``: ``config.model`` -> ``LlamaConfig`` with vocabularies from ``Vocab``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jaxvla")

DEFAULT_TEXT_CACHE_SIZE = 1024


def has_checkpoint(workdir: str) -> bool:
    from jaxvla import checkpoint as ckpt

    try:
        ckpt.resolve_checkpoint(workdir)
        return True
    except FileNotFoundError:
        return False


def ensure_checkpoint(workdir: str, config_spec: str, overrides: dict | None = None, what: str = "") -> str:
    """``workdir`` when it holds a checkpoint; otherwise trains ``config_spec`` (e.g.
    ``configs/tokenizer.py:small``) with ``overrides`` there first, logging that it does so.

    With several processes every process trains (the trainer is multi-process); paths are shared.
    """
    if has_checkpoint(workdir):
        log.info("%s: using the checkpoint in %s", what or config_spec, workdir)
        return workdir
    from jaxvla.config import apply_overrides, load_config
    from jaxvla.trainer import train

    spec = config_spec
    if not os.path.isabs(spec.partition(":")[0]) and not os.path.exists(spec.partition(":")[0]):
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        spec = os.path.join(repo, spec)
    config = apply_overrides(load_config(spec), dict(overrides or {}))
    log.info(
        "%s: no checkpoint in %s: training %s there first (%d steps; %s)",
        what or config_spec, workdir, config_spec, config.num_steps,
        ", ".join(f"{k}={v}" for k, v in (overrides or {}).items()) or "its defaults",
    )
    train(config, workdir)
    return workdir


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
            images = frames.astype(jnp.float32) / 127.5 - 1.0
            return model.apply({"params": params}, images, method=model.encode)

        self._encode = jax.jit(encode)

    @classmethod
    def from_checkpoint(cls, path: str) -> "FrameTokenizer":
        from jaxvla import checkpoint as ckpt
        from jaxvla.config import from_dict
        from jaxvla.stages.tokenizer import build_model

        state, config_dict, _, step = ckpt.load_checkpoint(path)
        if config_dict.get("stage") != "tokenizer":
            raise ValueError(f"{path}: a {config_dict.get('stage')!r} checkpoint, expected the image tokenizer")
        config = from_dict(config_dict)
        model = build_model(config.model, "float32")
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


class TextPrompts:
    """Prompt ids per instruction and the layout markers' ids.

    Ids are kept in an LRU cache of ``cache_size`` instructions (0: no cache); the returned arrays
    are read-only. With a token budget (``max_tokens`` or :meth:`set_budget`) an instruction whose
    prompt (bos and LAPA's template included) is longer raises ValueError. Failed instructions are
    never cached. Thread-safe: one lock guards the cache and the tokenizer.
    """

    def __init__(self, tokenizer_path: str = "", cache_size: int = DEFAULT_TEXT_CACHE_SIZE,
                 max_tokens: int | None = None):
        from jaxvla.data.text import load_text_tokenizer, marker_ids

        if int(cache_size) < 0:
            raise ValueError(f"text cache_size={cache_size}: expected >= 0 instructions (0 disables the cache)")
        self.cache_size = int(cache_size)
        self.tokenizer = load_text_tokenizer(tokenizer_path or None)
        self.markers = marker_ids(self.tokenizer)
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
        from jaxvla.data.text import prompt_ids

        if isinstance(instruction, bytes):
            instruction = instruction.decode("utf-8")
        instruction = str(instruction)
        if state_bins is not None:
            with self._lock:
                ids = prompt_ids(self.tokenizer, instruction, state_bins=state_bins)
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
                ids = prompt_ids(self.tokenizer, instruction)
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


def history_settings(model_config) -> tuple[int, int]:
    """``(history_frames, history_stride)`` of a stage 2 / 3 ``config.model``: 0 or 1 earlier frame
    o_{t-k} before o_t in the vision block, ``k`` control steps before it (missing keys: no
    history, k = 1). Errors name the key."""
    frames = int(model_config.get("history_frames", 0) or 0)
    stride = int(model_config.get("history_stride", 1) or 0)
    if frames not in (0, 1):
        raise ValueError(f"config.model.history_frames={frames}: expected 0 (o_t only) or 1 (o_{{t-k}} before o_t)")
    if stride < 1:
        raise ValueError(f"config.model.history_stride={stride}: expected k >= 1 control steps")
    return frames, stride


def data_with_history(data_config, history_frames: int, history_stride: int):
    """A copy of ``config.data`` whose pipeline windows carry the history frame:
    ``history = 1 + history_frames``, ``history_stride = k`` (``jaxvla.data.pipeline``: frames
    t-k, t; before the episode's start, frame 0). ``config.data.history`` left at 1 is set here;
    another value that disagrees with ``config.model.history_frames`` is an error naming both."""
    import ml_collections

    data = ml_collections.ConfigDict(data_config.to_dict())
    given = int(data.get("history", 1) or 1)
    if given not in (1, 1 + history_frames):
        raise ValueError(f"config.data.history={given} disagrees with config.model.history_frames={history_frames}: "
                         f"leave config.data.history at 1 (the stage sets it to 1 + history_frames)")
    data.history = 1 + int(history_frames)
    data.history_stride = int(history_stride)
    return data


def backbone_config(model_config, vocab, *, compute_dtype: str, remat: str, latent: bool = True,
                    action: bool = True):
    """``config.model`` (``size`` + non-zero overrides) -> ``LlamaConfig`` whose tables match
    ``vocab`` (a ``jaxvla.data.sequences.Vocab``)."""
    from jaxvla.models.llama import llama_config

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


def tokenizer_overrides(config) -> dict:
    """Overrides for training the image tokenizer first: its steps and, when this run reads the
    embedded Meta-World dataset, the same data directory, tasks and episodes."""
    overrides = {"num_steps": int(config.model.tokenizer_steps)}
    data = config.data
    if data.get("dataset") == "metaworld" and not data.get("mixture"):
        overrides.update({"data.source": "metaworld", "data.data_dir": str(data.data_dir)})
        if data.get("metaworld_tasks"):
            overrides["data.tasks"] = data.metaworld_tasks
        if data.get("metaworld_episodes_per_task"):
            overrides["data.episodes_per_task"] = int(data.metaworld_episodes_per_task)
    return overrides


def image_tokenizer(config) -> FrameTokenizer:
    """The frozen image tokenizer of ``config.model.tokenizer_checkpoint`` (trained first when
    missing), checked against ``config.data.image_size``."""
    mc = config.model
    tokenizer_dir = ensure_checkpoint(mc.tokenizer_checkpoint, mc.tokenizer_config, tokenizer_overrides(config),
                                      "image tokenizer")
    frames = FrameTokenizer.from_checkpoint(tokenizer_dir)
    if frames.image_size != int(config.data.image_size):
        raise ValueError(f"config.data.image_size={config.data.image_size} but the image tokenizer "
                         f"({tokenizer_dir}) reads {frames.image_size} px frames")
    return frames


def make_vocab(size: str, frames: FrameTokenizer, latent_codes: int, action_bins: int, text_size: int = 32000):
    """The ``Vocab`` of stages 2 and 3. The image table is the backbone size's when it has room
    (LWM: 8192 codes + 256 extra ids = 8448 rows), so both stages size it alike and init_from keeps it."""
    from jaxvla.data.sequences import Vocab
    from jaxvla.models.llama import llama_config

    table = llama_config(size).image_vocab
    return Vocab(text_size=text_size, image_codes=frames.codebook_size, latent_codes=latent_codes,
                 action_bins=action_bins, image_vocab=table if table >= frames.codebook_size + 2 else None)
