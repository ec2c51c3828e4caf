"""The LWM-style LLaMA backbone: attention rule, KV cache, scan/remat, input embeddings, modality
tables, parameter counts and logical axes. Everything uses the ``tiny`` config in float32."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.models.llama import (MODALITIES, Llama, abstract_params, attend, count_params, init_cache, llama_config,
                                 param_counts)

L = 10


def unbox(tree):
    return jax.tree.map(lambda a: a.value if isinstance(a, nn.meta.AxisMetadata) else a, tree,
                        is_leaf=lambda a: isinstance(a, nn.meta.AxisMetadata))


def batch(length=L, seed=0, modality=None, segment=None, bidirectional=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 9, (2, length)).astype(np.int32)  # in range for every vocab of "tiny"
    full = lambda v, d: np.broadcast_to(np.asarray(d if v is None else v, np.int32), (2, length)).copy()
    return dict(tokens=tokens, modality=full(modality, 0), positions=full(None, np.arange(length)),
                segment_ids=full(segment, 1), bidirectional_ids=full(bidirectional, 0))


_CACHE = {}


def setup(**overrides):
    """(model, params, jitted apply) for ``tiny`` with ``overrides``, built once per config."""
    key = tuple(sorted(overrides.items()))
    if key not in _CACHE:
        model = Llama(llama_config("tiny", **overrides))
        ids = jnp.zeros((1, 4), jnp.int32)
        params = unbox(model.init(jax.random.PRNGKey(0), ids, ids, ids, ids + 1, ids))["params"]

        def apply(params, b, **kwargs):
            return model.apply({"params": params}, b["tokens"], b["modality"], b["positions"], b["segment_ids"],
                               b["bidirectional_ids"], **kwargs)

        _CACHE[key] = (model, params, jax.jit(apply, static_argnames=("heads",)))
    return _CACHE[key]


def logits(params, apply, b, **kwargs):
    return np.asarray(apply(params, b, **kwargs)["logits"]["text"])


def changed(a, b):
    """[L] bool: did anything at each position of batch row 0 change."""
    return np.abs(a[0] - b[0]).max(axis=-1) > 1e-6


# ----------------------------------------------------------------------------------------------
# An independent reference: LLaMA written out from its definition (not from jaxvla's modules), in
# NumPy float64 or, for gradients, jax.numpy. RoPE rotates each pair (j, j + Dh/2) of a head by
# pos * theta^(-2j/Dh); query head h reads key/value head h // (H / KV).


def reference_mask(b):
    """[B, L, L] bool: query i sees key j iff same non-zero segment and (pos_j <= pos_i or both in
    the same positive bidirectional block); a padding query sees only itself."""
    seg, pos, bid = (np.asarray(b[k]) for k in ("segment_ids", "positions", "bidirectional_ids"))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    earlier = pos[:, None, :] <= pos[:, :, None]
    block = (bid[:, :, None] == bid[:, None, :]) & (bid[:, :, None] > 0)
    own = (seg == 0)[:, :, None] & np.eye(seg.shape[1], dtype=bool)[None]
    return (same & (earlier | block)) | own


def reference_attention(q, k, v, allowed, xp=np):
    """Softmax attention ``q [B, L, H, Dh]``, ``k``/``v`` ``[B, S, KV, Dh]``, ``allowed [B, L, S]``."""
    group = q.shape[2] // k.shape[2]
    k, v = xp.repeat(k, group, axis=2), xp.repeat(v, group, axis=2)
    scores = xp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = xp.where(allowed[:, None], scores, -1e30)
    weights = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return xp.einsum("bhij,bjhd->bihd", weights, v)


def reference_logits(params, config, b, xp=np, input_embeddings=None, embedding_mask=None):
    """{modality: logits [B, L, V]} of the whole sequence ``b``; params stacked (scan) or per layer."""
    c = config
    f = (lambda a: np.asarray(a, np.float64)) if xp is np else (lambda a: a)
    tokens, modality, pos = (np.asarray(b[k]) for k in ("tokens", "modality", "positions"))
    x = 0.0
    for m, name in enumerate(MODALITIES):
        if c.vocab(name):
            rows = f(params[f"embed_{name}"]["embedding"])[np.clip(tokens, 0, c.vocab(name) - 1)]
            x = x + (modality == m)[..., None] * rows
    if input_embeddings is not None:
        x = xp.where(np.asarray(embedding_mask)[..., None], f(input_embeddings), x)
    allowed = reference_mask(b)

    half = c.head_dim // 2
    angle = pos[..., None].astype(np.float64) * c.rope_theta ** (-2.0 * np.arange(half) / c.head_dim)
    cos, sin = np.cos(angle)[:, :, None, :], np.sin(angle)[:, :, None, :]  # [B, L, 1, Dh/2]

    def rope(t):
        first, second = t[..., :half], t[..., half:]
        return xp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

    def rms_norm(t, scale):
        return t / xp.sqrt(xp.mean(t * t, axis=-1, keepdims=True) + c.norm_eps) * f(scale)

    for i in range(c.num_layers):
        p = params[f"layers_{i}"] if f"layers_{i}" in params else jax.tree.map(lambda a: a[i], params["layers"])
        a = p["attention"]
        h = rms_norm(x, p["input_norm"]["scale"])
        q = rope(xp.einsum("bld,dhk->blhk", h, f(a["q_proj"]["kernel"])))
        k = rope(xp.einsum("bld,dhk->blhk", h, f(a["k_proj"]["kernel"])))
        v = xp.einsum("bld,dhk->blhk", h, f(a["v_proj"]["kernel"]))
        x = x + xp.einsum("blhk,hkd->bld", reference_attention(q, k, v, allowed, xp), f(a["o_proj"]["kernel"]))
        h = rms_norm(x, p["post_attention_norm"]["scale"])
        gate = h @ f(p["mlp"]["gate_proj"]["kernel"])
        x = x + (gate / (1.0 + xp.exp(-gate)) * (h @ f(p["mlp"]["up_proj"]["kernel"]))) @ f(
            p["mlp"]["down_proj"]["kernel"])
    hidden = rms_norm(x, params["final_norm"]["scale"])
    out = {}
    for name in c.present:
        head = params[f"head_{name}"]["kernel"] if f"head_{name}" in params else params[f"embed_{name}"]["embedding"].T
        out[name] = hidden @ f(head)
    return out


def assert_matches_reference(got, params, config, b, atol=2e-4, **kwargs):
    """Every present modality's logits (a dict of [B, L', V], L' = the last L' positions of ``b``)."""
    want = reference_logits(params, config, b, **kwargs)
    for name in config.present:
        g = np.asarray(got[name])
        np.testing.assert_allclose(g, want[name][:, -g.shape[1]:], atol=atol, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": False}, {"tie_embeddings": True}],
                         ids=["scan", "loop", "tied"])
def test_matches_numpy_reference(overrides):
    """Logits of every modality equal the NumPy LLaMA above (RoPE at shifted positions, GQA,
    segments, a bidirectional block, padding, mixed modalities)."""
    model, params, apply = setup(**overrides)
    b = batch(modality=[0, 0, 1, 1, 2, 0, 3, 3, 1, 0], segment=[1, 1, 1, 1, 1, 1, 1, 1, 0, 2],
              bidirectional=[1, 1, 1, 0, 0, 2, 2, 2, 0, 0])
    b["positions"] = b["positions"] + np.array([[3], [11]], np.int32)  # RoPE is not just relative offsets here
    assert_matches_reference(apply(params, b)["logits"], params, model.config, b)


def test_attention_rule_causal_bidirectional_padding():
    _, params, apply = setup()
    # Positions 0-2 a bidirectional prefix (id 1), 3 padding, 4-5 causal, 6-8 a block (id 2), 9 causal.
    b = batch(segment=[1, 1, 1, 0, 1, 1, 1, 1, 1, 1], bidirectional=[1, 1, 1, 0, 0, 0, 2, 2, 2, 0])
    base = logits(params, apply, b)

    def perturb(position):
        p = {k: v.copy() for k, v in b.items()}
        p["tokens"][:, position] += 1
        return changed(base, logits(params, apply, p))

    expect = lambda *ps: np.isin(np.arange(L), ps)
    np.testing.assert_array_equal(perturb(5), expect(5, 6, 7, 8, 9))  # causal: earlier positions unchanged
    np.testing.assert_array_equal(perturb(2), expect(0, 1, 2, 4, 5, 6, 7, 8, 9))  # the prefix sees itself
    np.testing.assert_array_equal(perturb(8), expect(6, 7, 8, 9))  # the block sees itself, not the past
    np.testing.assert_array_equal(perturb(3), expect(3))  # padding influences nobody


def test_segments_isolate_and_heads_select():
    _, params, apply = setup()
    b = batch(segment=[1] * 5 + [2] * 5)
    two = logits(params, apply, b)
    first = logits(params, apply, {k: v[:, :5] for k, v in b.items()})
    np.testing.assert_allclose(two[:, :5], first, atol=1e-5)
    out = apply(params, b, heads=("latent",))
    assert set(out["logits"]) == {"latent"} and out["logits"]["latent"].shape == (2, L, 9)
    assert out["logits"]["latent"].dtype == jnp.float32 and out["hidden"].shape == (2, L, 64)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decoding_matches_full_pass(scan_layers):
    model, params, apply = setup(scan_layers=scan_layers)
    b = batch(modality=[0, 0, 1, 1, 1, 0, 2, 2, 0, 3])
    full = apply(params, b)["logits"]
    cache = init_cache(model.config, 2, max_len=16)
    prefix = 4
    out = apply(params, {k: v[:, :prefix] for k, v in b.items()}, cache=cache)
    steps = [out["logits"]]
    cache = out["cache"]
    for i in range(prefix, L):
        out = apply(params, {k: v[:, i:i + 1] for k, v in b.items()}, cache=cache)
        steps.append(out["logits"])
        cache = out["cache"]
    assert int(cache["index"]) == L and cache["k"].shape == (2, 2, 16, 2, 16)
    decoded = {m: np.concatenate([s[m] for s in steps], axis=1) for m in MODALITIES}
    for m in MODALITIES:
        np.testing.assert_allclose(decoded[m], full[m], atol=1e-5)
    # ... and both equal the independent reference (a wrong RoPE would agree with itself).
    assert_matches_reference(decoded, params, model.config, b)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_flow_style_block_against_prefix_cache(scan_layers):
    model, params, apply = setup(scan_layers=scan_layers)
    prefix, chunk = 6, 4
    b = batch(modality=[0] * prefix + [3] * chunk, bidirectional=[1] * prefix + [2] * chunk)
    mask = np.arange(L)[None].repeat(2, 0) >= prefix
    prefill = apply(params, {k: v[:, :prefix] for k, v in b.items()}, cache=init_cache(model.config, 2, 16))
    for seed in range(2):  # two "Euler steps" reuse the same prefix cache
        noise = jax.random.normal(jax.random.PRNGKey(seed), (2, L, 64))
        full = apply(params, b, input_embeddings=noise, embedding_mask=mask)
        block = apply(params, {k: v[:, prefix:] for k, v in b.items()}, cache=prefill["cache"],
                      input_embeddings=noise[:, prefix:], embedding_mask=mask[:, prefix:])
        np.testing.assert_allclose(block["hidden"], full["hidden"][:, prefix:], atol=1e-5)
        np.testing.assert_allclose(block["logits"]["action"], full["logits"]["action"][:, prefix:], atol=1e-5)
        want = reference_logits(params, model.config, b, input_embeddings=np.asarray(noise), embedding_mask=mask)
        np.testing.assert_allclose(block["logits"]["action"], want["action"][:, prefix:], atol=2e-4, rtol=1e-4)


def test_scan_and_loop_agree():
    _, scanned_params, scanned = setup()
    model, loop_params, loop = setup(scan_layers=False)
    assert count_params(model.config) == count_params(llama_config("tiny"))
    converted = {k: v for k, v in scanned_params.items() if k != "layers"}
    for i in range(model.config.num_layers):
        converted[f"layers_{i}"] = jax.tree.map(lambda a: a[i], scanned_params["layers"])
    assert jax.tree.structure(converted) == jax.tree.structure(loop_params)
    b = batch(bidirectional=[1, 1, 1] + [0] * 7)
    np.testing.assert_allclose(logits(converted, loop, b), logits(scanned_params, scanned, b), atol=1e-5)
    want = reference_logits(scanned_params, model.config, b)["text"]
    np.testing.assert_allclose(logits(converted, loop, b), want, atol=2e-4, rtol=1e-4)


def test_scan_unroll_keeps_parameters_outputs_and_cache():
    """``scan_unroll=0`` (every layer inlined) has the scanned parameters (stacked on ``layers``,
    same values) and the same logits and KV-cache decoding as the one-layer loop."""
    _, looped_params, looped = setup()
    model, params, unrolled = setup(scan_unroll=0)
    jax.tree.map(np.testing.assert_array_equal, params, looped_params)
    b = batch(modality=[0, 0, 1, 1, 1, 0, 2, 2, 0, 3], bidirectional=[1, 1, 1] + [0] * 7)
    np.testing.assert_allclose(logits(params, unrolled, b), logits(params, looped, b), atol=1e-5)
    prefix = 6
    caches = [apply(params, {k: v[:, :prefix] for k, v in b.items()}, cache=init_cache(model.config, 2, 16))
              for apply in (looped, unrolled)]
    np.testing.assert_allclose(caches[1]["cache"]["k"], caches[0]["cache"]["k"], atol=1e-5)
    steps = [apply(params, {k: v[:, prefix:] for k, v in b.items()}, cache=c["cache"])
             for apply, c in zip((looped, unrolled), caches)]
    np.testing.assert_allclose(steps[1]["logits"]["text"], steps[0]["logits"]["text"], atol=1e-5)
    np.testing.assert_allclose(steps[1]["cache"]["v"], steps[0]["cache"]["v"], atol=1e-5)
    with pytest.raises(ValueError, match="scan unroll must be >= 0"):
        llama_config("tiny", scan_unroll=-1)


def test_remat_policies_give_same_gradients():
    b = batch(modality=[0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    grads = {}
    for policy in ("none", "full", "dots_saveable"):  # "nothing_saveable" is the same policy as "full"
        model, params, _ = setup(remat=policy)

        def loss(p):
            out = model.apply({"params": p}, b["tokens"], b["modality"], b["positions"], b["segment_ids"],
                              b["bidirectional_ids"])
            return jnp.mean(out["logits"]["text"] ** 2) + jnp.mean(out["logits"]["image"] ** 2)

        grads[policy] = jax.jit(jax.grad(loss))(params)
    for policy, g in grads.items():
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-5), g, grads["none"])

    # The gradients themselves: jax.grad of the reference LLaMA written in jax.numpy.
    def reference_loss(p):
        out = reference_logits(p, model.config, b, xp=jnp)
        return jnp.mean(out["text"] ** 2) + jnp.mean(out["image"] ** 2)

    def check(path, got, ref):
        got, ref = np.asarray(got), np.asarray(ref)
        scale = np.abs(ref).max() + 1e-12  # within 1e-4 of each parameter's largest gradient entry
        np.testing.assert_allclose(got / scale, ref / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, grads["full"], jax.jit(jax.grad(reference_loss))(params))


def test_input_embeddings_replace_tokens():
    _, params, apply = setup()
    b = batch()
    mask = np.zeros((2, L), bool)
    mask[:, 4:7] = True
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, L, 64))
    base = logits(params, apply, b, input_embeddings=emb, embedding_mask=mask)
    other = {k: v.copy() for k, v in b.items()}
    other["tokens"][:, 4:7] += 3
    np.testing.assert_allclose(logits(params, apply, other, input_embeddings=emb, embedding_mask=mask), base,
                               atol=1e-6)
    emb2 = emb.at[:, 5].add(1.0)
    assert changed(base, logits(params, apply, b, input_embeddings=emb2, embedding_mask=mask))[5]
    # Without a mask entry the embedding is ignored.
    np.testing.assert_allclose(logits(params, apply, b, input_embeddings=emb, embedding_mask=mask & False),
                               logits(params, apply, b), atol=1e-6)


def test_each_position_uses_its_modality_table():
    _, params, apply = setup()
    modality = np.array([0, 1, 1, 0, 2, 3, 1, 0, 3, 2])
    b = batch(modality=modality, segment=np.arange(L) + 1)  # own segment each: no mixing across positions
    base = np.asarray(apply(params, b)["hidden"])
    for m, name in enumerate(MODALITIES):
        zeroed = dict(params, **{f"embed_{name}": {"embedding": jnp.zeros_like(params[f"embed_{name}"]["embedding"])}})
        hidden = np.asarray(apply(zeroed, b)["hidden"])
        np.testing.assert_array_equal(changed(base, hidden), modality == m)


def test_lwm7b_parameter_count():
    config = llama_config("lwm7b")
    d, f, n, v = 4096, 11008, 32, 32000
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two norms
    body = n * per_layer + d  # + final norm
    assert per_layer == 202_383_360
    counts = param_counts(config)
    assert counts["body"] == body and abs(counts["body"] / 6.48e9 - 1) < 0.01
    assert counts["embed_text"] + counts["head_text"] == 2 * v * d
    assert body + 2 * v * d == 6_738_415_616  # LLaMA-2-7B as Hugging Face counts it
    extra = sum(2 * config.vocab(m) * d for m in ("image", "latent", "action"))
    assert count_params(config) == body + 2 * v * d + extra


def test_every_parameter_has_logical_axes():
    for overrides in ({}, {"scan_layers": False}):
        tree = abstract_params(llama_config("tiny", **overrides))
        leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, nn.meta.AxisMetadata))
        assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
        for a in leaves:
            assert len(a.names) == a.value.ndim and all(isinstance(x, str) for x in a.names), a
    scanned = abstract_params(llama_config("tiny"))
    assert scanned["layers"]["attention"]["k_proj"]["kernel"].names == ("layers", "embed", "kv_heads", "kv")
    assert scanned["embed_image"]["embedding"].names == ("vocab", "embed")
    assert scanned["head_text"]["kernel"].names == ("embed", "vocab")


def test_absent_modality_and_tied_embeddings():
    config = llama_config("tiny", latent_vocab=0, action_vocab=0, tie_embeddings=True, num_layers=1)
    assert config.present == ("text", "image")
    names = set(abstract_params(config))
    assert names == {"embed_text", "embed_image", "layers", "final_norm"}
    with pytest.raises(ValueError):
        llama_config("tiny", num_kv_heads=3)


def test_matches_hugging_face_llama():
    """Text-only logits equal ``transformers.LlamaForCausalLM`` with the same (converted) weights:
    fixes the RoPE layout and the weight mapping a converter needs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, _, apply = setup(image_vocab=0, latent_vocab=0, action_vocab=0)
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.text_vocab, hidden_size=c.dim, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    w = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    d, h, kv, dh = c.dim, c.num_heads, c.num_kv_heads, c.head_dim

    def layer(i):
        p = f"model.layers.{i}."
        return {
            "attention": {"q_proj": {"kernel": w[p + "self_attn.q_proj.weight"].T.reshape(d, h, dh)},
                          "k_proj": {"kernel": w[p + "self_attn.k_proj.weight"].T.reshape(d, kv, dh)},
                          "v_proj": {"kernel": w[p + "self_attn.v_proj.weight"].T.reshape(d, kv, dh)},
                          "o_proj": {"kernel": w[p + "self_attn.o_proj.weight"].T.reshape(h, dh, d)}},
            "mlp": {n: {"kernel": w[p + f"mlp.{n}.weight"].T} for n in ("gate_proj", "up_proj", "down_proj")},
            "input_norm": {"scale": w[p + "input_layernorm.weight"]},
            "post_attention_norm": {"scale": w[p + "post_attention_layernorm.weight"]},
        }

    layers = [layer(i) for i in range(c.num_layers)]
    params = {"embed_text": {"embedding": w["model.embed_tokens.weight"]},
              "head_text": {"kernel": w["lm_head.weight"].T},
              "final_norm": {"scale": w["model.norm.weight"]},
              "layers": jax.tree.map(lambda *a: np.stack(a), *layers)}
    b = batch()
    b["tokens"] = np.random.default_rng(3).integers(0, c.text_vocab, (2, L)).astype(np.int32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(b["tokens"]).long()).logits.numpy()
    np.testing.assert_allclose(logits(params, apply, b), expected, atol=1e-4)


