"""The tuned head-to-head of two methods (``inspo-report DIR --head-to-head``).

A fair comparison gives each method the same tuning budget on a validation signal that is not
the test signal, then judges the best configuration of each on the test prompts over several
seeds. The folder DIR (``benchmarks/fair.sh`` lays it out) holds:

- tuning trials: runs scored on the tuning prompts (``choices.eval_split == "tune"``), one
  search per method, e.g. ``DIR/tune/dpo/0 … 19`` and ``DIR/tune/inspo/0 … 19``;
- test runs, in one subfolder per *setting*: ``DIR/tuned/`` (each method's best trial rerun
  with several seeds) and, for contrast, ``DIR/untuned/`` (the baseline's hyperparameters for
  both), each scored on the test prompts. Runs without an evaluation (the SFT starts in
  ``DIR/sft/``) are neither.

A method is a run's objective × reflection (``dpo/off``, ``dpo/inspo``), as in the invariance
report; the baseline is the standard form (reflection ``off``). Per setting, the two methods'
runs are paired by seed when they share the SFT start and the data: the same prompts and the
same reference samples (the evaluation samples the start with a fixed seed). For each metric
the report gives the difference (method − baseline) with two 95% intervals that answer two
questions:

- **between seeds**: a Student-t interval over the per-seed differences: would another training
  run (another SFT start, data order and sampling) give the same gap? Each per-seed difference
  also carries that seed's prompt-sampling noise, so this is the interval to judge a method by.
- **within runs**: a paired bootstrap over prompts, resampling each seed's prompts (the same
  draw for both methods) and averaging over seeds: how sure the gap is on these trained
  policies, given a finite prompt set. It ignores training randomness and is narrower.

The bootstrap needs per-prompt scores (each run's ``eval/samples.json``): the win rate
against the SFT start, the gold score, the length and the *direct* win rate (the method's
sample against the baseline's on the same prompt, ties ½). The LC win rate, KL, validity and
preference accuracy come from ``summary.json`` and get the t-interval only.

A run that failed (diverged, or its policy collapsed) counts: a failed trial against its
search's budget, a failed test run by name where its seed is left out of the pairing. A run
folder that holds no ``summary.json`` at all (a process killed, or a failure older code did
not record) counts as failed too; it takes its method from the runs beside it.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from inspo.evaluation.sweep_report import DEFAULT_GROUP, group_name, load_runs
from inspo.jsonio import write_json
from inspo.names import (
    EVAL_KL,
    EVAL_LC_WIN_RATE,
    EVAL_LENGTH,
    EVAL_PLAIN_ACCURACY,
    EVAL_SCORE,
    EVAL_VALID,
    EVAL_WIN_RATE,
    TUNE_SPLIT,
)

#: The choices a search may vary: a trial's configuration is the ones its search did vary.
TUNABLE = (
    "beta",
    "lr",
    "reference_context",
    "standard_weight",
    "distill_weight",
    "scalarization",
    "gamma",
    "reference",
    "iterate_reference",
    "max_steps",
)
#: Overrides whose run choice is not named by their last part.
CHOICE_OF = {"iterate.reference": "iterate_reference"}
#: (key, label, per-prompt quantity or None): the compared metrics. A per-prompt quantity is
#: read from eval/samples.json and gets the bootstrap interval too.
METRICS = (
    (EVAL_WIN_RATE, "win rate vs SFT", "win"),
    ("direct", "direct win rate vs the baseline", "direct"),
    (EVAL_LC_WIN_RATE, "LC win rate", None),
    (EVAL_SCORE, "gold score", "score"),
    (EVAL_LENGTH, "length (bytes)", "length"),
    (EVAL_KL, "KL to SFT", None),
    (EVAL_VALID, "valid", None),
    (EVAL_PLAIN_ACCURACY, "pref. acc.", None),
)
LEVEL = 0.95
N_BOOTSTRAP = 10_000
#: A best value this close to a bound of its searched range (a share of the range's width, on
#: the log scale for a log-scaled range) is flagged: the optimum may lie outside the range.
EDGE = 0.05


# --------------------------------------------------------------------------- statistics
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t (0.5 < q < 1), by bisection on :func:`t_cdf`."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2.0


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean; nan bounds with fewer than 2."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n < 2:
        return (mean, math.nan, math.nan)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return (mean, mean - half, mean + half)


def paired_bootstrap(
    diffs: Sequence[Sequence[float]],
    level: float = LEVEL,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of each seed's mean per-prompt difference,
    resampling each seed's prompts with replacement (one draw serves both methods: ``diffs``
    are already paired by prompt)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n_boot, dtype=torch.float64)
    for d in diffs:
        x = torch.tensor(list(d), dtype=torch.float64)
        idx = torch.randint(len(x), (n_boot, len(x)), generator=gen)
        total += x[idx].mean(1)
    stat = total / len(diffs)
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(stat, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(low), float(high)


# --------------------------------------------------------------------------- reading
def method_of(run: dict[str, Any]) -> str:
    return group_name(run["choices"], DEFAULT_GROUP)


def setting_of(run: dict[str, Any]) -> str:
    """The subfolder of DIR the run is in (``tuned``, ``untuned``, ...)."""
    return Path(run["name"]).parts[0] if len(Path(run["name"]).parts) > 1 else "."


def trial_number(run: dict[str, Any]) -> int:
    """A Hydra multirun job's number (its folder's name), else -1."""
    name = Path(run["name"]).name
    return int(name) if name.isdigit() else -1


def configuration(run: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: run["choices"].get(k) for k in keys}


def choice_key(override: str) -> str:
    """The run choice an override sets: ``optim.lr`` -> ``lr`` (:data:`CHOICE_OF` where the
    last part is not its name)."""
    return CHOICE_OF.get(override, override.rsplit(".", 1)[-1])


def failed_run(run: dict[str, Any]) -> bool:
    return run["status"] != "finished"


def why(run: dict[str, Any]) -> str:
    """A failed run's error, its first line, shortened."""
    error = (run.get("error") or "no error recorded").splitlines()[0]
    return error if len(error) <= 160 else error[:157] + "..."


