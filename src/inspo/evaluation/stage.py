"""The evaluation stage: a trained policy evaluated the way it is used, from the prompt alone.

For a run folder (``.hydra/config.yaml``, ``policy/``, ``summary.json``), or as the last stage of
a training run (``eval.generate=true``), it reports under ``eval/...``:

- ``eval/pref_accuracy/plain`` and ``eval/pref_accuracy/reflective``: held-out preference
  accuracy (fraction of val pairs with h > 0) of the plain-context policy and, for reflective
  runs, of the reflective one, taken from the run's final validation;
- samples from π_θ(· | x) on the eval prompts (:mod:`inspo.models.sampling`: temperature, top-p,
  top-k, max new tokens, seed; never the checkpoint's ``generation_config``), and the same for
  the reference policy (by default the *initial* policy, the same for every reference kind so
  that runs compare): ``eval/score/{policy,reference}`` (gold reward of the synthetic task or a
  reward model's score), ``eval/win_rate`` with its Wilson 95% interval (``eval/win_rate_low``,
  ``eval/win_rate_high``), ``eval/lc_win_rate`` (length-controlled) with ``eval/lc_identified``
  (0.0 when the length difference does not vary: ``eval/lc_win_rate`` is then the raw win
  rate), ``eval/length/{policy,reference}`` (mean response length in bytes),
  ``eval/valid/{policy,reference}`` (synthetic task: share of valid responses);
- ``eval/kl``: Monte-Carlo KL(π_θ ‖ π_ref) over responses (capped at max new tokens) = mean
  over samples y ~ π_θ(· | x) of Σ_t [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)] (EOS
  included), with ``eval/kl_se``. The samples must come from π_θ itself: the eval samples when
  the sampling is pure (temperature 1, top-p 1, top-k 0), else a separate temperature-1 sample
  set with the same seed; ``metrics.json`` says which (``kl_samples``);
- ``eval/generations.json`` and ``eval/reference_generations.json`` in AlpacaEval's format
  (a list of ``{"instruction", "output", "generator"}``), and ``eval/samples.json``.

It runs at the end of ``inspo-train`` (:func:`eval_stage`) and as ``inspo-eval RUN_DIR``
(:func:`evaluate_run`), on ``eval.device`` in both, with the ``eval`` settings
(:class:`~inspo.settings.EvalConfig`). :func:`evaluate` is the comparison itself, in short
steps: sample and score each policy (:func:`draw_and_score`), compare the scores
(:func:`comparison`), estimate the KL (:func:`kl_metrics`); :func:`save` writes the files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inspo.config import check_scorer_fits, run_name
from inspo.data.sources import source_of
from inspo.evaluation.metrics import (
    length_controlled_win_rate,
    monte_carlo_kl,
    preference_accuracy,
    win_rate,
)
from inspo.evaluation.scorers import Scorer, make_scorer
from inspo.jsonio import write_json
from inspo.models.load import resolve_device
from inspo.models.sampling import sample
from inspo.names import (
    EVAL_KL,
    EVAL_KL_SE,
    EVAL_LC_IDENTIFIED,
    EVAL_LC_WIN_RATE,
    EVAL_LENGTH,
    EVAL_LENGTH_REFERENCE,
    EVAL_N_PROMPTS,
    EVAL_SAMPLES,
    EVAL_SCORE,
    EVAL_SCORE_REFERENCE,
    EVAL_SECONDS,
    EVAL_VALID,
    EVAL_VALID_REFERENCE,
    EVAL_WIN_RATE,
    EVAL_WIN_RATE_HIGH,
    EVAL_WIN_RATE_LOW,
)
from inspo.settings import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    as_dict,
    load_saved,
)

__all__ = ["EvalConfig", "Evaluation", "eval_stage", "evaluate", "evaluate_run"]

#: What ``metrics.json`` says the KL was estimated on.
KL_ON_EVAL, KL_ON_SEPARATE = "eval", "separate temperature-1 samples"


# --------------------------------------------------------------------------- evaluation
@dataclass
class Samples:
    """One policy's sample per prompt: token ids, texts and their scores."""

    ids: list[list[int]]
    texts: list[str]
    scores: list[float]

    @property
    def lengths(self) -> list[int]:
        """Response lengths in bytes."""
        return [len(t.encode()) for t in self.texts]


