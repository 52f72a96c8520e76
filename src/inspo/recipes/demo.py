"""The main job, as a library: SFT → DPO and InSPO-DPO from the same SFT policy → evaluation.

Runs on the embedded default (tiny Llama, synthetic task; no downloads):
    1. SFT: ``experiment=sft`` trains the random-init model to imitate the task's responses.
    2. DPO and InSPO-DPO (``experiment=demo``, ``reflection=off`` / ``inspo``) start from the
       saved SFT policy, with the same seed, data and reference (the SFT policy).
    3. Evaluation on held-out prompts (:func:`inspo.evaluation.stage.evaluate`): every policy
       samples from the prompt alone with the same seed, the gold reward scores the samples,
       and win rates are against the SFT policy's samples on the same prompts. Held-out
       preference accuracy comes from each run's validation.
Writes ``OUT/demo.json``, ``OUT/demo.png`` and one run folder per stage; returns the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inspo.config import compose_config
from inspo.data.sources import source_of
from inspo.evaluation.metrics import preference_accuracy
from inspo.evaluation.stage import eval_prompts, evaluate, save
from inspo.jsonio import write_json
from inspo.models.load import load_policy, load_tokenizer
from inspo.names import (
    EVAL_KL,
    EVAL_LC_IDENTIFIED,
    EVAL_LC_WIN_RATE,
    EVAL_LENGTH,
    EVAL_LENGTH_REFERENCE,
    EVAL_PLAIN_ACCURACY,
    EVAL_REFLECTIVE_ACCURACY,
    EVAL_SCORE,
    EVAL_SCORE_REFERENCE,
    EVAL_WIN_RATE,
    EVAL_WIN_RATE_HIGH,
    EVAL_WIN_RATE_LOW,
)
from inspo.settings import EvalConfig, load_settings
from inspo.training.run import run

LABELS = {"sft": "SFT", "dpo": "DPO", "inspo": "InSPO-DPO"}


@dataclass(frozen=True)
class Stage:
    """A preference stage: a run from the SFT policy, with its app's overrides."""

    name: str
    overrides: tuple[str, ...]
    app: str = "train"  # train (inspo-train) | iterate (inspo-iterate)


DEMO = (
    Stage("dpo", ("experiment=demo", "reflection=off")),
    Stage("inspo", ("experiment=demo", "reflection=inspo")),
)


def train_stage(name: str, overrides: list[str], out: Path, app: str = "train") -> dict[str, Any]:
    """One run into ``out/name``: its summary, with the wall and CPU seconds it took."""
    from inspo.online.run import iterate

    t0, c0 = clocks()
    print(f"\n=== stage {name}: {' '.join(overrides)}", flush=True)
    fn = iterate if app == "iterate" else run
    summary = fn(compose_config(overrides, out / name, name=app))
    summary["seconds"] = time.perf_counter() - t0
    summary["cpu_seconds"] = time.process_time() - c0
    return summary


def clocks() -> tuple[float, float]:
    """Wall and CPU seconds (every thread of this process) now."""
    return time.perf_counter(), time.process_time()


def timings(
    start: tuple[float, float], at_eval: tuple[float, float], summaries: dict[str, Any]
) -> dict[str, Any]:
    """A recipe report's wall and CPU seconds: in all since ``start``, of the evaluation since
    ``at_eval`` (both :func:`clocks`), and of every training stage (its summary's)."""
    now = clocks()
    return {
        "seconds_total": now[0] - start[0],
        "cpu_seconds_total": now[1] - start[1],
        "seconds_eval": now[0] - at_eval[0],
        "cpu_seconds_eval": now[1] - at_eval[1],
        "stage_seconds": {k: v["seconds"] for k, v in summaries.items()},
        "stage_cpu_seconds": {k: v["cpu_seconds"] for k, v in summaries.items()},
    }


