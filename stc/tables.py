"""The paper's tables with our numbers beside them: pandas DataFrames, Markdown and CSV.

`build_table(key, scores, latency, profile=..., label=...)` gives one table of the paper
(`stc.paper_numbers.PAPER_TABLES`, rows from `stc.workflow.TABLE_SPECS`) as a DataFrame indexed by
row, with columns (metric, source) for source in ("paper", <ours>, "diff"); <ours> is "tiny" for the
tiny profile and "ours" otherwise, and diff = ours - paper. Rows without results (a method not run, a
baseline not available, another base model) keep NaN and say why in ``frame.attrs["status"]``.

`scores` come from the workflow's merged score files (`load_scores`), `latency` from a latency JSON
(`load_latency`, the format `stc.latency` writes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from stc.paper_numbers import PAPER_TABLES
from stc.workflow import TABLE_SPECS, TableRow, canonical_method

# The latency columns: time for 16 frames (the paper's "ViT Enc." and "LLM Pref."), in ms.
LATENCY_FRAMES = 16
LATENCY_COLUMNS = {"ViT": "vit_ms_per_frame", "Prefill": "prefill_ms_per_frame"}

STREAMINGBENCH_TASKS = {
    "CS": "Clips Summarize", "OP": "Object Perception", "ATP": "Attribute Perception",
    "PR": "Prospective Reasoning", "ACP": "Action Perception", "SU": "Spatial Understanding",
    "EU": "Event Understanding", "CT": "Counting", "TR": "Text-Rich Understanding", "CR": "Causal Reasoning",
}  # fmt: skip
OVO_GROUP_COLUMNS = {"RT-Avg": "real-time", "BT-Avg": "backward", "FAR-Avg": "forward"}
VIDEOMME_COLUMNS = {"VideoMME Short": "short", "VideoMME Medium": "medium", "VideoMME Long": "long"}
MISSING = "–"


def ours_name(profile: str) -> str:
    """The name of our column: the profile for toy profiles ("tiny"), "ours" for the paper profile."""
    return "ours" if profile == "paper" else profile


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def load_scores(scores_dir: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """{(benchmark, method): the merged score record} from <scores_dir>/<benchmark>/<method>.json."""
    out = {}
    root = Path(scores_dir)
    for path in sorted(root.glob("*/*.json")) if root.is_dir() else []:
        record = json.loads(path.read_text(encoding="utf-8"))
        out[(path.parent.name, path.stem)] = record
    return out


def _flat_latency_rows(data: Mapping, source: str) -> list[dict]:
    rows = []
    meta = data.get("meta", {})
    for row in data.get("rows", []):
        common = {k: v for k, v in row.items() if k != "checkpoints"}
        common.update(source=source, device=meta.get("device"), dtype=meta.get("dtype"))
        if "checkpoints" in row:
            for frames, stages in row["checkpoints"].items():
                rows.append({**common, **stages, "frames": int(frames), "stream_frames": row.get("frames")})
        else:
            rows.append(common)
    return rows


def load_latency(paths: str | os.PathLike | Iterable[str | os.PathLike] | None) -> pd.DataFrame:
    """Latency rows of one or more latency JSON files, one row per (method, frames).

    Accepts rows with per-checkpoint stages ({"method", "frames", "checkpoints": {"16": {...}}, ...}, as
    `stc.latency.measure_stream` returns) and flat rows ({"method", "frames", "vit_ms_per_frame", ...}).
    Missing files are skipped; no file gives an empty frame.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            rows += _flat_latency_rows(json.loads(path.read_text(encoding="utf-8")), path.name)
    columns = ["method", "frames", "vit_ms_per_frame", "projector_ms_per_frame", "prefill_ms_per_frame", "qa_ms",
               "peak_memory_gb", "tokens_per_frame", "source", "device", "dtype"]  # fmt: skip
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = pd.Series(dtype=object if column in ("method", "source", "device", "dtype") else float)
    return frame[columns + [c for c in frame.columns if c not in columns]]


