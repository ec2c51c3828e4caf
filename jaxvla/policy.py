"""A finetuned VLA as a robot policy: observation + instruction -> a chunk of actions in the
robot's units.

    policy = Policy.from_checkpoint("runs/ft_flow")          # a stage 3 (finetune) workdir
    actions = policy.act({"image": frame}, "press the button")   # float32 [K, A]

    chunker = ActionChunker(policy)                           # executes 7 of every 14, replans
    chunker.reset()
    action = chunker.step({"image": frame}, "press the button")  # float32 [A]

What the checkpoint's assets give (``jaxvla.stages.finetune``): the head (``flow`` / ``bins``),
the frozen image tokenizer's checkpoint, the text tokenizer, the sequence layout and vocabulary
sizes, per-dataset action statistics and normalisation mask (flow), and the bin centres (bins).

* ``flow``: the prefix (prompt + image tokens) is prefilled once into a KV cache, then
  ``flow_steps`` Euler steps run only the K action tokens; the normalised chunk ``[K, A]`` is
  mapped back with the dataset's q01 / q99 (dims outside ``normalize_mask``, the gripper, are
  already in robot units).
* ``bins``: the A bins of one action are decoded greedily with the prefix in a KV cache and
  mapped to their bins' centres: ``[1, A]``.

Inference is one jitted function per batch size (compiled on first use); the image tokenizer is
jitted too. ``act_batch`` acts for B observations at once (``[B, K, A]``).

Sampler noise (flow): without ``keys`` a call draws it from the policy's own stream (``seed`` /
``reseed``: ``stream, key = split(stream)`` per call, the key shared by the batch). With per-row
``keys`` (``[B, 2]`` uint32) row i's noise comes from ``keys[i]`` alone, as if it were called
alone with that key, so its actions do not depend on which other rows share the batch (up to
float rounding between batch sizes). ``seed_keys`` / ``split_keys`` run one stream per row:
``streams = seed_keys(seeds)``, then per call ``streams, keys = split_keys(streams)`` gives row i
the key a policy reseeded with ``seeds[i]`` would use at that call (what batched evaluation does
to reproduce each episode of the unbatched scheme).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jaxvla")

SEQUENCE_INPUTS = ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids", "action_positions")


def _scalar(value) -> int:
    return int(np.asarray(value))


_seed_rows = jax.jit(jax.vmap(jax.random.PRNGKey))
_split_rows = jax.jit(jax.vmap(jax.random.split))


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """``PRNGKey(seed)`` of every row, ``[B, 2]`` uint32: the streams of policies reseeded with
    ``seeds`` (each in [0, 2**32))."""
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    if seeds.size and (seeds.min() < 0 or seeds.max() >= 2**32):
        raise ValueError(f"sampler seeds must be in [0, 2**32), got {seeds.min()}..{seeds.max()}")
    return np.asarray(_seed_rows(seeds.astype(np.uint32)))


def split_keys(streams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One call's step of every row's stream, ``[B, 2]`` uint32 -> (the streams after it, this
    call's keys): ``stream, key = split(stream)``, what ``act_batch`` does to its own stream."""
    pairs = np.asarray(_split_rows(np.asarray(streams, np.uint32)))
    return pairs[:, 0], pairs[:, 1]


def prompt_token_budget(head: str, seq_len: int, markers, vocab, tokens_per_frame: int, *, chunk: int,
                        action_dim: int) -> int:
    """How many prompt ids (bos and template included) fit in one ``seq_len`` sequence of ``head``:
    ``seq_len`` minus the image, marker and action tokens (measured by building an empty prompt's)."""
    from jaxvla.data.sequences import build_bins, build_flow

    empty, image = np.zeros(0, np.int32), np.zeros(tokens_per_frame, np.int32)
    if head == "flow":
        seq = build_flow(empty, image, markers, vocab, seq_len, chunk=chunk)
    else:
        seq = build_bins(empty, image, np.zeros(action_dim, np.int32), markers, vocab, seq_len)
    return seq_len - int(seq["segment_ids"].sum())


