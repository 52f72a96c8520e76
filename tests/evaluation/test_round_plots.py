"""Plots over rounds put their ticks at whole rounds (never at round 1.5)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure

from inspo.evaluation.sweep_report import plot_rounds
from inspo.recipes.iterative_demo import plot_rounds as plot_demo_rounds


def saved_ticks(monkeypatch, draw) -> list[list[float]]:
    """The x tick positions of every axis of the figure ``draw`` saves."""
    ticks: list[list[float]] = []

    def savefig(fig, *args, **kwargs):
        fig.canvas.draw()
        ticks.extend(
            [float(t) for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            for ax in fig.axes
        )

    monkeypatch.setattr(Figure, "savefig", savefig)
    draw()
    return ticks


def test_round_ticks_are_whole_rounds(monkeypatch, tmp_path):
    curves = {"iterative_dpo": [0.5, 0.6, 0.7], "iterative_inspo": [0.5, 0.52, 0.55]}
    table = {"dpo": {"win_rate_vs_sft": 0.57}}
    rounds = [{"eval/win_rate": 0.5 + r / 10, "objective/scores": r} for r in range(3)]
    runs = [{"group": "dpo/off", "rounds": rounds}]
    stats = {k: [{"mean": x[k]} for x in rounds] for k in rounds[0]}
    report = {"groups": {"dpo/off": {"rounds": stats}}, "runs": runs}
    for draw in (
        lambda: plot_demo_rounds(table, curves, tmp_path / "a.png"),
        lambda: plot_rounds(report, tmp_path / "b.png"),
    ):
        ticks = saved_ticks(monkeypatch, draw)
        assert ticks and all(ticks)
        for axis in ticks:
            assert axis == [round(t) for t in axis], axis