def test_attention_kernels_agree(monkeypatch):
    """Two different implementations, each against the NumPy softmax attention: the einsum kernel
    (the CPU default) and jax.nn.dot_product_attention's XLA one (a spy shows which ran); then the
    same for the whole model's logits, and einsum vs XLA gradients (GQA, segments, a bidirectional
    block, padding). An unknown kernel fails when the config is made."""
    calls = []
    original = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("implementation"))
        return original(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    b = batch(segment=np.r_[np.ones(L - 3), np.zeros(3)], bidirectional=np.r_[np.zeros(4), np.ones(4), np.zeros(L - 8)])
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, L, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, L, 2, 16)).astype(np.float32) for _ in range(2))
    allowed = reference_mask(b)
    want = reference_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), allowed)
    out = {}
    for kernel in ("einsum", "xla"):
        before = len(calls)
        out[kernel] = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed)[:, None],
                                        kernel))
        assert calls[before:] == ([] if kernel == "einsum" else ["xla"]), (kernel, calls)
        np.testing.assert_allclose(out[kernel], want, atol=1e-5, rtol=1e-5, err_msg=kernel)

    _, params, apply = setup()
    model_einsum, _, apply_einsum = setup(attention="einsum")
    model_xla, _, apply_xla = setup(attention="xla")
    # "" resolves to einsum on CPU: the very same computation, bit for bit.
    np.testing.assert_array_equal(logits(params, apply, b), logits(params, apply_einsum, b))
    seq = [b[k] for k in ("tokens", "modality", "positions", "segment_ids", "bidirectional_ids")]
    for model, run, expected in ((model_einsum, apply_einsum, set()), (model_xla, apply_xla, {"xla"})):
        calls.clear()
        jax.eval_shape(lambda p: model.apply({"params": p}, *seq), params)  # a fresh trace, no compilation
        assert set(calls) == expected and (len(calls) > 0) == bool(expected), (model.config.attention, calls)
        assert_matches_reference(run(params, b)["logits"], params, model.config, b)
    grads = [jax.grad(lambda p: apply(p, b)["hidden"][:, : L - 3].sum())(params) for apply in (apply_einsum, apply_xla)]
    for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-3)  # sums of ~1e2 terms
    with pytest.raises(ValueError, match="attention='flash'"):
        llama_config("tiny", attention="flash")