class Policy:
    """Restored finetuned model + everything needed to turn its outputs into robot actions.

    Build with :meth:`from_checkpoint`. ``act`` / ``act_batch`` are deterministic given the
    constructor's ``seed`` and the sequence of calls (the flow sampler's noise comes from a key
    split at every call), or given the per-row ``keys`` when those are passed.
    """

    def __init__(self, params: Any, config, assets: Mapping[str, Any], *, step: int = 0, checkpoint: str = "",
                 dataset: str | None = None, execute_steps: int | None = None, seed: int = 0,
                 tokenizer_checkpoint: str | None = None, flow_steps: int | None = None,
                 text_cache_size: int | None = None):
        from jaxvla.data.sequences import Vocab
        from jaxvla.stages.finetune import LATENT_CODES, Models
        from jaxvla.stages.vla import DEFAULT_TEXT_CACHE_SIZE, FrameTokenizer, TextPrompts

        self.checkpoint = checkpoint
        self.step = int(step)
        self.head = str(assets["head"])
        if self.head not in ("flow", "bins"):
            raise ValueError(f"{checkpoint}: assets 'head' is {self.head!r}; expected 'flow' or 'bins'")
        self.chunk = _scalar(assets["chunk"])
        self.action_dim = _scalar(assets["action_dim"])
        self.seq_len = _scalar(assets["seq_len"])
        self.flow_steps = int(flow_steps or _scalar(assets["flow_steps"]))
        if execute_steps is not None and not 1 <= int(execute_steps) <= self.chunk:
            raise ValueError(f"execute_steps={execute_steps} must be in [1, {self.chunk}] (the policy's chunk)")
        # The config's default (7) is for 14-action chunks; a bins policy predicts one action.
        self.execute_steps = int(execute_steps or min(max(_scalar(assets["execute_steps"]), 1), self.chunk))
        self.action_normalization = str(assets.get("action_normalization", "none"))

        datasets = dict(assets["datasets"])
        if not datasets:
            raise ValueError(f"{checkpoint}: assets hold no dataset statistics")
        self.dataset = dataset or next(iter(datasets))
        if self.dataset not in datasets:
            raise ValueError(f"{checkpoint}: no statistics for dataset {self.dataset!r}; "
                             f"the checkpoint has {sorted(datasets)}")
        entry = datasets[self.dataset]
        self._normalize_mask = np.asarray(entry["normalize_mask"], bool)
        self._action_stats = entry.get("statistics", {}).get("action")
        if self.head == "flow" and self.action_normalization != "none" and self._action_stats is None:
            raise ValueError(f"{checkpoint}: flow actions are normalised ({self.action_normalization}) but the "
                             f"assets hold no action statistics for {self.dataset!r}")
        if self.head == "bins":
            self._bin_centres = np.asarray(assets["bin_centres"], np.float32)  # [A, V]

        tokenizer_dir = tokenizer_checkpoint or str(assets["tokenizer_checkpoint"])
        if not os.path.exists(tokenizer_dir):
            raise FileNotFoundError(
                f"{checkpoint}: the image tokenizer checkpoint recorded in its assets ({tokenizer_dir}) does not "
                f"exist; pass tokenizer_checkpoint= (or --tokenizer_checkpoint) pointing at it")
        self.frames = FrameTokenizer.from_checkpoint(tokenizer_dir)
        self.image_size = int(self.frames.image_size)
        if self.image_size != _scalar(assets["image_size"]):
            raise ValueError(f"{checkpoint}: trained on {_scalar(assets['image_size'])} px frames but the image "
                             f"tokenizer {tokenizer_dir} reads {self.image_size} px")
        self.prompts = TextPrompts(str(assets.get("text_tokenizer", "")),
                                   cache_size=DEFAULT_TEXT_CACHE_SIZE if text_cache_size is None else text_cache_size)

        v = assets["vocab"]
        image_rows = _scalar(v["image"])
        image_codes = _scalar(v["image_codes"])
        self.vocab = Vocab(text_size=_scalar(v["text"]), image_codes=image_codes,
                           image_vocab=image_rows if image_rows != image_codes + 2 else None,
                           latent_codes=LATENT_CODES, action_bins=_scalar(v["action"]))
        self.prompt_budget = prompt_token_budget(self.head, self.seq_len, self.prompts.markers, self.vocab,
                                                 self.frames.tokens_per_frame, chunk=self.chunk,
                                                 action_dim=self.action_dim)
        self.prompts.set_budget(self.prompt_budget, f"the checkpoint's seq_len {self.seq_len} minus "
                                f"{self.seq_len - self.prompt_budget} image, marker and action tokens")
        models = Models(config, self.vocab, self.action_dim)
        self.params = jax.device_put(params)
        self._rng = jax.random.PRNGKey(seed)
        self._infer, self._infer_rows = self._make_infer(models)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> "Policy":
        """The latest (or the given step directory's) finetuning checkpoint under ``path``.
        ``kwargs``: ``dataset`` (whose statistics map actions back; default the first),
        ``execute_steps``, ``seed``, ``tokenizer_checkpoint``, ``flow_steps``, ``text_cache_size``
        (instructions whose prompt ids are kept; default 1024)."""
        from jaxvla import checkpoint as ckpt
        from jaxvla.config import from_dict

        state, config_dict, assets, step = ckpt.load_checkpoint(path)
        if config_dict.get("stage") != "finetune":
            raise ValueError(f"{path}: a {config_dict.get('stage')!r} checkpoint; a policy needs a finetuning "
                             "(configs/finetune.py) checkpoint")
        missing = [k for k in ("head", "chunk", "action_dim", "seq_len", "vocab", "datasets", "tokenizer_checkpoint")
                   if k not in assets]
        if missing:
            raise ValueError(f"{path}: checkpoint assets lack {missing}")
        config = from_dict(config_dict)
        policy = cls(state["params"], config, assets, step=step, checkpoint=path, **kwargs)
        log.info("policy: %s (step %d), head %s, chunk %d x %d, executes %d per plan, %d px frames", path, step,
                 policy.head, policy.chunk, policy.action_dim, policy.execute_steps, policy.image_size)
        return policy

    def _make_infer(self, models):
        """(batch key, per-row keys) inference functions ``(params, seq, rng or keys [B, 2])``."""
        from jaxvla.losses import finetune as losses

        if self.head == "flow":
            sample = functools.partial(losses.sample_action_chunk, **models.flow_modules, num_steps=self.flow_steps)

            def row(params, seq_row, key):  # one sequence as a batch of 1, its own noise
                return sample(params, jax.tree.map(lambda x: x[None], seq_row), key)[0]

            return jax.jit(sample), jax.jit(jax.vmap(row, in_axes=(None, 0, 0)))
        decode = functools.partial(losses.predict_bins_cached, backbone=models.backbone)
        infer = jax.jit(lambda params, seq, rng: decode(params, seq))
        return infer, infer  # greedy: no noise, rows are independent already

    # ------------------------------------------------------------------ description

    @property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to know (plain JSON types)."""
        return {
            "head": self.head,
            "chunk": self.chunk,
            "action_dim": self.action_dim,
            "execute_steps": self.execute_steps,
            "image_size": self.image_size,
            "flow_steps": self.flow_steps if self.head == "flow" else 0,
            "dataset": self.dataset,
            "action_normalization": self.action_normalization,
            "checkpoint": os.path.abspath(self.checkpoint) if self.checkpoint else "",
            "step": self.step,
        }

    def observation_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Required observation keys -> (shape, dtype name)."""
        return {"image": ((self.image_size, self.image_size, 3), "uint8")}

    # ------------------------------------------------------------------ acting

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"observation 'image' must be uint8 RGB, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"observation 'image' must be [{self.image_size}, {self.image_size}, 3] per frame "
                             f"(this policy's tokenizer reads {self.image_size} px RGB), got {images.shape[1:]}")
        return images

    def sequences(self, images: np.ndarray, instructions: Sequence[str]) -> dict[str, np.ndarray]:
        """The backbone's inputs ``[B, L]`` (and ``action_positions``) for B frames ``[B, S, S, 3]``."""
        from jaxvla.data.sequences import batch_sequences, build_bins, build_flow

        codes = self.frames.tokens(images)  # [B, N]
        seqs = []
        for code, instruction in zip(codes, instructions):
            prompt = self.prompts(instruction)
            if self.head == "flow":
                seqs.append(build_flow(prompt, code, self.prompts.markers, self.vocab, self.seq_len, chunk=self.chunk))
            else:
                seqs.append(build_bins(prompt, code, np.zeros(self.action_dim, np.int32), self.prompts.markers,
                                       self.vocab, self.seq_len))
        packed = batch_sequences(seqs)
        return {k: packed[k] for k in SEQUENCE_INPUTS}

    def act_batch(self, images: np.ndarray, instructions: Sequence[str], keys: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[B, K, A]`` (bins: K = 1) in the robot's units for frames ``[B, S, S, 3]``.
        ``keys`` (flow): per-row sampler keys ``[B, 2]`` uint32 (``split_keys``); None draws one
        key from the policy's stream. The bins head is greedy and ignores them."""
        images = self._check_images(images)
        instructions = list(instructions)
        if len(instructions) != len(images):
            raise ValueError(f"{len(images)} frames but {len(instructions)} instructions")
        for i, instruction in enumerate(instructions):
            if not isinstance(instruction, (str, bytes)):
                raise TypeError(f"instruction {i} must be a string, got {type(instruction).__name__}")
        if keys is not None:
            keys = np.asarray(keys)
            if keys.shape != (len(images), 2) or keys.dtype != np.uint32:
                raise ValueError(f"keys must be uint32 [{len(images)}, 2] (one per row), got {keys.dtype} {keys.shape}")
        seq = self.sequences(images, instructions)
        if keys is None:
            self._rng, rng = jax.random.split(self._rng)
            out = np.asarray(self._infer(self.params, seq, rng))
        else:
            out = np.asarray(self._infer_rows(self.params, seq, keys))
        return self.to_robot_units(out)

    def check_instruction(self, instruction: str) -> None:
        """Raise TypeError / ValueError (naming the limit) unless ``instruction``'s prompt fits the
        sequence (``prompt_budget`` ids); a fitting one stays cached for the next ``act``."""
        if not isinstance(instruction, (str, bytes)):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        self.prompts(instruction)

    def act(self, observation: Mapping[str, Any], instruction: str, key: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[K, A]`` for one observation ``{"image": uint8 [S, S, 3]}``; ``key``: this
        call's sampler key ``[2]`` uint32 (as a row of ``act_batch``'s ``keys``), else the
        policy's stream."""
        if "image" not in observation:
            raise KeyError(f"observation needs 'image' (uint8 [{self.image_size}, {self.image_size}, 3]); "
                           f"got keys {sorted(observation)}")
        keys = None if key is None else np.asarray(key)[None]
        return self.act_batch(np.asarray(observation["image"])[None], [instruction], keys)[0]

    def to_robot_units(self, out: np.ndarray) -> np.ndarray:
        """Model outputs -> actions: flow ``[B, K, A]`` normalised -> unnormalised; bins ``[B, A]``
        ints -> ``[B, 1, A]`` bin centres."""
        from jaxvla.data import stats as stats_lib

        if self.head == "bins":
            bins = np.clip(out.astype(np.int64), 0, self._bin_centres.shape[1] - 1)
            actions = np.take_along_axis(self._bin_centres[None], bins[..., None], axis=-1)[..., 0]
            return actions[:, None, :].astype(np.float32)
        if self.action_normalization == "none":
            return out.astype(np.float32)
        return np.asarray(stats_lib.unnormalize(out, self._action_stats, self.action_normalization,
                                                mask=self._normalize_mask), np.float32)

    def reseed(self, seed: int) -> None:
        """Restart the sampler's noise stream (flow) from ``seed``: an episode's actions then do
        not depend on what the policy did before (unbatched evaluation reseeds per episode; batched
        evaluation runs the same stream per row, ``seed_keys`` / ``split_keys``)."""
        self._rng = jax.random.PRNGKey(int(seed))

    def compiled_variants(self) -> int:
        """How many times inference was compiled: one per batch size used, with and without
        per-row ``keys`` counted apart (flow; the bins head shares one function)."""
        rows = self._infer_rows is not self._infer
        return int(self._infer._cache_size()) + (int(self._infer_rows._cache_size()) if rows else 0)


class ActionChunker:
    """Executes ``execute`` actions of each predicted chunk before asking the policy again
    (LAPA / ViPRA / openpi "action chunking"). ``step`` returns one action ``[A]``; ``replans``
    counts policy calls since ``reset``."""

    def __init__(self, policy, execute: int | None = None):
        self.policy = policy
        chunk = int(policy.chunk)
        self.execute = int(execute or policy.execute_steps)
        if not 1 <= self.execute <= chunk:
            raise ValueError(f"execute={self.execute} must be in [1, {chunk}] (the policy's chunk)")
        self.reset()

    def reset(self) -> None:
        self._queue: list[np.ndarray] = []
        self.replans = 0
        self.call_seconds: list[float] = []

    def step(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        if not self._queue:
            start = time.perf_counter()
            chunk = np.asarray(self.policy.act(observation, instruction))
            self.call_seconds.append(time.perf_counter() - start)
            self._queue = list(chunk[: self.execute])
            self.replans += 1
        return self._queue.pop(0)
