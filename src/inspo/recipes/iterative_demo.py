"""The iterative demo, as a library: SFT → offline DPO beside iterative DPO and iterative
InSPO-DPO (the policy samples, the gold reward judges, round after round) → evaluation.

All three preference stages start from the same SFT policy and train on the same number of
pairs (8,000: the offline demo's 250 steps × 32). The offline stage is the demo's DPO; the
iterative ones are ``inspo-iterate experiment=iterative_demo`` (5 rounds × 50 steps × 32). Each
final policy is evaluated as in the offline demo (256 held-out prompts, samples from the prompt
alone, gold reward, win rate against the SFT policy's samples); the iterative runs also record
their win rate after every round. Writes ``OUT/iterative_demo.json``, ``OUT/iterative_demo.png``
and one run folder per stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inspo.evaluation.sweep_report import label_rounds
from inspo.jsonio import write_json
from inspo.names import EVAL_WIN_RATE
from inspo.recipes.demo import LABELS, Stage, format_table, format_timings, run_stages
from inspo.settings import EvalConfig

NAMES = {**LABELS, "iterative_dpo": "iterative DPO", "iterative_inspo": "iterative InSPO-DPO"}


def stages(ecfg: EvalConfig) -> tuple[Stage, ...]:
    """Offline DPO, then iterative DPO and InSPO-DPO, each round evaluated as the end is."""
    every_round = tuple(
        f"eval.{k}={getattr(ecfg, k)}"
        for k in ("n_prompts", "max_new_tokens", "batch_size", "seed")
    )
    iterative = ("experiment=iterative_demo", *every_round)
    return (
        Stage("dpo", ("experiment=demo", "reflection=off")),
        Stage("iterative_dpo", (*iterative, "reflection=off"), "iterate"),
        Stage("iterative_inspo", (*iterative, "reflection=inspo"), "iterate"),
    )


def run_iterative_demo(out: Path, overrides: list[str], ecfg: EvalConfig) -> dict[str, Any]:
    """Run the iterative demo into ``out``; returns what it writes to iterative_demo.json."""
    report, summaries = run_stages(out, overrides, stages(ecfg), NAMES, ecfg)
    report["win_rate_per_round"] = curves = {
        name: [r[EVAL_WIN_RATE] for r in summaries[name]["rounds"] if EVAL_WIN_RATE in r]
        for name in ("iterative_dpo", "iterative_inspo")
    }
    write_json(out / "iterative_demo.json", report)
    plot_rounds(report["table"], curves, out / "iterative_demo.png")
    print("\n" + format_table(report["table"], NAMES))
    print("\n" + format_timings(report))
    minutes = report["seconds_total"] / 60
    print(f"\n{report['n_eval_prompts']} held-out prompts; total {minutes:.1f} min; wrote {out}")
    return report


def plot_rounds(table: dict[str, Any], curves: dict[str, list[float]], path: Path) -> None:
    """Win rate against SFT after each round, with offline DPO's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rates in curves.items():
        ax.plot(range(1, len(rates) + 1), rates, marker="o", label=NAMES[name])
    ax.axhline(table["dpo"]["win_rate_vs_sft"], color="tab:gray", ls="--", label="offline DPO")
    ax.axhline(0.5, color="lightgray", lw=1)
    label_rounds(ax, "round (1,600 pairs each)")
    ax.set_ylabel("gold win rate vs SFT")
    ax.set_ylim(0.3, 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
