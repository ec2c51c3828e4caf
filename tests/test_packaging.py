"""Installing like a library: the stage configs ship inside the package (``jaxvla.configs``, mapped
from the top-level configs/ by setup.py) and ``--config`` finds them by name from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from absl import flags

from jaxvla import config as cfg_lib

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ["finetune.py", "laq.py", "pretrain.py", "tokenizer.py"]


def test_packaged_configs_are_the_repository_configs():
    assert cfg_lib.packaged_config_names() == PACKAGED
    assert Path(cfg_lib.packaged_configs_dir()).resolve() == ROOT / "configs"


def test_configs_resolve_by_name_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = cfg_lib.load_config("pretrain.py:vipra_small")
    assert config.stage == "pretrain"
    assert cfg_lib.load_config("laq:vipra_small").stage == "laq"  # ".py" optional
    # The repository-relative spelling of the README's commands works from anywhere too.
    assert cfg_lib.load_config("configs/tokenizer.py:small").stage == "tokenizer"
    assert cfg_lib.resolve_config_spec("finetune.py:flow_small") == str(ROOT / "configs" / "finetune.py") + ":flow_small"
    # A file at the given path wins over the packaged config of the same name.
    (tmp_path / "tokenizer.py").write_text("import ml_collections\n\ndef get_config(variant='x'):\n"
                                           "    return ml_collections.ConfigDict({'stage': 'mine:' + variant})\n")
    assert cfg_lib.load_config("tokenizer.py:small").stage == "mine:small"
    assert cfg_lib.load_config(str(ROOT / "configs" / "tokenizer.py") + ":small").stage == "tokenizer"


def test_library_code_reads_the_packaged_configs_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "laq.py").write_text("raise RuntimeError('not jaxvla\'s')\n")
    spec = cfg_lib.packaged_config_spec("configs/laq.py:vipra_small")
    assert spec == str(ROOT / "configs" / "laq.py") + ":vipra_small"
    assert cfg_lib.load_config(spec).stage == "laq"
    with pytest.raises(cfg_lib.ConfigNotFoundError, match=r"'configs/nope.py' is not one of jaxvla's packaged configs "
                                                          r"\(finetune.py, laq.py, pretrain.py, tokenizer.py\)"):
        cfg_lib.packaged_config_spec("configs/nope.py")


def test_unknown_config_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("nope.py:x", "configs/nope.py", "elsewhere/pretrain.py", str(tmp_path / "pretrain.py"), ""):
        with pytest.raises(cfg_lib.ConfigNotFoundError) as error:
            cfg_lib.load_config(spec)
        message = str(error.value)
        assert f"config {spec.partition(':')[0]!r} not found" in message
        assert "packaged configs (finetune.py, laq.py, pretrain.py, tokenizer.py)" in message
        assert f"working directory {tmp_path}" in message
    # Both a ConfigError (a ValueError: absl reports it as one flag error) and a FileNotFoundError.
    assert issubclass(cfg_lib.ConfigNotFoundError, ValueError)
    assert issubclass(cfg_lib.ConfigNotFoundError, FileNotFoundError)


def test_config_flag_resolves_names_and_keeps_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["prog", "--config=pretrain.py:vipra_small", "--config.num_steps=3"]
    flag_values = flags.FlagValues()
    cfg_lib.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert flag_values.config.stage == "pretrain" and flag_values.config.num_steps == 3

    argv = ["prog", "--config=nope.py:x"]
    flag_values = flags.FlagValues()
    cfg_lib.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    with pytest.raises(flags.IllegalFlagValueError, match=r"config 'nope.py' not found.*\(finetune.py, laq.py, "
                                                          r"pretrain.py, tokenizer.py\)"):
        flag_values(argv)


def test_train_cli_finds_a_packaged_config_from_another_directory(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXVLA_COMPILATION_CACHE="off")
    run = subprocess.run([sys.executable, "-m", "jaxvla.train", "--config=tokenizer.py:small",
                          "--config.num_steps=0", f"--workdir={tmp_path / 'w'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "config.num_steps=0 is not allowed" in run.stderr, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "jaxvla.train", "--config=nope.py", f"--workdir={tmp_path / 'w'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "not one of jaxvla's packaged configs" in run.stderr, run.stderr[-2000:]


def test_wheel_ships_the_configs_and_an_install_outside_the_tree_finds_them(tmp_path):
    """A wheel built from the sources (offline, with this environment's setuptools) holds
    jaxvla/configs/*.py; installed into a directory of its own, it loads configs by name."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "setup.py", source)
    for folder in ("jaxvla", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, cwd=tmp_path, timeout=600)
    (wheel,) = wheels.glob("jaxvla-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"jaxvla/configs/{n}" for n in PACKAGED + ["__init__.py"]} <= names

    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True,
                   timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import jaxvla, jaxvla.config as c; "
             "print(jaxvla.__file__); print(c.packaged_configs_dir()); print(c.load_config('pretrain.py:vipra_small').stage)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-2000:]
    module, configs, stage = run.stdout.strip().splitlines()[-3:]
    assert module.startswith(str(target)) and configs == str(target / "jaxvla" / "configs") and stage == "pretrain"
