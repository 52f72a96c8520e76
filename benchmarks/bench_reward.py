"""inspo vs TRL 1.16 RewardTrainer on identical work, CPU fp32 (see benchmarks/README.md).

    python benchmarks/bench_reward.py            # tiny + real, every config: JSON lines + table
    python benchmarks/bench_reward.py --sizes tiny --reps 2

The harness of bench_dpo.py (its sizes, rows, clock and forked children): every (size, config,
repetition) runs in a child forked after the imports, the configurations alternate inside each
round, warm-up steps are excluded and the medians reported, with the load average beside each
run. Both train the same Bradley–Terry reward model: the tiny Llama of ``model=tiny`` as a
one-label sequence classifier (seed 0), the byte tokenizer, AdamW lr 1e-5, gradient clipping
1.0, logging every 10 steps. inspo: a Lightning ``Trainer`` fitting ``RewardModule`` on
``PreferenceDataModule`` batches, as ``inspo-train objective=bradley_terry`` runs it. TRL:
``RewardTrainer.train()`` on the same text rows (explicit prompt). Pairs whose whole sequences
exceed the size's ``max_length`` are left out of the sample (TRL drops them; inspo would
truncate them), so both train on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
import torch
import trl
from datasets import Dataset

import bench_dpo as harness
from inspo.data.datamodule import PreferenceDataModule
from inspo.models.load import byte_tokenizer, count_parameters, tiny_llama
from inspo.models.scoring import Scoring
from inspo.objectives import BradleyTerry
from inspo.settings import DataConfig, OptimConfig
from inspo.training.reward import RewardModule

SIZES = {name: harness.SIZES[name] for name in ("tiny", "small", "real")}
CONFIGS = [
    ("inspo RM packed", "inspo", {"packing": True}),
    ("inspo RM padded", "inspo", {"packing": False}),
    ("TRL RM", "trl", {"checkpointing": False}),
    ("TRL RM default", "trl", {}),  # RewardConfig's own defaults (activation checkpointing on)
]
LR, SEED = 1e-5, 0


def rows(size: harness.Size) -> list[dict]:
    """The size's pairs; for HH-RLHF, only pairs whose sequences fit ``max_length`` bytes."""
    if size.source != "hh":
        return harness.make_rows(size)
    room = size.max_length - 2  # inspo's BOS and both's EOS
    pool = harness.hh_rows(size.rows * 2, size.max_length)
    fits = [
        r
        for r in pool
        if all(len((r["prompt"] + r[s]).encode()) < room for s in ("chosen", "rejected"))
    ]
    if len(fits) < size.rows:
        raise SystemExit(f"only {len(fits)} of the sampled pairs fit {size.max_length} tokens")
    return fits[: size.rows]


def reward_model(size: harness.Size):
    tok = byte_tokenizer()
    model = tiny_llama(tokenizer=tok, seed=SEED, num_labels=1, **size.model)
    model.config.pad_token_id = tok.pad_token_id
    return tok, model


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.clock = harness.Clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        c = self.clock
        c.end()
        logged = trainer.callback_metrics  # what the step computed (a shared context once)
        computed = float(logged["train/tokens/computed"])
        real = round(computed * (1 - float(logged["train/tokens/padding_share"])))
        c.pairs.append(int(batch["index"].shape[0]))
        c.tokens.append(real)
        c.ref_tokens.append(0)
        c.computed.append(round(computed))
        c.real.append(real)


def run_inspo(size: harness.Size, options: dict, *, workdir: str) -> dict:
    tok, model = reward_model(size)
    optim = OptimConfig(lr=LR, warmup_steps=0)  # as before: no warm-up
    scoring = Scoring(packing=options["packing"])
    module = RewardModule(model, BradleyTerry(), optim=optim, scoring=scoring)
    data = rows(size)
    settings = DataConfig(
        val_split=None,
        batch_size=size.batch,
        max_length=size.max_length,
        max_prompt_length=size.max_length,
        packing=options["packing"],
    )
    dm = PreferenceDataModule(lambda: {"train": data}, tok, settings, seed=SEED)
    dm.setup("fit")

    trainer = partial(harness.cpu_trainer, workdir)

    clock = StepClock()
    if size.source == "hh":  # warm up, then time one epoch over every sampled pair
        trainer([], max_steps=size.warmup).fit(module, datamodule=dm)
        trainer([clock], max_epochs=1).fit(module, datamodule=dm)
    else:
        trainer([clock], max_steps=size.warmup + size.steps + 1).fit(module, datamodule=dm)
    return harness.summarise(clock.clock, size)


