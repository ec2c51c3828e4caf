"""The end-to-end experiment's bookkeeping (rows, stages, reuse) and the comparison's table; the
stages themselves are tested in their own files and run by ``make demo`` / ``scripts/reproduce.py``."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_share_stages(tmp_path):
    from jaxvla.experiment import BUDGETS, ROWS, Experiment

    exp = Experiment(str(tmp_path), BUDGETS["hour"], data_root=str(tmp_path / "data"))
    assert list(ROWS) == ["SCRATCH", "LAPA", "VIPRA-AR", "VIPRA-FM", "ACTIONVLA"]
    assert exp.stages_of("SCRATCH") == ["tokenizer", "finetune_scratch_400x4", "eval_scratch_400x4"]
    assert exp.stages_of("VIPRA-FM") == ["tokenizer", "laq_vipra", "labels_vipra", "pretrain_vipra",
                                         "finetune_vipra-fm_400x4", "eval_vipra-fm_400x4"]
    # VIPRA-AR and VIPRA-FM share the pretrained backbone; ACTIONVLA needs no LAQ.
    assert set(exp.stages_of("VIPRA-AR")) & set(exp.stages_of("VIPRA-FM")) == {
        "tokenizer", "laq_vipra", "labels_vipra", "pretrain_vipra"}
    assert exp.stages_of("ACTIONVLA") == ["tokenizer", "pretrain_actionvla", "finetune_actionvla_400x4",
                                          "eval_actionvla_400x4"]
    # The demo / hour budgets read the configs' default dataset; overnight renders its own.
    assert exp.video_data == exp.demo_data == str(tmp_path / "data" / "metaworld_mt10_64")
    big = Experiment(str(tmp_path / "o"), BUDGETS["overnight"], data_root=str(tmp_path / "data"))
    assert big.video_data.endswith("metaworld_mt10_20ep_64") and big.demo_data == big.video_data
    with pytest.raises(ValueError, match="unknown row 'BOGUS'"):
        exp.run_row("BOGUS")


def test_finished_stage_is_reused_only_at_the_same_steps(tmp_path, monkeypatch):
    import jaxvla.trainer
    from jaxvla.experiment import BUDGETS, Experiment
    from jaxvla.stages import vla

    exp = Experiment(str(tmp_path), BUDGETS["demo"], data_root=str(tmp_path / "data"))
    os.makedirs(tmp_path / "tokenizer")
    with open(tmp_path / "tokenizer" / "stage.json", "w") as f:
        json.dump({"stage": "tokenizer", "wall_seconds": 12.0, "metrics": {"eval/psnr": 20.0}, "steps": 200}, f)
    monkeypatch.setattr(vla, "has_checkpoint", lambda workdir: True)
    calls = []

    def fake_train(config, workdir):
        calls.append((config.num_steps, workdir))
        return types.SimpleNamespace(metrics={"loss": 0.5}, history=[(1, {"loss": 1.0}), (2, {"loss": 0.5})])

    monkeypatch.setattr(jaxvla.trainer, "train", fake_train)
    assert exp.tokenizer()["wall_seconds"] == 12.0 and calls == []  # reused
    longer = Experiment(str(tmp_path), BUDGETS["overnight"], data_root=str(tmp_path / "data"))
    record = longer.tokenizer()  # 2000 steps asked: the checkpoint is resumed and trained on
    assert calls == [(2000, str(tmp_path / "tokenizer"))]
    assert record["steps"] == 2000 and record["metrics"] == {"loss": 0.5}
    assert os.path.getsize(record["loss_curve"]) > 1000
    with open(tmp_path / "tokenizer" / "stage.json") as f:
        assert json.load(f)["steps"] == 2000


def test_comparison_table():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    from jaxvla.experiment import BUDGETS

    def row(name, head, wins, n):
        from jaxvla.evaluation import wilson_interval

        return {"row": name, "head": head, "wall_seconds": 600.0,
                "mean": {"successes": wins, "episodes": n, "success_rate": wins / n, "ci95": wilson_interval(wins, n)},
                "tasks": {"reach": {"successes": wins, "episodes": n}},
                "latency": {"ms_per_call": 50.0, "actions_per_call": 7.0}}

    text = reproduce.markdown([row("SCRATCH", "flow", 1, 10), row("VIPRA-FM", "flow", 5, 10)], BUDGETS["hour"],
                              "2026-11-22")
    assert "| SCRATCH | no pretraining | flow | 1/10 (10.0%) | [0.02, 0.40] | 10.0 min |" in text
    assert "| VIPRA-FM |" in text and "[0.24, 0.76]" in text
    assert "| row | reach |" in text and "| VIPRA-FM | 5/10 |" in text
