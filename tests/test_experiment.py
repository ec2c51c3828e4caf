"""The comparison protocol's bookkeeping (jaxvla/experiment.py: rows, seed streams, action-free
pool, matched steps, stopping rule, reuse) and its report (scripts/reproduce.py); the stages
themselves are tested in their own files and run by ``make demo`` / ``scripts/reproduce.py``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reproduce():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    return reproduce


def test_day_plan_meets_the_protocol(tmp_path):
    from jaxvla.experiment import HEADS, PRETRAININGS, PROTOCOLS, Experiment

    exp = Experiment(str(tmp_path), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    plan = exp.plan()
    pool, demos = plan["datasets"]["pool"], plan["datasets"]["demos"]
    assert len(pool["tasks"]) == 45 and pool["episodes_per_task"] >= 20
    assert set(demos["tasks"]) == set(plan["datasets"]["eval"]["tasks"]) and len(demos["tasks"]) == 10
    assert demos["episodes_per_task"] == 5
    assert pool["episodes"] >= 5 * demos["episodes"]
    rows = plan["rows"]
    assert {(r["pretraining"], r["head"]) for r in rows} == {(p, h) for p in PRETRAININGS for h in HEADS}
    assert all(len(r["seeds"]) >= 3 for r in rows)
    # Matched compute: equal pretraining across pretrained rows, equal totals for every row.
    assert len({r["pretrain_steps"] for r in rows if r["pretraining"] != "none"}) == 1
    assert len({r["total_steps"] for r in rows}) == 1
    # The estimate, summed here stage by stage (a fresh run: data rendered, every stage trained):
    # 18.1 h, over the 10-hour budget (reported as missed in the README).
    from jaxvla.experiment import CHECK_BATCH_SECONDS, EPISODE_SECONDS, STEP_SECONDS

    p = PROTOCOLS["day"]
    per_seed_steps = {"flow": 0, "bins": 0}
    for r in rows:
        per_seed_steps[r["head"]] += r["finetune_steps"] * len(r["seeds"])
    seconds = (EPISODE_SECONDS["generate"] * (45 * (p.videos_per_task + 1) + 10 * 7)
               + STEP_SECONDS["tokenizer"] * p.tokenizer_steps
               + (STEP_SECONDS["laq_lapa"] + STEP_SECONDS["laq_vipra"]) * p.laq_steps
               + EPISODE_SECONDS["label"] * 2 * pool["episodes"]
               + STEP_SECONDS["pretrain"] * 3 * p.pretrain_steps
               + sum(STEP_SECONDS[f"finetune_{h}"] * n for h, n in per_seed_steps.items())
               # 24 evaluations, and the 6 SCRATCH finetunings again stopped within 1200 steps:
               # 15 of each head
               + (EPISODE_SECONDS["evaluate_bins"] + EPISODE_SECONDS["evaluate_flow"]) * (12 + 3) * 100
               # held-out checks: 32 batches every 200 steps
               + sum(CHECK_BATCH_SECONDS[r["head"]] * 32 * (r["finetune_steps"] // 200) * 3 for r in rows))
    assert plan["estimated_hours"] == pytest.approx(seconds / 3600, rel=1e-6)
    assert plan["estimated_hours"] > 0
    # --rows restricts the plan: one SCRATCH-flow row is its data, tokenizer, three 2200-step
    # finetunings with their checks and six evaluations (with the equal-finetuning controls).
    only = exp.plan(["SCRATCH-flow"])
    assert [r["row"] for r in only["rows"]] == ["SCRATCH-flow"] and only["controls"] == ["SCRATCH-flow@ft1200"]
    seconds = (EPISODE_SECONDS["generate"] * (45 * (p.videos_per_task + 1) + 10 * 7)
               + STEP_SECONDS["tokenizer"] * p.tokenizer_steps + 3 * STEP_SECONDS["finetune_flow"] * 2200
               + 6 * EPISODE_SECONDS["evaluate_flow"] * 100 + 3 * CHECK_BATCH_SECONDS["flow"] * 32 * 11)
    assert only["estimated_hours"] == pytest.approx(seconds / 3600, rel=1e-6)
    assert plan["controls"] == ["SCRATCH-bins@ft1200", "SCRATCH-flow@ft1200"]
    controls = [s for s in plan["stages"] if s.endswith("_upto1200")]
    assert len(controls) == 6 and all(s.startswith("eval_scratch-") for s in controls)


def test_pretraining_prompt_budget_fits_every_pool_instruction(tmp_path):
    """ML45's pool has longer instructions than MT10 (pick-place-wall: 41 ids): pretraining's
    packed prompt budget must hold each of them (a 36-id budget crashed the first ``day``
    pretraining), and is no larger than the longest."""
    from jaxvla.experiment import PROTOCOLS, Experiment
    from jaxvla.frozen import TextPrompts
    from jaxvla.sim.instructions import instruction
    from jaxvla.sim.metaworld_env import task_names

    exp = Experiment(str(tmp_path), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    for objective in ("lapa", "vipra", "actionvla"):
        config = exp.stage_config(exp.pretrain_name(objective), f"configs/pretrain.py:{objective}_small",
                                  exp.pretrain_overrides(objective))
        budget = int(config.model.pack_prompt_tokens)
        fits = TextPrompts(max_tokens=budget)
        for task in task_names("ml45"):
            fits(instruction(task))  # raises ValueError when the prompt does not fit
        with pytest.raises(ValueError, match="pack_prompt_tokens|max_tokens"):
            TextPrompts(max_tokens=budget - 1)(instruction("pick-place-wall"))
    assert budget == 41


def test_seed_streams_are_disjoint_and_tasks_overlap(tmp_path):
    """MT10's tasks are in the ML45 pool, so disjointness must come from the seeds."""
    from jaxvla.experiment import PROTOCOLS, Experiment
    from jaxvla.sim.metaworld_env import episode_seed

    exp = Experiment(str(tmp_path), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    streams = exp.seed_streams()
    assert len(streams["pool"]) == 45 * 21 and len(streams["demos"]) == 10 * 7 and len(streams["eval"]) == 100
    assert not (streams["pool"] & streams["demos"] or streams["pool"] & streams["eval"]
                or streams["demos"] & streams["eval"])
    assert episode_seed(101, "reach", 0) in streams["pool"]
    # A protocol whose streams collide is refused.
    import jaxvla.experiment as experiment

    clash = Experiment(str(tmp_path), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    original = experiment.DEMO_SEED
    try:
        experiment.DEMO_SEED = experiment.POOL_SEED
        with pytest.raises(ValueError, match="seed streams pool and demos share"):
            clash.seed_streams()
    finally:
        experiment.DEMO_SEED = original


def test_rows_names_and_shared_stages(tmp_path):
    from jaxvla.experiment import PROTOCOLS, Experiment, parse_row

    exp = Experiment(str(tmp_path), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    assert parse_row("vipra-FLOW") == ("vipra", "flow")
    with pytest.raises(ValueError, match="unknown row 'VIPRA-AR'"):
        parse_row("VIPRA-AR")
    scratch = exp.stage_names("SCRATCH-bins", 1)
    # Stage names carry the inputs (h7: frame history k = 7; st4: 4 state dims in the prompt).
    assert scratch == ["tokenizer_pool20", "finetune_scratch-bins_mt10_k5_h7_st4_2200steps_s1",
                       "eval_scratch-bins_mt10_k5_h7_st4_2200steps_s1",
                       "eval_scratch-bins_mt10_k5_h7_st4_2200steps_s1_upto1200"]  # the equal-finetuning control
    vipra_ar, vipra_fm = exp.stage_names("VIPRA-bins", 0), exp.stage_names("VIPRA-flow", 0)
    assert set(vipra_ar) & set(vipra_fm) == {"tokenizer_pool20", "laq_vipra_pool20", "labels_vipra_pool20",
                                             "pretrain_vipra_pool20_h7"}
    assert exp.stage_names("ACTIONVLA-flow", 2)[:2] == ["tokenizer_pool20", "pretrain_actionvla_pool20_h7"]
    # Other inputs, other names: a pixels-only run never reuses these stages.
    plain = Experiment(str(tmp_path), dataclasses.replace(PROTOCOLS["day"], history_stride=0, state_dims=""),
                       data_root=str(tmp_path / "data"))
    assert plain.stage_names("LAPA-flow", 0)[3:5] == ["pretrain_lapa_pool20",
                                                      "finetune_lapa-flow_pool20_mt10_k5_1200steps_s0"]
    # No videos: only SCRATCH rows exist.
    none = dataclasses.replace(PROTOCOLS["day"], videos_per_task=0)
    assert none.rows() == ["SCRATCH-bins", "SCRATCH-flow"]


def test_pool_reaches_pretraining_without_actions(tmp_path, metaworld_dataset, monkeypatch):
    """Every config the protocol hands to the LAQs, the labeller and LAPA / ViPRA pretraining reads
    the pool's action-free view: its batches carry no action; ACTIONVLA's carry them."""
    import jaxvla.trainer
    from jaxvla.config import load_config
    from jaxvla.data.pipeline import make_batches
    from jaxvla.experiment import PROTOCOLS, Experiment

    exp = Experiment(str(tmp_path), PROTOCOLS["demo"], data_root=str(tmp_path / "data"))
    seen = {}

    def fake_train(config, workdir):
        seen[os.path.basename(workdir)] = config
        return types.SimpleNamespace(metrics={"loss": 0.5}, history=[], step=config.num_steps, preempted=False)

    monkeypatch.setattr(jaxvla.trainer, "train", fake_train)
    monkeypatch.setattr(Experiment, "_latest_step", lambda self, name: 10**9)
    monkeypatch.setattr(Experiment, "_laq_gate", lambda self, name, record: dict(record, gate={}))
    exp.laq("lapa")
    exp.laq("vipra")
    for objective in ("lapa", "vipra", "actionvla"):
        monkeypatch.setattr(Experiment, "labels", lambda self, kind: {})
        exp.pretrain(objective)
    configs = {name: c.data for name, c in seen.items()}
    configs["labels"] = exp.label_data_config(load_config(os.path.join(REPO, "configs/laq.py:lapa_small")))
    tag = exp.pool_tag
    assert set(configs) == {f"tokenizer_{tag}", f"laq_lapa_{tag}", f"laq_vipra_{tag}", f"pretrain_lapa_{tag}_h7",
                            f"pretrain_vipra_{tag}_h7", f"pretrain_actionvla_{tag}_h7", "labels"}
    for name, data in configs.items():
        if name.startswith("tokenizer"):
            continue  # the tokenizer's reader yields frames only
        assert data.data_dir == exp.pool_data and not data.generate_metaworld
        data = data.copy_and_resolve_references()
        data.unlock()
        data.data_dir = str(metaworld_dataset["out"])
        data.sample = "frames"
        data.latent_labels = ""
        batch = next(iter(make_batches(data, batch_size=4, train=False, seed=0, process_index=0, process_count=1)))
        has_actions = bool(batch["has_action"].any()) and bool(np.abs(batch["action"]).sum() > 0)
        assert has_actions == (name == f"pretrain_actionvla_{tag}_h7"), name


def test_select_step_is_the_lowest_held_out_error():
    from jaxvla.experiment import select_step

    history = [(100, {"loss": 1.0, "eval/action_mse": 0.5}), (150, {"loss": 0.9}),
               (200, {"eval/action_mse": 0.3}), (300, {"eval/action_mse": 0.3}), (400, {"eval/action_mse": 0.4})]
    step, curve = select_step(history)
    assert step == 200 and curve == [(100, 0.5), (200, 0.3), (300, 0.3), (400, 0.4)]
    with pytest.raises(ValueError, match="never evaluated"):
        select_step([(100, {"loss": 1.0})])
    # A diverged check stays in the curve and is never chosen, even first.
    nan = float("nan")
    step, curve = select_step([(200, {"eval/action_mse": nan}), (400, {"eval/action_mse": 0.4})])
    assert step == 400 and len(curve) == 2 and np.isnan(curve[0][1])
    with pytest.raises(ValueError, match="diverged"):
        select_step([(200, {"eval/action_mse": nan}), (400, {"eval/action_mse": float("inf")})])


def test_finished_stage_is_reused_only_at_the_same_steps(tmp_path, monkeypatch):
    import jaxvla.trainer
    from jaxvla.experiment import PROTOCOLS, Experiment

    exp = Experiment(str(tmp_path), PROTOCOLS["demo"], data_root=str(tmp_path / "data"))
    os.makedirs(tmp_path / "tokenizer_pool4")
    with open(tmp_path / "tokenizer_pool4" / "stage.json", "w") as f:
        json.dump({"stage": "tokenizer_pool4", "wall_seconds": 12.0, "metrics": {"eval/psnr": 20.0},
                   "steps": PROTOCOLS["demo"].tokenizer_steps}, f)
    monkeypatch.setattr(Experiment, "_latest_step", lambda self, name: 10**9)
    calls = []

    def fake_train(config, workdir):
        calls.append((config.num_steps, workdir))
        return types.SimpleNamespace(metrics={"loss": 0.5}, history=[(1, {"loss": 1.0}), (2, {"loss": 0.5})],
                                     step=config.num_steps, preempted=False)

    monkeypatch.setattr(jaxvla.trainer, "train", fake_train)
    assert exp.tokenizer()["wall_seconds"] == 12.0 and calls == []  # reused
    longer = Experiment(str(tmp_path), dataclasses.replace(PROTOCOLS["demo"], tokenizer_steps=400),
                        data_root=str(tmp_path / "data"))
    record = longer.tokenizer()  # 400 steps asked: the checkpoint is resumed and trained on
    assert calls == [(400, str(tmp_path / "tokenizer_pool4"))]
    assert record["steps"] == 400 and record["metrics"] == {"loss": 0.5}
    assert os.path.getsize(record["loss_curve"]) > 1000


def test_interrupted_stage_is_not_recorded_as_finished(tmp_path, monkeypatch):
    """SIGTERM stops a stage's training early (the trainer saves and returns, preempted): the run
    stops there and records nothing, so the next run resumes it instead of reusing half a stage;
    a record whose checkpoints stop short of its steps is trained on, not reused."""
    import jaxvla.experiment
    import jaxvla.trainer
    from jaxvla.experiment import PROTOCOLS, Experiment, StageInterrupted

    exp = Experiment(str(tmp_path), PROTOCOLS["demo"], data_root=str(tmp_path / "data"))
    calls = []

    def stopped_early(config, workdir):
        calls.append(config.num_steps)
        return types.SimpleNamespace(metrics={"loss": 0.5}, history=[(1, {"loss": 1.0})], step=57, preempted=True)

    monkeypatch.setattr(jaxvla.trainer, "train", stopped_early)
    with pytest.raises(StageInterrupted, match=r"tokenizer_pool4: stopped at step 57 of 150 .*resume"):
        exp.tokenizer()
    assert not os.path.exists(tmp_path / "tokenizer_pool4" / "stage.json")
    # A record written for 150 steps (as the code before this check did) over checkpoints up to 50.
    os.makedirs(tmp_path / "tokenizer_pool4", exist_ok=True)
    with open(tmp_path / "tokenizer_pool4" / "stage.json", "w") as f:
        json.dump({"stage": "tokenizer_pool4", "wall_seconds": 12.0, "metrics": {}, "steps": 150}, f)
    monkeypatch.setattr(jaxvla.experiment, "finished_steps", lambda path: [50])
    with pytest.raises(StageInterrupted):
        exp.tokenizer()
    assert calls == [150, 150]


def test_finetuning_is_matched_and_selects_on_held_out_demos(tmp_path, monkeypatch):
    import jaxvla.trainer
    from jaxvla.experiment import PROTOCOLS, Experiment

    protocol = PROTOCOLS["day"]
    exp = Experiment(str(tmp_path), protocol, data_root=str(tmp_path / "data"))
    spec, scratch = exp.finetune_overrides("SCRATCH-flow", 2)
    assert spec == "configs/finetune.py:scratch_flow_small"
    assert scratch["num_steps"] == protocol.pretrain_steps + protocol.finetune_steps and scratch["seed"] == 2
    spec, lapa = exp.finetune_overrides("LAPA-bins", 0)
    assert spec == "configs/finetune.py:bins_small" and lapa["num_steps"] == protocol.finetune_steps
    assert lapa["init_from"].endswith("pretrain_lapa_pool20_h7")
    # The same inputs in every row: frame history k = 7 and the 4-dim state prompt.
    pre = exp.pretrain_overrides("vipra")
    assert pre["model.history_frames"] == 1 and pre["model.history_stride"] == 7 and "model.state_dims" not in pre
    assert "batch_size" not in lapa  # the config's
    wider = Experiment(str(tmp_path), dataclasses.replace(protocol, finetune_batch_size=16))
    assert wider.finetune_overrides("LAPA-bins", 0)[1]["batch_size"] == 16
    assert wider.finetune_name("LAPA-bins", 0).endswith("_1200steps_b16_s0")
    for o in (scratch, lapa):
        assert o["model.history_frames"] == 1 and o["model.history_stride"] == 7
        assert o["model.state_dims"] == "4" and o["model.prompt_tokens"] == 60
        assert o["data.data_dir"] == exp.demo_data and o["data.few_demos_per_task"] == 5
        assert o["eval_every"] == o["checkpoint.every"] == protocol.select_every
        assert o["eval_batches"] == protocol.select_batches == 32
        assert o["checkpoint.max_to_keep"] * o["checkpoint.every"] > o["num_steps"]
    seen = []

    def fake_train(config, workdir):
        seen.append(config)
        return types.SimpleNamespace(metrics={"loss": 0.1}, step=config.num_steps, preempted=False, history=[
            (200, {"loss": 0.5, "eval/action_mse": 0.20}), (400, {"loss": 0.4, "eval/action_mse": 0.10}),
            (600, {"loss": 0.3, "eval/action_mse": 0.15})])

    monkeypatch.setattr(jaxvla.trainer, "train", fake_train)
    monkeypatch.setattr(jaxvla.trainer, "evaluate_checkpoints", lambda *a, **k: pytest.fail("nothing to measure"))
    monkeypatch.setattr(jaxvla.experiment, "finished_steps", lambda path: [200, 400, 600])
    monkeypatch.setattr(Experiment, "_latest_step", lambda self, name: 10**9)
    monkeypatch.setattr(Experiment, "tokenizer", lambda self: {})
    record = exp.finetune("SCRATCH-bins", 0)
    assert record["selected_step"] == 400 and list(record["selection_curve"][0]) == [200, 0.2]
    assert record["selection_batches"] == record["held_out_batches"] == 32 and "earlier_selection" not in record
    with open(tmp_path / exp.finetune_name("SCRATCH-bins", 0) / "stage.json") as f:
        assert json.load(f)["selected_step"] == 400
    assert seen[0].data.drop_actions is False and seen[0].eval_batches == 32


def _write_finetuning(exp, row, record, eval_batches):
    path = os.path.join(exp.run_dir, exp.finetune_name(row, 0))
    os.makedirs(path)
    with open(os.path.join(path, "stage.json"), "w") as f:
        json.dump({"stage": exp.finetune_name(row, 0), "wall_seconds": 60.0, "metrics": {"loss": 0.1},
                   "config": "configs/finetune.py:bins_small", "steps": 600, **record}, f)
    from jaxvla.config import to_json

    spec, overrides = exp.finetune_overrides(row, 0)
    config = json.loads(to_json(exp.stage_config(exp.finetune_name(row, 0), spec, overrides)))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "eval_batches": eval_batches}, f)  # what the trainer saved
    return path


def test_stopping_point_chosen_on_fewer_batches_is_chosen_again(tmp_path, monkeypatch):
    """A finetuning selected on 2 held-out batches (the day run's first cells) is measured again on
    the protocol's 32 at every kept step; when the step moves, its evaluation runs again."""
    import jaxvla.experiment
    import jaxvla.trainer
    from jaxvla.experiment import PROTOCOLS, Experiment

    protocol = dataclasses.replace(PROTOCOLS["day"], finetune_steps=600, pretrain_steps=0)
    exp = Experiment(str(tmp_path), protocol, data_root=str(tmp_path / "data"))
    old_curve = [[200, 0.30], [400, 0.17], [600, 0.21]]
    path = _write_finetuning(exp, "SCRATCH-bins", {"selected_step": 400, "selection_curve": old_curve,
                                                   "eval_history": [[s, {"eval/action_mse": v}] for s, v in old_curve]},
                             eval_batches=2)
    on_32 = {200: 0.44, 400: 0.24, 600: 0.166}
    measured = []

    def fake_measure(workdir, steps, eval_batches):
        measured.append((workdir, list(steps), eval_batches))
        return [(s, {"eval/action_mse": on_32[s], "eval/loss": 1.0}) for s in steps]

    monkeypatch.setattr(jaxvla.trainer, "train", lambda *a: pytest.fail("finished: nothing to train"))
    monkeypatch.setattr(jaxvla.trainer, "evaluate_checkpoints", fake_measure)
    monkeypatch.setattr(jaxvla.experiment, "finished_steps", lambda p: [200, 400, 600])
    monkeypatch.setattr(Experiment, "tokenizer", lambda self: {})
    seconds = exp._estimate_seconds.__func__  # the plan counts the measuring still to do
    monkeypatch.setattr(Experiment, "seed_streams", lambda self: {"pool": [], "demos": []})
    monkeypatch.setattr(Experiment, "tasks", {"pool": [], "finetune": [], "eval": ["a"] * 10})
    before = seconds(exp)

    record = exp.finetune("SCRATCH-bins", 0)
    assert measured == [(path, [200, 400, 600], 32)]
    assert record["selected_step"] == 600 and record["selection_batches"] == 32
    assert [list(p) for p in record["selection_curve"]] == [[200, 0.44], [400, 0.24], [600, 0.166]]
    assert record["earlier_selection"] == {"batches": 2, "selected_step": 400, "curve": old_curve}
    assert record["steps"] == 600 and record["wall_seconds"] == 60.0  # the training record is kept
    # 3 checks x 32 batches x CHECK_BATCH_SECONDS["bins"] fewer seconds to go, now it is done.
    assert before - seconds(exp) == pytest.approx(3 * 32 * jaxvla.experiment.CHECK_BATCH_SECONDS["bins"])
    with open(os.path.join(path, "stage.json")) as f:
        assert json.load(f)["selected_step"] == 600
    assert exp.finetune("SCRATCH-bins", 0)["selected_step"] == 600 and len(measured) == 1  # chosen once

    # A run resumed at step 400 on 32 batches: its history holds 400 and 600 only; 200 is measured.
    measured.clear()
    _write_finetuning(exp, "SCRATCH-flow", {"held_out_batches": 32, "eval_history": [
        [400, {"eval/action_mse": 0.5}], [600, {"eval/action_mse": 0.6}]]}, eval_batches=32)
    record = exp.finetune("SCRATCH-flow", 0)
    assert [m[1] for m in measured] == [[200]] and record["selected_step"] == 200
    assert "earlier_selection" not in record

    # The evaluation of the earlier step is not reused for the new one.
    evaluated = []

    def fake_evaluate(checkpoint, tasks, placements, **kwargs):
        evaluated.append(checkpoint)
        return {"episodes": [], "mean": 0.5, "tasks": {}, "latency": {}, "files": []}

    monkeypatch.setattr(jaxvla.experiment, "evaluate", fake_evaluate)
    monkeypatch.setattr(jaxvla.experiment, "resolve_checkpoint", lambda p, step: (f"{p}/checkpoints/{step}", step))
    eval_dir = os.path.join(exp.run_dir, "eval_" + exp.finetune_name("SCRATCH-bins", 0)[len("finetune_"):])
    os.makedirs(eval_dir)
    with open(os.path.join(eval_dir, "stage.json"), "w") as f:
        json.dump({"stage": "eval", "settings": {"tasks": protocol.eval_tasks, "placements": protocol.eval_placements,
                                                 "max_steps": protocol.max_steps, "step": 400}}, f)
    exp.evaluate("SCRATCH-bins", 0)
    assert evaluated == [f"{path}/checkpoints/600"]


def test_selection_candidates_are_the_checks_grid(tmp_path, monkeypatch):
    """A checkpoint a SIGTERM saved off the select_every grid is no candidate (an interrupted run
    gets no more than an uninterrupted one); grid steps whose checkpoints are gone are recorded."""
    import jaxvla.experiment
    import jaxvla.trainer
    from jaxvla.experiment import PROTOCOLS, Experiment

    protocol = dataclasses.replace(PROTOCOLS["day"], finetune_steps=600, pretrain_steps=0)
    exp = Experiment(str(tmp_path), protocol, data_root=str(tmp_path / "data"))
    _write_finetuning(exp, "SCRATCH-bins", {"held_out_batches": 32}, eval_batches=32)
    errors = {200: 0.4, 400: 0.3, 517: 0.1, 600: 0.35}
    measured = []

    def fake_measure(workdir, steps, eval_batches):
        measured.extend(steps)
        return [(s, {"eval/action_mse": errors[s]}) for s in steps]

    monkeypatch.setattr(jaxvla.trainer, "train", lambda *a: pytest.fail("finished: nothing to train"))
    monkeypatch.setattr(jaxvla.trainer, "evaluate_checkpoints", fake_measure)
    monkeypatch.setattr(jaxvla.experiment, "finished_steps", lambda p: [400, 517, 600])
    monkeypatch.setattr(Experiment, "tokenizer", lambda self: {})
    record = exp.finetune("SCRATCH-bins", 0)
    assert measured == [400, 600] and record["selected_step"] == 400  # never 517 (0.1)
    assert record["selection_missing_steps"] == [200]


def test_evaluations_follow_the_checkpoint_and_step_they_measured(tmp_path, monkeypatch):
    """An evaluation is reused, and published, only for the step its finetuning chooses now and
    the checkpoint there now: a finetuning trained again (other digests at the same step) is
    evaluated again, and its earlier episodes are not published meanwhile."""
    import jaxvla.experiment
    import jaxvla.trainer
    from jaxvla.experiment import PROTOCOLS, Experiment

    protocol = dataclasses.replace(PROTOCOLS["day"], finetune_steps=400, pretrain_steps=200, seeds=(0,),
                                   scratch_control=False)
    exp = Experiment(str(tmp_path), protocol, data_root=str(tmp_path / "data"))
    curve = [[200, 0.3], [400, 0.1], [600, 0.2]]
    path = _write_finetuning(exp, "SCRATCH-flow", {"selected_step": 400, "selection_curve": curve,
                                                   "selection_batches": 32, "held_out_batches": 32}, eval_batches=32)
    manifest = tmp_path / "ckpt" / "400" / "jaxvla_digests.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"files": {"params/a": {"sha256": "aa"}}}')
    rolled_out = []

    def fake_evaluate(checkpoint, tasks, placements, **kwargs):
        rolled_out.append(checkpoint)
        return {"episodes": [{"task": "reach", "episode": 0, "seed": 1, "success": True, "length": 9}],
                "mean": 1.0, "tasks": {}, "latency": {}, "files": []}

    monkeypatch.setattr(jaxvla.trainer, "train", lambda *a: pytest.fail("finished: nothing to train"))
    monkeypatch.setattr(jaxvla.experiment, "finished_steps", lambda p: [200, 400, 600])
    monkeypatch.setattr(jaxvla.experiment, "evaluate", fake_evaluate)
    monkeypatch.setattr(jaxvla.experiment, "resolve_checkpoint",
                        lambda p, step: (str(tmp_path / "ckpt" / str(step)), step))
    monkeypatch.setattr(Experiment, "data", lambda self: {})
    monkeypatch.setattr(Experiment, "tokenizer", lambda self: {})
    records = exp.run(["SCRATCH-flow"])
    assert len(records) == 1 and len(rolled_out) == 1
    assert exp.run(["SCRATCH-flow"]) == records and len(rolled_out) == 1  # reused
    import hashlib
    assert exp._done(exp.eval_name("SCRATCH-flow", 0))["checkpoint_fingerprint"] == hashlib.sha256(
        manifest.read_bytes()).hexdigest()

    manifest.write_text('{"files": {"params/a": {"sha256": "bb"}}}')  # trained again
    assert exp.records(["SCRATCH-flow"]) == []
    assert exp.run(["SCRATCH-flow"]) == records and len(rolled_out) == 2

    # The selection moved (e.g. chosen again) and the evaluation has not run yet: not published.
    with open(os.path.join(path, "stage.json")) as f:
        record = json.load(f)
    with open(os.path.join(path, "stage.json"), "w") as f:
        json.dump({**record, "selected_step": 600}, f)
    assert exp.records(["SCRATCH-flow"]) == []


def test_scratch_control_stops_within_the_pretrained_rows_finetuning(tmp_path, monkeypatch):
    """scratch_control: a SCRATCH finetuning is evaluated again from the step the held-out rule
    chooses among steps <= finetune_steps, named SCRATCH-<head>@ft<steps>; where that is the step
    already evaluated, its episodes are reused, not rolled out again."""
    import jaxvla.experiment
    import jaxvla.trainer
    from jaxvla.experiment import PROTOCOLS, Experiment

    protocol = dataclasses.replace(PROTOCOLS["day"], finetune_steps=400, pretrain_steps=200, seeds=(0,))
    assert protocol.scratch_control and protocol.control_step("SCRATCH-bins") == 400
    assert protocol.control_step("VIPRA-bins") is None
    assert dataclasses.replace(protocol, scratch_control=False).control_step("SCRATCH-bins") is None
    assert dataclasses.replace(protocol, pretrainings=("none",)).control_step("SCRATCH-bins") is None
    exp = Experiment(str(tmp_path), protocol, data_root=str(tmp_path / "data"))
    # SCRATCH-bins: lowest error at 600 overall, at 200 among steps <= 400.
    # SCRATCH-flow: lowest at 400, which the control chooses too.
    curves = {"SCRATCH-bins": [[200, 0.30], [400, 0.35], [600, 0.20]],
              "SCRATCH-flow": [[200, 0.30], [400, 0.10], [600, 0.20]]}
    for row, curve in curves.items():
        _write_finetuning(exp, row, {"selected_step": min(curve, key=lambda c: c[1])[0], "selection_curve": curve,
                                     "selection_batches": 32, "held_out_batches": 32}, eval_batches=32)
    rolled_out = []

    def fake_evaluate(checkpoint, tasks, placements, **kwargs):
        rolled_out.append(checkpoint)
        step = int(checkpoint.rsplit("/", 1)[1])
        return {"episodes": [{"task": "reach", "episode": i, "seed": i, "success": i < step // 200, "length": 9}
                             for i in range(4)], "mean": 0.5, "tasks": {}, "latency": {}, "files": []}

    monkeypatch.setattr(jaxvla.trainer, "train", lambda *a: pytest.fail("finished: nothing to train"))
    monkeypatch.setattr(jaxvla.experiment, "finished_steps", lambda p: [200, 400, 600])
    monkeypatch.setattr(jaxvla.experiment, "evaluate", fake_evaluate)
    monkeypatch.setattr(jaxvla.experiment, "resolve_checkpoint", lambda p, step: (f"{p}/checkpoints/{step}", step))
    monkeypatch.setattr(Experiment, "data", lambda self: {})
    monkeypatch.setattr(Experiment, "tokenizer", lambda self: {})
    records = exp.run(["SCRATCH-bins", "SCRATCH-flow"])
    bins, flow = (os.path.join(exp.run_dir, exp.finetune_name(r, 0)) for r in ("SCRATCH-bins", "SCRATCH-flow"))
    # bins: the chosen step 600, then the control's 200; flow: 400 once, the control reuses it.
    assert rolled_out == [f"{bins}/checkpoints/600", f"{bins}/checkpoints/200", f"{flow}/checkpoints/400"]
    wins = {}
    for r in records:
        wins[r["row"]] = wins.get(r["row"], 0) + r["success"]
    assert wins == {"SCRATCH-bins": 3, "SCRATCH-bins@ft400": 1, "SCRATCH-flow": 2, "SCRATCH-flow@ft400": 2}
    control = exp._done(exp.eval_name("SCRATCH-flow", 0, 400))
    assert control["same_as"] == exp.eval_name("SCRATCH-flow", 0) and control["settings"]["step"] == 400
    assert exp._done(exp.eval_name("SCRATCH-bins", 0, 400))["settings"]["step"] == 200
    assert exp.run(["SCRATCH-bins", "SCRATCH-flow"]) == records and len(rolled_out) == 3  # all reused


def test_publish_regenerates_from_raw_records(tmp_path):
    """results.json / RESULTS.md come from the raw records alone: --from_records reproduces them."""
    reproduce = _reproduce()
    rng = np.random.default_rng(0)
    rates = {"SCRATCH-flow": 0.2, "VIPRA-flow": 0.5, "LAPA-flow": 0.4, "ACTIONVLA-flow": 0.8,
             "SCRATCH-flow@ft1200": 0.1}
    records = [{"row": row, "seed": s, "task": task, "placement": i, "env_seed": 0,
                "success": bool(rng.random() < p), "length": 100}
               for row, p in rates.items() for s in range(3) for task in ("reach", "push") for i in range(5)]
    out = tmp_path / "res"
    curves = [{"row": "VIPRA-flow", "seed": 1, "metric": "eval/action_mse", "selected_step": 400,
               "curve": [[200, 0.25], [400, 0.125]]},
              {"row": "VIPRA-flow", "seed": 2, "metric": "eval/action_mse", "selected_step": 200,
               "curve": [[200, 0.5]]}]
    first = reproduce.publish(records, str(out), {"date": "2026-12-01", "protocol": "day", "finetuning": curves},
                              replicates=500)
    stats = first["statistics"]
    assert set(stats["contrasts"]) == {"VIPRA-flow - SCRATCH-flow", "LAPA-flow - SCRATCH-flow",
                                       "VIPRA-flow - LAPA-flow", "VIPRA-flow - SCRATCH-flow@ft1200",
                                       "LAPA-flow - SCRATCH-flow@ft1200", "SCRATCH-flow - SCRATCH-flow@ft1200"}
    assert set(stats["gaps"]) == {"(LAPA-flow - SCRATCH-flow) / (ACTIONVLA-flow - SCRATCH-flow)",
                                  "(VIPRA-flow - SCRATCH-flow) / (ACTIONVLA-flow - SCRATCH-flow)"}
    for row in rates:
        wins = [r["success"] for r in records if r["row"] == row]
        assert stats["rows"][row]["success_rate"] == pytest.approx(np.mean(wins))
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == len(records) and json.loads(lines[0]) == records[0]
    markdown = (out / "RESULTS.md").read_text()
    assert "| VIPRA-flow - SCRATCH-flow |" in markdown and os.path.getsize(out / "comparison.png") > 1000
    assert "| SCRATCH-flow@ft1200 | no pretraining, stopped within 1200 finetuning steps" in markdown
    # The control's contrasts are differences of the two rows' paired placements.
    by_row = {row: np.array([r["success"] for r in records if r["row"] == row], float) for row in rates}
    assert stats["contrasts"]["VIPRA-flow - SCRATCH-flow@ft1200"]["difference"] == pytest.approx(
        by_row["VIPRA-flow"].mean() - by_row["SCRATCH-flow@ft1200"].mean())
    # How many held-out batches measured this curve was not recorded: "-".
    assert "| VIPRA-flow | 1 | - | 0.2500 | 0.1250* |" in markdown and os.path.getsize(out / "finetuning.png") > 1000
    # Averaged over seeds only where every seed was measured: (0.25 + 0.5) / 2 at step 200.
    assert "| VIPRA-flow | 2 | 0.3750 | - |" in markdown
    # An upper bound below SCRATCH leaves the gap closed undefined, said so in the table.
    below = [dict(r, success=False) if r["row"] == "ACTIONVLA-flow" else r for r in records]
    gaps = reproduce.comparison(below, replicates=200)["gaps"]
    assert all(np.isnan(g["gap_closed"]) for g in gaps.values())
    assert "| undefined (ACTIONVLA not above SCRATCH) |" in reproduce.markdown(reproduce.comparison(below, 200), {})
    results = json.loads((out / "results.json").read_text())
    again = tmp_path / "again"
    # Without --bootstrap the published figures' own replicates (500 here, not the default 10000).
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reproduce.py"),
                    f"--from_records={out / 'episodes.jsonl'}", f"--out={again}"],
                   check=True, capture_output=True, cwd=REPO)
    assert (again / "RESULTS.md").read_text() == markdown
    regenerated = json.loads((again / "results.json").read_text())
    assert regenerated["statistics"] == results["statistics"] and set(regenerated) == set(results)


