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

import json
import time
from pathlib import Path
from typing import Any

from inspo.config import compose_config
from inspo.evaluation.stage import EvalConfig, eval_prompts
from inspo.models.load import load_tokenizer
from inspo.names import EVAL_WIN_RATE
from inspo.online.run import iterate
from inspo.recipes.demo import LABELS, evaluate_policies, format_table, train_stage

STAGES = ("dpo", "iterative_dpo", "iterative_inspo")
NAMES = {**LABELS, "iterative_dpo": "iterative DPO", "iterative_inspo": "iterative InSPO-DPO"}


def iterate_stage(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """One ``inspo-iterate`` run into ``out/name``; its summary, with the seconds it took."""
    t0 = time.perf_counter()
    print(f"\n=== stage {name}: {' '.join(overrides)}", flush=True)
    summary = iterate(compose_config(overrides, out / name, name="iterate"))
    summary["seconds"] = time.perf_counter() - t0
    return summary


def run_iterative_demo(
    out: Path,
    overrides: list[str],
    n_prompts: int = 256,
    max_new_tokens: int = 48,
    batch_size: int = 128,
    seed: int = 1234,
) -> dict[str, Any]:
    """Run the iterative demo into ``out``; returns what it writes to iterative_demo.json."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    common = ["logger=csv", *overrides]
    summaries = {"sft": train_stage("sft", ["experiment=sft", *common], out)}
    start = f"model.name_or_path={(out / 'sft' / 'policy').resolve()}"
    summaries["dpo"] = train_stage("dpo", ["experiment=demo", start, *common], out)
    per_round = [f"eval.n_prompts={n_prompts}", f"eval.max_new_tokens={max_new_tokens}",
                 f"eval.batch_size={batch_size}", f"eval.seed={seed}"]  # fmt: skip
    for name, reflection in (("iterative_dpo", "off"), ("iterative_inspo", "inspo")):
        stage = ["experiment=iterative_demo", f"reflection={reflection}", start, *per_round]
        summaries[name] = iterate_stage(name, [*stage, *common], out)

    cfg = compose_config(["experiment=demo", *common], out / "eval")
    prompts = eval_prompts(cfg, load_tokenizer(None))[:n_prompts]
    ecfg = EvalConfig(n_prompts=n_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      seed=seed)  # fmt: skip
    table, examples = evaluate_policies(out, prompts, ecfg, summaries, STAGES, NAMES)
    curves = {
        name: [r[EVAL_WIN_RATE] for r in summaries[name]["rounds"] if EVAL_WIN_RATE in r]
        for name in STAGES[1:]
    }
    seconds = time.perf_counter() - t0
    report = {
        "table": table,
        "win_rate_per_round": curves,
        "n_eval_prompts": len(prompts),
        "seconds_total": seconds,
        "stage_seconds": {k: v["seconds"] for k, v in summaries.items()},
        "overrides": overrides,
        "examples": examples,
    }
    (out / "iterative_demo.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_rounds(table, curves, out / "iterative_demo.png")
    print("\n" + format_table(table, NAMES))
    print(f"\n{len(prompts)} held-out prompts; total {seconds / 60:.1f} min; wrote {out}")
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
    ax.set_xlabel("round (1,600 pairs each)")
    ax.set_ylabel("gold win rate vs SFT")
    ax.set_ylim(0.3, 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