@dataclass
class Evaluation:
    """What :func:`evaluate` found: the prompts, both sample sets, the ``eval/...`` metrics
    and what the KL was estimated on."""

    prompts: list[str]
    policy: Samples
    reference: Samples
    metrics: dict[str, float]
    kl_samples: str

    def rows(self) -> list[dict[str, Any]]:
        """One row per prompt: both samples and their scores (``samples.json``)."""
        pol, ref = self.policy, self.reference
        return [
            {"prompt": p, "policy": a, "reference": b, "policy_score": sa, "reference_score": sb}
            for p, a, b, sa, sb in zip(
                self.prompts, pol.texts, ref.texts, pol.scores, ref.scores, strict=True
            )
        ]


def evaluate(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    ecfg: EvalConfig,
    *,
    scorer: Scorer | None = None,
    reference_samples: list[str] | None = None,
) -> Evaluation:
    """Sample policy and reference on the first ``ecfg.n_prompts`` prompts with the same seed,
    score, compare, and estimate KL(π_θ ‖ π_ref), where the models are (see
    :func:`resolve_device`). ``reference_samples``: the reference's texts when they are already
    known (the same reference, prompts and sampling settings: the draws are deterministic)."""
    t0 = time.perf_counter()
    prompts = list(prompts)[: ecfg.n_prompts]
    # A reward model scores where the policy is, in the policy's dtype (the run's model.dtype).
    param = next(policy.parameters())
    scorer = scorer or make_scorer(ecfg.scorer, tokenizer, device=param.device, dtype=param.dtype)
    pol = draw_and_score(policy, tokenizer, prompts, ecfg, scorer, "sampling policy")
    if reference_samples is None:
        ref = draw_and_score(reference, tokenizer, prompts, ecfg, scorer, "sampling reference")
    else:
        ref = Samples([], reference_samples, scorer(prompts, reference_samples))
    kl, kl_samples = kl_metrics(policy, reference, tokenizer, prompts, pol.ids, ecfg)
    metrics = {**comparison(pol, ref), **kl, EVAL_N_PROMPTS: float(len(prompts))}
    metrics |= validity(scorer, pol, ref)
    metrics[EVAL_SECONDS] = time.perf_counter() - t0
    return Evaluation(prompts, pol, ref, metrics, kl_samples)


def draw(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    ecfg: EvalConfig,
    desc: str,
    sampling: SamplingConfig | None = None,
) -> tuple[list[list[int]], list[str]]:
    """One sample per prompt with ``ecfg``'s sampling (or ``sampling``): (token ids, texts)."""
    groups = sample(
        model,
        tokenizer,
        prompts,
        sampling or ecfg.sampling(),
        batch_size=ecfg.batch_size,
        progress=ecfg.progress,
        desc=desc,
    )
    return [g[0].ids for g in groups], [g[0].text for g in groups]


def draw_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    ecfg: EvalConfig,
    scorer: Scorer,
    desc: str,
) -> Samples:
    ids, texts = draw(model, tokenizer, prompts, ecfg, desc)
    return Samples(ids, texts, scorer(prompts, texts))


def comparison(policy: Samples, reference: Samples) -> dict[str, float]:
    """Mean scores and lengths, the win rate (Wilson 95% interval) and the length-controlled
    win rate of the policy's samples over the reference's, prompt by prompt."""
    n = len(policy.texts)
    wr = win_rate(policy.scores, reference.scores)
    pol_len, ref_len = policy.lengths, reference.lengths
    lc = length_controlled_win_rate(policy.scores, reference.scores, pol_len, ref_len)
    return {
        EVAL_SCORE: sum(policy.scores) / n,
        EVAL_SCORE_REFERENCE: sum(reference.scores) / n,
        EVAL_WIN_RATE: wr.rate,
        EVAL_WIN_RATE_LOW: wr.low,
        EVAL_WIN_RATE_HIGH: wr.high,
        EVAL_LC_WIN_RATE: lc.rate,
        EVAL_LC_IDENTIFIED: float(lc.identified),
        EVAL_LENGTH: sum(pol_len) / n,
        EVAL_LENGTH_REFERENCE: sum(ref_len) / n,
    }