def test_comparison_names_video_scaling_rows_and_pairs_controls_by_seed():
    """Rows of a video-scaling run (VIPRA-flow@10) meet the pool-free SCRATCH row and the ACTIONVLA
    row of their own pool; a control shares its SCRATCH row's seed draws; rows with fewer than 3
    seeds are marked; repeated episodes are dropped only as identical SCRATCH copies."""
    reproduce = _reproduce()
    rng = np.random.default_rng(1)
    rates = {"SCRATCH-flow": 0.3, "SCRATCH-flow@ft1200": 0.3, "VIPRA-flow@10": 0.4, "VIPRA-flow@50": 0.5,
             "LAPA-flow@10": 0.35, "ACTIONVLA-flow@10": 0.9, "ACTIONVLA-flow@50": 0.9}
    records = [{"row": row, "seed": s, "task": task, "placement": i, "env_seed": 0,
                "success": bool(rng.random() < p), "length": 100}
               for row, p in rates.items() for s in range(3) for task in ("reach", "push") for i in range(6)]
    # The control is the same runs as SCRATCH, here stopped at the same step: paired over seeds and
    # placements, their contrast is exactly zero.
    scratch = [r for r in records if r["row"] == "SCRATCH-flow"]
    records = [r for r in records if r["row"] != "SCRATCH-flow@ft1200"] + [
        dict(r, row="SCRATCH-flow@ft1200") for r in scratch]
    stats = reproduce.comparison(records, replicates=300)
    assert {"VIPRA-flow@10 - SCRATCH-flow", "VIPRA-flow@50 - SCRATCH-flow", "LAPA-flow@10 - SCRATCH-flow",
            "VIPRA-flow@10 - LAPA-flow@10", "VIPRA-flow@10 - SCRATCH-flow@ft1200",
            "LAPA-flow@10 - SCRATCH-flow@ft1200"} <= set(stats["contrasts"])
    assert "VIPRA-flow@50 - LAPA-flow@10" not in stats["contrasts"]  # different pools are not paired
    assert set(stats["gaps"]) == {"(VIPRA-flow@10 - SCRATCH-flow) / (ACTIONVLA-flow@10 - SCRATCH-flow)",
                                  "(VIPRA-flow@50 - SCRATCH-flow) / (ACTIONVLA-flow@50 - SCRATCH-flow)",
                                  "(LAPA-flow@10 - SCRATCH-flow) / (ACTIONVLA-flow@10 - SCRATCH-flow)"}
    assert stats["contrasts"]["SCRATCH-flow - SCRATCH-flow@ft1200"]["ci95"] == [0.0, 0.0]
    two_seeds = [r for r in records if not (r["row"] == "LAPA-flow@10" and r["seed"] == 2)]
    text = reproduce.markdown(reproduce.comparison(two_seeds, 100), {})
    assert "| LAPA-flow@10 † |" in text and "| VIPRA-flow@10 - LAPA-flow@10 † |" in text
    assert "| VIPRA-flow@10 |" in text and "fewer than 3 seeds" in text

    copy = dict(scratch[0])
    assert reproduce.unique_records(records + [copy]) == records
    with pytest.raises(ValueError, match="two records of row 'SCRATCH-flow' seed 0 task 'reach' placement 0"):
        reproduce.unique_records(records + [dict(copy, success=not copy["success"])])
    vipra = next(r for r in records if r["row"] == "VIPRA-flow@10")
    with pytest.raises(ValueError, match="two records of row 'VIPRA-flow@10'"):
        reproduce.unique_records(records + [dict(vipra)])