def unrecorded_runs(head_dir: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run folders (a ``.hydra`` folder) under ``head_dir`` without a summary.json, as failed
    runs: their method and fixed choices from the runs beside them (a search's trials, or a
    setting's seeds, share their method), what their own overrides set (seed, the searched
    values) on top; what the runs beside them vary and the overrides do not name is unknown
    (None)."""
    from omegaconf import OmegaConf

    recorded = {r["dir"] for r in runs}
    out = []
    for hydra in sorted(Path(head_dir).rglob(".hydra")):
        d = hydra.parent
        if d in recorded or not (hydra / "overrides.yaml").exists():
            continue
        beside = [r for r in runs if r["dir"].parent == d.parent]
        if not beside:
            continue
        # What the runs beside it vary, only as far as its own overrides say (unknown else).
        varied = {k for k in TUNABLE if len({str(r["choices"].get(k)) for r in beside}) > 1}
        choices = {k: None if k in varied else v for k, v in beside[0]["choices"].items()}
        for item in OmegaConf.load(hydra / "overrides.yaml"):
            key, _, value = str(item).lstrip("+~").partition("=")
            name = choice_key(key)
            if name in choices or key == "seed":
                try:
                    choices[name] = json.loads(value)
                except ValueError:
                    choices[name] = value
        out.append({
            "dir": d, "name": str(d.relative_to(head_dir)), "status": "failed",
            "error": "no summary.json: it stopped (or is still running) before recording an end",
            "choices": choices, "rounds": [], "metrics": {}, "config": None,
        })  # fmt: skip
    return out


def read_samples(run: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The final evaluation's samples: RUN/eval/samples.json, or an iterative run's last
    evaluated round's (RUN/rounds/NNN/eval/samples.json)."""
    paths = [run["dir"] / "eval" / "samples.json"]
    paths += sorted(run["dir"].glob("rounds/*/eval/samples.json"), reverse=True)
    path = next((p for p in paths if p.exists()), None)
    return json.loads(path.read_text()) if path is not None else None


def sweeper_params(run: dict[str, Any]) -> dict[str, str]:
    """What a trial's search drew, read from the trial's own Hydra config
    (``RUN/.hydra/hydra.yaml``: ``hydra.sweeper.params``): ``{choice key: its distribution}``,
    the choice key being the override's last part (``optim.lr`` -> ``lr``); empty when the run
    has none (a copied folder)."""
    from omegaconf import OmegaConf

    path = run["dir"] / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    sweeper = OmegaConf.load(path).hydra.get("sweeper") or {}
    params = sweeper.get("params") or {}
    return {choice_key(k): str(v) for k, v in params.items()}


def search_space(run: dict[str, Any]) -> dict[str, tuple[float, float, bool]]:
    """The numeric ranges of :func:`sweeper_params` (``tag(log, interval(a, b))``,
    ``interval(a, b)``): ``{choice key: (low, high, log scale)}``."""
    out = {}
    for key, spec in sweeper_params(run).items():
        found = re.search(r"interval\(\s*([^,\s]+)\s*,\s*([^)\s]+)\s*\)", spec)
        if found:
            out[key] = (float(found[1]), float(found[2]), "log" in spec)
    return out


def at_edge(value: float, low: float, high: float, log: bool) -> str | None:
    """``"low"`` or ``"high"`` when ``value`` lies within :data:`EDGE` of that bound."""
    scale = math.log if log else float
    position = (scale(value) - scale(low)) / (scale(high) - scale(low))
    return "low" if position < EDGE else "high" if position > 1 - EDGE else None


def wins(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


# --------------------------------------------------------------------------- tuning
def tuning_summary(trials: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: its trials in order, what its search varied, the best finished trial (the
    highest tuning win rate; the earliest on a tie, as Optuna picks it)."""
    out: dict[str, Any] = {}
    for method in (m for m in methods if any(method_of(r) == m for r in trials)):
        runs = sorted((r for r in trials if method_of(r) == method), key=trial_number)
        varied = [k for k in TUNABLE if len({str(r["choices"].get(k)) for r in runs}) > 1]
        # What the search drew (from its config), else what its trials show it varied.
        searched = list(sweeper_params(runs[0])) or varied
        rows = []
        for r in runs:
            value = r["metrics"].get(EVAL_WIN_RATE)
            ok = r["status"] == "finished" and value is not None and not math.isnan(value)
            rows.append(
                {
                    "trial": trial_number(r),
                    "name": r["name"],
                    "status": r["status"] if ok else "failed",
                    "error": None if ok else why(r),
                    "value": value if ok else None,
                    # the evaluation's Wilson 95% interval of the win rate (prompt noise)
                    "low": r["metrics"].get(f"{EVAL_WIN_RATE}_low") if ok else None,
                    "high": r["metrics"].get(f"{EVAL_WIN_RATE}_high") if ok else None,
                    "config": configuration(r, varied),
                    "searched_config": configuration(r, searched),
                    "seed": r["choices"].get("seed"),
                }
            )
        done = [t for t in rows if t["value"] is not None]
        best = max(done, key=lambda t: t["value"]) if done else None
        # Other trials the tuning prompts cannot tell from the best: inside its interval.
        close = [
            t["trial"]
            for t in done
            if t is not best and best.get("low") is not None and t["value"] >= best["low"]
        ]
        space = search_space(runs[0]) if runs else {}
        edges = {}
        for key, (low, high, log) in space.items():
            value = (best or {}).get("config", {}).get(key)
            side = at_edge(value, low, high, log) if isinstance(value, int | float) else None
            if side:
                edges[key] = {"value": value, "side": side, "range": [low, high], "log": log}
        out[method] = {
            "trials": rows,
            "n_trials": len(rows),
            "n_failed": len(rows) - len(done),
            "varied": varied,
            "searched": searched,
            "best": best,
            "within_best_interval": close,
            "space": {k: list(v) for k, v in space.items()},
            "best_at_edge": edges,
        }
    counts = {m: s["n_trials"] for m, s in out.items()}
    return {"methods": out, "equal_trials": len(set(counts.values())) <= 1, "counts": counts}


# --------------------------------------------------------------------------- test runs
def pair_runs(
    base: list[dict[str, Any]], other: list[dict[str, Any]]
) -> tuple[list[tuple[int, dict, dict]], list[str]]:
    """(seed, baseline run, method run) for each seed both have, and why any seed was left
    out: missing in one method, more than one run, or not the same prompts and SFT samples."""
    by_seed: dict[str, dict[int, list[dict]]] = {"base": {}, "other": {}}
    for key, runs in (("base", base), ("other", other)):
        for r in runs:
            by_seed[key].setdefault(r["choices"].get("seed"), []).append(r)
    pairs, left_out = [], []
    for seed in sorted(set(by_seed["base"]) | set(by_seed["other"]), key=str):
        a, b = by_seed["base"].get(seed, []), by_seed["other"].get(seed, [])
        if len(a) != 1 or len(b) != 1:
            left_out.append(f"seed {seed}: {len(a)} baseline and {len(b)} method runs")
            continue
        failed = [(who, r) for who, r in (("baseline", a[0]), ("method", b[0])) if failed_run(r)]
        if failed:
            left_out += [f"seed {seed}: the {who}'s run failed ({why(r)})" for who, r in failed]
            continue
        sa, sb = read_samples(a[0]), read_samples(b[0])
        if sa is None or sb is None:
            left_out.append(f"seed {seed}: no eval/samples.json")
            continue
        same = [(x["prompt"], x["reference"]) for x in sa] == [
            (x["prompt"], x["reference"]) for x in sb
        ]
        if not same:
            left_out.append(f"seed {seed}: different prompts or SFT samples (not the same start)")
            continue
        pairs.append((seed, a[0], b[0]))
    return pairs, left_out


def per_prompt(base: list[dict], other: list[dict], quantity: str) -> tuple[list, list]:
    """The baseline's and the method's per-prompt values of ``quantity`` on one seed."""
    if quantity == "win":
        return (
            [wins(r["policy_score"], r["reference_score"]) for r in base],
            [wins(r["policy_score"], r["reference_score"]) for r in other],
        )
    if quantity == "score":
        return [r["policy_score"] for r in base], [r["policy_score"] for r in other]
    if quantity == "length":
        return [len(r["policy"].encode()) for r in base], [len(r["policy"].encode()) for r in other]
    if quantity == "direct":  # the method's sample against the baseline's; parity is 0.5
        return [0.5] * len(base), [
            wins(o["policy_score"], b["policy_score"]) for b, o in zip(base, other, strict=True)
        ]
    raise ValueError(quantity)


def compare(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """The paired comparison of two methods' test runs (see the module docstring)."""
    pairs, left_out = pair_runs(base, other)
    out: dict[str, Any] = {"seeds": [p[0] for p in pairs], "left_out": left_out, "metrics": {}}
    samples = [(read_samples(a), read_samples(b)) for _, a, b in pairs]
    for key, label, quantity in METRICS:
        if quantity is not None:
            values = [per_prompt(sa, sb, quantity) for sa, sb in samples]
            base_v = [statistics.fmean(a) for a, _ in values]
            other_v = [statistics.fmean(b) for _, b in values]
        else:
            base_v = [a["metrics"].get(key) for _, a, _ in pairs]
            other_v = [b["metrics"].get(key) for _, _, b in pairs]
            if any(v is None for v in base_v + other_v):
                continue
        diffs = [b - a for a, b in zip(base_v, other_v, strict=True)]
        mean, low, high = t_interval(diffs)
        m: dict[str, Any] = {
            "label": label,
            "baseline": base_v,
            "method": other_v,
            "diff": mean,
            "t_low": low,
            "t_high": high,
            "behind": sum(d < 0 for d in diffs),
            "ahead": sum(d > 0 for d in diffs),
        }
        if quantity is not None and pairs:
            m["boot_low"], m["boot_high"] = paired_bootstrap(
                [[y - x for x, y in zip(a, b, strict=True)] for a, b in values]
            )
        out["metrics"][key] = m
    return out


def is_best(runs: list[dict[str, Any]], tuning: dict[str, Any] | None) -> bool:
    """Whether every run uses its search's best configuration (on what the search drew)."""
    best = (tuning or {}).get("best")
    if not runs or best is None:
        return False
    keys = tuning["searched"]
    return all(configuration(r, keys) == best["searched_config"] for r in runs)


def setting_summary(
    runs: list[dict[str, Any]], baseline: str, method: str, tuning: dict[str, Any]
) -> dict[str, Any]:
    """One setting's test runs: each method's configuration(s), whether it is its search's best,
    and the paired comparison."""
    out: dict[str, Any] = {"configs": {}, "best": {}}
    searched = [k for k in TUNABLE if any(k in s["varied"] for s in tuning["methods"].values())]
    for name in (baseline, method):
        rs = [r for r in runs if method_of(r) == name]
        keys = searched or TUNABLE  # what the searches chose, else everything tunable
        configs = sorted({json.dumps(configuration(r, keys), sort_keys=True) for r in rs})
        out["configs"][name] = [json.loads(c) for c in configs]
        out["best"][name] = is_best(rs, tuning["methods"].get(name))
    base = [r for r in runs if method_of(r) == baseline]
    out["comparison"] = compare(base, [r for r in runs if method_of(r) == method])
    return out


def build(head_dir: str | Path) -> dict[str, Any]:
    """The head-to-head of every run under ``head_dir`` (see the module docstring)."""
    runs = load_runs(head_dir)
    if not runs:
        raise FileNotFoundError(f"no summary.json under {head_dir}")
    runs += unrecorded_runs(Path(head_dir), runs)
    trials = [r for r in runs if r["choices"].get("eval_split") == TUNE_SPLIT]
    # Test runs are the others that were evaluated (not the SFT starts beside them), and those
    # of the same methods that failed.
    tests = [r for r in runs if r not in trials and EVAL_WIN_RATE in r["metrics"]]
    methods = sorted({method_of(r) for r in trials + tests})
    tests += [
        r
        for r in runs
        if r not in trials and r not in tests and failed_run(r) and method_of(r) in methods
    ]
    if len(methods) != 2:
        raise ValueError(f"a head-to-head compares two methods; {head_dir} has {methods}")
    offs = [m for m in methods if m.endswith("/off")]
    baseline = offs[0] if len(offs) == 1 else methods[0]
    method = next(m for m in methods if m != baseline)
    report: dict[str, Any] = {
        "baseline": baseline,
        "method": method,
        "tuning": tuning_summary(trials, (baseline, method)),
        "settings": {},
    }
    for setting in sorted({setting_of(r) for r in tests}):
        members = [r for r in tests if setting_of(r) == setting]
        report["settings"][setting] = setting_summary(members, baseline, method, report["tuning"])
    return report


# --------------------------------------------------------------------------- writing
def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v, 3)}" for k, v in config.items() if v is not None)


def to_markdown(report: dict[str, Any]) -> str:
    base, method = report["baseline"], report["method"]
    lines = [f"# Head-to-head: {method} against {base}", ""]
    lines += tuning_lines(report["tuning"])
    for setting, s in report["settings"].items():
        lines += setting_lines(setting, s, base, method)
    return "\n".join(lines)


def tuning_lines(tuning: dict[str, Any]) -> list[str]:
    if not tuning["methods"]:
        return []
    counts = ", ".join(f"{m} {n}" for m, n in tuning["counts"].items())
    verdict = "equal" if tuning["equal_trials"] else "**NOT EQUAL: the budgets differ**"
    lines = [
        "## Tuning (win rate vs SFT on the tuning prompts)",
        "",
        f"Trials per method: {counts} ({verdict}).",
        "",
        "| method | trials | failed | searched | best trial | its tuning win rate (95%) | "
        "trials inside that interval | its configuration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, s in tuning["methods"].items():
        best = s["best"] or {}
        interval = ""
        if best.get("low") is not None:
            interval = f" ({fmt(best['low'])}–{fmt(best['high'])})"
        close = s.get("within_best_interval", [])
        lines.append(
            f"| {m} | {s['n_trials']} | {s['n_failed']} | {', '.join(s['varied'])} | "
            f"{best.get('trial', '—')} | {fmt(best.get('value'))}{interval} | "
            f"{len(close)}{' (' + ', '.join(map(str, close)) + ')' if close else ''} | "
            f"{config_text(best.get('config', {}))} |"
        )
    for m, s in tuning["methods"].items():
        for key, e in s.get("best_at_edge", {}).items():
            low, high = e["range"]
            lines += [
                "",
                f"**{m}'s best {key} ({fmt(e['value'])}) lies at the {e['side']} end of its "
                f"searched range [{fmt(low)}, {fmt(high)}]{' (log scale)' if e['log'] else ''}: "
                "the best value may lie outside it; a wider range would tell.**",
            ]
    for m, s in tuning["methods"].items():
        head = " | ".join(["trial", "tuning win rate", *s["varied"]])
        lines += [
            "",
            f"### {m}: every trial",
            "",
            f"| {head} |",
            "|---" * (2 + len(s["varied"])) + "|",
        ]
        for t in s["trials"]:
            value = fmt(t["value"]) if t["status"] != "failed" else f"failed: {t['error']}"
            cells = [str(t["trial"]), value, *(fmt(t["config"][k]) for k in s["varied"])]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def setting_lines(setting: str, s: dict[str, Any], base: str, method: str) -> list[str]:
    c = s["comparison"]
    lines = [f"## {setting}: the test prompts, {len(c['seeds'])} paired seeds", ""]
    for m in (base, method):
        best = " (its search's best trial)" if s["best"][m] else ""
        lines.append(f"- {m}{best}: " + "; ".join(config_text(x) for x in s["configs"][m]))
    if c["left_out"]:
        lines.append(f"- left out of the pairing: {'; '.join(c['left_out'])}")
    lines += [
        "",
        f"Difference {method} − {base}: mean over seeds, with 95% intervals: Student t over the "
        "per-seed differences (another training run), and a paired bootstrap over prompts within "
        "seeds (these policies, a finite prompt set). The direct win rate is the method's sample "
        "against the baseline's on the same prompt (0.5: parity); its columns give the rate.",
        "",
        f"| metric | {base} | {method} | difference | t-interval (seeds) | "
        "bootstrap (prompts) | seeds behind / ahead |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, m in c["metrics"].items():
        shift = 0.5 if key == "direct" else 0.0
        b_mean = "—" if key == "direct" else fmt(mean_or_nan(m["baseline"]))
        t_int = f"{fmt(m['t_low'] + shift)} to {fmt(m['t_high'] + shift)}"
        boot = "—"
        if "boot_low" in m:
            boot = f"{fmt(m['boot_low'] + shift)} to {fmt(m['boot_high'] + shift)}"
        lines.append(
            f"| {m['label']} | {b_mean} | {fmt(mean_or_nan(m['method']))} | "
            f"{fmt(m['diff'] + shift)} | {t_int} | {boot} | {m['behind']} / {m['ahead']} |"
        )
    if EVAL_WIN_RATE in c["metrics"]:
        w, d = c["metrics"][EVAL_WIN_RATE], c["metrics"].get("direct")
        lines += [
            "",
            "Per seed:",
            "",
            f"| seed | {base}: win rate vs SFT | {method}: win rate vs SFT | direct win rate |",
            "|---|---|---|---|",
        ]
        for i, seed in enumerate(c["seeds"]):
            direct = fmt(d["method"][i]) if d else "—"
            cells = [str(seed), fmt(w["baseline"][i]), fmt(w["method"][i]), direct]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def mean_or_nan(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def write(head_dir: Path, out: Path | None = None) -> tuple[dict[str, Any], str]:
    """Build the head-to-head of ``head_dir``; write head_to_head.json and .md to ``out``
    (default ``head_dir``); returns (report, markdown)."""
    report = build(head_dir)
    out = out or head_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "head_to_head.json", report)  # strict JSON: an absent interval is null
    md = to_markdown(report)
    (out / "head_to_head.md").write_text(md + "\n")
    return report, md
