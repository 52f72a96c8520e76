"""The invariance report of a sweep (``inspo-report``): invariance, made measurable.

Reads every run under SWEEP_DIR (each folder with a ``summary.json``; its ``.hydra/config.yaml``
and ``policy/`` when present), groups runs by objective family × reflection (plus any
``--group-by`` choice), and writes to SWEEP_DIR (or ``--out``):

- ``report.md`` / ``report.json``: per group and per metric (``eval/...`` and the validation
  accuracies), the mean, the spread (max − min) and the standard deviation (sample std,
  ddof = 1; 0 for one run) across the runs of the group, i.e. across its scalarization,
  reference and seed choices; and the group's *mutual divergence*: the mean, over every
  pair of its final policies, of the symmetric KL, KL(p‖q) + KL(q‖p), of their next-token
  distributions, averaged over the response positions of the eval prompts (prompt followed
  by the reference policy's sample from ``eval/reference_generations.json``; the prompt's
  last position alone when there is none). Smaller spread / divergence = more invariance.
- ``frontier.png``: gold (or RM) score of the policy's samples against Monte-Carlo
  KL(π_θ ‖ π_ref), one point per run; ``winrate_length.png``: win rate against mean length.
  Both need the evaluation stage's metrics (``eval.generate=true``); a plot without data is
  not drawn, and ``report.md`` says so instead.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inspo.jsonio import write_json
from inspo.names import (
    EOS_RATE,
    EVAL,
    EVAL_KL,
    EVAL_KL_SE,
    EVAL_LC_WIN_RATE,
    EVAL_LENGTH,
    EVAL_N_PROMPTS,
    EVAL_PLAIN_ACCURACY,
    EVAL_SCORE,
    EVAL_SECONDS,
    EVAL_VALID,
    EVAL_WIN_RATE,
    EVAL_WIN_RATE_HIGH,
    EVAL_WIN_RATE_LOW,
    PLAIN_ACCURACY,
    SCORES,
    SCORES_MARGIN,
    VIEW_ACCURACY,
)

SKIP_METRICS = (EVAL_SECONDS, EVAL_N_PROMPTS, EVAL_WIN_RATE_LOW, EVAL_WIN_RATE_HIGH, EVAL_KL_SE)
EXTRA_METRICS = (PLAIN_ACCURACY, VIEW_ACCURACY)
DEFAULT_GROUP = ("objective", "reflection")
# The summary table's columns, when a sweep has them: what the InSPO claims are about.
HEADLINE = (
    (EVAL_WIN_RATE, "win rate"),
    (EVAL_LC_WIN_RATE, "LC win rate"),
    (EVAL_SCORE, "gold score"),
    (EVAL_LENGTH, "length"),
    (EVAL_KL, "KL"),
    (EVAL_VALID, "valid"),
    (EVAL_PLAIN_ACCURACY, "pref. acc."),
)


# Iterative runs: the series over rounds that report.md tabulates and rounds.png draws.
ROUND_METRICS = (
    (EVAL_WIN_RATE, "win rate"),
    (EVAL_LC_WIN_RATE, "LC win rate"),
    (EVAL_KL, "KL"),
    (SCORES, "sample score"),
    (SCORES_MARGIN, "pair margin"),
    (EOS_RATE, "EOS rate"),
)


@dataclass(frozen=True)
class Plot:
    file: str
    x: str  # metric on the x axis
    y: str
    x_label: str
    y_label: str
    title: str


PLOTS = (
    Plot(
        "frontier.png",
        EVAL_KL,
        EVAL_SCORE,
        "KL(π_θ ‖ π_ref) (MC, nats)",
        "score of the policy's samples",
        "reward–KL frontier",
    ),
    Plot(
        "winrate_length.png",
        EVAL_LENGTH,
        EVAL_WIN_RATE,
        "mean length (bytes)",
        "win rate vs reference",
        "win rate vs mean length",
    ),
)


# --------------------------------------------------------------------------- reading
def load_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every run below ``sweep_dir``: ``{dir, name, status, choices, rounds, metrics, config}``,
    sorted by path."""
    from omegaconf import OmegaConf

    runs = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        d = path.parent
        s = json.loads(path.read_text())
        cfg_path = d / ".hydra" / "config.yaml"
        runs.append(
            {
                "dir": d,
                "name": str(d.relative_to(sweep_dir)),
                "status": s.get("status"),
                "error": s.get("error"),  # why a failed run failed
                "choices": s.get("choices", {}),
                "rounds": s.get("rounds", []),  # iterative runs: metrics after each round
                "metrics": s.get("metrics", {}),
                "config": OmegaConf.load(cfg_path) if cfg_path.exists() else None,
            }
        )
    return runs


