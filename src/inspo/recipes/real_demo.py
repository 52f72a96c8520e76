"""The real recipe, as a library: reward models, offline and iterative DPO and InSPO-DPO from a
pretrained instruct model on HH-RLHF, judged by a reward model the loop never trained against.

Every stage starts from the same model (SmolLM2-135M-Instruct by default) and composes one of
the ``real_demo`` experiments, so each is also one ``inspo-train`` / ``inspo-iterate`` command:

    1. Reward models A and B (``experiment=real_demo_reward_model``) on parts 0 and 1 of HH's
       training rows (``data.source.train_parts=2``): no row in common, each one's accuracy on
       the same held-out rows (the ``val`` split).
    2. Offline DPO and InSPO-DPO (``experiment=real_demo``) on part 0's pairs.
    3. Iterative DPO and InSPO-DPO (``experiment=real_demo_iterative``) on part 0's prompts,
       with reward model A as the judge (``judge=reward_model``), at the offline pair budget.
    4. Evaluation on held-out prompts (the ``val`` rows' prompts, less any that a training row
       also has): every policy samples from the prompt alone with the start model's seed, and
       reward model B scores them: win rate against the start model (Wilson 95% interval),
       KL to it, mean length, and the samples of a few prompts.

Writes ``OUT/real_demo.json``, ``OUT/real_demo.md`` and one run folder per stage. A stage that
finished is not run again when the recipe is rerun into the same folder (``ckpt_path=last``).
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from inspo.config import compose_config
from inspo.data.rows import to_text
from inspo.data.sources import source_of
from inspo.evaluation.metrics import preference_accuracy, wilson_interval
from inspo.evaluation.scorers import make_scorer
from inspo.evaluation.stage import draw, eval_prompts, evaluate, initial_policy, save
from inspo.jsonio import write_json
from inspo.models.load import load_policy, model_tokenizer
from inspo.names import (
    ERROR,
    EVAL_KL,
    EVAL_KL_SE,
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
    REWARD_ACCURACY,
    VAL,
)
from inspo.recipes.demo import Stage, clocks, format_timings, timings, train_stage
from inspo.settings import EvalConfig, RunConfig, load_saved, load_settings
from inspo.training.reward import SAVED_AS

REWARD_MODELS = {
    "rm_a": "reward model A (the loop's judge)",
    "rm_b": "reward model B (the evaluation's judge)",
}
LABELS = {
    "start": "start",
    "dpo": "DPO",
    "inspo": "InSPO-DPO",
    "iterative_dpo": "iterative DPO",
    "iterative_inspo": "iterative InSPO-DPO",
}
POLICIES = ("dpo", "inspo", "iterative_dpo", "iterative_inspo")
N_EXAMPLES = 3
#: Groups only inspo-iterate composes: overrides of them reach the iterative stages alone.
ITERATE_ONLY = ("iterate", "generation", "judge", "pairing")


def stages(out: Path) -> tuple[Stage, ...]:
    """The recipe's runs, in order: the two reward models, then the four policies."""
    rm = "experiment=real_demo_reward_model"
    iterative = ("experiment=real_demo_iterative", f"judge.name_or_path={judge_path(out)}")
    return (
        Stage("rm_a", (rm, "data.source.train_part=0")),
        Stage("rm_b", (rm, "data.source.train_part=1")),
        Stage("dpo", ("experiment=real_demo", "reflection=off")),
        Stage("inspo", ("experiment=real_demo", "reflection=inspo")),
        Stage("iterative_dpo", (*iterative, "reflection=off"), "iterate"),
        Stage("iterative_inspo", (*iterative, "reflection=inspo"), "iterate"),
    )


def for_app(overrides: Sequence[str], app: str) -> list[str]:
    """The overrides a stage of ``app`` takes: those of the iterate-only groups
    (:data:`ITERATE_ONLY`) go to inspo-iterate's stages alone."""
    if app == "iterate":
        return list(overrides)
    return [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in ITERATE_ONLY]


def judge_path(out: Path) -> Path:
    """Reward model A, the loop's judge."""
    return (out / "rm_a" / SAVED_AS).resolve()


def scorer_path(out: Path) -> Path:
    """Reward model B, the evaluation's judge."""
    return (out / "rm_b" / SAVED_AS).resolve()