def _same_method(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return canonical_method(a) == canonical_method(b)
    except ValueError:
        return False


def latency_value(latency: pd.DataFrame, method: str, column: str, frames: int = LATENCY_FRAMES) -> float | None:
    """ms per `frames` frames of a latency column ("vit_ms_per_frame", ...) for a method, or None."""
    if latency is None or latency.empty:
        return None
    hits = latency[(latency["frames"] == frames) & latency["method"].map(lambda m: _same_method(str(m), method))]
    values = hits[column].dropna() if column in hits else []
    return float(values.iloc[0]) * frames if len(values) else None


# ---------------------------------------------------------------------------------------------------
# Our values
# ---------------------------------------------------------------------------------------------------


def _summary(scores: Mapping, benchmark: str, method: str) -> tuple[dict | None, str]:
    record = scores.get((benchmark, canonical_method(method)))
    if record is None:
        return None, f"not run ({benchmark})"
    if record.get("status") != "ok" or record.get("summary") is None:
        return None, f"{record.get('status', 'missing')} ({benchmark}): {record.get('reason')}"
    return record["summary"], "ok"


def benchmark_overall(scores: Mapping, benchmark: str, method: str) -> float | None:
    """A method's headline accuracy on one benchmark, or None without results."""
    summary, _ = _summary(scores, benchmark, method)
    return _get(summary, "overall")


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) or not values else sum(values) / len(values)


