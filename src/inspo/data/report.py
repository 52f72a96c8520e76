"""The data report: every row read is either used or counted under a reason. Nothing is silent.

Per split it records ``rows_read``, ``rows_used``, ``skipped`` (reason → count), the first few
row ids per reason, how many used rows were truncated (``truncated``: anything cut) and how many
of those had a scored response cut (``response_truncated``); ``rows_read == rows_used +
sum(skipped.values())`` always holds. ``batches`` says what one epoch's batches compute: real
tokens, padded tokens and the share of computed tokens that is padding
(:func:`~inspo.data.batching.batch_tokens`). It is printed, logged and saved as
``data_report.json``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inspo.jsonio import write_json

MAX_EXAMPLES = 5


class DataError(ValueError):
    """A start-up error about the data (missing columns, or any bad row under strict mode)."""


@dataclass
class SplitReport:
    rows_read: int = 0
    rows_used: int = 0
    truncated: int = 0
    response_truncated: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    batches: dict[str, Any] = field(default_factory=dict)

    def skip(self, reason: str, row_id: Any) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(row_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "truncated": self.truncated,
            "response_truncated": self.response_truncated,
            "skipped": dict(self.skipped),
            "examples": dict(self.examples),
            "batches": self.batches,
        }


@dataclass
class DataReport:
    """Per-split accounting of rows; ``strict`` turns the first bad row into a DataError."""

    strict: bool = False
    splits: dict[str, SplitReport] = field(default_factory=dict)

    def split(self, name: str) -> SplitReport:
        return self.splits.setdefault(name, SplitReport())

    def skip(self, split: str, reason: str, row_id: Any) -> None:
        if self.strict:
            raise DataError(
                f"bad row in split {split!r}: row {row_id} ({reason}); data.strict=true"
            )
        self.split(split).skip(reason, row_id)

    def to_dict(self) -> dict[str, Any]:
        return {name: s.to_dict() for name, s in self.splits.items()}

    def flat_metrics(self) -> dict[str, float]:
        """``data/<split>/<field>`` numbers for a logger."""
        out: dict[str, int] = {}
        for name, s in self.splits.items():
            out[f"data/{name}/rows_read"] = s.rows_read
            out[f"data/{name}/rows_used"] = s.rows_used
            out[f"data/{name}/truncated"] = s.truncated
            out[f"data/{name}/response_truncated"] = s.response_truncated
            for reason, n in s.skipped.items():
                out[f"data/{name}/skipped/{reason}"] = n
            if s.batches:
                out[f"data/{name}/padding_share"] = s.batches["padding_share"]
        return out

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def __str__(self) -> str:
        lines = ["data report:"]
        for name, s in self.splits.items():
            lines.append(
                f"  {name}: read {s.rows_read}, used {s.rows_used}, truncated {s.truncated}"
                f" (scored response cut in {s.response_truncated})"
            )
            for reason, n in sorted(s.skipped.items()):
                lines.append(f"    skipped {n} × {reason} (e.g. rows {s.examples[reason]})")
            if s.batches:
                b = s.batches
                lines.append(
                    f"    {b['batches']} batches of {b['pairs_per_batch']:.1f} pairs, "
                    f"{b['real_tokens']} real tokens; padding {b['padding_share']:.1%} of the "
                    f"computed tokens ({'packed' if b['packing'] else 'padded'}; padded: "
                    f"{b['padding_share_without_packing']:.1%})"
                )
        return "\n".join(lines)
