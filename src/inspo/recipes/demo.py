"""inspo-demo: the main job. SFT → DPO and InSPO-DPO from the same SFT policy → evaluation.

Runs on the embedded default (tiny Llama, synthetic task; no downloads):
    1. SFT: ``experiment=sft`` trains the random-init model to imitate the task's responses.
    2. DPO and InSPO-DPO (``experiment=demo``, ``reflection=off`` / ``inspo``) start from the
       saved SFT policy, with the same seed, data and reference (the SFT policy).
    3. Evaluation on held-out prompts: every policy samples from the prompt alone with the same
       seed; the gold reward scores the samples; win rates are against the SFT policy's samples
       on the same prompts. Held-out preference accuracy comes from each run's validation.
Writes ``OUT/demo.json``, ``OUT/demo.png`` and one run folder per stage; prints a table.

    inspo-demo                       # logs/demo/<timestamp>
    inspo-demo --out DIR seed=1      # trailing words are Hydra overrides for every stage
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from inspo.evaluation.stage import eval_prompts
from inspo.evaluation.metrics import length_controlled_win_rate, score, win_rate
from inspo.models.load import load_policy, load_tokenizer
from inspo.models.sampling import SamplingConfig, sample
from inspo.data.synthetic import gold_reward
from inspo.training.run import compose_config, run

log = logging.getLogger(__name__)

POLICIES = ("dpo", "inspo")
LABELS = {"sft": "SFT", "dpo": "DPO", "inspo": "InSPO-DPO"}


def train_stage(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    print(f"\n=== stage {name}: {' '.join(overrides)}", flush=True)
    cfg = compose_config(overrides, out / name)
    summary = run(cfg)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def evaluate_policies(
    out: Path, prompts: list[str], seed: int, max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Sample every policy on the same prompts with the same seed; score with the gold reward."""
    results: dict[str, Any] = {}
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed)
    for name in ("sft", *POLICIES):
        path = str(out / name / "policy")
        model, tok = load_policy(path), load_tokenizer(path)
        groups = sample(model, tok, prompts, sampling, batch_size=batch_size, progress=True,
                        desc=f"sampling {name}")  # fmt: skip
        samples = [g[0].text for g in groups]
        results[name] = {
            "samples": samples,
            "gold": score(gold_reward, prompts, samples),
            "length": [len(s.encode()) for s in samples],
        }
    return results


def summarise(results: dict[str, Any], summaries: dict[str, Any]) -> dict[str, Any]:
    base = results["sft"]
    table: dict[str, Any] = {}
    for name in ("sft", *POLICIES):
        r = results[name]
        row: dict[str, Any] = {
            "gold_reward": sum(r["gold"]) / len(r["gold"]),
            "mean_length": sum(r["length"]) / len(r["length"]),
        }
        if name != "sft":
            wr = win_rate(r["gold"], base["gold"])
            lc = length_controlled_win_rate(r["gold"], base["gold"], r["length"], base["length"])
            row |= {
                "win_rate_vs_sft": wr.rate,
                "win_rate_ci95": [wr.low, wr.high],
                "lc_win_rate_vs_sft": lc.rate,
                "lc_identified": lc.identified,  # False: no length variation, rate is the raw one
            }
            m = summaries[name]["metrics"]
            row["pref_accuracy_plain"] = m.get("val/plain/rewards/accuracies")
            if summaries[name]["choices"]["reflection"] != "off":
                row["pref_accuracy_reflective"] = m.get("val/rewards/accuracies")
            row["train_seconds"] = summaries[name]["seconds"]
        table[name] = row
    return table


def format_table(table: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| policy | win rate vs SFT (95% CI) | LC win rate | gold reward | mean length (bytes) | pref. acc. plain | pref. acc. reflective |"  # noqa: E501
    lines = [head, "|" + "---|" * 7]
    for name, row in table.items():
        ci = row.get("win_rate_ci95")
        wr = f"{row['win_rate_vs_sft']:.3f} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "—"
        lines.append(
            f"| {LABELS[name]} | {wr} | {f(row.get('lc_win_rate_vs_sft'))} | "
            f"{f(row['gold_reward'])} | {f(row['mean_length'])} | "
            f"{f(row.get('pref_accuracy_plain'))} | {f(row.get('pref_accuracy_reflective'))} |"
        )
    return "\n".join(lines)


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(POLICIES)
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``inspo-demo``); exits 0 on success."""
    run_demo(argv)


def run_demo(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns what it writes to demo.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage")
    args = parser.parse_args(argv)
    out = args.out or Path("logs/demo") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    t0 = time.perf_counter()

    common = ["logger=csv", *args.overrides]
    summaries = {"sft": train_stage("sft", ["experiment=sft", *common], out)}
    start = f"model.name_or_path={(out / 'sft' / 'policy').resolve()}"
    for name, reflection in (("dpo", "off"), ("inspo", "inspo")):
        stage = ["experiment=demo", f"reflection={reflection}", start, *common]
        summaries[name] = train_stage(name, stage, out)

    cfg = compose_config(["experiment=demo", *common], out / "eval")
    prompts = eval_prompts(cfg, load_tokenizer(None))[: args.eval_prompts]
    t_eval = time.perf_counter()
    results = evaluate_policies(
        out, prompts, args.eval_seed, args.max_new_tokens, args.eval_batch_size
    )
    table = summarise(results, summaries)
    seconds = time.perf_counter() - t0
    report = {
        "table": table,
        "n_eval_prompts": len(prompts),
        "seconds_total": seconds,
        "seconds_eval": time.perf_counter() - t_eval,
        "stage_seconds": {k: v["seconds"] for k, v in summaries.items()},
        "overrides": args.overrides,
        "examples": [
            {"prompt": p, **{n: results[n]["samples"][i] for n in ("sft", *POLICIES)}}
            for i, p in enumerate(prompts[:8])
        ],
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(table, out / "demo.png")
    print("\n" + format_table(table))
    print(f"\n{len(prompts)} held-out prompts; total {seconds / 60:.1f} min; wrote {out}/demo.json")
    return report


if __name__ == "__main__":
    main()