def run_real_demo(
    out: Path, overrides: Sequence[str], eval_settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the recipe into ``out`` with Hydra ``overrides`` for every stage (the model, the data
    file, sizes) and ``eval_settings`` over the experiment's ``eval.*``; returns what it writes
    to real_demo.json."""
    out.mkdir(parents=True, exist_ok=True)
    start, load0 = clocks(), os.getloadavg()
    common = ["logger=csv", "ckpt_path=last", *overrides]
    summaries: dict[str, dict[str, Any]] = {}
    for st in stages(out):
        summaries[st.name] = train_stage(
            st.name, [*st.overrides, *for_app(common, st.app)], out, st.app
        )
        # The checkpoint resumes an unfinished stage only; a finished one keeps its summary.
        shutil.rmtree(out / st.name / "checkpoints", ignore_errors=True)
    policy_cfg = compose_config(["experiment=real_demo", *for_app(common, "train")], out / "eval")
    settings = load_settings(policy_cfg)
    ecfg = replace(settings.eval, progress=False, **(eval_settings or {}))
    at_eval = clocks()
    prompts, dropped = held_out_prompts(out, settings, ecfg.n_prompts)
    table, examples = evaluate_policies(out, settings, prompts, ecfg, summaries)
    report = {
        "table": table,
        "reward_models": {n: reward_model_row(out / n, summaries[n]) for n in REWARD_MODELS},
        "n_eval_prompts": len(prompts),
        "eval_prompts_also_in_training": dropped,
        "eval": {k: getattr(ecfg, k) for k in ("max_new_tokens", "temperature", "seed")},
        **timings(start, at_eval, summaries),
        "machine": machine(),
        "load_average": {"start": list(load0), "end": list(os.getloadavg())},
        "overrides": list(overrides),
        "examples": examples,
    }
    write_json(out / "real_demo.json", report)
    (out / "real_demo.md").write_text(format_report(report))
    print("\n" + format_report(report))
    print(f"wrote {out}")
    return report


# --------------------------------------------------------------------------- data
def saved_settings(run_dir: Path) -> RunConfig:
    """The settings a finished stage ran with."""
    from omegaconf import OmegaConf

    return load_saved(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))


def train_prompts(settings: RunConfig, tokenizer: Any) -> set[str]:
    """The prompts of the rows a run's training split holds (all of them, not only those its
    steps drew), read as training reads them."""
    rows = source_of(settings.data)()[settings.data.train_split]
    texts = (to_text(r, tokenizer) for r in rows if ERROR not in r)
    return {t["prompt"] for t in texts if not isinstance(t, str)}


def held_out_prompts(out: Path, settings: RunConfig, n: int) -> tuple[list[str], int]:
    """The first ``n`` prompts of the held-out rows that no stage's training rows have (HH
    repeats a few dialogues), and how many were left out for that."""
    tokenizer = start_tokenizer(settings)
    seen: set[str] = set()
    for st in stages(out):
        seen |= train_prompts(saved_settings(out / st.name), tokenizer)
    prompts = eval_prompts(source_of(settings.data), settings.data, tokenizer)
    kept = [p for p in prompts if p not in seen]
    return kept[:n], len(prompts) - len(kept)


def start_tokenizer(settings: RunConfig) -> Any:
    return model_tokenizer(settings.model, settings.paths.cache)  # a GGUF file's, converted


# --------------------------------------------------------------------------- evaluation
def evaluate_policies(
    out: Path,
    settings: RunConfig,
    prompts: list[str],
    ecfg: EvalConfig,
    summaries: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each policy against the start model on ``prompts``, scored by reward model B: the table
    rows and the samples of the first few prompts. The start model samples once."""
    tokenizer = start_tokenizer(settings)
    start = initial_policy(settings.model, tokenizer, settings.paths.cache)
    scorer = make_scorer(str(scorer_path(out)), tokenizer)
    _, baseline = draw(start, tokenizer, prompts, ecfg, "sampling the start model")
    pairs = zip(prompts[:N_EXAMPLES], baseline[:N_EXAMPLES], strict=True)
    examples = [{"prompt": p, "start": s} for p, s in pairs]
    table: dict[str, Any] = {}
    for name in POLICIES:
        policy = load_policy(str(out / name / "policy"))
        ev = evaluate(
            policy, start, tokenizer, prompts, ecfg, scorer=scorer, reference_samples=baseline
        )
        device = next(policy.parameters()).device
        save(ev, out / name / "eval", ecfg, device, LABELS[name], reference_generator="start")
        m, s = ev.metrics, summaries[name]
        accuracy = preference_accuracy(s["metrics"], s["choices"]["reflection"])
        table["start"] = {"score": m[EVAL_SCORE_REFERENCE], "mean_length": m[EVAL_LENGTH_REFERENCE]}
        table[name] = {
            "score": m[EVAL_SCORE],
            "mean_length": m[EVAL_LENGTH],
            "win_rate_vs_start": m[EVAL_WIN_RATE],
            "win_rate_ci95": [m[EVAL_WIN_RATE_LOW], m[EVAL_WIN_RATE_HIGH]],
            "lc_win_rate_vs_start": m[EVAL_LC_WIN_RATE],
            "kl_to_start": m[EVAL_KL],
            "kl_se": m[EVAL_KL_SE],
            "pref_accuracy_plain": accuracy.get(EVAL_PLAIN_ACCURACY),
            "pref_accuracy_reflective": accuracy.get(EVAL_REFLECTIVE_ACCURACY),
            "train_seconds": s["seconds"],
        }
        for ex, row in zip(examples, ev.rows(), strict=False):
            ex[name] = row["policy"]
        del policy
    return {n: table[n] for n in ("start", *POLICIES)}, examples