def group_name(choices: dict[str, Any], keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        v = choices.get(k)
        if k == "objective":  # prefer the config name (dpo, ipo) when the sweep recorded it
            v = choices.get("objective_config") or v
        parts.append(str(v) if k in DEFAULT_GROUP else f"{k}={v}")
    return "/".join(parts)


def metric_names(runs: list[dict[str, Any]]) -> list[str]:
    names = {k for r in runs for k in r["metrics"] if k.startswith(EVAL) or k in EXTRA_METRICS}
    return sorted(n for n in names if n not in SKIP_METRICS)


def stats(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "spread": float("nan"), "std": float("nan"), "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "spread": max(vals) - min(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


# --------------------------------------------------------------------------- divergence
def divergence_inputs(runs: list[dict[str, Any]], n_prompts: int) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs: the reference's samples of the first run that has them,
    else the eval prompts of its config with no continuation."""
    for r in runs:
        f = r["dir"] / "eval" / "reference_generations.json"
        if f.exists():
            rows = json.loads(f.read_text())[:n_prompts]
            return [(x["instruction"], x["output"]) for x in rows]
    for r in runs:
        if r["config"] is not None:
            from inspo.data.sources import source_of
            from inspo.evaluation.stage import eval_prompts
            from inspo.models.load import load_tokenizer
            from inspo.settings import load_saved

            data = load_saved(r["config"]).data
            tok = load_tokenizer(str(r["dir"] / "policy"))
            return [(p, "") for p in eval_prompts(source_of(data), data, tok)[:n_prompts]]
    return []


@torch.no_grad()
def next_token_logprobs(model: Any, tokenizer: Any, inputs: list[tuple[str, str]]) -> torch.Tensor:
    """log π(· | x, y_<t) at every response position (t = 0..|y|−1; the last prompt position
    when y is empty), stacked over all inputs: [positions, vocab]."""
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for prompt, response in inputs:
        x = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        y = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
        ids = torch.tensor([x + y])
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        out.append(logits[len(x) - 1 : len(x) - 1 + max(len(y), 1)].log_softmax(-1))
    return torch.cat(out)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over positions of KL(p‖q) + KL(q‖p), from log-probabilities [positions, vocab]."""
    return float(((p.exp() - q.exp()) * (p - q)).sum(-1).mean())


def mutual_divergence(policy_dirs: list[Path], inputs: list[tuple[str, str]]) -> tuple[float, int]:
    """Mean symmetric KL over every pair of policies (nan with fewer than 2); and #pairs."""
    from inspo.models.load import load_policy, load_tokenizer

    dirs = [d for d in policy_dirs if d.exists()]
    if len(dirs) < 2 or not inputs:
        return float("nan"), 0
    logps = []
    for d in dirs:
        logps.append(next_token_logprobs(load_policy(str(d)), load_tokenizer(str(d)), inputs))
    pairs = list(itertools.combinations(range(len(dirs)), 2))
    return statistics.fmean(symmetric_kl(logps[i], logps[j]) for i, j in pairs), len(pairs)


# --------------------------------------------------------------------------- report
def build_report(
    runs: list[dict[str, Any]],
    group_by: tuple[str, ...] = DEFAULT_GROUP,
    divergence: bool = True,
    divergence_prompts: int = 64,
) -> dict[str, Any]:
    metrics = metric_names(runs)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(group_name(r["choices"], group_by), []).append(r)
    inputs = divergence_inputs(runs, divergence_prompts) if divergence else []
    out: dict[str, Any] = {"group_by": list(group_by), "metrics": metrics, "groups": {}}
    for name, members in groups.items():
        g = {
            "runs": [m["name"] for m in members],
            "varying": varying_choices(members),
            "metrics": {k: stats([m["metrics"].get(k) for m in members]) for k in metrics},
        }
        if divergence:
            g["divergence"], g["divergence_pairs"] = mutual_divergence(
                [m["dir"] / "policy" for m in members], inputs
            )
        if any(m["rounds"] for m in members):
            g["rounds"] = round_stats(members)
        out["groups"][name] = g
    out["runs"] = [
        {
            "name": r["name"],
            "group": group_name(r["choices"], group_by),
            "choices": r["choices"],
            "metrics": r["metrics"],
            "rounds": r["rounds"],
        }
        for r in runs
    ]
    return out


def round_stats(members: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per metric of :data:`ROUND_METRICS`, per round: its stats over the group's runs."""
    n = max(len(m["rounds"]) for m in members)
    out = {}
    for key, _ in ROUND_METRICS:
        series = [
            stats([m["rounds"][k].get(key) for m in members if k < len(m["rounds"])])
            for k in range(n)
        ]
        if any(s["n"] for s in series):
            out[key] = series
    return out


def varying_choices(members: list[dict[str, Any]]) -> dict[str, list]:
    """The choices that take more than one value inside a group (what its spread is across)."""
    keys = (
        "scalarization",
        "reference",
        "reference_context",
        "seed",
        "standard_weight",
        "distill_weight",
        "model",
        "iterate_reference",
    )
    out = {}
    for k in keys:
        vals = sorted({str(m["choices"].get(k)) for m in members})
        if len(vals) > 1:
            out[k] = vals
    return out


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Invariance report", ""]
    lines.append(f"Runs: {len(report['runs'])}; groups by {' × '.join(report['group_by'])}.")
    lines.append("Per metric: mean, spread (max − min), std (ddof 1) across the group's runs.")
    lines.append("")
    head = ["group", "runs", "divergence (sym. KL)"]
    lines.append("| " + " | ".join(head) + " | varying |")
    lines.append("|" + "---|" * (len(head) + 1))
    for name, g in report["groups"].items():
        vary = "; ".join(f"{k}: {','.join(v)}" for k, v in g["varying"].items())
        lines.append(f"| {name} | {len(g['runs'])} | {fmt(g.get('divergence'))} | {vary} |")
    lines += summary_table(report)
    for metric in report["metrics"]:
        lines += [
            "",
            f"## {metric}",
            "",
            "| group | mean | spread | std | n |",
            "|---|---|---|---|---|",
        ]
        for name, g in report["groups"].items():
            s = g["metrics"][metric]
            lines.append(
                f"| {name} | {fmt(s['mean'])} | {fmt(s['spread'])} | {fmt(s['std'])} | {s['n']} |"
            )
    lines += round_tables(report)
    lines += plot_lines(report)
    return "\n".join(lines)


def round_tables(report: dict[str, Any]) -> list[str]:
    """Iterative runs: per group, each series' mean (± std over the runs) after every round."""
    groups = {k: g for k, g in report["groups"].items() if g.get("rounds")}
    if not groups:
        return []
    lines = ["", "## Per round: mean ± std over the group's runs", ""]
    for name, g in groups.items():
        keys = [(k, label) for k, label in ROUND_METRICS if k in g["rounds"]]
        lines += [f"### {name}", "", "| round | " + " | ".join(label for _, label in keys) + " |"]
        lines.append("|---|" + "---|" * len(keys))
        for r in range(len(g["rounds"][keys[0][0]])):
            cells = []
            for k, _ in keys:
                s = g["rounds"][k][r]
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] else "—")
            lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![per round](rounds.png)", ""]
    return lines


def points(report: dict[str, Any], plot: Plot, group: str | None = None) -> list[tuple]:
    """(x, y) of every run (of ``group``) that has both metrics."""
    rs = [r for r in report["runs"] if group is None or r["group"] == group]
    pts = [(r["metrics"].get(plot.x), r["metrics"].get(plot.y)) for r in rs]
    return [(x, y) for x, y in pts if x is not None and y is not None]


def plot_lines(report: dict[str, Any]) -> list[str]:
    """Links to the plots that have data; for the others, what produces their data."""
    lines = [""]
    for p in PLOTS:
        if points(report, p):
            lines += [f"![{p.title}]({p.file})", ""]
        else:
            lines += [
                f"No {p.title} plot (`{p.file}`): no run has `{p.x}` and `{p.y}`. "
                "They come from the evaluation stage: train with `eval.generate=true`, "
                "or run `inspo-eval RUN_DIR` on each run.",
                "",
            ]
    return lines


def summary_table(report: dict[str, Any]) -> list[str]:
    """One row per group: each headline metric as mean (spread) over the group's runs."""
    cols = [(k, label) for k, label in HEADLINE if k in report["metrics"]]
    if not cols:
        return []
    lines = ["", "## Summary: mean (spread = max − min) per group", ""]
    lines.append("| group | n | " + " | ".join(label for _, label in cols) + " | divergence |")
    lines.append("|---|---|" + "---|" * (len(cols) + 1))
    for name, g in report["groups"].items():
        cells = []
        for k, _ in cols:
            m = g["metrics"][k]
            cells.append(f"{m['mean']:.3f} ({m['spread']:.3f})" if m["n"] else "—")
        div = fmt(g.get("divergence"))
        lines.append(f"| {name} | {len(g['runs'])} | " + " | ".join(cells) + f" | {div} |")
    return lines


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Draws each of :data:`PLOTS` that has data (an empty frame says nothing); returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = list(report["groups"])
    markers = "os^vDP*Xh"
    for p in (p for p in PLOTS if points(report, p)):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, gname in enumerate(groups):
            pts = points(report, p, gname)
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=gname, marker=markers[i % len(markers)])
        if p.y == EVAL_WIN_RATE:
            ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set_xlabel(p.x_label)
        ax.set_ylabel(p.y_label)
        ax.set_title(p.title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / p.file, dpi=110)
        plt.close(fig)
        paths.append(out / p.file)
    if any(g.get("rounds") for g in report["groups"].values()):
        paths.append(plot_rounds(report, out / "rounds.png"))
    return paths


