"""HF LLaMA and LWM (EasyLM-layout) LLaMA weights -> the jaxvla backbone: logits parity with
``transformers.LlamaForCausalLM`` (tiny random models built here), the converter script, layouts,
round trips and error messages."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.io.hf_llama import (hf_config_to_llama, hf_to_params, load_hf_llama, params_to_hf,
                                read_hf_config, read_hf_state_dict)
from jaxvla.io.lwm import (lwm_llama_to_params, read_easylm_streaming, rope_half_to_interleaved,
                           rope_interleaved_to_half)
from jaxvla.io.weights import flatten_dict, load_param_tree
from jaxvla.models.llama import Llama, apply_rope, llama_config, rope_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L = 2, 9


def run_backbone(config, params, tokens, modality=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    modality = jnp.zeros_like(tokens) if modality is None else jnp.asarray(modality, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    out = Llama(config).apply({"params": params}, tokens, modality, positions, jnp.ones_like(tokens),
                              jnp.zeros_like(tokens))
    return {k: np.asarray(v) for k, v in out["logits"].items()}


_HF = {}


def hf_model(tmp_path_factory, kv_heads=4, tie=False):
    """(checkpoint dir saved with save_pretrained (safetensors), torch model, tokens, torch logits)."""
    key = (kv_heads, tie)
    if key not in _HF:
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        hf_config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=64,
            tie_word_embeddings=tie)
        torch.manual_seed(kv_heads + 10 * tie)
        model = transformers.LlamaForCausalLM(hf_config).eval()
        with torch.no_grad():  # non-trivial norm scales, so a mis-mapped norm shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        directory = tmp_path_factory.mktemp(f"hf_kv{kv_heads}_tie{int(tie)}")
        model.save_pretrained(directory)
        tokens = np.random.default_rng(kv_heads).integers(0, 128, (B, L)).astype(np.int32)
        with torch.no_grad():
            expected = model(torch.from_numpy(tokens).long()).logits.numpy()
        _HF[key] = (directory, model, tokens, expected)
    return _HF[key]


def run_script(*args):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_hf_llama.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kv_heads,tie,suffix", [(4, False, ".npz"), (2, True, ".msgpack")])
def test_script_and_library_match_transformers(tmp_path_factory, tmp_path, kv_heads, tie, suffix):
    directory, _, tokens, expected = hf_model(tmp_path_factory, kv_heads, tie)
    assert os.path.exists(directory / "model.safetensors")
    config = hf_config_to_llama(read_hf_config(directory))
    assert (config.num_kv_heads, config.tie_embeddings, config.norm_eps) == (kv_heads, tie, 1e-6)

    params, config2 = load_hf_llama(directory)
    assert config2 == config
    np.testing.assert_allclose(run_backbone(config, params, tokens)["text"], expected, atol=1e-4)

    out = tmp_path / f"converted{suffix}"
    proc = run_script(f"--input={directory}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stdout and f"{sum(v.size for v in flatten_dict(params).values()):,}" in proc.stdout
    loaded = load_param_tree(out)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    np.testing.assert_allclose(run_backbone(config, loaded, tokens)["text"], expected, atol=1e-4)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_torch_bin_and_unscanned(tmp_path_factory, tmp_path):
    torch = pytest.importorskip("torch")
    directory, model, tokens, expected = hf_model(tmp_path_factory, 2, False)
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    config = hf_config_to_llama(read_hf_config(directory), scan_layers=False)
    sd = read_hf_state_dict(tmp_path / "weights.bin")
    params = hf_to_params(sd, config)
    assert "layers_1" in params and "layers" not in params
    assert params["layers_0"]["attention"]["k_proj"]["kernel"].shape == (64, 2, 16)
    np.testing.assert_allclose(run_backbone(config, params, tokens)["text"], expected, atol=1e-4)
    # A directory holding pytorch_model.bin is found too.
    os.replace(tmp_path / "weights.bin", tmp_path / "pytorch_model.bin")
    assert read_hf_state_dict(tmp_path).keys() == sd.keys()


def test_sharded_safetensors_and_bfloat16(tmp_path_factory, tmp_path):
    import json

    import ml_dtypes
    from safetensors.numpy import save_file

    directory, _, _, _ = hf_model(tmp_path_factory, 4, False)
    sd = read_hf_state_dict(directory)
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / file))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: file for file, keys in shards.items() for k in keys}}, f)
    merged = read_hf_state_dict(tmp_path)
    assert merged.keys() == sd.keys() and all(np.array_equal(merged[k], sd[k]) for k in sd)

    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    x = torch.randn(3, 5).to(torch.bfloat16)
    save_torch({"a": x, "b": torch.ones(2)}, str(tmp_path / "bf16.safetensors"))
    got = read_hf_state_dict(tmp_path / "bf16.safetensors")
    assert got["a"].dtype == np.float32
    np.testing.assert_array_equal(got["a"], x.float().numpy())
    assert np.asarray(got["a"]).astype(ml_dtypes.bfloat16).astype(np.float32).tolist() == got["a"].tolist()


def test_round_trip_params_to_hf(tmp_path_factory):
    directory, _, _, _ = hf_model(tmp_path_factory, 2, False)
    sd = read_hf_state_dict(directory)
    for scan in (True, False):
        config = hf_config_to_llama(read_hf_config(directory), scan_layers=scan)
        back = params_to_hf(hf_to_params(sd, config), config)
        assert back.keys() == sd.keys()
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_errors_name_the_tensor(tmp_path_factory, tmp_path):
    directory, _, _, _ = hf_model(tmp_path_factory, 4, False)
    sd = read_hf_state_dict(directory)
    config = hf_config_to_llama(read_hf_config(directory))
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' \(expected shape \(128, 64\)\)"):
        hf_to_params(missing, config)
    bad = {**sd, "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight': expected shape \(64, 64\), found \(32, 64\)"):
        hf_to_params(bad, config)
    extra = {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32),
             "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        hf_to_params(extra, config)
    with pytest.warns(UserWarning, match="q_proj.bias"):
        hf_to_params(extra, config, strict=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_hf_state_dict(tmp_path)

    script = _script_module()
    assert script.main([f"--input={tmp_path / 'nothing'}", f"--output={tmp_path / 'x.npz'}"]) == 1
    assert script.main([f"--input={directory}", f"--config={tmp_path / 'nope.json'}",
                        f"--output={tmp_path / 'x.npz'}"]) == 1
    assert not os.path.exists(tmp_path / "x.npz")


def _script_module():
    spec = importlib.util.spec_from_file_location("convert_hf_llama", os.path.join(REPO, "scripts", "convert_hf_llama.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# LWM (EasyLM layout)


def params_to_lwm_tree(params, config, scanned=False):
    """The inverse of lwm_llama_to_params, written independently: backbone params -> EasyLM names
    with wq/wk columns in EasyLM's interleaved RoPE layout."""
    d, h, kv, dh = config.dim, config.num_heads, config.num_kv_heads, config.head_dim
    layers = params["layers"]
    n = config.num_layers

    def interleave(kernel, heads):  # [..., D, heads, Dh] rotate-half -> [..., D, heads*Dh] interleaved
        k = np.asarray(kernel)
        half = k.reshape(*k.shape[:-1], 2, dh // 2)
        inter = np.stack([half[..., 0, :], half[..., 1, :]], axis=-1).reshape(k.shape)
        return inter.reshape(*k.shape[:-2], heads * dh)

    def block(i):
        pick = (lambda a: np.asarray(a)) if i is None else (lambda a: np.asarray(a)[i])
        att, mlp = layers["attention"], layers["mlp"]
        lead = (n,) if i is None else ()
        return {
            "attention": {"wq": {"kernel": interleave(pick(att["q_proj"]["kernel"]), h)},
                          "wk": {"kernel": interleave(pick(att["k_proj"]["kernel"]), kv)},
                          "wv": {"kernel": pick(att["v_proj"]["kernel"]).reshape(*lead, d, kv * dh)},
                          "wo": {"kernel": pick(att["o_proj"]["kernel"]).reshape(*lead, h * dh, d)}},
            "feed_forward": {"w1": {"kernel": pick(mlp["gate_proj"]["kernel"])},
                             "w3": {"kernel": pick(mlp["up_proj"]["kernel"])},
                             "w2": {"kernel": pick(mlp["down_proj"]["kernel"])}},
            "attention_norm": {"kernel": pick(layers["input_norm"]["scale"])},
            "ffn_norm": {"kernel": pick(layers["post_attention_norm"]["scale"])},
        }

    blocks = {"scan_decoder": block(None)} if scanned else {str(i): block(i) for i in range(n)}
    return {"params": {
        "transformer": {"wte": {"embedding": np.asarray(params["embed_text"]["embedding"])},
                        "vte": {"embedding": np.asarray(params["embed_image"]["embedding"])},
                        "h": blocks, "ln_f": {"kernel": np.asarray(params["final_norm"]["scale"])}},
        "lm_head": {"kernel": np.asarray(params["head_text"]["kernel"])},
        "vision_head": {"kernel": np.asarray(params["head_image"]["kernel"])},
    }}


def test_rope_permutation_inverse():
    x = np.arange(2 * 3 * 8).reshape(2, 3, 8)
    assert rope_interleaved_to_half(x)[0, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    np.testing.assert_array_equal(rope_half_to_interleaved(rope_interleaved_to_half(x)), x)

    # EasyLM's apply_rotary_emb (complex numbers over interleaved pairs, in numpy) followed by the
    # permutation equals the backbone's rotate-half RoPE applied to the permuted input.
    dh, theta = 8, 10000.0
    q = np.random.default_rng(0).normal(size=(1, 5, 2, dh)).astype(np.float32)  # [B, L, H, Dh]
    pos = np.arange(5)[None]
    freqs = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    z = (q[..., 0::2] + 1j * q[..., 1::2]) * np.exp(1j * pos[..., None, None] * freqs)
    easylm = np.stack([z.real, z.imag], axis=-1).reshape(q.shape)
    ours = apply_rope(jnp.asarray(rope_interleaved_to_half(q)), rope_tables(jnp.asarray(pos), dh, theta))
    np.testing.assert_allclose(np.asarray(ours), rope_interleaved_to_half(easylm), atol=1e-5)


def test_lwm_tree_reproduces_backbone_logits(tmp_path):
    config = llama_config("tiny", latent_vocab=0, action_vocab=0)  # text 128, image 64, GQA 4/2
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(Llama(config).init(jax.random.PRNGKey(1), ids, ids, ids, ids + 1, ids))["params"]
    # Non-trivial norms so a swapped norm mapping shows.
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), a.shape)
        if "norm" in jax.tree_util.keystr(p) else a, params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (B, L)).astype(np.int32)
    modality = (rng.random((B, L)) < 0.5).astype(np.int32)  # text and image tokens mixed
    expected = run_backbone(config, params, tokens, modality)

    # Per-layer LWM blocks (h/0, h/1) and a scanned block (h/scan_decoder), into both our layouts.
    for scanned_src, scan in ((False, True), (True, False)):
        tree = params_to_lwm_tree(params, config, scanned=scanned_src)
        cfg = llama_config("tiny", latent_vocab=0, action_vocab=0, scan_layers=scan)
        got = run_backbone(cfg, lwm_llama_to_params(tree, cfg), tokens, modality)
        for m in ("text", "image"):
            np.testing.assert_allclose(got[m], expected[m], atol=1e-5, err_msg=f"{m} scanned={scanned_src} {scan}")
    # Without the RoPE permutation (undone here on the converted q/k kernels) the logits differ: the
    # test really exercises it.
    unpermuted = lwm_llama_to_params(params_to_lwm_tree(params, config), config)
    for name in ("q_proj", "k_proj"):
        attention = unpermuted["layers"]["attention"][name]
        attention["kernel"] = rope_half_to_interleaved(attention["kernel"])
    assert np.abs(run_backbone(config, unpermuted, tokens, modality)["text"] - expected["text"]).max() > 1e-3

    # EasyLM streaming checkpoint file: msgpack stream of (key path, to_bytes(array)).
    import msgpack
    from flax import serialization

    path = tmp_path / "streaming_params"
    with open(path, "wb") as f:
        packer = msgpack.Packer()
        for key, value in flatten_dict(params_to_lwm_tree(params, config)).items():
            f.write(packer.pack((key.split("/"), serialization.to_bytes(value))))
    from_file = flatten_dict(lwm_llama_to_params(read_easylm_streaming(path), config))
    direct = flatten_dict(lwm_llama_to_params(params_to_lwm_tree(params, config), config))
    assert from_file.keys() == direct.keys() and all(np.array_equal(from_file[k], direct[k]) for k in direct)

    # Errors name the tensor.
    tree = params_to_lwm_tree(params, config)
    del tree["params"]["transformer"]["h"]["1"]["feed_forward"]["w3"]
    tree["params"]["transformer"]["h"]["0"]["attention"]["wk"]["kernel"] = np.zeros((64, 8), np.float32)
    with pytest.raises(ValueError) as info:
        lwm_llama_to_params(tree, config)
    assert "missing LWM tensor 'transformer/h/1/feed_forward/w3/kernel'" in str(info.value)
    assert "'transformer/h/0/attention/wk/kernel': expected shape (64, 32), found (64, 8)" in str(info.value)
