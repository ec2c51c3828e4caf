"""Sequence builder: exact layouts, target shift, loss weights, flow block, padding, errors."""

import numpy as np
import pytest

from jaxvla.data import sequences as S

VOCAB = S.Vocab(text_size=100, image_codes=8, latent_codes=4, action_bins=16)  # eof 8, eov 9, sep 4
MARKERS = {"<vision>": [10], "</vision>": [11], "<delta>": [12], "</delta>": [13],
           "<dynamics>": [14, 15], "</dynamics>": [16]}
PROMPT = np.array([1, 5, 6, 7])
IMAGE = np.array([[3, 0], [7, 2]])  # N = 4 codes (flattened row-major)


def shifted(x):
    return np.append(np.asarray(x)[1:], 0)


def check_common(seq, n, max_len):
    for key in S.SEQUENCE_KEYS:
        assert seq[key].shape == (max_len,), key
        assert seq[key].dtype == (np.float32 if key == "loss_weight" else np.int32), key
    np.testing.assert_array_equal(seq["segment_ids"], [1] * n + [0] * (max_len - n))
    np.testing.assert_array_equal(seq["positions"], list(range(n)) + [0] * (max_len - n))
    np.testing.assert_array_equal(seq["targets"], shifted(seq["tokens"]))
    np.testing.assert_array_equal(seq["target_modality"], shifted(seq["modality"]))
    pad = seq["segment_ids"] == 0
    assert (seq["tokens"][pad] == 0).all() and (seq["modality"][pad] == 0).all()
    assert (seq["loss_weight"][pad] == 0).all() and (seq["bidirectional_ids"][pad] == 0).all()
    assert seq["loss_weight"][n - 1] == 0  # the last real token predicts padding
    assert (seq["loss_weight"] >= 0).all()


def test_lapa_exact():
    seq = S.build_lapa(PROMPT, IMAGE, [2, 0], MARKERS, VOCAB, max_len=18)
    #            prompt      <v> o_t codes   eov </v> <d> z    </d>  pad
    tokens = [1, 5, 6, 7, 10, 3, 0, 7, 2, 9, 11, 12, 2, 0, 13, 0, 0, 0]
    modality = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 0]
    np.testing.assert_array_equal(seq["tokens"], tokens)
    np.testing.assert_array_equal(seq["modality"], modality)
    np.testing.assert_array_equal(seq["bidirectional_ids"], np.zeros(18))
    check_common(seq, 15, 18)
    t, z = 0.01 / 7, 0.99 / 2  # 7 text targets after bos (positions 1-4, 10, 11, 14), 2 latents
    weight = [t, t, t, t, 0, 0, 0, 0, 0, t, t, z, z, t, 0, 0, 0, 0]
    np.testing.assert_allclose(seq["loss_weight"], weight, rtol=1e-6)
    np.testing.assert_array_equal(seq["latent_positions"], [12, 13])
    np.testing.assert_array_equal(seq["targets"][seq["latent_positions"] - 1], [2, 0])
    lw, tm = seq["loss_weight"], seq["target_modality"]
    assert lw[tm == S.LATENT].sum() == pytest.approx(0.99)
    assert lw[tm == S.TEXT].sum() == pytest.approx(0.01)
    assert lw[tm == S.IMAGE].sum() == 0


