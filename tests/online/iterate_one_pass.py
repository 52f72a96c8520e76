"""``inspo-iterate`` with one decoding pass per chunk of prompts (no look-ahead), as before the
look-ahead: ``python -m iterate_one_pass ...`` (tests/online on the path), for comparisons."""

from __future__ import annotations

from inspo.cli.iterate import main
from inspo.online.rounds import Rounds

Rounds.lookahead = lambda self, size: 0

if __name__ == "__main__":
    main()
