"""The real path on a real instruct model: SmolLM2-135M-Instruct (its BPE tokenizer, its chat
template, bos <|im_start|>, eos = pad = <|im_end|>) on HH-RLHF rows from the shared data.

What the tiny model with its byte tokenizer cannot show: the chat template applied once, in
every view; a response that ends in EOS told apart from one cut at the token budget when the
padding token *is* EOS; padding never scored or counted; packed and padded batches scoring the
same on a 49k vocabulary with grouped-query attention.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from conftest import SHARED_DATA, needs_real_model
from inspo.data.collate import PreferenceCollator
from inspo.data.encode import Encoder
from inspo.data.rows import to_text
from inspo.data.templates import resolve_template
from inspo.evaluation.metrics import sample_logps
from inspo.models.load import load_policy, load_tokenizer
from inspo.models.sampling import SamplingConfig, sample
from inspo.models.scoring import Scoring, prepare_packing, score_pairs

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
pytestmark = [
    needs_real_model,
    pytest.mark.skipif(not HH.exists(), reason=f"shared data file absent: {HH}"),
]
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
VIEWS = ("plain", "reflective")


@pytest.fixture(scope="module")
def tok(real_model):
    return load_tokenizer(str(real_model.folder))


@pytest.fixture(scope="module")
def model(real_model, tok):
    return load_policy(str(real_model.folder)).eval()


def hh_rows(n: int, tok, short: bool = True) -> list[dict]:
    """The first ``n`` usable HH-RLHF rows as text rows (with their chat messages); ``short``:
    only one-turn dialogues with short answers (≤ 40 tokens each), which fit a small batch."""
    out = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            text = to_text(json.loads(line), tok, keep_chat=True)
            if not isinstance(text, dict):
                continue
            sizes = [len(tok(text[c])["input_ids"]) for c in ("prompt", "chosen", "rejected")]
            if not short or max(sizes) <= 40:
                out.append(text)
            if len(out) == n:
                return out
    raise AssertionError("too few usable rows")


def encoded_batch(tok, rows, max_length=128, max_prompt_length=96):
    enc = Encoder(tok, resolve_template("chat"), max_length, max_prompt_length)
    encoded = [
        {**enc.encode_ids(*(enc.ids(r[c]) for c in ("prompt", "chosen", "rejected")), VIEWS,
                          r["chat"]), "index": i}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    return encoded, PreferenceCollator(tok.pad_token_id, VIEWS)(encoded)


def test_hh_dialogues_are_rendered_with_the_chat_template_once_in_every_view(tok):
    row = hh_rows(1, tok, short=False)[0]
    # The dialogue's turns became chat turns: no Human:/Assistant: text is left.
    assert "Human:" not in row["prompt"] and "\n\nAssistant:" not in row["prompt"]
    assert row["prompt"].startswith(SYSTEM[len("<|im_start|>") :])  # the BOS string is an id
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert not row["chosen"].startswith(" ") and "<|im_end|>" not in row["chosen"]
    encoded, _ = encoded_batch(tok, [row], max_length=2048, max_prompt_length=2048)
    for view in VIEWS:
        ids = encoded[0][f"{view}_chosen"]
        text = tok.decode(ids)
        assert text.startswith(SYSTEM) and text.count(SYSTEM) == 1, view  # one template
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS id
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # one EOS id
        start = encoded[0][f"{view}_chosen_start"]
        assert tok.decode(ids[start:]) == row["chosen"] + "<|im_end|>"
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    reflective = tok.decode(encoded[0]["reflective_chosen"])
    # The alternative joins the last user turn; the scored response is the one assistant turn
    # after it.
    last_user = reflective.rsplit("<|im_start|>user\n", 1)[1]
    assert "[Another answer to this request, shown for reference only:]\n" in last_user
    assert row["rejected"] in last_user and last_user.count("<|im_start|>assistant\n") == 1


def test_with_pad_equal_to_eos_only_a_responses_own_eos_is_scored(tok):
    encoded, batch = encoded_batch(tok, hh_rows(2, tok))
    for view in VIEWS:
        v = batch[view]
        ids, att, mask = v["input_ids"], v["attention_mask"], v["loss_mask"]
        rows = [r for side in ("chosen", "rejected") for r in encoded]
        for i, side in enumerate(["chosen"] * 2 + ["rejected"] * 2):
            seq, start = rows[i][f"{view}_{side}"], rows[i][f"{view}_{side}_start"]
            n = len(seq)
            assert ids[i, n:].eq(tok.eos_token_id).all()  # the padding is EOS ...
            assert not mask[i, n:].any() and not att[i, n:].any()  # ... and never scored
            # Scored: exactly the response and its one EOS.
            assert mask[i].sum() == n - start and ids[i, n - 1] == tok.eos_token_id
            assert mask[i, n - 1] == 1 and mask[i, :start].sum() == 0 and n - start > 2
        assert (mask.sum(-1) < att.sum(-1)).all()


def test_packed_and_padded_batches_score_the_same_on_the_real_model(tok, model):
    _, batch = encoded_batch(tok, hh_rows(2, tok))
    assert prepare_packing(model)  # as PreferenceModule does: Llama with GQA packs
    with torch.no_grad():
        for view in VIEWS:
            packed, _ = score_pairs(model, batch[view], Scoring(packing=True))
            padded, _ = score_pairs(model, batch[view], Scoring(packing=False))
            for field in ("chosen", "rejected", "chosen_length", "rejected_length"):
                a, b = getattr(packed, field), getattr(padded, field)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-3, msg=f"{view} {field}")
            assert packed.tokens.computed < padded.tokens.computed  # no padding computed


def test_a_response_ending_in_eos_is_told_apart_from_one_cut_at_the_token_budget(tok, model):
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )[len(tok.bos_token) :]  # prompt_ids adds the BOS id
    full, cut = (
        sample(model, tok, [prompt], SamplingConfig(temperature=0.0, max_new_tokens=k))[0][0]
        for k in (24, 4)
    )
    assert full.text == "The capital of France is Paris."
    assert full.finished and full.ids[-1] == tok.eos_token_id
    assert full.ids.count(tok.eos_token_id) == 1  # the EOS once, no padding after it
    assert not cut.finished and len(cut.ids) == 4 and tok.eos_token_id not in cut.ids
    assert cut.ids == full.ids[:4]
    # Sampled beside a longer response in one batch, the finished one keeps its length while
    # its row decodes pad (= EOS) tokens; none of them are counted.
    long_prompt = prompt.replace("France", "France, and why is it the capital")
    both = sample(model, tok, [prompt, long_prompt], SamplingConfig(0.0, max_new_tokens=24))
    assert both[0][0].ids == full.ids and both[0][0].logp == pytest.approx(full.logp, abs=1e-4)
    # Scored for the KL: each sample's own tokens once (its EOS included), however it is padded.
    alone = sample_logps(model, tok, [prompt], [full.ids])
    padded = sample_logps(model, tok, [prompt, long_prompt], [full.ids, full.ids * 3])
    torch.testing.assert_close(alone[0], padded[0], rtol=0, atol=1e-4)
    assert alone[0].item() == pytest.approx(full.logp, abs=1e-3)
