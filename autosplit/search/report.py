"""What a search shows on its parent run: the Pareto front (front.csv/.png/.html), the
hypervolume history, the final stage, and the run's description in ``mlflow ui``.

Computed here from the study's records (with ``front`` and ``front_plots``) and handed to the
tracker, which only logs: the tracker knows nothing of fronts, the search nothing of MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from autosplit.search.attrs import State
from autosplit.search.front import (
    FLOPS_CONVENTION,
    Cost,
    FinalMember,
    TrialRecord,
    final_front,
    hypervolume_history,
    margin,
    pareto_front,
)
from autosplit.search.front_text import margin_line, tau_lines

if TYPE_CHECKING:
    from autosplit.tracking import Tracker


class SearchReport:
    """The parent run's figures for one search under ``budget_flops``, logged by ``tracker``.

    Nothing is drawn while the tracker records nothing (``--no-tracking``, or a store that
    failed): the plots exist only to be logged.
    """

    def __init__(
        self, tracker: Tracker, study_name: str, budget_flops: int, cost: Cost = "flops"
    ) -> None:
        self.tracker, self.study_name, self.budget_flops = tracker, study_name, budget_flops
        self.cost = cost  # the FLOPs figure the search optimises: fronts and plots use it too
        self._hypervolume_step = -1  # finished-trial count of the last hypervolume point
        self._note: str | None = None  # the last description ``front`` wrote

    def front(self, records: list[TrialRecord]) -> None:
        """Rewrite front.csv/.png/.html and hypervolume.csv on the parent run; log the metric.

        ``search/hypervolume`` gets one point per call, stepped by the number of finished
        trials seen; hypervolume.csv holds the exact per-trial history (trials may finish out of
        order across workers, which a metric history could not rewrite).
        """
        from autosplit.search import front_plots

        if not self.tracker.enabled:
            return
        budget, cost = self.budget_flops, self.cost
        front = pareto_front(records, budget, cost=cost)
        history = hypervolume_history(records, budget, cost=cost)
        finished = sum(1 for r in records if r.state not in (State.RUNNING, State.WAITING))
        metrics = {"search/front_size": float(len(front))}
        if front:
            metrics["search/best_val_acc"] = max(float(r.val_acc or 0.0) for r in front)
        if finished > self._hypervolume_step:
            self._hypervolume_step = finished
            metrics["search/hypervolume"] = history[-1][1] if history else 0.0
        self._note = search_note(self.study_name, {}, budget, front, cost=cost)
        with tempfile.TemporaryDirectory(prefix="autosplit-front-") as tmp:
            folder = Path(tmp)
            front_plots.write_csv(folder / "front.csv", front)
            front_plots.write_history_csv(folder / "hypervolume.csv", history)
            title = f"{self.study_name} — budget {budget:,} FLOPs"
            front_plots.write_png(folder / "front.png", records, front, budget, title, cost)
            front_plots.write_html(folder / "front.html", records, front, budget, title, cost)
            self.tracker.log_parent(
                "update the front artifacts",
                artifacts=[
                    folder / n for n in ("front.csv", "front.png", "front.html", "hypervolume.csv")
                ],
                metrics=metrics,
                step=finished,
                note=self._note,
            )

    def final_stage(
        self,
        members: list[FinalMember],
        rungs: dict[int, list[TrialRecord]],
        proxy: Mapping[int, Mapping[str, float | None]],
    ) -> None:
        """The final front (with ±1 sd error bars), each rung's front, and the proxy's Kendall
        tau against the final stage, on the parent run."""
        from autosplit.search import front_plots

        if not self.tracker.enabled:
            return
        budget, name, cost = self.budget_flops, self.study_name, self.cost
        front = final_front(members, budget, cost=cost)
        with tempfile.TemporaryDirectory(prefix="autosplit-final-") as tmp:
            folder = Path(tmp)
            paths = [folder / "final_front.csv", folder / "final_front.png"]
            front_plots.write_final_csv(paths[0], members, front)
            front_plots.write_final_png(
                paths[1], members, front, budget, f"{name} — final stage", cost
            )
            for rung, records in sorted(rungs.items()):
                paths.append(folder / f"rung{rung}_front.png")
                rung_front = pareto_front(records, budget, cost=cost)
                front_plots.write_png(
                    paths[-1], records, rung_front, budget, f"{name} — rung {rung}", cost
                )
            metrics = final_metrics(members, front, proxy)
            # The parent's description ends with what a user comes for: the margin, and how far
            # the cheap rungs predicted the final stage.
            note = "\n\n".join(
                [self._note or "", "**" + margin_line(members) + "**", *tau_lines(proxy)]
            )
            self.tracker.log_parent(
                "log the final stage", artifacts=paths, metrics=metrics, note=note.strip()
            )


def final_metrics(
    members: list[FinalMember],
    front: list[FinalMember],
    proxy: Mapping[int, Mapping[str, float | None]],
) -> dict[str, float]:
    """The final stage's figures on the parent run: each rung's Kendall tau (n always; tau and p
    where there is a figure), the best member's margin over the best baseline, and the best
    member on the front with its number of seeds (its sd only over two or more: one seed has
    none, and a logged 0.0 would read as a perfectly repeatable result)."""
    metrics: dict[str, float] = {}
    for k, v in proxy.items():
        metrics[f"final/kendall_n_rung{k}"] = float(v["n"] or 0)
        if v.get("tau") is not None:
            metrics[f"final/kendall_tau_rung{k}"] = float(v["tau"])
            metrics[f"final/kendall_p_rung{k}"] = float(v["p"])
    found = margin(members)
    if found is not None:
        metrics["final/margin_delta"] = found.delta
        metrics["final/margin_seeds"] = float(len(found.seeds))
        if found.pooled_sd is not None:
            metrics["final/margin_pooled_sd"] = found.pooled_sd
            metrics["final/margin_exceeds_sd"] = float(abs(found.delta) > found.pooled_sd)
    if front:
        best = max(front, key=lambda m: m.val_mean)
        metrics["final/best_val_acc_mean"] = best.val_mean
        metrics["final/best_val_acc_seeds"] = float(len(best.val_accs))
        if len(best.val_accs) > 1:
            metrics["final/best_val_acc_sd"] = best.val_sd
        metrics["final/front_size"] = float(len(front))
    return metrics


def search_note(
    study_name: str,
    settings: Mapping[str, object],
    budget_flops: int | None,
    front: list[TrialRecord],
    *,
    cost: Cost = "flops",
) -> str:
    """The parent run's description in ``mlflow ui``: what is searched and how to read it."""
    lines = [f"## autosplit search — study `{study_name}`", ""]
    if budget_flops is not None:
        lines.append(f"**Budget: {budget_flops:,} FLOPs** ({FLOPS_CONVENTION}).")
    elif "budget" in settings or "budget_flops" in settings:
        lines.append(
            f"**Budget: {settings.get('budget', settings.get('budget_flops'))} FLOPs** "
            f"({FLOPS_CONVENTION})."
        )
    if front:
        best = max(front, key=lambda r: r.val_acc or 0.0)
        lines.append(
            f"Front: {len(front)} trial(s); most accurate: trial {best.number} "
            f"({best.label}) {best.val_acc:.2f}% at {best.flops:,} FLOPs."
        )
    lines += [
        "",
        "Objectives: maximise validation accuracy (split carved from train; test untouched), "
        f"minimise {'expected' if cost == 'expected_flops' else 'worst-case'} FLOPs (the front, "
        "its plots and hypervolume use the same figure); constraint worst-case FLOPs <= budget "
        "(over-budget candidates are never trained).",
        "",
        "How to read: open the **Artifacts** tab — `front.html` (interactive, hover for trial "
        "and recipe) or `front.png`: grey = every trial, coloured line = the Pareto front (no "
        "feasible trial is both more accurate and cheaper), dashed line = budget, stars = "
        "baselines (equal-budget KD, DKD and FitNets students). `front.csv` lists the "
        "front with run ids. Metric `search/hypervolume` (0-1, higher is better) tracks the "
        "front's progress; the child runs hold one trial each (params = the candidate).",
    ]
    return "\n".join(lines)