def kl_metrics(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    policy_ids: list[list[int]],
    ecfg: EvalConfig,
) -> tuple[dict[str, float], str]:
    """Monte-Carlo KL(π_θ ‖ π_ref) and its standard error, and which samples it used. The
    estimate is unbiased only on draws from π_θ itself, not from a tempered or truncated
    sampler: those get separate temperature-1 samples with the same seed (comparable sets)."""
    sampling = ecfg.sampling()
    kl_samples = KL_ON_EVAL if sampling.pure else KL_ON_SEPARATE
    if not sampling.pure:
        pure = sampling.as_pure()
        policy_ids, _ = draw(policy, tokenizer, prompts, ecfg, "sampling for KL", pure)
    kl, se = monte_carlo_kl(policy, reference, tokenizer, prompts, policy_ids, ecfg.batch_size)
    return {EVAL_KL: kl, EVAL_KL_SE: se}, kl_samples


def validity(scorer: Scorer, policy: Samples, reference: Samples) -> dict[str, float]:
    """The share of valid answers, for a scorer that knows them (the gold reward)."""
    valid: Callable[[Sequence[str]], list[bool]] | None = getattr(scorer, "valid", None)
    if valid is None:
        return {}
    n = len(policy.texts)
    return {
        EVAL_VALID: sum(valid(policy.texts)) / n,
        EVAL_VALID_REFERENCE: sum(valid(reference.texts)) / n,
    }


# --------------------------------------------------------------------------- files
def alpaca_eval_records(
    prompts: Sequence[str], outputs: Sequence[str], generator: str
) -> list[dict[str, str]]:
    """AlpacaEval's model-outputs format: ``[{"instruction", "output", "generator"}]``."""
    return [
        {"instruction": p, "output": o, "generator": generator}
        for p, o in zip(prompts, outputs, strict=True)
    ]


