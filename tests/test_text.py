"""The SentencePiece text tokenizer (mistral-common's LLaMA-style model, loaded offline)."""

import importlib.util
import os

import numpy as np
import pytest

from jaxvla.data import text

INSTRUCTIONS = (
    "pick up the red cup",
    "open the drawer",
    "push the button on the wall",
    "put the green block left of the bowl",
    "reach towards the puck, then stop",
)


@pytest.fixture(scope="module")
def tokenizer():
    return text.load_text_tokenizer()


def test_default_path_and_special_ids(tokenizer):
    path = text.default_tokenizer_path()
    assert path.endswith(os.path.join("mistral_common", "data", "tokenizer.model.v1"))
    assert os.path.isfile(path)
    assert len(tokenizer) == text.VOCAB_SIZE == 32000
    assert tokenizer.vocab_size == 32000
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]


def test_known_ids(tokenizer):
    ids = text.encode_text(tokenizer, "robot")
    assert ids.dtype == np.int32
    assert ids.tolist() == [1, 18401]  # <s>, "▁robot"
    assert text.encode_text(tokenizer, "robot", add_bos=False).tolist() == [18401]
    assert tokenizer.convert_ids_to_tokens([18401]) == ["▁robot"]
    assert text.prompt_ids(tokenizer, "pick up the cup.").tolist() == [
        1, 995, 460, 264, 10865, 13892, 28723, 2223, 725, 28747, 1824, 2992, 1023, 272, 18401,
        1388, 298, 3088, 582, 272, 6211, 28804, 8602, 8048, 12738, 28747]
    markers = text.marker_ids(tokenizer)
    assert markers["<vision>"].tolist() == [523, 9824, 28767]  # "▁<", "vision", ">"
    assert markers["</vision>"].tolist() == [1867, 9824, 28767]
    assert markers["<delta>"].tolist() == [523, 3973, 28767]
    assert markers["</delta>"].tolist() == [1867, 3973, 28767]


def test_matches_sentencepiece(tokenizer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=text.default_tokenizer_path())
    assert (sp.vocab_size(), sp.bos_id(), sp.eos_id()) == (32000, 1, 2)
    for s in INSTRUCTIONS + (text.LAPA_PROMPT.format(instruction=INSTRUCTIONS[0]),):
        assert text.encode_text(tokenizer, s, add_bos=False).tolist() == sp.encode(s)


@pytest.mark.parametrize("s", INSTRUCTIONS + ("<vision> </delta>", "café 日本 3.5cm"))
def test_round_trip(tokenizer, s):
    ids = text.encode_text(tokenizer, s)
    assert ids[0] == 1 and (ids[1:] > 2).all()
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=True) == s
    assert tokenizer.decode(ids[1:].tolist()) == s


def test_missing_file(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope" / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.model.*mistral-common"):
        text.load_text_tokenizer(missing)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mistral_common" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="mistral_common.*tokenizer.model.v1.*--no-deps"):
        text.load_text_tokenizer()
