"""The iterative loop end to end on a tiny model: round folders, accounting, metrics, resume
(mid-round and online), the previous-round reference, failures, reflective objectives."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import replace

import pytest

from conftest import FAST, full_and_resumed
from inspo.config import ConfigError, compose_config
from inspo.online import run as online_run
from inspo.online.builder import RoundBuilder
from inspo.online.judges import JudgeError
from inspo.online.rounds import RoundError
from inspo.online.store import RoundStore
from inspo.training.module import PreferenceModule
from inspo.training.run import run as train_run

MODEL = [o for o in FAST if not o.startswith(("data.batch_size", "+data.source.n_train"))]
ITER = [
    *MODEL,
    "data.batch_size=4",
    "optim.lr=1e-3",
    "iterate.rounds=2",
    "iterate.steps_per_round=2",
    "generation.max_new_tokens=6",
    "judge=python",
    "judge.function=fake_judges.distinct",
    "eval.n_prompts=8",
    "eval.max_new_tokens=6",
]


def iterate(tmp_path, *overrides):
    return online_run.iterate(compose_config([*ITER, *overrides], tmp_path, name="iterate"))


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_two_rounds_write_their_folders_and_account_for_every_prompt(tmp_path):
    summary = iterate(tmp_path)
    assert summary["status"] == "finished" and summary["steps"] == 4
    for r in ("000", "001"):
        folder = tmp_path / "rounds" / r
        pairs, samples = lines(folder / "pairs.jsonl"), lines(folder / "samples.jsonl")
        report = json.loads((folder / "data_report.json").read_text())
        assert len(pairs) == 2 * 4 == report["pairs"]  # steps_per_round × batch
        assert len(samples) == report["samples"] == 2 * report["prompts"]  # K = 2
        assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        d = report["dropped"]  # best-worst: one pair per prompt, or a counted reason
        lost = d.get("tie", 0) + d.get("too_few_responses", 0) + d.get("below_min_margin", 0)
        assert report["prompts"] == report["pairs"] + d["unused_surplus"] + lost
        assert (folder / "eval" / "generations.json").exists()
    first, second = (tmp_path / "rounds" / r / "samples.jsonl" for r in ("000", "001"))
    prompts = [{s["prompt"] for s in lines(f)} for f in (first, second)]
    assert not prompts[0] & prompts[1]  # each round takes fresh prompts from the stream
    rounds = json.loads((tmp_path / "iterate.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] == [r["round"] for r in summary["rounds"]]
    for r in rounds:
        for name in ("objective/scores", "objective/scores_margin", "objective/kl",
                     "objective/entropy", "val/contain_eos_token", "eval/win_rate"):  # fmt: skip
            assert math.isfinite(r[name]), name
        shares = [r[f"time/{k}_share"] for k in ("generation", "judging", "training")]
        assert all(0 <= s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9
    assert abs(rounds[0]["objective/kl"]) < 1e-4 < abs(rounds[1]["objective/kl"])
    # The sampler's log-prob is the policy's own: at round 0 the reference is that policy.
    for s in lines(first):
        assert s["logp"] == pytest.approx(s["reference_logp"], abs=1e-3)
    csv = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"objective/scores", "eval/win_rate", "round", "train/loss"} <= set(csv)


def test_a_rounds_pairs_train_with_inspo_train_as_they_are(tmp_path):
    iterate(tmp_path / "it", "iterate.rounds=1")
    pairs = tmp_path / "it" / "rounds" / "000" / "pairs.jsonl"
    fast = [o for o in FAST if not o.startswith("+data.source.")]
    summary = train_run(compose_config(
        [*fast, "data=jsonl", f"data.source.path={pairs}", "data.source.val_fraction=0.25",
         "trainer.max_steps=2", "data.batch_size=2"], tmp_path / "train",
    ))  # fmt: skip
    report = json.loads((tmp_path / "train" / "data_report.json").read_text())
    assert summary["steps"] == 2
    assert sum(r["rows_used"] for r in report.values()) == len(pairs.read_text().splitlines())


def stop_after(monkeypatch, steps):
    """The run ends after ``steps`` optimiser steps, as a killed one would (its checkpoints and
    round folders are what is left)."""
    check = online_run.Iterate.check

    def cut(self, settings, objective):
        settings = check(self, settings, objective)
        return replace(settings, trainer=replace(settings.trainer, max_steps=steps))

    monkeypatch.setattr(online_run.Iterate, "check", cut)


VAL = ("val/loss", "val/rewards/margins", "val/plain/logps/chosen")


def timeless(metrics):
    """The metrics but the clocks, NaN as a string (so that NaN equals NaN)."""
    clocks = [k for k in metrics if k.startswith("time/") or k.endswith("seconds")]
    return {k: "nan" if v != v else v for k, v in metrics.items() if k not in clocks}


def test_a_run_cut_mid_round_resumes_to_identical_metrics_and_a_finished_one_keeps_them(
    tmp_path, monkeypatch
):
    """Cut after 3 of 6 steps (in the middle of round 1 of 3) and resumed: round 1 is reloaded
    from its folder (the same token ids and reference scores, no sampling), and every metric
    of every round and of the end equals the uninterrupted run's, bit for bit. Resubmitting
    the finished run (a requeue) trains nothing and keeps its summary, evaluation included."""
    common = ["iterate.rounds=3", "checkpoint.every_n_train_steps=1", "trainer.max_steps=6"]
    built = []  # the run folder, then the rounds each run built
    rounds = {}  # (run, "built" | "loaded", index): the round's training pairs
    real, load = RoundBuilder.build, RoundStore.load

    def build(self, i, *a, **k):
        built.append(i)
        r = real(self, i, *a, **k)
        run_name = next(x for x in reversed(built) if isinstance(x, str))
        rounds[(run_name, "built", i)] = r.pairs
        return r

    def reload(self, i, *a, **k):
        r = load(self, i, *a, **k)
        rounds[(self.out_dir.name, "loaded", i)] = r.pairs
        return r

    monkeypatch.setattr(RoundBuilder, "build", build)
    monkeypatch.setattr(RoundStore, "load", reload)

    def train(run_dir, *overrides):
        built.append(run_dir.name)
        with monkeypatch.context() as m:
            if "trainer.max_steps=3" in overrides:
                stop_after(m, 3)  # killed in the middle of round 1
            return iterate(run_dir, *overrides)

    full, resumed = full_and_resumed(train, tmp_path, *common)
    assert built == ["full", 0, 1, 2, "cut", 0, 1, "cut", 2]  # round 1 reloaded, not rebuilt
    # The reloaded round trains on what the built one did: the same sampled ids and token rows,
    # and the reference scores taken when it was built, not recomputed (a recomputation lays
    # the rows out in other batches, which can move the last bits of a score).
    trained, reloaded = rounds[("full", "built", 1)], rounds[("cut", "loaded", 1)]
    assert all(p.reference is not None for p in trained)
    assert [(p.sampled, p.tokens, p.reference) for p in reloaded] == [
        (p.sampled, p.tokens, p.reference) for p in trained
    ]
    for r in ("000", "001", "002"):
        for name in ("pairs.jsonl", "tokens.jsonl", "samples.jsonl"):
            a, b = (tmp_path / run / "rounds" / r / name for run in ("full", "cut"))
            assert a.read_text() == b.read_text(), (r, name)
    assert resumed["steps"] == full["steps"] == 6
    assert [timeless(r) for r in resumed["rounds"]] == [timeless(r) for r in full["rounds"]]
    assert timeless(resumed["metrics"]) == timeless(full["metrics"])
    assert full["rounds"][-1]["eval/kl"] == resumed["metrics"]["eval/kl"]

    saved = (tmp_path / "full" / "summary.json").read_text()
    built.clear()
    again = iterate(tmp_path / "full", *common, "ckpt_path=last")
    assert built == []  # nothing sampled, nothing trained
    assert (tmp_path / "full" / "summary.json").read_text() == saved
    assert again == json.loads(saved) and "eval/lc_win_rate" in again["metrics"]


ONLINE = ["iterate.steps_per_round=1", "iterate.eval_every=0", "eval.n_prompts=0",
          "judge.function=fake_judges.coarse"]  # fmt: skip


def test_online_mode_resumes_with_the_same_samples_and_carried_pairs(tmp_path, monkeypatch):
    """One step per round, no round folders, a judge that ties often: cut at the start of the
    first round after round 0 that trains carried pairs, a resume trains the pairs the
    checkpoint carried into it and regenerates the next steps' samples exactly as the
    uninterrupted run drew them."""
    common = ["iterate.rounds=5", "iterate.save_rounds=false", "checkpoint.every_n_train_steps=1",
              *ONLINE]  # fmt: skip
    full = iterate(tmp_path / "full", *common)
    carried = [k for k, r in enumerate(full["rounds"]) if r["objective/pair_staleness_max"] == 1]
    cut = next(k for k in carried if k >= 2)  # the checkpoint after round k - 1 carries pairs
    with monkeypatch.context() as m:
        stop_after(m, cut)
        iterate(tmp_path / "cut", *common)
    resumed = iterate(tmp_path / "cut", *common, "ckpt_path=last")
    assert not (tmp_path / "full" / "rounds").exists()
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3, 4]
    assert [timeless(r) for r in resumed["rounds"]] == [timeless(r) for r in full["rounds"]]
    assert timeless(resumed["metrics"]) == timeless(full["metrics"])


def test_two_steps_a_pass_without_folders_resumes_with_the_same_pairs(tmp_path, monkeypatch):
    """Online with one decoding pass for two steps (``iterate.steps_per_round=2``) and no round
    folders: pairs are at most ``max_staleness`` = 2 steps old, some carried, and a run cut at
    a round boundary (where its checkpoints must fall) resumes to the uninterrupted run's
    rounds and metrics."""
    common = ["iterate.rounds=4", "iterate.steps_per_round=2", "iterate.max_staleness=2",
              "iterate.save_rounds=false", "checkpoint.every_n_train_steps=2",
              "iterate.eval_every=0", "eval.n_prompts=0",
              "judge.function=fake_judges.coarse"]  # fmt: skip
    full = iterate(tmp_path / "full", *common)
    ages = [r["objective/pair_staleness_max"] for r in full["rounds"]]
    assert max(ages) == 2.0 and min(ages) >= 1.0  # a round's own pairs: 0 and 1 step old
    with monkeypatch.context() as m:
        stop_after(m, 4)
        iterate(tmp_path / "cut", *common)
    resumed = iterate(tmp_path / "cut", *common, "ckpt_path=last")
    assert not (tmp_path / "full" / "rounds").exists()
    assert [timeless(r) for r in resumed["rounds"]] == [timeless(r) for r in full["rounds"]]
    assert timeless(resumed["metrics"]) == timeless(full["metrics"])


def decoding_passes(monkeypatch):
    """Per round, how many decoding passes built it (its chunks of prompts)."""
    passes = Counter()
    real = RoundBuilder.chunk
    monkeypatch.setattr(
        RoundBuilder, "chunk", lambda self, i, *a, **k: passes.update([i]) or real(self, i, *a, **k)
    )
    return passes


def test_online_mode_makes_up_for_ties_in_one_decoding_pass_by_carrying_pairs(
    tmp_path, monkeypatch
):
    """Most prompts tie: without carrying (max_staleness=0) a round decodes pass after pass
    for the pairs it still lacks; with it, after round 0 (no yield estimate before its first
    pass) every round decodes at most once, trains first the pairs the last one carried (in
    order, at most one step old), and every pair or prompt is trained, carried on or dropped
    for a counted reason."""
    passes = decoding_passes(monkeypatch)
    iterate(tmp_path / "own", "iterate.rounds=6", "iterate.max_staleness=0", *ONLINE)
    assert max(passes[i] for i in range(1, 6)) > 1
    own, passes = dict(passes), decoding_passes(monkeypatch)
    summary = iterate(tmp_path / "carry", "iterate.rounds=6", *ONLINE)
    assert all(passes[i] <= 1 for i in range(1, 6))
    assert passes[0] < own[0]  # round 0 sizes its later passes by what its first ones gave
    folders = [tmp_path / "carry" / "rounds" / f"{i:03d}" for i in range(6)]
    reports = [json.loads((f / "data_report.json").read_text()) for f in folders]
    assert sum(r["carried_in"] for r in reports) > 0
    for before, after in itertools.pairwise(folders):
        carried = [c["pair"] for c in lines(before / "carry.jsonl")]
        assert lines(after / "pairs.jsonl")[: len(carried)] == carried
    for i, r in enumerate(reports):
        d = r["dropped"]
        lost = sum(d.get(k, 0) for k in ("tie", "too_few_responses", "below_min_margin",
                                         "unused_surplus", "stale"))  # fmt: skip
        assert r["prompts"] + r["carried_in"] == r["pairs"] + r["carried_out"] + lost, i
        assert r["carried_in"] == (reports[i - 1]["carried_out"] if i else 0)
        metrics = summary["rounds"][i]
        assert metrics["objective/pair_staleness_max"] == (1.0 if r["carried_in"] else 0.0)
        assert metrics["objective/pair_staleness"] == r["carried_in"] / 4


def test_a_run_killed_after_building_a_round_resumes_with_what_it_carries(tmp_path, monkeypatch):
    """Killed in the step after round 3 was built (its folder written, no checkpoint since):
    the resumed run reloads round 3 with the pairs it carries on and the yield estimate after
    it, and every round and metric equals the uninterrupted run's."""
    common = ["iterate.rounds=6", "checkpoint.every_n_train_steps=1", *ONLINE]
    full = iterate(tmp_path / "full", *common)
    step = PreferenceModule.training_step

    def dies_at_step_3(self, *a, **k):
        if self.trainer.global_step == 3:
            raise RuntimeError("killed")
        return step(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(PreferenceModule, "training_step", dies_at_step_3)
        with pytest.raises(RuntimeError, match="killed"):
            iterate(tmp_path / "cut", *common)
    assert (tmp_path / "cut" / "rounds" / "003").exists()
    assert not (tmp_path / "cut" / "rounds" / "004").exists()
    carried = [json.loads((tmp_path / "full" / "rounds" / f"{i:03d}" / "data_report.json")
                          .read_text())["carried_in"] for i in (3, 4)]  # fmt: skip
    assert carried[1] > 0  # round 4 trains pairs carried from round 3
    resumed = iterate(tmp_path / "cut", *common, "ckpt_path=last")
    for r in range(6):
        for name in ("pairs.jsonl", "tokens.jsonl", "carry.jsonl"):
            a, b = (tmp_path / run / "rounds" / f"{r:03d}" / name for run in ("full", "cut"))
            assert a.read_text() == b.read_text(), (r, name)
    assert [timeless(r) for r in resumed["rounds"]] == [timeless(r) for r in full["rounds"]]
    assert timeless(resumed["metrics"]) == timeless(full["metrics"])


def test_previous_reference_is_the_policy_each_round_starts_from(tmp_path):
    prev = iterate(tmp_path / "prev", "iterate.reference=previous")
    assert prev["choices"]["reference"] == "sync" and prev["choices"]["sync_alpha"] == 1.0
    for r in prev["rounds"]:  # the samples' KL to the reference is 0 at every round's start
        assert abs(r["objective/kl"]) < 1e-4
    # The final validation compares the policy with the reference of the last round, not with
    # itself (a sync after the last step made every margin 0).
    for key in ("val/rewards/margins", "val/plain/rewards/margins", "val/logps/chosen"):
        assert prev["metrics"][key] != 0, key
    assert abs(prev["metrics"]["val/rewards/margins"]) > 1e-4
    init = iterate(tmp_path / "init")
    assert abs(init["rounds"][1]["objective/kl"]) > 1e-4
    with pytest.raises(ConfigError, match="reference=policy_init"):
        iterate(tmp_path / "bad", "iterate.reference=previous", "reference=model",
                "reference.name_or_path=x")  # fmt: skip


def test_a_failing_judge_names_itself_and_the_round_and_leaves_no_round(tmp_path):
    with pytest.raises(JudgeError, match=r"fake_judges\.broken.*round 0.*server is down"):
        iterate(tmp_path, "judge.function=fake_judges.broken")
    assert not (tmp_path / "rounds").exists() or not any((tmp_path / "rounds").iterdir())


def test_a_round_that_cannot_fill_says_why_and_records_a_failed_run(tmp_path):
    """Nothing but ties (a collapsed policy's samples): the run fails as a diverged one does,
    with a summary a sweep and its report count as a failed run."""
    with pytest.raises(RoundError, match=r"round 0 found 0 of its 8 pairs.*'tie'"):
        iterate(tmp_path, "judge.function=fake_judges.constant", "iterate.max_prompts_factor=2")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "found 0 of its 8 pairs" in summary["error"]
    assert not (tmp_path / "policy").exists()


def test_config_errors_before_any_model(tmp_path):
    with pytest.raises(ConfigError, match="precomputed"):
        iterate(tmp_path, "reference=precomputed")
    # Two steps a round, no round folders: a checkpoint after step 3 could not resume.
    no_folders = ["iterate.save_rounds=false", "checkpoint.every_n_train_steps=3"]
    with pytest.raises(ConfigError, match=r"multiple of iterate\.steps_per_round=2"):
        iterate(tmp_path, *no_folders)


@pytest.mark.parametrize(
    ("objective", "context"),
    [("dpo", "reflective"), ("ipo", "reflective"), ("simpo", "reflective"), ("dpo", "plain")],
)
def test_every_form_trains_online(tmp_path, monkeypatch, objective, context):
    """A reflective objective online (its views built from the fresh pairs), a reference-free
    one (no reference, so no sample KL), and InSPO whose reference scores the plain view (the
    samples' reference scores then serve its training steps)."""
    shared = []
    real = online_run.shares_reference_scores
    monkeypatch.setattr(
        online_run, "shares_reference_scores", lambda c, m: shared.append(real(c, m)) or shared[-1]
    )
    summary = iterate(tmp_path, f"objective={objective}", "reflection=inspo",
                      f"reflection.reference_context={context}",
                      "iterate.steps_per_round=1", "iterate.eval_every=0")  # fmt: skip
    assert summary["steps"] == 2 and math.isfinite(summary["metrics"]["val/plain/loss"])
    assert summary["choices"]["reflection"] == "inspo"
    assert ("objective/kl" in summary["rounds"][0]) == (objective != "simpo")
    assert shared == [context == "plain"]


def train_losses(run_dir):
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("train/loss")
    return [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]


def test_the_samples_reference_scores_serve_the_training_steps(tmp_path, monkeypatch):
    """A round scores its samples under the reference (for its KL); the plain view's rows that
    hold exactly the sampled tokens take those scores in training instead of a second
    reference forward: the same pairs and losses, one reference forward per sample."""
    common = ["generation._target_=fake_backends.AsciiHF", "eval.n_prompts=0"]
    given = []  # per training-time reference lookup: did the batch carry the scores?
    lookup = PreferenceModule.reference_scores

    def spy(self, batch, view):
        if self.training:
            given.append("reference_scores" in batch)
        return lookup(self, batch, view)

    monkeypatch.setattr(PreferenceModule, "reference_scores", spy)
    with monkeypatch.context() as m:
        m.setattr(online_run, "shares_reference_scores", lambda cfg, module: False)
        separate = iterate(tmp_path / "separate", *common)
    assert given and not any(given)
    given.clear()
    shared = iterate(tmp_path / "shared", *common)
    assert len(given) == shared["steps"] and all(given)
    for r in ("000", "001"):
        a, b = (tmp_path / run / "rounds" / r / "pairs.jsonl" for run in ("separate", "shared"))
        assert a.read_text() == b.read_text()
    want, got = train_losses(tmp_path / "separate"), train_losses(tmp_path / "shared")
    assert len(got) == shared["steps"] and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    for key in VAL:
        assert shared["metrics"][key] == pytest.approx(separate["metrics"][key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("why", ["synced reference", "reflective reference view"])
def test_no_shared_reference_scores_where_the_reference_would_score_otherwise(
    tmp_path, monkeypatch, why
):
    """A synced reference moves at a round's first step, after its samples were scored; an
    InSPO reference scoring the reflective context scores other tokens."""
    extra = {"synced reference": ["iterate.reference=previous"],
             "reflective reference view": ["reflection=inspo"]}[why]  # fmt: skip
    cfg = compose_config([*ITER, *extra], tmp_path, name="iterate")
    seen = []
    real = online_run.shares_reference_scores
    monkeypatch.setattr(
        online_run, "shares_reference_scores", lambda c, m: seen.append(real(c, m)) or seen[-1]
    )
    online_run.iterate(cfg)
    assert seen == [False]


def test_the_summary_holds_the_last_rounds_evaluation(tmp_path):
    """The run's final metrics (summary.json, and the value a sweeper optimises) hold the last
    round's evaluation, also when a validation after the last step cleared the logged ones."""
    # No validation during training (every 50 steps): the run validates once after it.
    summary = iterate(tmp_path, "iterate.eval_every=0", "iterate.steps_per_round=1",
                      "trainer.val_check_interval=50")  # fmt: skip
    last = summary["rounds"][-1]
    evaluation = {k for k in last if k.startswith("eval/")}
    assert "eval/win_rate" in evaluation and "eval/win_rate" not in summary["rounds"][0]
    assert {k: summary["metrics"].get(k) for k in evaluation} == {k: last[k] for k in evaluation}