def test_vipra_exact_with_history():
    prev, future = np.array([1, 1, 1, 1]), np.array([4, 5, 6, 7])
    latents = np.array([[0, 1], [2, 3], [3, 3]])  # H = 3, M = 2
    seq = S.build_vipra(PROMPT, IMAGE, future, latents, MARKERS, VOCAB, max_len=40,
                        prev_image=prev)
    tokens = ([1, 5, 6, 7, 10] + [1, 1, 1, 1, 8] + [3, 0, 7, 2, 8] + [4, 5, 6, 7, 9] + [11, 14, 15]
              + [0, 1, 4, 2, 3, 4, 3, 3, 4] + [16])
    modality = [0] * 5 + [1] * 15 + [0] * 3 + [2] * 9 + [0]
    n = len(tokens)
    assert n == 33
    np.testing.assert_array_equal(seq["tokens"], tokens + [0] * 7)
    np.testing.assert_array_equal(seq["modality"], modality + [0] * 7)
    check_common(seq, n, 40)
    np.testing.assert_array_equal(seq["future_positions"], [15, 16, 17, 18])
    np.testing.assert_array_equal(seq["latent_positions"], [23, 24, 26, 27, 29, 30])
    # text targets: positions 1-4, 20-22, 32 (8); future: 15-18; latent: 23-31 incl. separators
    t, f, z = 0.02 / 8, 0.48 / 4, 0.48 / 9
    token_weight = np.zeros(40)
    token_weight[[1, 2, 3, 4, 20, 21, 22, 32]] = t
    token_weight[15:19] = f
    token_weight[23:32] = z
    np.testing.assert_allclose(seq["loss_weight"], shifted(token_weight), rtol=1e-6)
    lw, tm = seq["loss_weight"], seq["target_modality"]
    assert lw[tm == S.IMAGE].sum() == pytest.approx(0.48)
    assert lw[tm == S.LATENT].sum() == pytest.approx(0.48)
    assert lw[tm == S.TEXT].sum() == pytest.approx(0.02)
    assert lw.sum() == pytest.approx(0.98)


def test_vipra_without_history_or_separator_loss():
    latents = np.array([[0, 1], [2, 3]])
    seq = S.build_vipra(PROMPT, IMAGE, [4, 5, 6, 7], latents, MARKERS, VOCAB, max_len=32,
                        separator_loss=False)
    tokens = [1, 5, 6, 7, 10, 3, 0, 7, 2, 8, 4, 5, 6, 7, 9, 11, 14, 15, 0, 1, 4, 2, 3, 4, 16]
    np.testing.assert_array_equal(seq["tokens"][:25], tokens)
    check_common(seq, 25, 32)
    np.testing.assert_array_equal(seq["future_positions"], [10, 11, 12, 13])
    np.testing.assert_array_equal(seq["latent_positions"], [18, 19, 21, 22])
    lw = seq["loss_weight"]
    np.testing.assert_allclose(lw[seq["latent_positions"] - 1], 0.48 / 4, rtol=1e-6)
    assert lw[[19, 22]].sum() == 0  # predicting the separators (positions 20, 23) is free
    assert lw.sum() == pytest.approx(0.98)


@pytest.mark.parametrize("builder, weights", [(S.build_actionvla, (0.99, 0.01)),
                                              (S.build_bins, (1.0, 0.0))])
def test_action_bins_exact(builder, weights):
    seq = builder(PROMPT, IMAGE, [15, 0, 7], MARKERS, VOCAB, max_len=16)
    tokens = [1, 5, 6, 7, 10, 3, 0, 7, 2, 9, 11, 12, 15, 0, 7, 13]
    modality = [0] * 5 + [1] * 5 + [0, 0, 3, 3, 3, 0]
    np.testing.assert_array_equal(seq["tokens"], tokens)
    np.testing.assert_array_equal(seq["modality"], modality)
    check_common(seq, 16, 16)
    np.testing.assert_array_equal(seq["action_positions"], [12, 13, 14])
    a, t = weights[0] / 3, weights[1] / 7  # text targets: 1-4, 10, 11, 15
    np.testing.assert_allclose(seq["loss_weight"],
                               [t] * 4 + [0] * 5 + [t, t, a, a, a, t, 0], rtol=1e-6)