def run_stages(
    out: Path,
    overrides: list[str],
    stages: tuple[Stage, ...],
    labels: dict[str, str],
    ecfg: EvalConfig,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SFT, then every stage from the SFT policy, then every stage's policy evaluated against
    the SFT policy on the same held-out prompts: (report, the runs' summaries)."""
    out.mkdir(parents=True, exist_ok=True)
    began = clocks()
    common = ["logger=csv", *overrides]
    summaries = {"sft": train_stage("sft", ["experiment=sft", *common], out)}
    start = f"model.name_or_path={(out / 'sft' / 'policy').resolve()}"
    for st in stages:
        summaries[st.name] = train_stage(st.name, [*st.overrides, start, *common], out, st.app)
    data = load_settings(compose_config(["experiment=demo", *common], out / "eval")).data
    prompts = eval_prompts(source_of(data), data, load_tokenizer(None))[: ecfg.n_prompts]
    at_eval = clocks()
    names = tuple(st.name for st in stages)
    table, examples = evaluate_policies(out, prompts, ecfg, summaries, names, labels)
    report = {
        "table": table,
        "n_eval_prompts": len(prompts),
        **timings(began, at_eval, summaries),
        "overrides": overrides,
        "examples": examples,
    }
    return report, summaries


def evaluate_policies(
    out: Path,
    prompts: list[str],
    ecfg: EvalConfig,
    summaries: dict[str, Any],
    policies: tuple[str, ...] = ("dpo", "inspo"),
    labels: dict[str, str] = LABELS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each trained policy (``out/NAME/policy``) against the SFT policy, by the evaluation
    stage's own code: the table rows and a few example generations."""
    sft = load_policy(str(out / "sft" / "policy"))
    table: dict[str, Any] = {}
    examples = [{"prompt": p} for p in prompts[:8]]
    for name in policies:
        path = str(out / name / "policy")
        s = summaries[name]
        policy = load_policy(path)
        ev = evaluate(policy, sft, load_tokenizer(path), prompts, ecfg)
        ev.metrics = preference_accuracy(s["metrics"], s["choices"]["reflection"]) | ev.metrics
        device = next(policy.parameters()).device
        save(ev, out / name / "eval", ecfg, device, labels[name], reference_generator="SFT")
        m = ev.metrics
        table["sft"] = {
            "gold_reward": m[EVAL_SCORE_REFERENCE],
            "mean_length": m[EVAL_LENGTH_REFERENCE],
        }
        table[name] = {
            "gold_reward": m[EVAL_SCORE],
            "mean_length": m[EVAL_LENGTH],
            "win_rate_vs_sft": m[EVAL_WIN_RATE],
            "win_rate_ci95": [m[EVAL_WIN_RATE_LOW], m[EVAL_WIN_RATE_HIGH]],
            "lc_win_rate_vs_sft": m[EVAL_LC_WIN_RATE],
            "lc_identified": bool(m[EVAL_LC_IDENTIFIED]),
            "kl_to_sft": m[EVAL_KL],
            "pref_accuracy_plain": m.get(EVAL_PLAIN_ACCURACY),
            "pref_accuracy_reflective": m.get(EVAL_REFLECTIVE_ACCURACY),
            "train_seconds": s["seconds"],
        }
        for ex, row in zip(examples, ev.rows(), strict=False):
            ex["sft"], ex[name] = row["reference"], row["policy"]
    return {n: table[n] for n in ("sft", *policies)}, examples


def run_demo(out: Path, overrides: list[str], ecfg: EvalConfig) -> dict[str, Any]:
    """Run the demo into ``out``; returns what it writes to demo.json."""
    report, _ = run_stages(out, overrides, DEMO, LABELS, ecfg)
    write_json(out / "demo.json", report)
    plot(report["table"], out / "demo.png")
    print("\n" + format_table(report["table"]))
    print("\n" + format_timings(report))
    minutes = report["seconds_total"] / 60
    print(f"\n{report['n_eval_prompts']} held-out prompts; total {minutes:.1f} min; wrote {out}")
    return report


def format_table(table: dict[str, Any], labels: dict[str, str] = LABELS) -> str:
    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| policy | win rate vs SFT (95% CI) | LC win rate | gold reward | mean length (bytes) | pref. acc. plain | pref. acc. reflective |"  # noqa: E501
    lines = [head, "|" + "---|" * 7]
    for name, row in table.items():
        ci = row.get("win_rate_ci95")
        wr = f"{row['win_rate_vs_sft']:.3f} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "—"
        lines.append(
            f"| {labels[name]} | {wr} | {f(row.get('lc_win_rate_vs_sft'))} | "
            f"{f(row['gold_reward'])} | {f(row['mean_length'])} | "
            f"{f(row.get('pref_accuracy_plain'))} | {f(row.get('pref_accuracy_reflective'))} |"
        )
    return "\n".join(lines)


def format_timings(report: dict[str, Any]) -> str:
    """Where the time went, stage by stage: wall seconds, CPU seconds (every thread of this
    process) and their ratio. A machine that is slower at equal CPU % did more work per step
    (another kernel, another precision); one with a lower CPU % waited (load, memory, I/O)."""
    rows = [
        *(
            (name, report["stage_seconds"][name], report["stage_cpu_seconds"][name])
            for name in report["stage_seconds"]
        ),
        ("evaluation", report["seconds_eval"], report["cpu_seconds_eval"]),
        ("total", report["seconds_total"], report["cpu_seconds_total"]),
    ]
    lines = ["| stage | wall s | CPU s | CPU % |", "|---|---|---|---|"]
    lines += [f"| {n} | {w:.1f} | {c:.1f} | {100 * c / max(w, 1e-9):.0f} |" for n, w, c in rows]
    return "\n".join(lines)


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [st.name for st in DEMO]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    rates = [table[n]["win_rate_vs_sft"] for n in names]
    errs = [
        [r - table[n]["win_rate_ci95"][0] for n, r in zip(names, rates, strict=True)],
        [table[n]["win_rate_ci95"][1] - r for n, r in zip(names, rates, strict=True)],
    ]
    labels = [LABELS[n] for n in names]
    axes[0].bar(labels, rates, yerr=errs, capsize=4, color=["tab:blue", "tab:orange"])
    axes[0].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].set_title("gold win rate vs SFT")
    axes[0].set_ylim(0, 1)
    all_names = ["sft", *names]
    axes[1].bar([LABELS[n] for n in all_names], [table[n]["gold_reward"] for n in all_names])
    axes[1].set_title("mean gold reward")
    axes[2].bar([LABELS[n] for n in all_names], [table[n]["mean_length"] for n in all_names])
    axes[2].set_title("mean response length (bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
