"""The Pareto front as the text ``autosplit front`` and ``autosplit search`` print: the search's
and the final stage's tables, the margin and τ lines, the final jobs' planned and actual time.

Pure, like ``front.py``, whose records and fronts it prints: the caller reads the study.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autosplit.errors import UserError
from autosplit.search.attrs import Stage, State
from autosplit.search.front import (
    FLOPS_CONVENTION,
    MIN_TAU_N,
    Cost,
    FinalMember,
    TrialRecord,
    cost_of,
    final_front,
    final_members,
    margin,
    pareto_front,
    rung_records,
    search_records,
)

if TYPE_CHECKING:
    from autosplit.search.attrs import StudyAttrs, TrialAttrs


@dataclass(frozen=True)
class ExtraColumns:
    """Columns a table shows before ``label`` (``front --latency``): cells by trial number,
    "-" for a trial without any; ``notes`` are printed under the table."""

    header: tuple[str, ...]
    cells: Mapping[int, tuple[str, ...]]
    notes: tuple[str, ...] = ()


def _with_columns(
    header: tuple[str, ...], rows: list[tuple[str, ...]], extra: ExtraColumns | None
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    if extra is None:
        return header, rows
    blank = ("-",) * len(extra.header)
    return header[:-2] + extra.header + header[-2:], [
        row[:-2] + tuple(extra.cells.get(int(row[1]), blank)) + row[-2:] for row in rows
    ]


def _fmt_flops(value: float | None) -> str:
    if value is None:
        return "-"
    # Imported here: autosplit.flops pulls in torch, which a table of numbers does not need
    # until it prints one, and the one formatter keeps figures identical across commands.
    from autosplit.flops import format_flops

    return format_flops(value)


def _train_cost(value: float | None) -> str:
    """Training cost relative to one joint run of the candidate's epochs ("3.0x": a chain whose
    three stages each trained the full schedule)."""
    return "-" if value is None else f"{value:.1f}x"


def _percent(value: float, whole: float | None) -> str:
    return f"{100.0 * value / whole:.0f}%" if whole else "-"


def front_table(
    records: Sequence[TrialRecord],
    budget_flops: int,
    *,
    teacher_flops: int | None = None,
    cost: Cost = "flops",
    extra: ExtraColumns | None = None,
) -> str:
    """The Pareto table ``autosplit front`` prints: the front cheapest first, then baselines.

    Baselines that the search beat are listed under the front (marked, without a rank), so the
    table always shows what the front is measured against. The most accurate front member is
    marked ``best``: it is what ``autosplit export`` writes as best.yaml.
    """
    front = pareto_front(records, budget_flops, cost=cost)
    on_front = {r.number for r in front}
    best = max(front, key=lambda r: (r.val_acc, -cost_of(r, cost), -r.number)) if front else None
    others = sorted(
        (r for r in records if r.baseline and r.number not in on_front), key=lambda r: r.number
    )

    header = (
        "rank",
        "trial",
        "val acc %",
        "FLOPs",
        "%budget",
        "%teacher",
        "exp. FLOPs",
        "params",
        "train",
        "label",
        "mark",
    )
    rows: list[tuple[str, ...]] = []
    for rank, record in enumerate(front, start=1):
        rows.append(
            _row(
                str(rank),
                record,
                budget_flops,
                teacher_flops,
                best is not None and record.number == best.number,
            )
        )
    for record in others:
        rows.append(_row("-", record, budget_flops, teacher_flops, False))
    header, rows = _with_columns(header, rows, extra)

    teacher = f"; teacher {_fmt_flops(teacher_flops)}" if teacher_flops else ""
    against = "expected FLOPs" if cost == "expected_flops" else "worst-case FLOPs"
    out = _table(
        f"Pareto front: max val acc, min {against} — budget {_fmt_flops(budget_flops)} "
        f"FLOPs{teacher} ({FLOPS_CONVENTION})",
        header,
        rows,
        len(front),
        budget_flops,
        empty="  (no feasible complete trial yet)",
    )
    counts = Counter(r.state for r in records)
    over = sum(
        1
        for r in records
        if r.state == State.COMPLETE and r.flops is not None and r.flops > budget_flops
    )
    shown = (State.COMPLETE, State.PRUNED, State.INFEASIBLE, State.FAILED, State.RUNNING)
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in shown)
    others_states = "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s not in shown)
    out.append(
        f"{len(records)} trials: {summary}{others_states}"
        + (f" ({over} complete but over budget)" if over else "")
    )
    return "\n".join(out + list(extra.notes if extra else ()))


def _row(
    rank: str, record: TrialRecord, budget_flops: int, teacher_flops: int | None, is_best: bool
) -> tuple[str, ...]:
    flops = record.flops
    marks = [
        m
        for m in (
            ("best" if is_best else ""),
            (f"baseline:{record.baseline}" if record.baseline else ""),
        )
        if m
    ]
    return (
        rank,
        str(record.number),
        f"{record.val_acc:.2f}" if record.val_acc is not None else "-",
        _fmt_flops(flops),
        _percent(flops, budget_flops) if flops is not None else "-",
        _percent(flops, teacher_flops) if flops is not None else "-",
        _fmt_flops(record.expected_flops),
        f"{record.params:,}" if record.params is not None else "-",
        _train_cost(record.train_cost),
        record.label,
        " ".join(marks),
    )


def mean_sd(accs: Sequence[float]) -> str:
    """ "mean ± sd", or "mean (1 seed)": one seed has no spread to show, and "± 0.00" would
    claim one; an sd below the last digit shows as "± <0.01"."""
    mean = sum(accs) / len(accs)
    if len(accs) < 2:
        return f"{mean:.2f} (1 seed)"
    sd = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
    return f"{mean:.2f} ± {sd:.2f}" if round(sd, 2) > 0 else f"{mean:.2f} ± <0.01"


def margin_line(members: Sequence[FinalMember]) -> str:
    """One line for the user: the margin, or why there is none."""
    found = margin(members)
    if found is not None:
        return found.line()
    if not any(m.baseline for m in members):
        return "margin: no baseline finished the final stage, nothing to compare with"
    if not any(not m.baseline for m in members):
        return "margin: no searched member finished the final stage, only baselines"
    return "margin: the best member and the baselines share no seed"


def tau_lines(proxy: Mapping[int, Mapping[str, float | None]]) -> list[str]:
    """One line per rung: Kendall τ against the final stage with n and p, or why none."""
    lines = []
    for rung, figure in sorted(proxy.items()):
        n = int(figure["n"] or 0)
        tau, p = figure.get("tau"), figure.get("p")
        if n < MIN_TAU_N:
            lines.append(
                f"τ rung {rung} vs final: no figure, {n} member{'s' if n != 1 else ''} trained "
                f"at both (need ≥ {MIN_TAU_N})"
            )
        elif tau is None:
            lines.append(f"τ rung {rung} vs final: no figure, accuracies tied (n = {n})")
        else:
            lines.append(f"τ rung {rung} vs final: {tau:+.2f} (n = {n}, p = {p:.2g})")
    return lines


def final_table(
    members: Sequence[FinalMember],
    budget_flops: int,
    *,
    teacher_flops: int | None = None,
    cost: Cost = "flops",
    fidelity: str = "",
    extra: ExtraColumns | None = None,
) -> str:
    """The final front ``autosplit front`` prints by default: mean ± sd over seeds.

    ``best`` is the most accurate member on the front (what ``export`` writes as best.yaml);
    ``within 1 sd`` marks members whose mean is within one standard deviation of the best's,
    which the seeds cannot tell apart from it.
    """
    front = final_front(members, budget_flops, cost=cost)
    on_front = {m.number for m in front}
    best = (
        max(front, key=lambda m: (m.val_mean, -cost_of(m.record(), cost), -m.number))
        if front
        else None
    )
    others = [m for m in members if m.baseline and m.number not in on_front]
    header = (
        "rank",
        "trial",
        "val acc % (mean ± sd)",
        "seeds",
        "FLOPs",
        "%budget",
        "%teacher",
        "exp. FLOPs",
        "params",
        "train",
        "label",
        "mark",
    )
    rows = []
    for rank, member in enumerate(front, start=1):
        rows.append(_final_row(str(rank), member, best, budget_flops, teacher_flops))
    for member in others:
        rows.append(_final_row("-", member, best, budget_flops, teacher_flops))
    header, rows = _with_columns(header, rows, extra)
    teacher = f"; teacher {_fmt_flops(teacher_flops)}" if teacher_flops else ""
    against = "expected FLOPs" if cost == "expected_flops" else "worst-case FLOPs"
    at = f" at {fidelity}" if fidelity else ""
    return "\n".join(
        _table(
            f"Final front{at}: max mean val acc, min {against} — budget "
            f"{_fmt_flops(budget_flops)} FLOPs{teacher} ({FLOPS_CONVENTION})",
            header,
            rows,
            len(front),
            budget_flops,
            empty="  (no finished final-stage job yet)",
        )
        + list(extra.notes if extra else ())
    )


def _table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    n_front: int,
    budget_flops: int,
    *,
    empty: str,
) -> list[str]:
    """Lines of a front table: the first ``n_front`` rows ranked above the budget rule, the
    rest listed below it as baselines not on the front. The last two columns (label, mark)
    are left-aligned, numbers right-aligned."""
    widths = [
        max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i])
        for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i >= len(header) - 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [title, line(header)]
    out += [line(row) for row in rows[:n_front]]
    if not n_front:
        out.append(empty)
    rule = f"---- budget {_fmt_flops(budget_flops)} "
    out.append(rule + "-" * max(0, len(line(header)) - len(rule)))
    if len(rows) > n_front:
        out.append("baselines not on the front:")
        out += [line(row) for row in rows[n_front:]]
    out.append(
        "train: training cost (images seen x the student's FLOPs) over one joint run of the "
        "trial's epochs; a staged schedule trains every stage for them (train.stage_epochs)"
    )
    return out


def _final_row(
    rank: str,
    member: FinalMember,
    best: FinalMember | None,
    budget_flops: int,
    teacher_flops: int | None,
) -> tuple[str, ...]:
    marks = []
    if best is not None and member.number == best.number:
        marks.append("best")
    elif best is not None and member.val_mean >= best.val_mean - best.val_sd:
        marks.append("within 1 sd of best")
    if member.baseline:
        marks.append(f"baseline:{member.baseline}")
    return (
        rank,
        str(member.number),
        mean_sd(member.val_accs),
        str(len(member.val_accs)),
        _fmt_flops(member.flops),
        _percent(member.flops, budget_flops),
        _percent(member.flops, teacher_flops),
        _fmt_flops(member.expected_flops),
        f"{member.params:,}" if member.params is not None else "-",
        _train_cost(member.train_cost),
        member.label,
        " ".join(marks),
    )


def front_text(
    records: Sequence[TrialRecord],
    info: StudyAttrs,
    *,
    study_name: str,
    rung: int | None,
    fidelity: str = "",
    extra: ExtraColumns | None = None,
) -> str:
    """The final front when the study has one (unless a rung is asked for), else the search's
    front at the top rung, or the front of rung ``rung``. ``info``: what the study stored about
    itself; ``fidelity``: the final stage's, as a line says it; ``extra``: columns to add."""
    budget = int(info.budget_flops)  # type: ignore[arg-type] - study_info checked it is set
    teacher_flops, cost = info.teacher_flops, info.cost
    if rung is not None:
        at = rung_records(records, rung)
        if not at:
            raise UserError(f"--rung {rung}: no trial of study {study_name!r} finished that rung")
        table = front_table(at, budget, teacher_flops=teacher_flops, cost=cost, extra=extra)
        return f"rung {rung}:\n" + table
    members = final_members(records, info.final_members)
    if members:
        return final_table(
            members,
            budget,
            teacher_flops=teacher_flops,
            cost=cost,
            fidelity=fidelity,
            extra=extra,
        )
    return front_table(
        search_records(records), budget, teacher_flops=teacher_flops, cost=cost, extra=extra
    )


def final_jobs_lines(jobs: Iterable[tuple[int, TrialAttrs]]) -> list[str]:
    """Each final-stage job's planned seconds against what it took (skipped ones: planned);
    ``jobs``: (trial number, what it stored) of every trial of the study."""
    lines = []
    for number, attrs in jobs:
        if attrs.stage != Stage.FINAL or attrs.estimate_s is None or attrs.state == State.DUPLICATE:
            continue
        planned = float(attrs.estimate_s["total"])
        if attrs.actual_s is not None:
            actual = float(attrs.actual_s["total"])
            off = f" ({100 * (actual - planned) / planned:+.0f} %)" if planned > 0 else ""
            took = f"took {actual:.1f} s{off}"
        else:
            took = attrs.state or "not run"
        lines.append(
            f"  final job {number}: member {attrs.member} seed {attrs.seed} "
            f"({attrs.role or '-'}, {attrs.label}): planned {planned:.1f} s, {took}"
        )
    return ["final jobs, planned vs actual:", *lines] if lines else []