def save(
    ev: Evaluation,
    out_dir: str | Path,
    ecfg: EvalConfig,
    device: Any,
    generator: str = "policy",
    reference_generator: str = "reference",
) -> None:
    """The AlpacaEval files, ``samples.json`` and ``metrics.json`` (with the device and the
    samples the KL was estimated on) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"metrics": ev.metrics, "config": as_dict(ecfg), "device": str(device)}
    files = {
        "generations.json": alpaca_eval_records(ev.prompts, ev.policy.texts, generator),
        "reference_generations.json": alpaca_eval_records(
            ev.prompts, ev.reference.texts, reference_generator
        ),
        "samples.json": ev.rows(),
        "metrics.json": info | {"kl_samples": ev.kl_samples},
    }
    for name, obj in files.items():
        write_json(out / name, obj)


def log_wandb(run: Any, metrics: dict[str, float], rows: list[dict], n_table: int) -> None:
    """Scalars plus a table of sample generations, on a wandb run (``logger.experiment``)."""
    import wandb

    cols = ["prompt", "policy", "reference", "policy_score", "reference_score"]
    table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows[:n_table]])
    run.log({**metrics, EVAL_SAMPLES: table})


# --------------------------------------------------------------------------- sources
def eval_split(raw: Mapping[str, Any], data: DataConfig) -> str:
    """The split of ``raw`` (the data's ``{split: rows}``) the evaluation samples the prompts
    of: ``data.eval_split``, or the val split when it is null; a DataError when the data lack
    it."""
    from inspo.data.report import DataError

    split = data.eval_split or data.val_split
    if split not in raw:
        raise DataError(
            f"data.eval_split={split!r}: the data have no such split (they have "
            f"{', '.join(map(repr, raw))}); name one of them, or null for the val split"
        )
    return split


def eval_prompts(
    source: Callable[[], dict[str, Sequence[Any]]],
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> list[str]:
    """The held-out eval prompts of ``source``'s rows, each once, in order: those of
    ``data.eval_split`` (on the built-in task ``eval``, the test prompts, or ``tune``, the
    tuning prompts), or, when it is null, of the val split. A named split the data lack is an
    error, not a silent fallback: a tuning run must never be scored on the test prompts."""
    from inspo.data.rows import to_text

    raw = source()
    split = eval_split(raw, data)
    seen: dict[str, None] = {}
    for row in raw[split]:
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and "chosen" not in row:
            seen.setdefault(row["prompt"], None)  # a prompt-only row (the synthetic eval split)
            continue
        text = to_text(row, tokenizer)
        if not isinstance(text, str):
            seen.setdefault(text["prompt"], None)
    return list(seen)


def initial_policy(
    model: ModelConfig, tokenizer: PreTrainedTokenizerBase, cache_dir: str | None = None
) -> PreTrainedModel:
    """The run's starting policy, rebuilt from its ``model`` settings (the tiny model is
    seeded; a GGUF file's converted checkpoint is read from ``cache_dir``), without its LoRA
    adapter."""
    from inspo.models.load import load_model

    return load_model(
        replace(model, lora=None, gradient_checkpointing=False), tokenizer, cache_dir=cache_dir
    )


def reference_policy(
    model: ModelConfig,
    ecfg: EvalConfig,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | None = None,
) -> PreTrainedModel:
    """What the policy is compared with: ``eval.reference``, else the run's initial policy."""
    from inspo.models.load import load_policy

    if ecfg.reference:
        return load_policy(ecfg.reference)
    return initial_policy(model, tokenizer, cache_dir)


def generator_name(settings: RunConfig, run_dir: Path) -> str:
    """The AlpacaEval ``generator`` of a run's samples: its name and its folder."""
    return f"{settings.run_name or run_name(settings)}/{run_dir.name}"


# --------------------------------------------------------------------------- stages
def eval_stage(
    settings: RunConfig,
    policy: PreTrainedModel,
    tokenizer: Any,
    metrics: dict,
    run_dir: Path,
    logger: Any = None,
) -> dict[str, float]:
    """The evaluation stage of a training run (``eval.generate=true``): returns ``eval/...``.

    Runs on ``eval.device`` as ``inspo-eval`` does, and puts the policy back where it was.
    """
    ecfg = settings.eval
    was_training, home = policy.training, next(policy.parameters()).device
    prompts = eval_prompts(source_of(settings.data), settings.data, tokenizer)
    device = resolve_device(ecfg.device)
    policy.to(device)
    cache = settings.paths.cache
    reference = reference_policy(settings.model, ecfg, tokenizer, cache).to(device)
    try:
        ev = evaluate(policy, reference, tokenizer, prompts, ecfg)
    finally:
        policy.to(home).train(was_training)
    ev.metrics = preference_accuracy(metrics, settings.reflection.mode) | ev.metrics
    save(ev, run_dir / "eval", ecfg, device, generator_name(settings, run_dir))
    if logger is not None and type(logger).__name__ == "WandbLogger":
        log_wandb(logger.experiment, ev.metrics, ev.rows(), ecfg.n_table)
    return ev.metrics


def evaluate_run(
    run_dir: Path,
    ecfg: EvalConfig,
    *,
    policy_path: str | None = None,
    out_dir: Path | None = None,
    log_to_wandb: bool = False,
) -> tuple[dict[str, float], Path]:
    """``inspo-eval``: evaluate a finished run's policy (or ``policy_path``) as its training
    config says, on ``ecfg``'s settings; writes ``out_dir`` (default RUN_DIR/eval) and, for the
    run's own policy, adds the metrics to its summary.json. Returns (metrics, out_dir)."""
    from omegaconf import OmegaConf

    from inspo.models.load import load_policy, load_tokenizer

    settings = load_saved(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    check_scorer_fits(settings.data.source, ecfg.scorer, "e.g. inspo-eval RUN_DIR --scorer PATH")
    path = policy_path or str(run_dir / "policy")
    tokenizer = load_tokenizer(path)
    device = resolve_device(ecfg.device)
    policy = load_policy(path).to(device)
    # A saved config's paths are Hydra's runtime values: the default cache (as a run's) is used.
    reference = reference_policy(settings.model, ecfg, tokenizer, settings.paths.cache).to(device)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    prompts = eval_prompts(source_of(settings.data), settings.data, tokenizer)
    ev = evaluate(policy, reference, tokenizer, prompts, ecfg)
    accuracy = preference_accuracy(summary.get("metrics") or {}, settings.reflection.mode)
    ev.metrics = accuracy | ev.metrics
    out_dir = out_dir or run_dir / "eval"
    save(ev, out_dir, ecfg, device, generator_name(settings, run_dir))
    if summary and policy_path is None:
        summary["metrics"] = {**summary["metrics"], **ev.metrics}
        write_json(summary_path, summary)
    if log_to_wandb:
        import wandb

        run = wandb.init(project="inspo", job_type="eval", config=as_dict(ecfg))
        log_wandb(run, ev.metrics, ev.rows(), ecfg.n_table)
        run.finish()
    return ev.metrics, out_dir
