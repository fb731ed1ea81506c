"""The front as files a person opens: CSV, a static PNG (matplotlib) and an interactive HTML page
(plotly). No MLflow here — the tracker uploads these, and anything else may write them too.

Every drawing follows one legend: grey = every trial, coloured staircase = the Pareto front,
dashed line = the budget, stars = the baselines, x = FLOPs in fvcore's convention: the figure
the search optimises (``cost``: expected FLOPs for early-exit chains, or worst case), the one its
front is ranked by.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autosplit.search.attrs import State
from autosplit.search.front import FLOPS_CONVENTION, Cost, FinalMember, TrialRecord, cost_of

CSV_COLUMNS = (
    "rank",
    "trial",
    "val_acc",
    "flops",
    "expected_flops",
    "params",
    "label",
    "baseline",
    "run_id",
)
_FRONT_COLOUR = "#1f77b4"
_AXIS = {"flops": "FLOPs, worst case", "expected_flops": "FLOPs, expected (worst case if no gate)"}
_BASELINE_COLOUR = "#d62728"


def _flops_text(value: float | None) -> str:
    from autosplit.flops import format_flops  # one formatter for every figure a user reads

    return "-" if value is None else format_flops(value)


def write_csv(path: Path, front: Sequence[TrialRecord]) -> None:
    """The front, cheapest first, one row per trial with its MLflow run id."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for rank, r in enumerate(front, start=1):
            writer.writerow(
                [
                    rank,
                    r.number,
                    r.val_acc,
                    r.flops,
                    _blank(r.expected_flops),
                    _blank(r.params),
                    r.label,
                    _blank(r.baseline),
                    _blank(r.run_id),
                ]
            )


def read_csv(path: Path) -> list[TrialRecord]:
    """front.csv back into records (state complete), e.g. to compare fronts of two searches."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            TrialRecord(
                number=int(row["trial"]),
                state=State.COMPLETE,
                val_acc=float(row["val_acc"]),
                flops=int(row["flops"]),
                expected_flops=float(row["expected_flops"]) if row["expected_flops"] else None,
                params=int(row["params"]) if row["params"] else None,
                label=row["label"],
                run_id=row["run_id"] or None,
                baseline=row["baseline"] or None,
            )
            for row in csv.DictReader(handle)
        ]


def write_history_csv(path: Path, history: Sequence[tuple[int, float]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("trial", "hypervolume"))
        writer.writerows((number, f"{volume:.6f}") for number, volume in history)


def _blank(value: object) -> object:
    return "" if value is None else value


def _others(records: Sequence[TrialRecord], front: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Trials with both an accuracy and a FLOPs figure that are not on the front."""
    on_front = {r.number for r in front}
    return [
        r
        for r in records
        if r.number not in on_front and r.val_acc is not None and r.flops is not None
    ]