def test_flow_block():
    seq = S.build_flow(PROMPT, IMAGE, MARKERS, VOCAB, max_len=20, chunk=5)
    n = 11 + 5
    np.testing.assert_array_equal(seq["tokens"][:n], [1, 5, 6, 7, 10, 3, 0, 7, 2, 9, 11] + [0] * 5)
    np.testing.assert_array_equal(seq["modality"][:n], [0] * 5 + [1] * 5 + [0] + [3] * 5)
    np.testing.assert_array_equal(seq["bidirectional_ids"], [0] * 11 + [2] * 5 + [0] * 4)
    np.testing.assert_array_equal(seq["action_positions"], np.arange(11, 16))
    assert seq["action_positions"].dtype == np.int32
    check_common(seq, n, 20)
    assert (seq["loss_weight"] == 0).all()
    mask = S.attention_mask(seq)
    acts = seq["action_positions"]
    assert mask[np.ix_(acts, acts)].all()  # the block sees itself both ways
    assert mask[np.ix_(acts, np.arange(11))].all()  # and the whole prefix
    assert not mask[np.ix_(np.arange(11), acts)].any()  # the prefix never sees the actions
    np.testing.assert_array_equal(mask[:11, :11], np.tril(np.ones((11, 11), bool)))
    assert not mask[16:].any() and not mask[:, 16:].any()  # padding
    # text CE on the prompt when asked; still none on the action block
    seq = S.build_flow(PROMPT, IMAGE, MARKERS, VOCAB, max_len=20, chunk=5, text_weight=0.5)
    assert seq["loss_weight"].sum() == pytest.approx(0.5)
    assert (seq["loss_weight"][10:] == 0).all()
    seq = S.build_flow(PROMPT, IMAGE, MARKERS, VOCAB, max_len=20, chunk=5,
                       prefix_bidirectional=True)
    np.testing.assert_array_equal(seq["bidirectional_ids"], [1] * 11 + [2] * 5 + [0] * 4)


HISTORY_BUILDERS = {
    "lapa": lambda prev: S.build_lapa(PROMPT, IMAGE, [2, 0], MARKERS, VOCAB, max_len=24, prev_image=prev),
    "actionvla": lambda prev: S.build_actionvla(PROMPT, IMAGE, [15, 0, 7], MARKERS, VOCAB, max_len=24,
                                                prev_image=prev),
    "bins": lambda prev: S.build_bins(PROMPT, IMAGE, [15, 0, 7], MARKERS, VOCAB, max_len=24, prev_image=prev),
    "flow": lambda prev: S.build_flow(PROMPT, IMAGE, MARKERS, VOCAB, max_len=24, chunk=3, prev_image=prev),
}


@pytest.mark.parametrize("kind", sorted(HISTORY_BUILDERS))
def test_history_frame_layout(kind):
    """``prev_image``: ``prompt <vision> o_{t-k} eof o_t eov </vision> ...``: the history frame's N
    codes and one eof right after ``<vision>`` (context: weight 0, image modality, causal); every
    later token, its target, loss weight, modality and bidirectional id are the layout without
    history's, N + 1 = 5 positions later; positions stay 0..n-1."""
    prev = np.array([[6, 6], [1, 4]])  # N = 4 codes
    plain, seq = HISTORY_BUILDERS[kind](None), HISTORY_BUILDERS[kind](prev)
    n0, n = int(plain["segment_ids"].sum()), int(seq["segment_ids"].sum())
    assert n == n0 + 5
    check_common(seq, n, 24)
    # prompt (4) and <vision> (1), then o_{t-k} and its eof (8), then o_t as before
    np.testing.assert_array_equal(seq["tokens"][:5], plain["tokens"][:5])
    np.testing.assert_array_equal(seq["tokens"][5:10], [6, 6, 1, 4, VOCAB.eof_id])
    np.testing.assert_array_equal(seq["modality"][5:10], [S.IMAGE] * 5)
    np.testing.assert_array_equal(seq["tokens"][10:n], plain["tokens"][5:n0])
    np.testing.assert_array_equal(seq["tokens"][10:14], IMAGE.reshape(-1))
    for key in ("modality", "target_modality", "bidirectional_ids"):
        np.testing.assert_array_equal(seq[key][10:n], plain[key][5:n0], err_msg=key)
    np.testing.assert_array_equal(seq["targets"][9:n], plain["targets"][4:n0])
    # the history frame is never a target (weights 0 for predicting it and its eof) and every
    # target after it keeps its weight: the same loss groups with the same members
    assert (seq["loss_weight"][4:9] == 0).all()
    np.testing.assert_allclose(seq["loss_weight"][9:n], plain["loss_weight"][4:n0], rtol=1e-6)
    np.testing.assert_allclose(seq["loss_weight"][:4], plain["loss_weight"][:4], rtol=1e-6)
    assert seq["loss_weight"].sum() == pytest.approx(plain["loss_weight"].sum())
    for name in ("latent_positions", "action_positions"):
        if name in plain:
            np.testing.assert_array_equal(seq[name], plain[name] + 5, err_msg=name)
    # causal over the vision block: o_t sees o_{t-k}, never the other way round
    mask = S.attention_mask(seq)
    assert mask[10:14, 5:10].all() and not mask[5:10, 10:14].any()
    with pytest.raises(ValueError, match=r"prev_image codes must lie in \[0, 8\)"):
        HISTORY_BUILDERS[kind](np.array([8, 0, 0, 0]))


