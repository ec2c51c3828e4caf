"""The text tokenizer of the pretraining / finetuning stages: a LLaMA-style SentencePiece model.

Nothing is downloaded: the default model is the SentencePiece file that ships inside the
``mistral-common`` wheel (``mistral_common/data/tokenizer.model.v1``: vocab 32000, ``<unk>`` 0,
``<s>`` 1, ``</s>`` 2, byte fallback). The Makefile installs that wheel with ``--no-deps`` (its
metadata caps numpy below ours on Python <= 3.12); only the data file is used, its code is never
imported. Any other SentencePiece ``.model`` file (e.g. LLaMA-2's) can be passed as ``path``.

Note: this vocabulary is Mistral-7B-v0.1's, not LLaMA-2's: the sizes and special ids match, the
piece ids do not. A backbone initialised from LLaMA-2 / LWM weights needs LLaMA-2's own file.

The tokenizer is a ``transformers`` tokenizer (``LlamaTokenizer``; on transformers 5.x the
``tokenizers``-backed one converted from the SentencePiece proto, on 4.x the sentencepiece-backed
slow one). :func:`encode_text` never relies on its "add special tokens" defaults, which changed
between versions: it encodes without special tokens and prepends ``bos`` itself.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import numpy as np

TOKENIZER_PACKAGE = "mistral_common"
TOKENIZER_RESOURCE = ("data", "tokenizer.model.v1")
VOCAB_SIZE = 32000
BOS_ID = 1
EOS_ID = 2

_INSTALL_HINT = (
    "install the wheel that ships it without its dependencies: "
    "`.venv/bin/pip install --no-deps mistral-common==1.13.1` (the Makefile does this), "
    "or pass the path of another LLaMA-style SentencePiece .model file"
)

# LAPA's prompt (REFERENCE.md, Stage 2). The bos token is not part of the string: encode_text adds it.
LAPA_PROMPT = (
    "You are a helpful assistant. USER: What action should the robot take to {instruction}? ASSISTANT:"
)
# A state prompt inserts " State: <bins>." before this ending, so it still ends as pretraining's did.
STATE_ANCHOR = " ASSISTANT:"


def default_tokenizer_path() -> str:
    """Path of ``mistral_common/data/tokenizer.model.v1`` in the installed ``mistral-common``.

    Found with ``importlib.util.find_spec`` (the package is not imported). Raises
    FileNotFoundError, naming what it looked for and how to get it, when it is not installed.
    """
    rel = os.path.join(TOKENIZER_PACKAGE, *TOKENIZER_RESOURCE)
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no SentencePiece tokenizer: package {TOKENIZER_PACKAGE!r} ({rel}) "
                                f"is not installed; {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *TOKENIZER_RESOURCE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no SentencePiece tokenizer: {rel} not found in "
                            f"{list(spec.submodule_search_locations)}; {_INSTALL_HINT}")


def load_text_tokenizer(path: str | None = None):
    """A ``transformers.LlamaTokenizer`` built offline from the SentencePiece model at ``path``.

    ``path=None`` uses :func:`default_tokenizer_path`. bos / eos ids are those of the model (1 / 2
    for the default, checked by the tests). A missing file raises FileNotFoundError naming it.
    """
    import transformers

    path = default_tokenizer_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePiece tokenizer file not found: {path}; {_INSTALL_HINT}")
    cls = transformers.LlamaTokenizer
    if hasattr(cls, "convert_to_native_format"):
        # transformers 5.x: the tokenizers backend converts a SentencePiece proto only when the
        # file name ends in ".model" (else it silently builds a 3-token vocab), hence the link.
        with tempfile.TemporaryDirectory() as tmp:
            link = os.path.join(tmp, "tokenizer.model")
            os.symlink(os.path.abspath(path), link)
            kwargs = cls.convert_to_native_format(vocab_file=link)
            tokenizer = cls(**kwargs)
        tokenizer.vocab_file = path  # the temporary link is gone; save_pretrained copies this
    else:  # transformers 4.x: the slow, sentencepiece-backed tokenizer reads any file name
        tokenizer = cls(vocab_file=path, legacy=False)
    if len(tokenizer) < 3 or tokenizer.bos_token_id is None:
        raise ValueError(f"{path} did not load as a SentencePiece model ({len(tokenizer)} tokens)")
    return tokenizer


def encode_text(tokenizer, text: str, add_bos: bool = True) -> np.ndarray:
    """int32 ids of ``text`` (no eos), preceded by ``tokenizer.bos_token_id`` when ``add_bos``.

    The text is encoded as plain text: SentencePiece prefixes a word boundary ("▁") to it, so
    ``encode_text(t, "a") + encode_text(t, "b")`` equals the ids of "a b" when pieces split there.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if add_bos:
        ids = [tokenizer.bos_token_id] + list(ids)
    return np.asarray(ids, dtype=np.int32)


def state_text(state_bins) -> str:
    """The discretized proprioceptive state as prompt text: the bins (ints in [0, 255], one per
    selected dim, ``jaxvla.data.stats.discretize_state``) in decimal, separated by single spaces,
    e.g. ``[12, 200, 45, 3]`` -> ``"12 200 45 3"``."""
    bins = np.asarray(state_bins).reshape(-1)
    if bins.size == 0:
        raise ValueError("state_text: no state bins (the state prompt needs at least one dim)")
    if not np.issubdtype(bins.dtype, np.integer):
        raise ValueError(f"state_text: state bins must be integers, got dtype {bins.dtype}")
    return " ".join(str(int(b)) for b in bins)


def prompt_text(instruction: str, template: str = LAPA_PROMPT, state_bins=None) -> str:
    """The prompt string (without bos) of :func:`prompt_ids`: LAPA's prompt around ``instruction``
    (trailing whitespace and one final period dropped, since the template adds "?"); with
    ``state_bins`` (pi0-FAST style proprioception in the prompt, finetuning and policies only)
    the question is followed by ``" State: "`` + :func:`state_text` + ``"."`` before
    ``" ASSISTANT:"``, e.g. "You are a helpful assistant. USER: What action should the robot take
    to open the drawer? State: 12 200 45 3. ASSISTANT:"."""
    instruction = instruction.strip()
    if instruction.endswith("."):
        instruction = instruction[:-1]
    text = template.format(instruction=instruction)
    if state_bins is None:
        return text
    if not text.endswith(STATE_ANCHOR):
        raise ValueError(f"prompt_text: a state prompt needs a template ending in {STATE_ANCHOR!r}, got {template!r}")
    return text[: -len(STATE_ANCHOR)] + f" State: {state_text(state_bins)}." + STATE_ANCHOR


def prompt_ids(tokenizer, instruction: str, template: str = LAPA_PROMPT, state_bins=None) -> np.ndarray:
    """``<s>`` + the ids of :func:`prompt_text` (``state_bins``: the discretized state, or None)."""
    return encode_text(tokenizer, prompt_text(instruction, template, state_bins), add_bos=True)


def marker_ids(tokenizer, markers=("<vision>", "</vision>", "<delta>", "</delta>",
                                   "<dynamics>", "</dynamics>")) -> dict[str, np.ndarray]:
    """The text ids of the layout markers, encoded as plain strings (no bos): e.g. "<vision>" ->
    ["▁<", "vision", ">"]. They are not special SentencePiece pieces; encoding them as text keeps
    the vocabulary at 32000 and the result deterministic."""
    return {m: encode_text(tokenizer, m, add_bos=False) for m in markers}