def write_png(
    path: Path,
    records: Sequence[TrialRecord],
    front: Sequence[TrialRecord],
    budget_flops: int,
    title: str,
    cost: Cost = "flops",
) -> None:
    """Static plot for the MLflow artifact preview. Uses the Agg canvas directly, not pyplot,
    so no global figure state is touched and threads may draw at the same time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    others = _others(records, front)
    done = [r for r in others if r.state == State.COMPLETE]
    pruned = [r for r in others if r.state != State.COMPLETE]
    axes.scatter(
        [cost_of(r, cost) for r in done],
        [r.val_acc for r in done],
        s=18,
        c="0.6",
        label=f"trials ({len(done)})",
        zorder=2,
    )
    if pruned:
        axes.scatter(
            [cost_of(r, cost) for r in pruned],
            [r.val_acc for r in pruned],
            s=18,
            c="0.75",
            marker="x",
            label=f"pruned, last epoch ({len(pruned)})",
            zorder=2,
        )
    if front:
        axes.plot(
            [cost_of(r, cost) for r in front],
            [r.val_acc for r in front],
            drawstyle="steps-post",
            color=_FRONT_COLOUR,
            marker="o",
            markersize=6,
            linewidth=1.8,
            label=f"Pareto front ({len(front)})",
            zorder=3,
        )
        for r in front:
            axes.annotate(
                f"#{r.number}",
                (cost_of(r, cost), r.val_acc),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=_FRONT_COLOUR,
            )
    baselines = [r for r in records if r.baseline and r.val_acc is not None and r.flops]
    if baselines:
        axes.scatter(
            [cost_of(r, cost) for r in baselines],
            [r.val_acc for r in baselines],
            s=140,
            marker="*",
            c=_BASELINE_COLOUR,
            edgecolors="black",
            linewidths=0.5,
            label="baselines",
            zorder=4,
        )
        for r in baselines:
            axes.annotate(
                r.baseline or "",
                (cost_of(r, cost), r.val_acc),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
                color=_BASELINE_COLOUR,
            )
    _finish(figure, axes, path, budget_flops, title, "validation accuracy (%)", cost)


def write_html(
    path: Path,
    records: Sequence[TrialRecord],
    front: Sequence[TrialRecord],
    budget_flops: int,
    title: str,
    cost: Cost = "flops",
) -> None:
    """Interactive plot; plotly.js is embedded so it opens offline from the MLflow UI."""
    import plotly.graph_objects as go

    def trace(rows: Sequence[TrialRecord], name: str, **style: object) -> go.Scatter:
        return go.Scatter(
            x=[cost_of(r, cost) for r in rows],
            y=[r.val_acc for r in rows],
            name=name,
            customdata=[
                [
                    r.number,
                    r.label,
                    _flops_text(r.flops),
                    _flops_text(r.expected_flops),
                    r.state,
                    r.baseline or "",
                ]
                for r in rows
            ],
            hovertemplate=(
                "trial %{customdata[0]} (%{customdata[4]}) %{customdata[5]}<br>"
                "%{customdata[1]}<br>val acc %{y:.2f}%<br>FLOPs %{customdata[2]} "
                "(expected %{customdata[3]})<extra></extra>"
            ),
            **style,
        )

    figure = go.Figure()
    figure.add_trace(
        trace(
            _others(records, front),
            "trials",
            mode="markers",
            marker={"color": "#999999", "size": 7},
        )
    )
    figure.add_trace(
        trace(
            front,
            "Pareto front",
            mode="lines+markers",
            line_shape="hv",
            marker={"color": _FRONT_COLOUR, "size": 9},
            line={"color": _FRONT_COLOUR},
        )
    )
    baselines = [r for r in records if r.baseline and r.val_acc is not None and r.flops]
    figure.add_trace(
        trace(
            baselines,
            "baselines",
            mode="markers+text",
            text=[r.baseline for r in baselines],
            textposition="top center",
            marker={"color": _BASELINE_COLOUR, "size": 15, "symbol": "star"},
        )
    )
    figure.add_vline(
        x=budget_flops,
        line_dash="dash",
        line_color="black",
        annotation_text=f"budget {_flops_text(budget_flops)}",
    )
    figure.update_layout(
        title=title,
        template="plotly_white",
        hovermode="closest",
        xaxis_title=f"{_AXIS[cost]} ({FLOPS_CONVENTION})",
        yaxis_title="validation accuracy (%)",
    )
    figure.write_html(
        str(path), include_plotlyjs=True, full_html=True, config={"displaylogo": False}
    )


def write_final_png(
    path: Path,
    members: Sequence[FinalMember],
    front: Sequence[FinalMember],
    budget_flops: int,
    title: str,
    cost: Cost = "flops",
) -> None:
    """The final front: each member's mean val accuracy over seeds with a ±1 sd error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    on_front = {m.number for m in front}
    for group, colour, label in (
        (
            [m for m in members if m.number in on_front and not m.baseline],
            _FRONT_COLOUR,
            "final front",
        ),
        (
            [m for m in members if m.number not in on_front and not m.baseline],
            "0.6",
            "other finalists",
        ),
        ([m for m in members if m.baseline], _BASELINE_COLOUR, "baselines"),
    ):
        if not group:
            continue
        axes.errorbar(
            [cost_of(m.record(), cost) for m in group],
            [m.val_mean for m in group],
            yerr=[m.val_sd for m in group],
            fmt="*" if colour == _BASELINE_COLOUR else "o",
            color=colour,
            capsize=4,
            markersize=8,
            label=label,
            zorder=3,
        )
        for m in group:
            axes.annotate(
                m.baseline or f"#{m.number}",
                (cost_of(m.record(), cost), m.val_mean),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
                color=colour,
            )
    if front:
        axes.plot(
            [cost_of(m.record(), cost) for m in front],
            [m.val_mean for m in front],
            drawstyle="steps-post",
            color=_FRONT_COLOUR,
            linewidth=1.2,
            zorder=2,
        )
    _finish(
        figure,
        axes,
        path,
        budget_flops,
        title,
        "validation accuracy (%), mean ± sd over seeds",
        cost,
    )


def _finish(
    figure: Any,
    axes: Any,
    path: Path,
    budget_flops: int,
    title: str,
    ylabel: str,
    cost: Cost = "flops",
) -> None:
    """The budget line, axes, legend and file every front plot shares."""
    from matplotlib.ticker import FuncFormatter

    axes.axvline(
        budget_flops,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"budget {_flops_text(budget_flops)}",
        zorder=1,
    )
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _flops_text(x)))
    axes.set_xlabel(f"{_AXIS[cost]} ({FLOPS_CONVENTION})")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def write_final_csv(
    path: Path, members: Sequence[FinalMember], front: Sequence[FinalMember]
) -> None:
    on_front = {m.number for m in front}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            (
                "trial",
                "on_front",
                "val_acc_mean",
                "val_acc_sd",
                "seeds",
                "flops",
                "expected_flops",
                "params",
                "label",
                "baseline",
                "final_trials",
            )
        )
        for m in members:
            writer.writerow(
                (
                    m.number,
                    m.number in on_front,
                    m.val_mean,
                    m.val_sd,
                    len(m.val_accs),
                    m.flops,
                    m.expected_flops,
                    _blank(m.params),
                    m.label,
                    _blank(m.baseline),
                    " ".join(map(str, m.trials)),
                )
            )