def test_plan_command_prints_the_protocol_and_refuses_bad_flags():
    script = os.path.join(REPO, "scripts", "reproduce.py")
    out = subprocess.run([sys.executable, script, "--plan", "--demos_per_task=2", "--videos_per_task=10,50",
                          "--finetune_tasks=ml45-test", "--eval_tasks=ml45-test"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "45 tasks (ml45) x 10 = 450 episodes" in out.stdout and "x 50 = 2250 episodes" in out.stdout
    assert "5 tasks (ml45-test) x K=2 = 10 episodes" in out.stdout
    assert "VIPRA-flow" in out.stdout and "estimated time" in out.stdout
    assert "frame history o_(t-7), o_t" in out.stdout and "proprioceptive state (dims 4)" in out.stdout
    pixels = subprocess.run([sys.executable, script, "--plan", "--history_stride=0", "--state_dims="],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert pixels.returncode == 0 and "policy inputs: the current frame alone\n" in pixels.stdout
    bad = subprocess.run([sys.executable, script, "--plan", "--rows=VIPRA-AR"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "unknown row 'VIPRA-AR'" in bad.stderr


def test_failed_laq_gate_stops_before_labelling(tmp_path, monkeypatch):
    from jaxvla.experiment import PROTOCOLS, Experiment

    verdict = {"passed": False, "reasons": ["code usage 0.40 < 0.9"], "steps": 2000}
    monkeypatch.setattr(Experiment, "laq", lambda self, kind: {"steps": 2000, "gate": verdict})
    exp = Experiment(str(tmp_path), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    with pytest.raises(RuntimeError, match=r"laq_lapa_pool20 failed its gate: code usage 0.40 < 0.9"):
        exp.labels("lapa")
    lenient = Experiment(str(tmp_path), dataclasses.replace(PROTOCOLS["day"], enforce_laq_gate=False),
                         data_root=str(tmp_path / "data"))
    lenient.check_gate("lapa")  # logged, not raised
    verdict["passed"] = True
    exp.check_gate("vipra")


def test_labels_stage_resumes_with_its_laq_and_starts_over_with_another(tmp_path, monkeypatch):
    """The labels stage continues an interrupted labelling (resume), starts over when the labeller
    refuses to (another LAQ's shards), and is finished only for the LAQ weights it recorded."""
    import jaxvla.experiment as experiment
    from jaxvla.data.latent_labels import LabelResumeError
    from jaxvla.experiment import PROTOCOLS, Experiment

    fingerprint = {"value": "weights-a"}
    calls = []

    def fake_label_dataset(laq, data_config, out, *, split, overwrite, progress, resume):
        calls.append((resume, overwrite, split))
        if resume and fingerprint["value"] == "weights-b" and len(calls) == 1:
            raise LabelResumeError("the interrupted run labelled with LAQ weights 'weights-a'")
        return out

    monkeypatch.setattr(Experiment, "laq", lambda self, kind: {"steps": 2000, "gate": {"passed": True}})
    monkeypatch.setattr(Experiment, "label_data_config", lambda self, laq_config: None)
    monkeypatch.setattr(experiment, "resolve_checkpoint", lambda path: (os.path.join(path, "2000"), 2000))
    monkeypatch.setattr(experiment, "checkpoint_fingerprint", lambda step_dir: fingerprint["value"])
    monkeypatch.setattr(experiment, "load_laq", lambda path: types.SimpleNamespace(config=None))
    monkeypatch.setattr(experiment, "label_dataset", fake_label_dataset)

    exp = Experiment(str(tmp_path), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    record = exp.labels("lapa")
    assert calls == [(True, True, "train,val")] and record["laq_weights"] == "weights-a"
    assert exp.labels("lapa")["laq_weights"] == "weights-a" and len(calls) == 1  # finished: reused

    fingerprint["value"] = "weights-b"  # the LAQ trained again: these labels are another LAQ's
    calls.clear()
    record = exp.labels("lapa")
    assert calls == [(True, True, "train,val"), (False, True, "train,val")]
    with open(tmp_path / "labels_lapa_pool20" / "stage.json") as f:
        assert json.load(f)["laq_weights"] == record["laq_weights"] == "weights-b"


def test_finished_stage_trained_with_another_config_is_refused(tmp_path, monkeypatch):
    import jaxvla.trainer
    from jaxvla.config import to_json
    from jaxvla.experiment import PROTOCOLS, Experiment, stale_keys

    exp = Experiment(str(tmp_path), PROTOCOLS["demo"], data_root=str(tmp_path / "data"))
    name = "laq_vipra_pool4"
    config = exp.stage_config(name, "configs/laq.py:vipra_small", exp.laq_overrides("vipra"))
    saved = json.loads(to_json(config))
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "stage.json", "w") as f:
        json.dump({"stage": name, "wall_seconds": 5.0, "metrics": {}, "steps": int(config.num_steps),
                   "gate": {"steps": int(config.num_steps)}}, f)
    monkeypatch.setattr(Experiment, "_latest_step", lambda self, name: 10**9)
    monkeypatch.setattr(jaxvla.trainer, "train", lambda config, workdir: pytest.fail("must not train"))
    # The same configuration (and a run-only key such as log_every changed): reused.
    saved["log_every"] = 999
    with open(tmp_path / name / "config.json", "w") as f:
        json.dump(saved, f)
    assert exp.laq("vipra")["wall_seconds"] == 5.0
    # Trained before encode_deltas was on, with another learning rate: refused, naming both.
    saved["model"]["encode_deltas"] = False
    saved["optimizer"]["learning_rate"] = 0.5
    with open(tmp_path / name / "config.json", "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match=r"model.encode_deltas: trained False, now True.*"
                                         r"optimizer.learning_rate: trained 0.5"):
        exp.laq("vipra")
    # The comparison itself, on hand-made trees: nested leaves, absent keys, untouched other keys.
    differ = stale_keys({"model": {"a": 1, "b": {"c": 2}}, "data": {"sample": "pairs"}, "seed": 1},
                        {"model": {"a": 1, "b": {"c": 3}, "d": 4}, "data": {"sample": "pairs"}, "seed": 2})
    assert [(k, a, b) for k, a, b in differ if k != "model.d"] == [("model.b.c", 2, 3)]
    assert [k for k, _, _ in differ] == ["model.b.c", "model.d"]
    # The row length only lays examples out (packed losses equal, tests/test_packing.py): not stale.
    assert stale_keys({"model": {"seq_len": 528, "a": 1}}, {"model": {"seq_len": 264, "a": 1}}) == []


def test_finished_only_publishes_what_is_done(tmp_path):
    """--finished_only: the finished evaluations of a run, published without training anything (a
    run with none is refused, naming the run directory)."""
    from jaxvla.experiment import PROTOCOLS, Experiment

    exp = Experiment(str(tmp_path / "run"), PROTOCOLS["day"], data_root=str(tmp_path / "data"))
    successes = [True, False, True, True, False, False, True, False]
    episodes = [{"row": "SCRATCH-bins", "seed": 0, "task": task, "placement": i, "env_seed": i, "success": ok,
                 "length": 50 if ok else 150}
                for task, oks in (("reach", successes[:4]), ("push", successes[4:])) for i, ok in enumerate(oks)]
    name = "eval_" + exp.finetune_name("SCRATCH-bins", 0)[len("finetune_"):]
    os.makedirs(tmp_path / "run" / name)
    settings = {"tasks": "mt10", "placements": 10, "max_steps": 150, "step": 400}
    (tmp_path / "run" / name / "stage.json").write_text(json.dumps({"stage": name, "episodes": episodes,
                                                                    "settings": settings}))
    # The finetuning's held-out curve travels with the results: step 400 chosen.
    finetune = exp.finetune_name("SCRATCH-bins", 0)
    os.makedirs(tmp_path / "run" / finetune)
    (tmp_path / "run" / finetune / "stage.json").write_text(json.dumps(
        {"stage": finetune, "selected_step": 400, "selection_curve": [[200, 0.2], [400, 0.1], [600, 0.15]],
         "selection_batches": 32}))
    script = os.path.join(REPO, "scripts", "reproduce.py")
    common = [sys.executable, script, "--finished_only", f"--data_root={tmp_path / 'data'}", "--bootstrap=200",
              "--rows=SCRATCH-bins,VIPRA-flow"]
    out = subprocess.run(common + [f"--run_dir={tmp_path / 'run'}", f"--out={tmp_path / 'res'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["statistics"]["rows"]["SCRATCH-bins"]["success_rate"] == pytest.approx(np.mean(successes))
    assert set(results["statistics"]["rows"]) == {"SCRATCH-bins"}
    assert "[('SCRATCH-bins', 0)]" in results["partial"] and "**Partial results**" in out.stdout
    assert results["finetuning"] == [{"row": "SCRATCH-bins", "seed": 0, "metric": "eval/action_mse", "batches": 32,
                                      "selected_step": 400, "curve": [[200, 0.2], [400, 0.1], [600, 0.15]]}]
    assert "| SCRATCH-bins | 0 | 32 | 0.2000 | 0.1000* | 0.1500 |" in out.stdout
    assert results["pretraining_runs"] == {}  # no pretrained row, nothing split across pretraining runs
    assert "A pretrained row's seeds share one pretraining run: its intervals" in out.stdout
    assert os.path.getsize(tmp_path / "res" / "finetuning.png") > 1000
    assert not os.path.exists(tmp_path / "data")  # nothing generated, trained or evaluated
    empty = subprocess.run(common + [f"--run_dir={tmp_path / 'empty'}"], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert empty.returncode != 0 and "no finished evaluation" in empty.stderr and "empty" in empty.stderr


def test_with_records_lets_a_lost_run_directorys_cells_stand(tmp_path):
    """--finished_only --with_records: the cells published from a lost run directory stand beside
    those finished in the run continuing it; once every cell of the protocol's --rows/--seeds is
    there the tables are no longer partial. Cells both hold must agree, and every source must
    share the placements."""
    from jaxvla.experiment import PROTOCOLS, Experiment

    reproduce = _reproduce()
    exp = Experiment(str(tmp_path / "run"), PROTOCOLS["day"], data_root=str(tmp_path / "data"))

    def episodes(row, seed, oks, env_seed=lambda i: 100 + i):
        return [{"row": row, "seed": seed, "task": "reach", "placement": i, "env_seed": env_seed(i), "success": ok,
                 "length": 40 if ok else 150} for i, ok in enumerate(oks)]

    lost = {("SCRATCH-bins", 0): [True, True, False, False], ("SCRATCH-bins@ft1200", 0): [True, False, False, False],
            ("SCRATCH-bins@ft1200", 1): [False, False, False, True]}
    published = [r for (row, seed), oks in lost.items() for r in episodes(row, seed, oks)]
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in published))
    lost_curve = {"row": "SCRATCH-bins", "seed": 0, "metric": "eval/action_mse", "batches": 32, "selected_step": 200,
                  "curve": [[200, 0.3], [400, 0.4]]}
    (tmp_path / "pub" / "results.json").write_text(json.dumps({"finetuning": [lost_curve]}))
    # The new run directory finished seed 1's finetuning (step 400 chosen) and its evaluation.
    finetune = exp.finetune_name("SCRATCH-bins", 1)
    os.makedirs(tmp_path / "run" / finetune)
    (tmp_path / "run" / finetune / "stage.json").write_text(json.dumps(
        {"stage": finetune, "selected_step": 400, "selection_curve": [[200, 0.5], [400, 0.25]],
         "selection_batches": 32}))
    name = exp.eval_name("SCRATCH-bins", 1)
    os.makedirs(tmp_path / "run" / name)
    new = episodes("SCRATCH-bins", 1, [True, True, True, False])
    (tmp_path / "run" / name / "stage.json").write_text(json.dumps(
        {"stage": name, "episodes": new, "settings": {"tasks": "mt10", "placements": 10, "max_steps": 150,
                                                       "step": 400}}))
    # A pretrained row: seed 0 published from the lost directory, seed 1 finetuned in the new one from
    # its pretraining trained again (a checkpoint whose digest manifest fingerprints the run).
    lost_lapa = episodes("LAPA-bins", 0, [False, True, False, False])
    (tmp_path / "pub" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in published + lost_lapa))
    manifest = tmp_path / "run" / exp.pretrain_name("lapa") / "checkpoints" / "1000" / "jaxvla_digests.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"files": {"params/w": {"sha256": "cd"}}}')
    finetune = exp.finetune_name("LAPA-bins", 1)
    os.makedirs(tmp_path / "run" / finetune)
    (tmp_path / "run" / finetune / "stage.json").write_text(json.dumps(
        {"stage": finetune, "selected_step": 200, "selection_curve": [[200, 0.5]], "selection_batches": 32}))
    name = exp.eval_name("LAPA-bins", 1)
    os.makedirs(tmp_path / "run" / name)
    (tmp_path / "run" / name / "stage.json").write_text(json.dumps(
        {"stage": name, "episodes": episodes("LAPA-bins", 1, [True, False, False, False]),
         "settings": {"tasks": "mt10", "placements": 10, "max_steps": 150, "step": 200}}))
    script = os.path.join(REPO, "scripts", "reproduce.py")
    out = subprocess.run([sys.executable, script, "--finished_only", f"--run_dir={tmp_path / 'run'}",
                          f"--data_root={tmp_path / 'data'}", "--bootstrap=200", "--rows=SCRATCH-bins,LAPA-bins",
                          "--seeds=0,1",
                          f"--with_records={tmp_path / 'pub' / 'episodes.jsonl'}", f"--out={tmp_path / 'res'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    rows = results["statistics"]["rows"]
    assert rows["SCRATCH-bins"]["per_seed"] == {"0": 0.5, "1": 0.75}
    assert rows["SCRATCH-bins@ft1200"]["success_rate"] == pytest.approx(2 / 8)
    assert "partial" not in results and "**Partial results**" not in out.stdout
    assert results["sources"]["run directory"]["cells"] == [["LAPA-bins", 1], ["SCRATCH-bins", 1]]
    assert len(results["sources"]["published records"]["cells"]) == 4
    assert sorted((c["row"], c["seed"], c["selected_step"]) for c in results["finetuning"]) == [
        ("LAPA-bins", 1, 200), ("SCRATCH-bins", 0, 200), ("SCRATCH-bins", 1, 400)]
    assert "Assembled from finished evaluations" in out.stdout
    # Which pretraining run each pretrained cell finetuned from: the published cell's is not
    # recorded (one label for its source), the new one's is its checkpoint's fingerprint.
    import hashlib
    assert results["pretraining_runs"] == {"LAPA-bins": {
        "0": f"unrecorded: {tmp_path / 'pub' / 'episodes.jsonl'}",
        "1": hashlib.sha256(manifest.read_bytes()).hexdigest()}}
    assert "one run per group of seeds: LAPA-bins (seeds 0 | 1)." in out.stdout
    regenerated = subprocess.run([sys.executable, script, f"--from_records={tmp_path / 'res' / 'episodes.jsonl'}",
                                  f"--out={tmp_path / 'res3'}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert regenerated.returncode == 0, regenerated.stderr
    assert "LAPA-bins (seeds 0 | 1)" in regenerated.stdout
    # Published again beside the same run directory, the recorded runs carry over: still two.
    again = subprocess.run([sys.executable, script, "--finished_only", f"--run_dir={tmp_path / 'run'}",
                            f"--data_root={tmp_path / 'data'}", "--bootstrap=200", "--rows=SCRATCH-bins,LAPA-bins",
                            "--seeds=0,1", f"--with_records={tmp_path / 'res' / 'episodes.jsonl'}",
                            f"--out={tmp_path / 'res4'}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "res4" / "results.json").read_text())["pretraining_runs"] == \
        results["pretraining_runs"]
    # Without the published cells, the same run directory is partial and says what is still to run.
    alone = subprocess.run([sys.executable, script, "--finished_only", f"--run_dir={tmp_path / 'run'}",
                            f"--data_root={tmp_path / 'data'}", "--bootstrap=200", "--rows=SCRATCH-bins",
                            "--seeds=0,1", f"--out={tmp_path / 'res2'}"], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr
    assert "still to run: [('SCRATCH-bins', 0), ('SCRATCH-bins@ft1200', 0)" in alone.stdout

    # The checks, directly: an identical cell in both is kept once; a differing one, or another
    # placement stream, is refused by name.
    records, curves = reproduce.merge_cells(published + new, new, [lost_curve], [])
    assert len(records) == len(published) + len(new) and curves == [lost_curve]
    changed = [dict(r, success=not r["success"]) if r["placement"] == 2 else r for r in new]
    with pytest.raises(ValueError, match="row 'SCRATCH-bins' seed 1: the published records and the run"):
        reproduce.merge_cells(published + new, changed, [], [])
    elsewhere = episodes("SCRATCH-bins", 1, [True, True, True, False], env_seed=lambda i: 7 + i)
    with pytest.raises(ValueError, match="task 'reach' placement 0: environment seeds 100 and 7"):
        reproduce.merge_cells(published, elsewhere, [], [])
    with pytest.raises(ValueError, match="seed 0: the published held-out curve"):
        reproduce.merge_cells(published, [], [lost_curve], [dict(lost_curve, selected_step=400)])


def test_a_run_of_part_of_the_protocol_is_published_as_partial():
    """--seeds / --rows runs publish tables that are not the protocol's: the banner says what is
    left out (the day run's per-seed invocations once wrote seed-only tables with none)."""
    from jaxvla.experiment import PROTOCOLS

    reproduce = _reproduce()
    day = PROTOCOLS["day"]
    assert reproduce.subset_of_protocol(day, None) == ""
    assert reproduce.subset_of_protocol(dataclasses.replace(day, seeds=(0, 1, 2, 3)), None) == ""
    only_seed_2 = reproduce.subset_of_protocol(dataclasses.replace(day, seeds=(2,)), None)
    assert only_seed_2 == "a run of part of protocol day, without its seeds [0, 1]"
    rows = reproduce.subset_of_protocol(day, ["SCRATCH-flow", "VIPRA-flow"])
    assert "without its rows" in rows and "'SCRATCH-bins'" in rows and "'VIPRA-flow'" not in rows
    text = reproduce.markdown({"rows": {}, "contrasts": {}, "gaps": {}, "placements": 0, "replicates": 0},
                              {"partial": only_seed_2})
    assert "**Partial results**: a run of part of protocol day, without its seeds [0, 1]." in text
