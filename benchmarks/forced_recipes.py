"""Are final jobs planned from measurement? Each method recipe forced as the search's only
candidate, on Fashion-MNIST, the whole job run as a user runs it.

For each recipe of ``--recipes`` (default: the space's portfolio), a copy of ``--space`` whose
portfolio is that recipe alone and whose trial cap is the baselines plus one: the search trains
the KD, DKD and FitNets baselines and the recipe, and the final stage trains the recipe and the
baselines. Each runs as ``autosplit search`` in a child process under ``--time-limit`` (the
cached or shipped teacher, so the limit is search + final stage); its wall time is measured
around the process. The table gives, for every final job, the seconds the plan gave it (cache
build, auto-encoder, training) against the seconds it took, and each run's wall time against
its limit. The goals: each job within 20 % of its estimate, the whole job within the limit
+ 5 %.

Each finished run is appended to ``<out>/results.jsonl`` at once, and a second invocation skips
it (a run cut short runs again, in a fresh study). The tables are printed from that file.

Usage: python benchmarks/forced_recipes.py [--recipes rkd reskd era iekd aekt]
           [--budget 0.25] [--time-limit 30m] [--runs-dir runs] [--out DIR] [--tables-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from autosplit.config import atomic_write_text, dump_yaml, load_yaml
from autosplit.search.attrs import Stage, TrialAttrs
from autosplit.search.budget import parse_duration

ROOT = Path(__file__).resolve().parent.parent
JOB_GOAL = 0.20  # each final job within 20 % of its estimate
WALL_GOAL = 0.05  # the whole job within its limit + 5 %


def forced_space(space: dict[str, Any], recipe: str) -> dict[str, Any]:
    """``space`` with ``recipe`` as its only portfolio trial and no sampled trial after it."""
    forced = json.loads(json.dumps(space))  # a deep copy of plain YAML data
    search = forced.setdefault("search", {})
    search["portfolio"] = [recipe]
    search["trials"] = len(search.get("baselines") or {}) + 1
    return forced


def read_jobs(storage: str, study_name: str) -> list[dict[str, Any]]:
    """The study's final jobs in the order they were enqueued: member label, role, seed,
    planned and taken seconds by part (``None`` where the job did not run)."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    attrs = {t.number: TrialAttrs.read(t) for t in trials}
    jobs = []
    for trial in trials:
        job = attrs[trial.number]
        if job.stage != Stage.FINAL:
            continue
        member = attrs.get(job.member) if job.member is not None else None
        jobs.append(
            {
                "member": job.member,
                "label": (member.baseline or member.label) if member else "?",
                "role": str(job.role or ""),
                "seed": job.seed,
                "state": trial.state.name,
                "planned": job.estimate_s,
                "took": job.actual_s,
            }
        )
    return jobs


def run_one(recipe: str, args: argparse.Namespace, out: Path, base: dict[str, Any]) -> dict:
    storage = f"sqlite:///{out}/optuna.db"
    taken = optuna.get_all_study_names(storage) if (out / "optuna.db").is_file() else []
    prefix = f"forced-{args.budget}-{recipe}-"
    name = f"{prefix}{sum(1 for s in taken if s.startswith(prefix))}"
    space_path = out / "spaces" / f"{name}.yaml"
    space_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(space_path, dump_yaml(forced_space(base, recipe)))
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        "import sys; from autosplit.cli import main; sys.exit(main())",
        "search",
        "--space",
        str(space_path),
        "--budget",
        f"{args.budget}x",
        "--time-limit",
        args.time_limit,
        "--study-name",
        name,
        "--storage",
        storage,
        "--tracking-uri",
        f"sqlite:///{out}/mlflow.db",
        "--runs-dir",
        str(Path(args.runs_dir).resolve()),
        "--quiet",
    ]
    print(f"{recipe}: {' '.join(command[3:])}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if code.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:]
        sys.exit(f"{recipe}: autosplit search exited {code.returncode}: {tail} (see {log_path})")
    plan = next(
        (line for line in log_path.read_text().splitlines() if line.startswith("plan:")), ""
    )
    return {
        "key": f"{args.budget}/{recipe}",
        "study": name,
        "wall": wall,
        "limit": parse_duration(args.time_limit),
        "plan": plan,
        "jobs": read_jobs(storage, name),
    }


def seconds(part: dict[str, Any] | None, key: str = "total") -> float | None:
    return None if not part or part.get(key) is None else float(part[key])


def tables(rows: list[dict[str, Any]]) -> None:
    print("\n| recipe | wall s / limit s | within limit + 5 % | plan |")
    print("|---|---|---|---|")
    for row in rows:
        over = row["wall"] / row["limit"] - 1
        print(
            f"| {row['key']} | {row['wall']:,.0f} / {row['limit']:,.0f} ({over:+.1%}) | "
            f"{'yes' if over <= WALL_GOAL else 'NO'} | {row['plan']} |"
        )
    print(
        "\n| recipe | job (role, seed) | planned s: cache + prepare + train + overhead = total | "
        "took s: cache + prepare + train + overhead = total | took / planned |"
    )
    print("|---|---|---|---|---|")
    ratios: list[float] = []
    for row in rows:
        for job in row["jobs"]:
            planned, took = job["planned"], job["took"]

            def parts(d: dict[str, Any] | None) -> str:
                if not d:
                    return "not run"
                return (
                    " + ".join(
                        f"{float(d.get(k) or 0):.1f}"
                        for k in ("cache", "prepare", "train", "overhead")
                    )
                    + f" = {float(d['total']):.1f}"
                )

            p, t = seconds(planned), seconds(took)
            ratio = f"{t / p:.2f}" if p and t is not None else "-"
            if p and t is not None:
                ratios.append(t / p)
            print(
                f"| {row['key']} | {job['label']} ({job['role']}, {job['seed']}) | "
                f"{parts(planned)} | {parts(took)} | {ratio} |"
            )
    if ratios:
        within = sum(1 for r in ratios if abs(r - 1) <= JOB_GOAL)
        print(
            f"\n{within} of {len(ratios)} jobs within {JOB_GOAL:.0%} of their estimate; "
            f"took / planned {statistics.fmean(ratios):.2f} mean, "
            f"{min(ratios):.2f} to {max(ratios):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "fashion_mnist.yaml"))
    parser.add_argument("--recipes", nargs="+", default=None, help="default: the portfolio")
    parser.add_argument("--budget", default="0.25", help="a fraction of the teacher's FLOPs")
    parser.add_argument("--time-limit", default="30m", help="each run's whole-job limit")
    parser.add_argument("--runs-dir", default="runs", help="holds the cached teacher")
    parser.add_argument("--out", default=None, help="default: <runs-dir>/bench-forced-recipes")
    parser.add_argument("--tables-only", action="store_true", help="print what has finished")
    args = parser.parse_args()
    out = (
        Path(args.out).resolve()
        if args.out
        else Path(args.runs_dir).resolve() / "bench-forced-recipes"
    )
    out.mkdir(parents=True, exist_ok=True)
    base = load_yaml(Path(args.space))
    recipes = args.recipes or list((base.get("search") or {}).get("portfolio") or [])
    results_path = out / "results.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a kill: that run goes again
                continue
            done[row["key"]] = row
    if not args.tables_only:
        for recipe in recipes:
            if f"{args.budget}/{recipe}" in done:
                continue
            row = run_one(recipe, args, out, base)
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
            done[row["key"]] = row
    tables([done[k] for k in done if k.startswith(f"{args.budget}/")])


if __name__ == "__main__":
    main()