def reward_model_row(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A reward model's held-out accuracy with its Wilson 95% interval, and its rows."""
    import json

    report = json.loads((run_dir / "data_report.json").read_text())
    n_val = report[VAL]["rows_used"]
    accuracy = summary["metrics"][REWARD_ACCURACY]
    settings = saved_settings(run_dir)
    return {
        "held_out_accuracy": accuracy,
        "accuracy_ci95": list(wilson_interval(accuracy * n_val, n_val)),
        "n_held_out": n_val,
        "train_part": settings.data.source["train_part"],
        "train_pairs": summary["steps"] * settings.data.batch_size,
        "train_seconds": summary["seconds"],
    }


# --------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    """The CPU model and the cores this process may use."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0))}


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: timing and machine, reward models, policies, samples."""

    def f(v: Any, digits: int = 3) -> str:
        return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    m, load = report["machine"], report["load_average"]
    lines = [
        f"{m['cpu']}, {m['cores']} cores; load average (1 min) {load['start'][0]:.1f} at the "
        f"start, {load['end'][0]:.1f} at the end. Wall {report['seconds_total'] / 60:.1f} min, "
        f"CPU {report['cpu_seconds_total'] / 60:.1f} min.",
        "",
        "| reward model | trained on | pairs | held-out accuracy (95% CI) | held-out pairs |",
        "|---|---|---|---|---|",
    ]
    for name, label in REWARD_MODELS.items():
        r = report["reward_models"][name]
        ci = r["accuracy_ci95"]
        lines.append(
            f"| {label} | part {r['train_part']} | {r['train_pairs']} | "
            f"{r['held_out_accuracy']:.3f} ({ci[0]:.2f}–{ci[1]:.2f}) | {r['n_held_out']} |"
        )
    lines += [
        "",
        f"Judged by reward model B on {report['n_eval_prompts']} held-out prompts "
        f"({report['eval']['max_new_tokens']} new tokens at most, temperature "
        f"{report['eval']['temperature']}):",
        "",
        "| policy | win rate vs start (95% CI) | LC win rate | RM B score | KL to start (± se) "
        "| mean length (bytes) | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["table"].items():
        if name == "start":
            lines.append(
                f"| {LABELS[name]} | — | — | {f(row['score'])} | — | {f(row['mean_length'], 1)} "
                "| — |"
            )
            continue
        ci = row["win_rate_ci95"]
        lines.append(
            f"| {LABELS[name]} | {row['win_rate_vs_start']:.3f} ({ci[0]:.2f}–{ci[1]:.2f}) | "
            f"{f(row['lc_win_rate_vs_start'])} | {f(row['score'])} | "
            f"{f(row['kl_to_start'])} ± {f(row['kl_se'])} | {f(row['mean_length'], 1)} | "
            f"{row['train_seconds'] / 60:.1f} |"
        )
    lines += ["", "Where the time went:", "", format_timings(report)]
    for i, ex in enumerate(report["examples"], 1):
        lines += ["", f"Prompt {i}: {quote(ex['prompt'])}", ""]
        lines += [f"- {LABELS[k]}: {quote(ex[k])}" for k in ("start", *POLICIES) if k in ex]
    return "\n".join(lines) + "\n"


def quote(text: str, limit: int = 300) -> str:
    """One line of Markdown code: newlines shown as ⏎, long texts cut."""
    one = text.strip().replace("\n", " ⏎ ").replace("`", "'")
    return f"`{one[:limit]}{'…' if len(one) > limit else ''}`"