def _get(mapping: Mapping | None, key: str) -> float | None:
    value = (mapping or {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def ours_values(key: str, row: TableRow, scores: Mapping, latency: pd.DataFrame | None) -> tuple[dict[str, float | None], str]:
    """Our value for every column of table `key` in `row`, and the row's status ("ok" or why not)."""
    columns = PAPER_TABLES[key].columns
    spec = TABLE_SPECS[key]
    if row.method is None:
        return {c: None for c in columns}, row.note or "not reproducible here"
    summaries, statuses = {}, []
    for benchmark in spec.benchmarks:
        summaries[benchmark], status = _summary(scores, benchmark, row.method)
        if status != "ok":
            statuses.append(status)
    out: dict[str, float | None] = {}
    ovo, sb = summaries.get("ovobench"), summaries.get("streamingbench")
    for column in columns:
        if column in LATENCY_COLUMNS:
            out[column] = latency_value(latency, row.method, LATENCY_COLUMNS[column])
        elif key == "table1":
            if column == "Overall":
                out[column] = _get(ovo, "overall")
            elif column in OVO_GROUP_COLUMNS:
                out[column] = _get(ovo and ovo["per_group"], OVO_GROUP_COLUMNS[column])
            else:
                out[column] = _get(ovo and ovo["per_task"], column)
        elif key == "table2":
            out[column] = _get(sb, "overall") if column == "Overall" else _get(sb and sb["per_task"], STREAMINGBENCH_TASKS[column])
        elif key == "table3":
            vm = summaries.get("videomme")
            if column == "EgoSchema":
                out[column] = _get(summaries.get("egoschema"), "overall")
            elif column == "MLVU-dev":
                out[column] = _get(summaries.get("mlvu"), "overall")
            elif column == "VideoMME Overall":
                out[column] = _get(vm, "overall")
            elif column in VIDEOMME_COLUMNS:
                out[column] = _get(vm and vm["per_group"], VIDEOMME_COLUMNS[column])
            else:  # Average of the three benchmarks' headline numbers
                out[column] = _mean([out["EgoSchema"], out["MLVU-dev"], out["VideoMME Overall"]])
        else:  # ablations: OVO-Bench EPM / STU / REC, then EgoSchema or their average
            if column == "Ego":
                out[column] = _get(summaries.get("egoschema"), "overall")
            elif column == "Avg":
                out[column] = _mean([out["EPM"], out["STU"], out["REC"]])
            else:
                out[column] = _get(ovo and ovo["per_task"], column)
    return out, "ok" if not statuses else "; ".join(statuses)


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


def build_long(key: str, scores: Mapping, latency: pd.DataFrame | None = None, *, profile: str = "paper",
               label: str = "") -> pd.DataFrame:  # fmt: skip
    """Table `key` in long form: one line per (row, metric) with paper, ours and diff = ours - paper."""
    if key not in PAPER_TABLES:
        raise KeyError(f"unknown table {key!r}; known: {', '.join(PAPER_TABLES)}")
    paper = PAPER_TABLES[key]
    records = []
    for row in TABLE_SPECS[key].rows:
        printed = paper.row(row.paper_label).values if row.paper_label is not None else (None,) * len(paper.columns)
        ours, status = ours_values(key, row, scores, latency)
        for column, paper_value in zip(paper.columns, printed):
            value = ours[column]
            records.append({
                "table": key, "row": row.label, "method": row.method, "metric": column,
                "paper": math.nan if paper_value is None else paper_value,
                "ours": math.nan if value is None else value,
                "status": status, "profile": profile, "label": label,
            })  # fmt: skip
    frame = pd.DataFrame.from_records(records)
    frame["diff"] = frame["ours"] - frame["paper"]
    return frame


def build_table(key: str, scores: Mapping, latency: pd.DataFrame | None = None, *, profile: str = "paper",
                label: str = "") -> pd.DataFrame:  # fmt: skip
    """Table `key` wide: index = rows, columns = (metric, "paper" | ours_name(profile) | "diff").

    attrs: key, title, notes, label, profile, ours (the name of our column), status and method per row.
    """
    long = build_long(key, scores, latency, profile=profile, label=label)
    ours = ours_name(profile)
    paper = PAPER_TABLES[key]
    rows = list(dict.fromkeys(long["row"]))
    columns = pd.MultiIndex.from_product([paper.columns, ["paper", ours, "diff"]], names=["metric", "source"])
    wide = pd.DataFrame(index=pd.Index(rows, name="row"), columns=columns, dtype=float)
    for record in long.itertuples():
        wide.loc[record.row, (record.metric, "paper")] = record.paper
        wide.loc[record.row, (record.metric, ours)] = record.ours
        wide.loc[record.row, (record.metric, "diff")] = record.diff
    first = long.drop_duplicates("row").set_index("row")
    notes = list(paper.notes) + ([TABLE_SPECS[key].note] if TABLE_SPECS[key].note else [])
    if TABLE_SPECS[key].latency and latency is not None and "source" in latency and not latency.empty:
        for _, src in latency.drop_duplicates("source").iterrows():
            notes.append(f"Our ViT / Prefill: {src['source']} ({src.get('device')}, {src.get('dtype')}); "
                         f"ms per frame at {LATENCY_FRAMES} frames x {LATENCY_FRAMES}.")
    wide.attrs.update(
        key=key, title=paper.title, notes=notes, label=label, profile=profile, ours=ours,
        status=first["status"].to_dict(), method=first["method"].to_dict(),
    )  # fmt: skip
    return wide


def build_all(scores: Mapping, latency: pd.DataFrame | None = None, *, tables: Iterable[str] | None = None,
              profile: str = "paper", label: str = "") -> dict[str, pd.DataFrame]:  # fmt: skip
    return {key: build_table(key, scores, latency, profile=profile, label=label) for key in (tables or PAPER_TABLES)}


def _fmt(value: float) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def to_markdown(table: pd.DataFrame) -> str:
    """A Markdown table: each cell "paper / ours (diff)", a status column, then the notes."""
    attrs = table.attrs
    ours = attrs.get("ours", "ours")
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    lines = [f"## {attrs.get('title', attrs.get('key', 'table'))}", ""]
    if attrs.get("label"):
        lines += [f"**{attrs['label']}**", ""]
    legend = f"Each cell: paper / {ours} ({ours} - paper); {MISSING} = no number."
    if any(m in LATENCY_COLUMNS for m in metrics):
        legend += f" ViT, Prefill: ms for {LATENCY_FRAMES} frames."
    lines += [legend, ""]
    lines.append("| row | " + " | ".join(metrics) + " | status |")
    lines.append("|---" * (len(metrics) + 2) + "|")
    for row in table.index:
        cells = []
        for metric in metrics:
            paper, value, diff = (table.loc[row, (metric, s)] for s in ("paper", ours, "diff"))
            cell = f"{_fmt(paper)} / {_fmt(value)}"
            if not math.isnan(diff):
                cell += f" ({diff:+.1f})"
            cells.append(cell)
        status = attrs.get("status", {}).get(row, "")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {status} |")
    notes = attrs.get("notes") or []
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def to_long(table: pd.DataFrame) -> pd.DataFrame:
    """A table from `build_table` in long form: one line per (row, metric), columns as `build_long`'s."""
    attrs = table.attrs
    ours = attrs.get("ours", "ours")
    records = []
    for row in table.index:
        for metric in dict.fromkeys(table.columns.get_level_values(0)):
            records.append({
                "table": attrs.get("key"), "row": row, "method": attrs.get("method", {}).get(row), "metric": metric,
                "paper": table.loc[row, (metric, "paper")], "ours": table.loc[row, (metric, ours)],
                "diff": table.loc[row, (metric, "diff")], "status": attrs.get("status", {}).get(row),
                "profile": attrs.get("profile"), "label": attrs.get("label"),
            })  # fmt: skip
    return pd.DataFrame.from_records(records)


def write_table(table: pd.DataFrame, markdown_path: str | os.PathLike, csv_path: str | os.PathLike) -> None:
    """Write a table from `build_table` as Markdown (wide, readable) and CSV (long: one line per row and metric)."""
    for path in (markdown_path, csv_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(markdown_path).write_text(to_markdown(table), encoding="utf-8")
    to_long(table).to_csv(csv_path, index=False)
