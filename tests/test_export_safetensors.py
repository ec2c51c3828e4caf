"""scripts/export_safetensors.py and jaxvla.io.safetensor_files: a checkpoint's params written as
safetensors and read back exactly, by our reader, the ``safetensors`` package and PyTorch."""

from __future__ import annotations

import importlib.util
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from jaxvla.io.safetensor_files import read_safetensors, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("export_safetensors", os.path.join(ROOT, "scripts", "export_safetensors.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_format_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.f64": rng.standard_normal((2, 1, 2)),
        "d.i32": rng.integers(-5, 5, (4, 3)).astype(np.int32),
        "e.u8": rng.integers(0, 255, (3,)).astype(np.uint8),
        "f.bool": np.asarray([True, False, True]),
        "g.scalar": np.float32(2.5),
        "h.empty": np.zeros((0, 4), np.float32),
        "i.big_endian": np.arange(5, dtype=">i8"),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"note": "hi"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"note": "hi"}
    back, metadata = read_safetensors(path)
    assert metadata == {"note": "hi"} and sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        value = np.asarray(value)
        assert back[name].shape == value.shape and back[name].dtype == value.dtype.newbyteorder("=")
        np.testing.assert_array_equal(back[name], value)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    theirs = safetensors_numpy.load_file(str(path))
    for name, value in tensors.items():
        np.testing.assert_array_equal(theirs[name], np.asarray(value))
    with pytest.raises(TypeError, match="bfloat16"):
        write_safetensors(tmp_path / "x.safetensors", {"x": np.zeros(2, ml_dtypes.bfloat16)})
    path.write_bytes(raw[:-1])  # truncated: refused
    with pytest.raises(ValueError, match="does not"):
        read_safetensors(path)


def test_export_checkpoint_params(tmp_path):
    from jaxvla.checkpoint import Checkpointer

    rng = np.random.default_rng(1)
    params = {"backbone": {"layers": {"attention": {"wq": rng.standard_normal((2, 4, 4)).astype(np.float32)},
                                      "norm": {"scale": np.ones((2, 4), ml_dtypes.bfloat16)}},
                           "embed": {"embedding": rng.standard_normal((6, 4)).astype(np.float16)}},
              "velocity_head": {"kernel": rng.standard_normal((4, 3)).astype(np.float32)}}
    writer = Checkpointer(str(tmp_path / "run"), async_save=False)
    writer.save(5, {"step": np.asarray(5), "params": params}, {"stage": "finetune"}, {})
    writer.close()
    out = tmp_path / "out" / "params.safetensors"
    assert _script().main([f"--checkpoint={tmp_path / 'run'}", f"--out={out}"]) == 0
    back, metadata = read_safetensors(out)
    assert metadata["step"] == "5" and metadata["stage"] == "finetune" and metadata["params"] == "params"
    expected = {"backbone.layers.attention.wq": params["backbone"]["layers"]["attention"]["wq"],
                "backbone.layers.norm.scale": params["backbone"]["layers"]["norm"]["scale"],
                "backbone.embed.embedding": params["backbone"]["embed"]["embedding"],
                "velocity_head.kernel": params["velocity_head"]["kernel"]}
    assert sorted(back) == sorted(expected)
    for name, value in expected.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], np.asarray(value, np.float32))  # exact: widening is lossless
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    theirs = safetensors_torch.load_file(str(out))
    for name, value in expected.items():
        assert theirs[name].dtype == torch.float32
        np.testing.assert_array_equal(theirs[name].numpy(), np.asarray(value, np.float32))
    # Our reader through PyTorch as well: torch tensors from the numpy arrays, bit for bit.
    for name, value in back.items():
        assert torch.equal(torch.from_numpy(value), theirs[name])