def test_batch():
    seqs = [S.build_lapa(PROMPT, IMAGE, [i, 3], MARKERS, VOCAB, max_len=18) for i in range(3)]
    batch = S.batch_sequences(seqs)
    assert batch["tokens"].shape == (3, 18) and batch["latent_positions"].shape == (3, 2)
    np.testing.assert_array_equal(batch["targets"][:, 11], [0, 1, 2])
    assert S.attention_mask(batch).shape == (3, 18, 18)
    with pytest.raises(ValueError, match="different shapes"):
        S.batch_sequences([seqs[0], S.build_lapa(PROMPT, IMAGE, [1, 3], MARKERS, VOCAB, 20)])


def test_errors():
    with pytest.raises(ValueError, match=r"lapa sequence of 15 tokens \(prompt 4, .*latent 2.*\) "
                                         r"exceeds max_len 14"):
        S.build_lapa(PROMPT, IMAGE, [2, 0], MARKERS, VOCAB, max_len=14)
    with pytest.raises(ValueError, match=r"flow sequence of 25 tokens .* exceeds max_len 24"):
        S.build_flow(PROMPT, IMAGE, MARKERS, VOCAB, max_len=24, chunk=14)
    with pytest.raises(ValueError, match=r"latent ids must lie in \[0, 4\)"):
        S.build_lapa(PROMPT, IMAGE, [4, 0], MARKERS, VOCAB, max_len=18)  # 4 is the separator
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 8\)"):
        S.build_lapa(PROMPT, [8, 0], [0, 0], MARKERS, VOCAB, max_len=18)
    with pytest.raises(KeyError, match="<delta>"):
        S.build_lapa(PROMPT, IMAGE, [0], {"<vision>": [10], "</vision>": [11]}, VOCAB, 18)


def test_vocab():
    v = S.Vocab()
    assert (v.eof_id, v.eov_id, v.latent_sep_id) == (8192, 8193, 8)
    assert v.sizes == (32000, 8194, 9, 256)
    assert S.Vocab(image_vocab=8448).sizes[1] == 8448
    with pytest.raises(ValueError, match="image_vocab"):
        S.Vocab(image_codes=8, image_vocab=9)


def test_real_tokenizer():
    text = pytest.importorskip("jaxvla.data.text")
    try:
        tok = text.load_text_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    vocab = S.Vocab(image_codes=16, latent_codes=8)
    prompt = text.prompt_ids(tok, "open the drawer")
    markers = text.marker_ids(tok)
    image = np.arange(16)
    seq = S.build_lapa(prompt, image, [7, 0, 3, 5], markers, vocab, max_len=64)
    n = int(seq["segment_ids"].sum())
    assert n == len(prompt) + 3 + 16 + 1 + 3 + 3 + 4 + 3
    is_text = (seq["modality"] == S.TEXT) & (seq["segment_ids"] == 1)
    decoded = tok.decode(seq["tokens"][is_text].tolist(), skip_special_tokens=True)
    assert decoded == ("You are a helpful assistant. USER: What action should the robot take to "
                       "open the drawer? ASSISTANT: <vision> </vision> <delta> </delta>")
    assert seq["loss_weight"].sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(seq["targets"][seq["latent_positions"] - 1], [7, 0, 3, 5])
