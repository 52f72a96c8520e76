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
(:func:`evaluate_run`), on ``eval.device`` in both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inspo.config import run_name
from inspo.evaluation.metrics import (
    length_controlled_win_rate,
    monte_carlo_kl,
    preference_accuracy,
    win_rate,
)
from inspo.evaluation.scorers import Scorer, make_scorer
from inspo.models.sampling import SamplingConfig, sample


@dataclass
class EvalConfig:
    """What ``conf/eval/default.yaml`` holds (the ``eval`` key of a training config)."""

    generate: bool = False  # run the evaluation stage at the end of inspo-train
    n_prompts: int = 256
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    batch_size: int = 64
    seed: int = 1234
    scorer: str = "gold"  # gold (synthetic task) | a path/name of a sequence-classification RM
    reference: str | None = None  # null: the initial policy (model.*); else a path/name
    n_table: int = 16  # sample generations kept in the wandb table / samples.json
    progress: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu; or any torch device string

    @classmethod
    def from_cfg(cls, cfg: Any) -> EvalConfig:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )


def resolve_device(spec: str = "auto") -> torch.device:
    """Where evaluation runs: ``auto`` is the CUDA device when there is one, else the CPU;
    anything else is taken as a torch device string (``cpu``, ``cuda:1``, ``mps``)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


# --------------------------------------------------------------------------- evaluation
def alpaca_eval_records(
    prompts: Sequence[str], outputs: Sequence[str], generator: str
) -> list[dict[str, str]]:
    """AlpacaEval's model-outputs format: ``[{"instruction", "output", "generator"}]``."""
    return [
        {"instruction": p, "output": o, "generator": generator}
        for p, o in zip(prompts, outputs, strict=True)
    ]


def evaluate(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    ecfg: EvalConfig,
    *,
    scorer: Scorer | None = None,
    out_dir: str | Path | None = None,
    generator: str = "policy",
    reference_generator: str = "reference",
    reference_samples: list[str] | None = None,
    val_metrics: dict[str, float] | None = None,
    reflection: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample policy and reference on ``prompts`` with the same seed; score; compare; KL.

    Runs where the models are (see :func:`resolve_device`). Returns (``eval/...`` metrics,
    sample rows) and, with ``out_dir``, writes the AlpacaEval files, ``samples.json`` and
    ``metrics.json`` (with the device and the samples the KL was estimated on) there.
    ``reference_samples``: the reference's samples when they are already known (the same
    reference, prompts and sampling settings: the draws are deterministic).
    """
    t0 = time.perf_counter()
    prompts = list(prompts)[: ecfg.n_prompts]
    scorer = scorer or make_scorer(ecfg.scorer, tokenizer)
    sampling = ecfg.sampling()
    pol_ids, pol_text = draw(policy, tokenizer, prompts, sampling, ecfg, "sampling policy")
    ref_text = reference_samples
    if ref_text is None:
        _, ref_text = draw(reference, tokenizer, prompts, sampling, ecfg, "sampling reference")
    pol_score, ref_score = scorer(prompts, pol_text), scorer(prompts, ref_text)
    pol_len = [len(s.encode()) for s in pol_text]
    ref_len = [len(s.encode()) for s in ref_text]
    wr = win_rate(pol_score, ref_score)
    lc = length_controlled_win_rate(pol_score, ref_score, pol_len, ref_len)
    # The KL estimate is unbiased only on draws from π_θ itself, not from a tempered or
    # truncated sampler; the same seed keeps the two sample sets comparable.
    kl_samples = "eval" if sampling.pure else "separate temperature-1 samples"
    if not sampling.pure:
        pol_ids, _ = draw(policy, tokenizer, prompts, sampling.as_pure(), ecfg, "sampling for KL")
    kl, kl_se = monte_carlo_kl(policy, reference, tokenizer, prompts, pol_ids, ecfg.batch_size)
    n = len(prompts)
    metrics = {
        **preference_accuracy(val_metrics or {}, reflection),
        "eval/score/policy": sum(pol_score) / n,
        "eval/score/reference": sum(ref_score) / n,
        "eval/win_rate": wr.rate,
        "eval/win_rate_low": wr.low,
        "eval/win_rate_high": wr.high,
        "eval/lc_win_rate": lc.rate,
        "eval/lc_identified": float(lc.identified),
        "eval/length/policy": sum(pol_len) / n,
        "eval/length/reference": sum(ref_len) / n,
        "eval/kl": kl,
        "eval/kl_se": kl_se,
        "eval/n_prompts": float(n),
    }
    if ecfg.scorer == "gold":
        from inspo.data.synthetic import is_valid

        metrics["eval/valid/policy"] = sum(map(is_valid, pol_text)) / n
        metrics["eval/valid/reference"] = sum(map(is_valid, ref_text)) / n
    metrics["eval/seconds"] = time.perf_counter() - t0
    rows = [
        {"prompt": p, "policy": a, "reference": b, "policy_score": sa, "reference_score": sb}
        for p, a, b, sa, sb in zip(prompts, pol_text, ref_text, pol_score, ref_score, strict=True)
    ]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dump = {
            "generations.json": alpaca_eval_records(prompts, pol_text, generator),
            "reference_generations.json": alpaca_eval_records(
                prompts, ref_text, reference_generator
            ),
            "samples.json": rows,
            "metrics.json": {
                "metrics": metrics,
                "config": asdict(ecfg),
                "device": str(next(policy.parameters()).device),
                "kl_samples": kl_samples,
            },
        }
        for name, obj in dump.items():
            (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    return metrics, rows


def draw(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    ecfg: EvalConfig,
    desc: str,
) -> tuple[list[list[int]], list[str]]:
    """One sample per prompt: (token ids, texts)."""
    groups = sample(
        model,
        tokenizer,
        prompts,
        sampling,
        batch_size=ecfg.batch_size,
        progress=ecfg.progress,
        desc=desc,
    )
    return [g[0].ids for g in groups], [g[0].text for g in groups]


def log_wandb(run: Any, metrics: dict[str, float], rows: list[dict], n_table: int) -> None:
    """Scalars plus a table of sample generations, on a wandb run (``logger.experiment``)."""
    import wandb

    cols = ["prompt", "policy", "reference", "policy_score", "reference_score"]
    table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows[:n_table]])
    run.log({**metrics, "eval/samples": table})


# --------------------------------------------------------------------------- sources
def eval_prompts(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The run's held-out eval prompts: those of ``data.eval_split`` (on the built-in task
    ``eval``, the test prompts, or ``tune``, the tuning prompts), or, when it is null, of the
    val split. A named split the data lacks is an error, not a silent fallback: a tuning run
    must never be scored on the test prompts."""
    from hydra.utils import instantiate

    from inspo.data.report import DataError
    from inspo.data.rows import to_text

    raw = instantiate(cfg.data.source, _partial_=True)()
    split = cfg.data.get("eval_split") or cfg.data.val_split
    if split not in raw:
        raise DataError(
            f"data.eval_split={split!r}: the data have no such split (they have "
            f"{', '.join(map(repr, raw))}); name one of them, or null for the val split"
        )
    seen: dict[str, None] = {}
    for row in raw[split]:
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and "chosen" not in row:
            seen.setdefault(row["prompt"], None)  # a prompt-only row (the synthetic eval split)
            continue
        text = to_text(row, tokenizer)
        if not isinstance(text, str):
            seen.setdefault(text["prompt"], None)
    return list(seen)


