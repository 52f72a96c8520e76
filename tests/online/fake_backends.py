"""Generation backends for the online tests: ``generation._target_=fake_backends.<name>``
(tests/online on the path)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from inspo.online.generation import HF


@dataclass
class AsciiHF(HF):
    """The policy's samples with every token folded into 7-bit ASCII (id mod 128, EOS kept):
    a random byte-level model's bytes >= 128 decode to U+FFFD, whose text does not re-encode
    to the sampled tokens; these do."""

    def generate(self, prompts, n, seed, all_done=None):
        groups = super().generate(prompts, n, seed, all_done)
        eos = self.tokenizer.eos_token_id
        fold = [[replace(s, ids=[t if t == eos else t % 128 for t in s.ids]) for s in g]
                for g in groups]  # fmt: skip
        return self.decode(fold)