def trl_config(size: harness.Size, options: dict, workdir: str, **overrides):
    kwargs = {
        "output_dir": workdir,
        "per_device_train_batch_size": size.batch,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "max_length": None if size.source == "synthetic" else size.max_length,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "max_grad_norm": 1.0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": SEED,
    }
    if "checkpointing" in options:
        kwargs["gradient_checkpointing"] = options["checkpointing"]
    return trl.RewardConfig(**{**kwargs, **overrides})


def run_trl(size: harness.Size, options: dict, *, workdir: str) -> dict:
    tok, model = reward_model(size)
    dataset = Dataset.from_list(rows(size))
    timer = harness.TrlClock()
    clock = timer.clock

    def trainer(args, callbacks: list):
        t = trl.RewardTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=callbacks
        )
        collate = t.data_collator

        def counting(examples):  # once per training batch, in order (no workers)
            batch = collate(examples)
            if callbacks:
                mask = batch["attention_mask"]
                clock.pairs.append(mask.shape[0] // 2)
                clock.tokens.append(int(mask.sum()))
                clock.ref_tokens.append(0)
                clock.computed.append(mask.numel())
                clock.real.append(int(mask.sum()))
            return batch

        t.data_collator = counting
        return t

    if size.source == "hh":
        trainer(trl_config(size, options, workdir, max_steps=size.warmup), []).train()
        trainer(trl_config(size, options, workdir, num_train_epochs=1), [timer]).train()
    else:
        steps = size.warmup + size.steps + 1
        trainer(trl_config(size, options, workdir, max_steps=steps), [timer]).train()
    return harness.summarise(clock, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,real")
    ap.add_argument("--configs", default="all", help="comma-separated labels, or all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results_reward.jsonl", help="appended to")
    args = ap.parse_args()
    harness.THREADS[0] = args.threads
    configs = [c for c in CONFIGS if args.configs == "all" or c[0] in args.configs.split(",")]
    out = open(args.out, "a")  # noqa: SIM115  (appended: earlier runs' records stay)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in cpuinfo if "model name" in x), "?")
    emit({"kind": "env", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu,
          "cores": os.cpu_count(), "torch": torch.__version__, "trl": trl.__version__,
          "threads": args.threads, "loadavg": os.getloadavg(), "argv": sys.argv[1:]})  # fmt: skip
    table = []
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        params = count_parameters(reward_model(size)[1])
        runs: dict[str, list] = {label: [] for label, _, _ in configs}
        for rep in range(args.reps):  # A/B/C..., A/B/C...
            for label, framework, options in configs:
                fn = run_inspo if framework == "inspo" else run_trl
                load = os.getloadavg()[0]
                msg = harness.in_child(fn, size, options, workdir=True, every=0.01)
                emit({"kind": "run", "size": size_name, "config": label, "rep": rep,
                      "params": params, "loadavg": load, **msg})  # fmt: skip
                if msg["ok"]:
                    runs[label].append(msg["result"] | {"peak_mem_mb": msg["peak_mem_mb"]})
        keys = ("pairs_per_s", "pairs_per_cpu_s", "step_s", "padding", "peak_mem_mb")
        medians = {
            label: {k: statistics.median(r[k] for r in results) for k in keys}
            for label, results in runs.items()
            if results
        }
        for label, med in medians.items():
            emit({"kind": "median", "size": size_name, "config": label, **med})
            table.append((size_name, label, med, medians.get("TRL RM")))
    print(f"\n{'size':6} {'config':16} {'pairs/s':>8} {'× TRL':>6} {'pairs/CPU-s':>11} "
          f"{'× TRL':>6} {'padding':>8} {'peak MB':>8}")  # fmt: skip
    for size_name, label, med, trl_med in table:
        ratio = med["pairs_per_s"] / trl_med["pairs_per_s"] if trl_med else float("nan")
        cpu_ratio = med["pairs_per_cpu_s"] / trl_med["pairs_per_cpu_s"] if trl_med else float("nan")
        print(f"{size_name:6} {label:16} {med['pairs_per_s']:8.2f} {ratio:6.2f} "
              f"{med['pairs_per_cpu_s']:11.2f} {cpu_ratio:6.2f} {med['padding']:8.1%} "
              f"{med['peak_mem_mb']:8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