def plot_rounds(report: dict[str, Any], path: Path) -> Path:
    """Win rate and the samples' score after each round: each run thin, each group's mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, (ROUND_METRICS[0], ROUND_METRICS[3]), strict=True):
        for i, (name, g) in enumerate(report["groups"].items()):
            colour = colours[i % len(colours)]
            for r in (r for r in report["runs"] if r["group"] == name):
                ys = [x.get(key) for x in r["rounds"]]
                ax.plot(range(1, len(ys) + 1), ys, color=colour, alpha=0.25, lw=0.8)
            means = [s["mean"] for s in g.get("rounds", {}).get(key, [])]
            ax.plot(range(1, len(means) + 1), means, color=colour, lw=2, marker="o", label=name)
        label_rounds(ax, "round")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label_rounds(ax: Any, label: str) -> None:
    """An x axis of rounds: ticks at whole rounds only (never 1.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def log_wandb(report: dict[str, Any], plots: list[Path], project: str = "inspo") -> None:
    import wandb

    run = wandb.init(project=project, job_type="report", config={"group_by": report["group_by"]})
    rows = []
    for name, g in report["groups"].items():
        for metric, s in g["metrics"].items():
            rows.append([name, metric, s["mean"], s["spread"], s["std"], s["n"]])
    table = wandb.Table(columns=["group", "metric", "mean", "spread", "std", "n"], data=rows)
    div = wandb.Table(
        columns=["group", "divergence"],
        data=[[n, g.get("divergence")] for n, g in report["groups"].items()],
    )
    run.log(
        {
            "report/metrics": table,
            "report/divergence": div,
            **{f"report/{p.stem}": wandb.Image(str(p)) for p in plots},
        }
    )
    run.finish()


def write_report(
    sweep_dir: Path,
    out: Path | None = None,
    group_by: tuple[str, ...] = (),
    divergence: bool = True,
    divergence_prompts: int = 64,
    wandb_project: str | None = None,
) -> tuple[dict[str, Any], str]:
    """``inspo-report``: build the report of every run under ``sweep_dir``, write report.json,
    report.md and the plots to ``out`` (default ``sweep_dir``); returns (report, markdown)."""
    runs = load_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    report = build_report(runs, DEFAULT_GROUP + group_by, divergence, divergence_prompts)
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    md = to_markdown(report)
    (out / "report.md").write_text(md + "\n")
    plots = plot(report, out)
    if wandb_project:
        log_wandb(report, plots, wandb_project)
    return report, md
