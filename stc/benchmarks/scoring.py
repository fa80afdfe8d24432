"""Official metrics of each benchmark, computed from the driver's JSON-lines rows.

All accuracies are percentages (0-100). A row with an `error` (e.g. a missing video) counts as
answered wrongly: it stays in `n` and in the denominators, and `n_errors` counts it.

Correctness is recomputed from each row's `kind`, `answer` and `response` (not read from its
`correct` field), so a results file can be re-scored after a rule changes:
- "mc": the ReKV parse of the response (character before the first ")", else the first
  character) equals the gold letter. This is StreamingBench's "first letter" rule for the
  "X) ..." responses the ReKV prompt yields; for OVO-Bench's backward / real-time items it
  replaces OVO-Bench's "gold letter appears anywhere in the response", which with the
  "Best option: (" prompt would accept any response that happens to contain that capital.
- "yesno" (OVO SSR/CRR): the response is exactly "Y"/"N" matching the gold, or contains the
  gold word "Yes"/"No" (OVO-Bench's rule).
- "count" (OVO REC): all digits of the response joined equal the gold count (OVO-Bench's rule).

Aggregates:
- streamingbench: accuracy per task_type and over all questions.
- ovobench: accuracy per task; each group's average is the mean of its tasks' accuracies;
  Overall is the mean of the group averages (of the groups present).
- mlvu: accuracy over all questions and per task; extra["M-Avg"] = mean of the task accuracies.
- egoschema: accuracy over all questions.
- videomme: accuracy over all questions, per duration (short/medium/long) and per task_type.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stc.benchmarks.loaders import OVO_GROUPS
from stc.benchmarks.prompts import parse_count, parse_mc

BENCHMARKS = ("streamingbench", "ovobench", "mlvu", "egoschema", "videomme")
OVO_GROUP_ORDER = ("real-time", "backward", "forward")
ROW_FIELDS = ("qid", "task", "kind", "answer", "response", "error")


def is_correct(kind: str, answer: str, response: str | None) -> bool:
    """Whether `response` answers correctly under the benchmark rule for `kind` (module docstring)."""
    if response is None:
        return False
    if kind == "mc":
        return parse_mc(response) == answer
    if kind == "yesno":
        if response.strip() in ("Y", "N"):
            return (response.strip() == "Y") == (answer == "Yes")
        return answer in response
    if kind == "count":
        return parse_count(response) == answer
    raise ValueError(f"unknown question kind {kind!r}; expected 'mc', 'yesno' or 'count'")


@dataclass
class Summary:
    """Scores of one (method, benchmark) run.

    overall: the benchmark's headline accuracy (%); per_task / per_group: accuracy (%) by task
    and by group (OVO-Bench groups, Video-MME durations); task_counts / group_counts: questions
    behind each; extra: other official figures (MLVU "M-Avg"); n: rows scored; n_errors: rows
    that carry an error (counted as wrong).
    """

    benchmark: str
    overall: float
    per_task: dict[str, float] = field(default_factory=dict)
    per_group: dict[str, float] = field(default_factory=dict)
    task_counts: dict[str, int] = field(default_factory=dict)
    group_counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    n: int = 0
    n_errors: int = 0

    def to_frame(self):
        """One row per figure: columns benchmark, level (overall/group/task/extra), name, accuracy, n."""
        import pandas as pd

        records = [(self.benchmark, "overall", "Overall", self.overall, self.n)]
        records += [(self.benchmark, "group", k, v, self.group_counts.get(k)) for k, v in self.per_group.items()]
        records += [(self.benchmark, "task", k, v, self.task_counts.get(k)) for k, v in self.per_task.items()]
        records += [(self.benchmark, "extra", k, v, None) for k, v in self.extra.items()]
        return pd.DataFrame(records, columns=["benchmark", "level", "name", "accuracy", "n"])


def _accuracy(values: list[bool]) -> float:
    return 100.0 * sum(values) / len(values) if values else math.nan


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _check_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    checked, seen = [], set()
    for index, row in enumerate(rows):
        missing = [key for key in ROW_FIELDS if key not in row]
        if missing:
            raise ValueError(f"result row {index} lacks fields {missing}; rows must come from run_benchmark")
        if row["qid"] in seen:
            raise ValueError(f"result row {index}: question {row['qid']!r} appears twice; delete the duplicate")
        seen.add(row["qid"])
        checked.append(row)
    return checked


def score(benchmark: str, rows: Iterable[Mapping[str, Any]]) -> Summary:
    """Score the driver's rows of one benchmark ("synthetic-<name>" scores like <name>)."""
    base = benchmark.removeprefix("synthetic-")
    if base not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS} (or 'synthetic-<name>')")
    rows = _check_rows(rows)
    correct = [row["error"] is None and is_correct(row["kind"], row["answer"], row["response"]) for row in rows]
    by_task: dict[str, list[bool]] = {}
    for row, ok in zip(rows, correct):
        by_task.setdefault(row["task"], []).append(ok)
    summary = Summary(
        benchmark=benchmark,
        overall=_accuracy(correct),
        per_task={task: _accuracy(values) for task, values in sorted(by_task.items())},
        task_counts={task: len(values) for task, values in sorted(by_task.items())},
        n=len(rows),
        n_errors=sum(row["error"] is not None for row in rows),
    )
    if base == "ovobench":
        tasks_by_group: dict[str, list[str]] = {}
        for task in summary.per_task:
            group = OVO_GROUPS.get(task)
            if group is None:
                raise ValueError(f"OVO-Bench rows have unknown task {task!r}; expected one of {sorted(OVO_GROUPS)}")
            tasks_by_group.setdefault(group, []).append(task)
        for group in OVO_GROUP_ORDER:
            if group in tasks_by_group:
                summary.per_group[group] = _mean(summary.per_task[t] for t in tasks_by_group[group])
                summary.group_counts[group] = sum(summary.task_counts[t] for t in tasks_by_group[group])
        summary.overall = _mean(summary.per_group.values())
    elif base == "mlvu":
        summary.extra["M-Avg"] = _mean(summary.per_task.values())
    elif base == "videomme":
        by_duration: dict[str, list[bool]] = {}
        for row, ok in zip(rows, correct):
            by_duration.setdefault(row.get("group") or "unknown", []).append(ok)
        order = ["short", "medium", "long"] + sorted(set(by_duration) - {"short", "medium", "long"})
        for group in order:
            if group in by_duration:
                summary.per_group[group] = _accuracy(by_duration[group])
                summary.group_counts[group] = len(by_duration[group])
    return summary