def initial_policy(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The run's starting policy, rebuilt from ``model.*`` (the tiny model is seeded)."""
    from inspo.models.load import load_policy

    m = OmegaConf.to_container(cfg.model, resolve=True)
    m.pop("tokenizer", None)
    m.pop("lora", None)
    m["gradient_checkpointing"] = False
    return load_policy(tokenizer=tokenizer, **m)


def reference_policy(
    cfg: DictConfig, ecfg: EvalConfig, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    from inspo.models.load import load_policy

    if ecfg.reference:
        return load_policy(ecfg.reference)
    return initial_policy(cfg, tokenizer)


def eval_stage(
    cfg: DictConfig,
    policy: PreTrainedModel,
    tokenizer: Any,
    metrics: dict,
    run_dir: Path,
    logger: Any = None,
) -> dict[str, float]:
    """The evaluation stage of a training run (``eval.generate=true``): returns ``eval/...``.

    Runs on ``eval.device`` as ``inspo-eval`` does, and puts the policy back where it was.
    """
    ecfg = EvalConfig.from_cfg(cfg.eval)
    was_training, home = policy.training, next(policy.parameters()).device
    prompts = eval_prompts(cfg, tokenizer)
    device = resolve_device(ecfg.device)
    policy.to(device)
    reference = reference_policy(cfg, ecfg, tokenizer).to(device)
    try:
        out, rows = evaluate(
            policy,
            reference,
            tokenizer,
            prompts,
            ecfg,
            out_dir=run_dir / "eval",
            generator=generator_name(cfg, run_dir),
            val_metrics=metrics,
            reflection=cfg.reflection.mode,
        )
    finally:
        policy.to(home).train(was_training)
    if logger is not None and type(logger).__name__ == "WandbLogger":
        log_wandb(logger.experiment, out, rows, ecfg.n_table)
    return out


def generator_name(cfg: DictConfig, run_dir: Path) -> str:
    """The AlpacaEval ``generator`` of a run's samples: its name and its folder."""
    return f"{run_name(cfg)}/{run_dir.name}"


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
    from inspo.models.load import load_policy, load_tokenizer

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    path = policy_path or str(run_dir / "policy")
    tokenizer = load_tokenizer(path)
    device = resolve_device(ecfg.device)
    policy = load_policy(path).to(device)
    reference = reference_policy(cfg, ecfg, tokenizer).to(device)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    out_dir = out_dir or run_dir / "eval"
    metrics, rows = evaluate(
        policy,
        reference,
        tokenizer,
        eval_prompts(cfg, tokenizer),
        ecfg,
        out_dir=out_dir,
        generator=generator_name(cfg, run_dir),
        val_metrics=summary.get("metrics"),
        reflection=cfg.reflection.mode,
    )
    if summary and policy_path is None:
        summary["metrics"] = {**summary["metrics"], **metrics}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if log_to_wandb:
        import wandb

        run = wandb.init(project="inspo", job_type="eval", config=asdict(ecfg))
        log_wandb(run, metrics, rows, ecfg.n_table)
        run.finish()
    return metrics, out_dir
