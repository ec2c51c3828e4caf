"""The LAPA / ViPRA comparison at CPU scale on Meta-World (jaxvla/experiment.py): pretrain on an
action-free video pool, finetune on K demonstrations per task, evaluate at fixed placements.

    python scripts/reproduce.py --plan                          # the protocol; runs nothing
    python scripts/reproduce.py [--protocol=day] [--run_dir=runs/day] [--rows=VIPRA-flow,SCRATCH-flow]
        [--seeds=0,1,2] [--demos_per_task=5] [--videos_per_task=20[,50,...]] [--finetune_tasks=mt10]
        [--eval_tasks=mt10] [--eval_placements=10] [--out=docs/results/<date>-day]
    python scripts/reproduce.py --from_records=docs/results/<date>-day/episodes.jsonl --out=DIR
    python scripts/reproduce.py --finished_only --run_dir=runs/day --out=DIR   # what is done so far
    python scripts/reproduce.py --finished_only --run_dir=runs/day2 \
        --with_records=docs/results/<date>-day-partial/episodes.jsonl --out=DIR   # after losing runs/day

Protocols (``jaxvla.experiment.PROTOCOLS``): ``day`` (the full comparison: ML45 pool of 20 videos
per task, K=5 demonstrations per MT10 task, 8 rows x 3 seeds, at most 10 hours on 2 cores; every
finished stage is reused, so interrupt and rerun freely) and ``demo`` (one row, ``make demo``).
``--videos_per_task`` takes a list for the video-scaling study (0 runs SCRATCH rows only); rows of
the extra pool sizes are named ``<row>@<videos>``. With ``Protocol.scratch_control`` (``day``) each
SCRATCH finetuning is also published stopped within the pretrained rows' finetuning steps, as
``SCRATCH-<head>@ft<steps>`` (the equal-finetuning control, a secondary analysis).

Writes into ``--out`` (default ``--run_dir``/results): ``episodes.jsonl`` (the raw per-episode
records: row, seed, task, placement, env_seed, success, length), ``results.json`` (statistics:
cluster-bootstrap intervals over seeds and placements, paired contrasts, gap closed),
``RESULTS.md`` and ``comparison.png``. ``--from_records`` regenerates the last three exactly from
the first. ``--with_records`` lets the published cells of a lost run directory stand beside those of
the run continuing it in a new one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("protocol", "day", "day | demo (jaxvla.experiment.PROTOCOLS).")
flags.DEFINE_boolean("plan", False, "Print the protocol (datasets, rows, steps, estimated hours) and exit.")
flags.DEFINE_string("run_dir", "", "Where every stage goes (default runs/<protocol>).")
flags.DEFINE_string("data_root", "runs/data", "Where the Meta-World datasets are (generated when missing).")
flags.DEFINE_string("rows", "", "Comma list of rows (default: the protocol's), e.g. SCRATCH-flow,VIPRA-flow.")
flags.DEFINE_string("seeds", "", "Comma list of finetuning seeds (default: the protocol's).")
flags.DEFINE_integer("demos_per_task", 0, "K demonstrations per finetuning task (0: the protocol's; 2, 5, 10).")
flags.DEFINE_string("videos_per_task", "", "Pool videos per task; a comma list runs the video-scaling study.")
flags.DEFINE_string("pool_tasks", "", "Meta-World tasks of the video pool (default: the protocol's, ml45).")
flags.DEFINE_string("finetune_tasks", "", "Tasks with demonstrations (default mt10; any Meta-World tasks).")
flags.DEFINE_string("eval_tasks", "", "Evaluation tasks (default mt10).")
flags.DEFINE_integer("eval_placements", 0, "Fixed evaluation placements per task (0: the protocol's).")
flags.DEFINE_string("out", "", "Where the results go (default <run_dir>/results).")
flags.DEFINE_string("from_records", "", "Regenerate results.json / RESULTS.md / comparison.png from this "
                                        "episodes.jsonl instead of running anything.")
flags.DEFINE_boolean("finished_only", False, "Publish the evaluations already finished in --run_dir (of --rows / "
                     "--seeds) without training or evaluating anything: partial results while a long run goes on.")
flags.DEFINE_string("with_records", "", "With --finished_only: a published episodes.jsonl of this protocol "
                    "(its results.json beside it) whose (row, seed) cells stand beside the run directory's, "
                    "their held-out curves included: how a run goes on after its run directory is lost. A cell "
                    "in both must hold the same records; every record must share the protocol's placements.")
flags.DEFINE_integer("bootstrap", 10_000, "Bootstrap replicates.")
flags.DEFINE_enum("until", None, ["tokenizer", "labels", "pretrain"],
                  "Run only the shared stages up to this one (labels: LAQs, gates and labels too; pretrain: "
                  "every pretraining too) and stop: no finetuning, no results.")
flags.DEFINE_integer("history_stride", None, "Frame history o_{t-k} in pretraining and finetuning: k control "
                     "steps (0: the current frame alone; default: the protocol's, 7).")
flags.DEFINE_string("state_dims", None, "Proprioceptive state dims in the finetuning prompt, e.g. 4 or 0:4 "
                    "(empty: pixels only; default: the protocol's, 4).")
flags.DEFINE_boolean("ignore_laq_gate", False, "Pretrain on an LAQ that failed its gate (the verdict is recorded).")
FLAGS = flags.FLAGS

CONTRASTS = (("VIPRA", "SCRATCH"), ("LAPA", "SCRATCH"), ("VIPRA", "LAPA"))
DESCRIPTIONS = {
    "SCRATCH": "no pretraining",
    "LAPA": "LAPA latent actions (pairs) from the pool",
    "VIPRA": "ViPRA latent actions (clips) + future frames from the pool",
    "ACTIONVLA": "the pool's true action bins (upper bound)",
}


def protocols_from_flags():
    """One Protocol per pool size of ``--videos_per_task`` (the protocol's own when unset)."""
    from jaxvla.experiment import PROTOCOLS

    if FLAGS.protocol not in PROTOCOLS:
        raise app.UsageError(f"--protocol={FLAGS.protocol!r}; expected one of {sorted(PROTOCOLS)}")
    base = PROTOCOLS[FLAGS.protocol]
    changes = {}
    if FLAGS.seeds:
        try:
            changes["seeds"] = tuple(int(s) for s in FLAGS.seeds.split(",") if s.strip())
        except ValueError:
            raise app.UsageError(f"--seeds={FLAGS.seeds!r}: expected integers, e.g. 0,1,2") from None
    if FLAGS.demos_per_task:
        changes["demos_per_task"] = FLAGS.demos_per_task
    for flag in ("pool_tasks", "finetune_tasks", "eval_tasks"):
        if getattr(FLAGS, flag):
            changes[flag] = getattr(FLAGS, flag)
    if FLAGS.eval_placements:
        changes["eval_placements"] = FLAGS.eval_placements
    if FLAGS.ignore_laq_gate:
        changes["enforce_laq_gate"] = False
    if FLAGS.history_stride is not None:
        changes["history_stride"] = FLAGS.history_stride
    if FLAGS.state_dims is not None:
        changes["state_dims"] = FLAGS.state_dims
    sizes = [base.videos_per_task]
    if FLAGS.videos_per_task:
        try:
            sizes = [int(v) for v in FLAGS.videos_per_task.split(",") if v.strip()]
        except ValueError:
            raise app.UsageError(f"--videos_per_task={FLAGS.videos_per_task!r}: expected integers") from None
    try:
        return [dataclasses.replace(base, videos_per_task=v, **changes) for v in sizes]
    except ValueError as e:
        raise app.UsageError(str(e)) from None


# A published row: LABEL-head, with the pool's videos per task when a video-scaling run has several
# (VIPRA-flow@20; SCRATCH rows never, they use no pool), or an equal-finetuning control
# (experiment.control_row: SCRATCH-flow@ft1200). Parsed here, not imported, so that --from_records
# needs neither JAX nor the experiment.
ROW = re.compile(r"^(?P<label>[A-Z]+)-(?P<head>[a-z]+)(?:@(?:(?P<videos>\d+)|ft(?P<cap>\d+)))?$")
# Rows with fewer finetuning seeds have intervals that leave out (one seed) or understate (two:
# by half) the seed-to-seed spread.
FULL_SEEDS = 3


def describe(row: str) -> str:
    parsed = ROW.match(row)
    if parsed is None:
        return ""
    if parsed["cap"]:
        return (f"no pretraining, stopped within {parsed['cap']} finetuning steps (the pretrained rows' "
                "finetuning; secondary)")
    return DESCRIPTIONS.get(parsed["label"], "")


def unique_records(records: list[dict]) -> list[dict]:
    """One record per (row, seed, task, placement). A video-scaling run meets the SCRATCH rows
    once per pool size (they share one stage): identical copies are dropped. Any other repeat is
    an error naming the episode, never a silent choice between two outcomes."""
    out: dict[tuple, dict] = {}
    for r in records:
        key = (r["row"], r["seed"], r["task"], r["placement"])
        if key in out:
            if out[key] == r and r["row"].startswith("SCRATCH"):
                continue
            raise ValueError(f"two records of row {key[0]!r} seed {key[1]} task {key[2]!r} placement {key[3]}: "
                             f"{out[key]} and {r}")
        out[key] = r
    return list(out.values())


def comparison(records: list[dict], replicates: int = 10_000) -> dict:
    """Statistics of ``records`` (jaxvla.statistics.compare) with the protocol's contrasts per head
    (and per pool size) and, per head, the gap closed towards ACTIONVLA. An equal-finetuning
    control shares its SCRATCH row's seed draws: they are the same finetuning runs."""
    from jaxvla import statistics

    rows = list(dict.fromkeys(r["row"] for r in records))
    parsed = {row: ROW.match(row) for row in rows}
    seeds = {row: {r["seed"] for r in records if r["row"] == row} for row in rows}

    def pooled(label: str, head: str, videos: str | None) -> str:
        return f"{label}-{head}" + (f"@{videos}" if videos and label != "SCRATCH" else "")

    contrasts, control_contrasts, gaps, seed_groups = [], [], [], []
    for row in rows:
        if parsed[row] is None:
            continue
        label, head, videos, cap = parsed[row].group("label", "head", "videos", "cap")
        if cap:
            # Secondary: pretrained rows against SCRATCH at their finetuning budget, and what
            # SCRATCH's extra steps (matched compute) bought it.
            scratch = f"SCRATCH-{head}"
            control_contrasts += [(other, row) for pretraining in ("VIPRA", "LAPA") for other in rows
                                  if parsed[other] and not parsed[other]["cap"]
                                  and parsed[other].group("label", "head") == (pretraining, head)]
            if scratch in rows:
                control_contrasts.append((scratch, row))
                if seeds[scratch] == seeds[row]:  # a seed whose control is not evaluated yet: unpaired
                    seed_groups.append((scratch, row))
            continue
        for a, b in CONTRASTS:
            if label == a and pooled(b, head, videos) in rows:
                contrasts.append((row, pooled(b, head, videos)))
        base, top = f"SCRATCH-{head}", pooled("ACTIONVLA", head, videos)
        if label in ("LAPA", "VIPRA") and base in rows and top in rows:
            gaps.append((row, base, top))
    return statistics.compare(records, rows, contrasts=contrasts + control_contrasts, gaps=gaps,
                              seed_groups=seed_groups, replicates=replicates)


def pretraining_sentence(meta: dict) -> str:
    """What a pretrained row's intervals are conditional on, from results.json's ``pretraining_runs``."""
    if "pretraining_runs" not in meta:
        return ("A pretrained row's seeds share their run directory's pretraining run: its intervals and contrasts "
                "are conditional on the pretraining runs.")
    split = split_pretraining(meta)
    if not split:
        return "A pretrained row's seeds share one pretraining run: its intervals and contrasts are conditional on that run."
    rows = "; ".join(f"{row} (seeds " + " | ".join(", ".join(map(str, g)) for g in groups) + ")"
                     for row, groups in split.items())
    return ("A pretrained row's seeds share one pretraining run, except in rows whose pretraining was trained again "
            f"(another run directory; CPU training is not bit-reproducible), one run per group of seeds: {rows}. "
            "Intervals and contrasts are conditional on the pretraining runs drawn; a row with two mixes them in "
            "its seed clusters (`pretraining_runs` in results.json).")


def markdown(stats: dict, meta: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}"

    def ci(c):
        return f"[{pct(c[0])}, {pct(c[1])}]"

    lines = [f"# LAPA / ViPRA comparison on Meta-World ({meta.get('date', '')}, protocol {meta.get('protocol', '')})",
             ""]
    if meta.get("partial"):
        lines += [f"**Partial results**: {meta['partial']}. Rows with one seed have no seed spread; contrasts "
                  "need both rows.", ""]
    if meta.get("sources"):
        lines += ["Assembled from finished evaluations: " + "; ".join(
            f"{name} `{source['path']}` ({len(source['cells'])} (row, seed) cells)"
            for name, source in meta["sources"].items()) + ". Each cell is one finetuning's evaluation; "
            "results.json lists the cells of each source.", ""]
    if meta.get("plan_text"):
        lines += ["```", meta["plan_text"], "```", ""]
    few = {row for row, r in stats["rows"].items() if len(r["seeds"]) < FULL_SEEDS}

    def mark(name):
        return name + (" †" if any(part.strip() in few for part in re.split(r" - |[()/]", name)) else "")

    lines += ["Success rate in %, 95 % interval from a cluster bootstrap over finetuning seeds (clusters) and "
              f"placements (shared by all rows); {stats['placements']} placements, {stats['replicates']} replicates. "
              f"{pretraining_sentence(meta)} An equal-finetuning control (`@ft`) is its SCRATCH row's runs stopped earlier and "
              "shares their seed draws.",
              "", "| row | pretraining | success % | 95 % CI | episodes | per-seed % |", "|---|---|---|---|---|---|"]
    for row, r in stats["rows"].items():
        seeds = ", ".join(pct(v) for v in r["per_seed"].values())
        lines.append(f"| {mark(row)} | {describe(row)} | {pct(r['success_rate'])} | {ci(r['ci95'])} | "
                     f"{r['successes']}/{r['episodes']} | {seeds} |")
    if few:
        lines += ["", f"† fewer than {FULL_SEEDS} seeds: the interval leaves out (one seed) or understates (two "
                  "seeds, by half) the seed-to-seed spread, and so do the contrasts with this row."]
    if stats["contrasts"]:
        lines += ["", "Paired contrasts (same placements; difference in percentage points):", "",
                  "| contrast | difference | 95 % CI | share of replicates <= 0 |", "|---|---|---|---|"]
        for name, c in stats["contrasts"].items():
            lines.append(f"| {mark(name)} | {pct(c['difference'])} | {ci(c['ci95'])} | {c['p_not_greater']:.3f} |")
    if stats["gaps"]:
        lines += ["", "Gap closed towards the upper bound, (X - SCRATCH) / (ACTIONVLA - SCRATCH). Its interval "
                  "is over the replicates where ACTIONVLA is above SCRATCH, and is given only where that holds in "
                  "at least 95 % of them: elsewhere the denominator crosses zero and the ratio has no "
                  "meaningful interval (read the two contrasts instead).", "",
                  "| ratio | gap closed | 95 % CI | replicates undefined |", "|---|---|---|---|"]
        for name, g in stats["gaps"].items():
            point = (f"{g['gap_closed']:.2f}" if math.isfinite(g["gap_closed"])
                     else "undefined (ACTIONVLA not above SCRATCH)")
            span = (f"[{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}]" if all(map(math.isfinite, g["ci95"]))
                    else "not given")
            lines.append(f"| {mark(name)} | {point} | {span} | {g['undefined_fraction']:.3f} |")
    curves = meta.get("finetuning") or []
    if curves:
        steps = sorted({step for c in curves for step, _ in c["curve"]})
        lines += ["", f"Finetuning: `{curves[0]['metric']}` on the held-out demonstrations at each evaluated step "
                  "(* the step chosen and evaluated), measured on the number of held-out batches (8 chunks "
                  "each) given:", "",
                  "| row | seed | batches | " + " | ".join(str(step) for step in steps) + " |",
                  "|---" * (len(steps) + 3) + "|"]
        for c in curves:
            values = dict((step, value) for step, value in c["curve"])
            cells = [f"{values[step]:.4f}" + ("*" if step == c["selected_step"] else "") if step in values else "-"
                     for step in steps]
            lines.append(f"| {c['row']} | {c['seed']} | {c.get('batches') or '-'} | " + " | ".join(cells) + " |")
        by_row: dict[str, list[dict]] = {}
        for c in curves:
            by_row.setdefault(c["row"], []).append(dict(c["curve"]))
        lines += ["", "The same, averaged over each row's seeds at equal finetuning steps (where every seed was "
                  "measured): how far pretraining moves finetuning's start and end.", "",
                  "| row | seeds | " + " | ".join(str(step) for step in steps) + " |", "|---" * (len(steps) + 2) + "|"]
        for row, seed_curves in by_row.items():
            cells = [f"{sum(v[step] for v in seed_curves) / len(seed_curves):.4f}"
                     if all(step in v for v in seed_curves) else "-" for step in steps]
            lines.append(f"| {row} | {len(seed_curves)} | " + " | ".join(cells) + " |")
    tasks = sorted({t for r in stats["rows"].values() for t in r["tasks"]})
    lines += ["", "Per task (success %):", "", "| row | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for row, r in stats["rows"].items():
        lines.append(f"| {row} | " + " | ".join(pct(r["tasks"][t]["success_rate"]) if t in r["tasks"] else "-"
                                               for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(path: str, stats: dict, title: str) -> str:
    from jaxvla.evaluation import bar_plot

    rows = list(stats["rows"])
    return bar_plot(path, rows, [stats["rows"][r]["success_rate"] for r in rows],
                    [stats["rows"][r]["ci95"] for r in rows], title)


def plot_curves(path: str, curves: list[dict], title: str) -> str:
    """The held-out selection metric against the finetuning step, one line per (row, seed), a star
    at the chosen step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxvla.tracking import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    colours = {}
    for c in curves:
        first = c["row"] not in colours
        colour = colours.setdefault(c["row"], f"C{len(colours) % 10}")
        steps, values = zip(*c["curve"])
        ax.plot(steps, values, marker=".", color=colour, alpha=0.8, label=c["row"] if first else None)
        ax.plot([c["selected_step"]], [dict(c["curve"])[c["selected_step"]]], marker="*", color=colour, markersize=10)
    ax.set_xlabel("finetuning step")
    ax.set_ylabel(f"held-out {curves[0]['metric']}")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def publish(records: list[dict], out: str, meta: dict, replicates: int, source: str = "") -> dict:
    """Writes episodes.jsonl (unless it is ``source``, the records' own file), results.json,
    RESULTS.md, comparison.png and, with ``meta["finetuning"]`` (the held-out selection curves),
    finetuning.png."""
    from jaxvla.io.files import write_json, write_text

    os.makedirs(out, exist_ok=True)
    records_path = os.path.join(out, "episodes.jsonl")
    if not source or os.path.abspath(source) != os.path.abspath(records_path):
        write_text(records_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    stats = comparison(records, replicates)
    write_json(os.path.join(out, "results.json"), {**meta, "statistics": stats})
    text = markdown(stats, meta)
    write_text(os.path.join(out, "RESULTS.md"), text)
    plot(os.path.join(out, "comparison.png"), stats,
         f"Meta-World success, 95 % cluster-bootstrap CI ({meta.get('date', '')})")
    if meta.get("finetuning"):
        plot_curves(os.path.join(out, "finetuning.png"), meta["finetuning"],
                    f"Finetuning on the held-out demonstrations (* chosen) ({meta.get('date', '')})")
    return {"statistics": stats, "markdown": text}


def subset_of_protocol(protocol, rows) -> str:
    """What a run restricted by ``--rows`` / ``--seeds`` leaves out of its protocol's design, as the
    published banner says it ("" when nothing is left out): its tables are not the protocol's."""
    from jaxvla.experiment import PROTOCOLS

    design = PROTOCOLS.get(protocol.name, protocol)
    left_out = []
    missing_rows = [r for r in protocol.rows() if r not in (rows or protocol.rows())]
    if missing_rows:
        left_out.append(f"rows {missing_rows}")
    missing_seeds = [s for s in design.seeds if s not in protocol.seeds]
    if missing_seeds:
        left_out.append(f"seeds {missing_seeds}")
    return f"a run of part of protocol {protocol.name}, without its {' and '.join(left_out)}" if left_out else ""


def expected_cells(protocol, rows) -> list[tuple[str, int]]:
    """The (row, seed) evaluations ``protocol`` publishes for ``rows`` (default: all of its rows),
    equal-finetuning controls included."""
    from jaxvla.experiment import control_row

    out = []
    for row in protocol.rows(rows):
        for cap in protocol.evaluation_caps(row):
            name = row if cap is None else control_row(row, cap)
            out += [(name, seed) for seed in protocol.seeds]
    return out


def labelled(experiments, exp, item: dict) -> dict:
    """``item`` (an episode record or a selection curve) with its row named as published: suffixed
    ``@videos`` when several video counts run, except SCRATCH rows, which do not depend on the pool."""
    if len(experiments) == 1 or item["row"].startswith("SCRATCH"):
        return dict(item)
    return {**item, "row": f"{item['row']}@{exp.protocol.videos_per_task}"}


def selection_curves(experiments, rows) -> list[dict]:
    """The finetunings' held-out selection curves of every experiment (rows named like the records;
    SCRATCH rows once)."""
    curves = {}
    for exp in experiments:
        chosen = exp.protocol.rows(rows)
        for curve in exp.selection_curves(chosen):
            curve = labelled(experiments, exp, curve)
            curves[(curve["row"], curve["seed"])] = curve
    return list(curves.values())


def read_records(path: str, flag: str = "--from_records") -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise app.UsageError(f"{flag}: {path} line {number} is not JSON ({e})") from None
            missing = [k for k in ("row", "seed", "task", "placement", "success") if k not in record]
            if missing:
                raise app.UsageError(f"{flag}: {path} line {number} lacks {missing}")
            records.append(record)
    if not records:
        raise app.UsageError(f"{flag}: {path} holds no records")
    return records


def published_results(records_path: str) -> dict:
    """The results.json published beside ``records_path`` (an episodes.jsonl), {} without one."""
    path = os.path.join(os.path.dirname(os.path.abspath(records_path)), "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_pretraining_runs(experiments, records: list[dict]) -> dict[tuple[str, int], str]:
    """{(row, seed): fingerprint of the pretraining run it finetuned from} for the cells of
    ``records`` (as published, ``labelled``) whose row is pretrained and whose pretraining
    checkpoint the run directory holds."""
    runs = {}
    for exp in experiments:
        for row in exp.protocol.rows():
            fingerprint = exp.pretraining_run(row)  # None for SCRATCH rows
            if fingerprint is None:
                continue
            label = labelled(experiments, exp, {"row": row})["row"]
            runs.update({(label, r["seed"]): fingerprint for r in records if r["row"] == label})
    return runs


def published_pretraining_runs(published: list[dict], meta: dict, path: str) -> dict[tuple[str, int], str]:
    """{(row, seed): pretraining run} of a published file's cells of pretrained rows: its
    results.json's ``pretraining_runs`` where recorded. Files published before the runs were
    recorded name one label per source in ``sources`` (each an assembled run directory), and a
    file without sources one label for all its cells (one run directory)."""
    recorded = {(row, int(seed)): run for row, seeds in meta.get("pretraining_runs", {}).items()
                for seed, run in seeds.items()}
    runs = {}
    for r in published:
        cell = (r["row"], r["seed"])
        if r["row"].startswith("SCRATCH") or cell in runs:
            continue
        if cell in recorded:
            runs[cell] = recorded[cell]
            continue
        source = next((name for name, s in meta.get("sources", {}).items() if list(cell) in s["cells"]), "")
        runs[cell] = f"unrecorded: {path}" + (f" ({source})" if source else "")
    return runs


def pretraining_runs_meta(runs: dict[tuple[str, int], str]) -> dict[str, dict[str, str]]:
    """``{(row, seed): run}`` as results.json's ``pretraining_runs``: ``{row: {"seed": run}}``."""
    out: dict[str, dict[str, str]] = {}
    for (row, seed), run in sorted(runs.items()):
        out.setdefault(row, {})[str(seed)] = run
    return out


def split_pretraining(meta: dict) -> dict[str, list[list[int]]]:
    """Rows whose seeds finetuned from more than one pretraining run: ``{row: [seeds of the first
    run, seeds of the next, ...]}`` (runs in the order of their lowest seed)."""
    out = {}
    for row, seeds in meta.get("pretraining_runs", {}).items():
        groups: dict[str, list[int]] = {}
        for seed, run in sorted(seeds.items(), key=lambda kv: int(kv[0])):
            groups.setdefault(run, []).append(int(seed))
        if len(groups) > 1:
            out[row] = list(groups.values())
    return out


def merge_cells(published: list[dict], run: list[dict], published_curves: list[dict],
                run_curves: list[dict]) -> tuple[list[dict], list[dict]]:
    """The records and held-out curves of two sources of one protocol's (row, seed) cells, each
    cell once: a published file's and a run directory's. A cell both hold must hold the same
    records (and curve); every record of a (task, placement) must have the same environment seed,
    so that all rows still share the protocol's placements. Raises ValueError naming the cell or
    the placement otherwise."""
    def cells(records):
        out = {}
        for r in records:
            out.setdefault((r["row"], r["seed"]), []).append(r)
        return out

    def episodes(records):
        return sorted(records, key=lambda r: (r["task"], r["placement"]))

    # The published cells first, in their published order, so that a file grown by a run's cells
    # differs from the one it grew from by those cells' lines alone.
    mine, theirs = cells(published), cells(run)
    for cell in sorted(set(mine) & set(theirs)):
        if episodes(mine[cell]) != episodes(theirs[cell]):
            raise ValueError(f"row {cell[0]!r} seed {cell[1]}: the published records and the run directory's differ")
    merged = [r for rs in {**mine, **theirs}.values() for r in rs]
    placements: dict[tuple, object] = {}
    for r in merged:
        key, env_seed = (r["task"], r["placement"]), r.get("env_seed")
        if placements.setdefault(key, env_seed) != env_seed:
            raise ValueError(f"task {key[0]!r} placement {key[1]}: environment seeds {placements[key]} and {env_seed} "
                             f"(row {r['row']!r} seed {r['seed']}): the sources do not share the placements")
    curves = {(c["row"], c["seed"]): c for c in published_curves}
    for c in run_curves:
        cell = (c["row"], c["seed"])
        if cell in curves and curves[cell] != c:
            raise ValueError(f"row {cell[0]!r} seed {cell[1]}: the published held-out curve and the run directory's "
                             "differ")
        curves[cell] = c
    return merged, list(curves.values())


def main(argv):
    del argv
    import logging

    logging.getLogger("jaxvla").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)

    if FLAGS.from_records:
        records = read_records(FLAGS.from_records)
        out = FLAGS.out or os.path.dirname(os.path.abspath(FLAGS.from_records))
        meta, replicates = {}, FLAGS.bootstrap
        published = published_results(FLAGS.from_records)
        if published:
            meta = {k: v for k, v in published.items() if k != "statistics"}
            if not FLAGS["bootstrap"].present:  # the published figures' own replicates
                replicates = int(published.get("statistics", {}).get("replicates", replicates))
        try:
            print(publish(unique_records(records), out, meta, replicates, source=FLAGS.from_records)["markdown"])
        except ValueError as e:
            raise app.UsageError(f"--from_records={FLAGS.from_records}: {e}") from None
        return

    from jaxvla import compilation_cache
    from jaxvla.experiment import Experiment, StageInterrupted, format_plan, parse_row

    protocols = protocols_from_flags()
    run_dir = FLAGS.run_dir or os.path.join("runs", FLAGS.protocol)
    experiments = [Experiment(run_dir, p, data_root=FLAGS.data_root) for p in protocols]
    rows = [r.strip() for r in FLAGS.rows.split(",") if r.strip()] or None
    for row in rows or []:
        try:
            parse_row(row)
        except ValueError as e:
            raise app.UsageError(f"--rows: {e}") from None
    plans = []
    for exp in experiments:
        try:
            plans.append(format_plan(exp.plan(rows)))
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    if FLAGS.plan:
        print("\n\n".join(plans))
        return

    start = time.time()
    if FLAGS.finished_only:
        records = []
        for exp in experiments:
            chosen = exp.protocol.rows(rows)
            records.extend(labelled(experiments, exp, r) for r in exp.records(chosen))
        curves = selection_curves(experiments, rows)
        runs = run_pretraining_runs(experiments, records)
        sources = {}
        if FLAGS.with_records:
            published = read_records(FLAGS.with_records, "--with_records")
            published_meta = published_results(FLAGS.with_records)
            published_curves = published_meta.get("finetuning", [])
            sources = {"published records": (FLAGS.with_records, sorted({(r["row"], r["seed"]) for r in published})),
                       "run directory": (run_dir, sorted({(r["row"], r["seed"]) for r in records}))}
            # The run directory's fingerprint wins for a cell both hold: it is the checkpoint there now.
            runs = {**published_pretraining_runs(published, published_meta, FLAGS.with_records), **runs}
            try:
                records, curves = merge_cells(published, records, published_curves, curves)
            except ValueError as e:
                raise app.UsageError(f"--with_records={FLAGS.with_records}: {e}") from None
        if not records:
            raise app.UsageError(f"--finished_only: no finished evaluation of {rows or 'the protocol rows'} "
                                 f"in {run_dir}")
        records = unique_records(records)
        out = FLAGS.out or os.path.join(run_dir, "results")
        done = sorted({(r["row"], r["seed"]) for r in records})
        meta = {"date": time.strftime("%Y-%m-%d"), "protocol": FLAGS.protocol,
                "protocols": [dataclasses.asdict(e.protocol) for e in experiments], "plan_text": "\n\n".join(plans),
                "finetuning": curves, "pretraining_runs": pretraining_runs_meta(runs)}
        expected = dict.fromkeys((labelled(experiments, exp, {"row": row})["row"], seed)
                                 for exp in experiments for row, seed in expected_cells(exp.protocol, rows))
        missing = [cell for cell in expected if cell not in done]
        if missing:
            meta["partial"] = (f"`--finished_only`, the run still going: {len(done)} finished (row, seed) evaluations: "
                               f"{done}" + (f"; still to run: {missing}" if missing else ""))
        if sources:
            meta["sources"] = {name: {"path": path, "cells": [list(c) for c in cells]}
                               for name, (path, cells) in sources.items()}
        print(publish(records, out, meta, FLAGS.bootstrap)["markdown"])
        return
    compilation_cache.enable()  # $JAXVLA_COMPILATION_CACHE, else ~/.cache/jaxvla/xla; "off" disables
    try:
        if FLAGS.until:
            for exp in experiments:
                exp.prepare(FLAGS.until, rows)
            print(f"shared stages up to {FLAGS.until} done in {time.time() - start:.0f} s")
            return
        records = []
        for exp in experiments:
            chosen = exp.protocol.rows(rows)
            records.extend(labelled(experiments, exp, record) for record in exp.run(chosen))
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    records = unique_records(records)  # SCRATCH rows do not depend on the pool: one copy of each
    date = time.strftime("%Y-%m-%d")
    out = FLAGS.out or os.path.join(run_dir, "results")
    meta = {"date": date, "protocol": FLAGS.protocol,
            "protocols": [dataclasses.asdict(e.protocol) for e in experiments],
            "plan_text": "\n\n".join(plans), "wall_seconds": time.time() - start,
            "finetuning": selection_curves(experiments, rows),
            "pretraining_runs": pretraining_runs_meta(run_pretraining_runs(experiments, records))}
    subset = subset_of_protocol(experiments[0].protocol, rows)
    if subset:
        meta["partial"] = subset
    print(publish(records, out, meta, FLAGS.bootstrap)["markdown"])
    print(f"Files: {out}/RESULTS.md, comparison.png, results.json, episodes.jsonl")


if __name__ == "__main__":
    app.run(main)
