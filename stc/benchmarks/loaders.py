"""Loaders that read each benchmark's real annotation file into `Question` records.

Schemas (see docs/benchmarks.md):
- StreamingBench: Real_Time_Visual_Understanding.csv (one row per question).
- OVO-Bench: ovo_bench_new.json (backward / real-time items; forward items with probes).
- MLVU dev: the ReKV/STC JSON, a list of videos with `conversations`.
- EgoSchema subset: the same JSON layout with 5 choices and an answer index.
- Video-MME: the HF parquet rows, read from .parquet (pandas + pyarrow) or from the same rows
  exported as JSON lines (.jsonl) or a JSON list (.json).

Every loader validates each record and raises BenchmarkFormatError naming the file, the record
(index and id) and the field that is wrong.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from stc.benchmarks.records import BenchmarkFormatError, Question

OVO_GROUPS = MappingProxyType({
    "OCR": "real-time", "ACR": "real-time", "ATR": "real-time",
    "STU": "real-time", "FPD": "real-time", "OJR": "real-time",
    "EPM": "backward", "ASI": "backward", "HLD": "backward",
    "REC": "forward", "SSR": "forward", "CRR": "forward",
})  # fmt: skip

STREAMINGBENCH_COLUMNS = (
    "question_id", "task_type", "question", "time_stamp", "answer", "options",
    "frames_required", "temporal_clue_type",
)  # fmt: skip

_OPTION_PREFIX = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.)])\s*")
_TIME_STAMP = re.compile(r"^(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)$")
_SB_QUESTION_ID = re.compile(r"sample_(\d+)_(\d+)$")


class _Record:
    """Names one record of one file in error messages."""

    def __init__(self, path: Path, index: int, ident: Any = None) -> None:
        self.path, self.index, self.ident = path, index, ident

    def error(self, field: str, problem: str) -> BenchmarkFormatError:
        where = f"record {self.index}" + (f" (id {self.ident!r})" if self.ident is not None else "")
        return BenchmarkFormatError(f"{self.path}: {where}: field {field!r}: {problem}")

    def get(self, item: dict, field: str, types: type | tuple[type, ...]) -> Any:
        if field not in item:
            raise self.error(field, "missing")
        value = item[field]
        if isinstance(value, bool) or not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            raise self.error(field, f"expected {names}, got {type(value).__name__} {value!r:.80}")
        return value

    def text(self, item: dict, field: str) -> str:
        value = self.get(item, field, str)
        if not value.strip():
            raise self.error(field, "empty text")
        return value

    def seconds(self, item: dict, field: str) -> float:
        value = float(self.get(item, field, (int, float)))
        if not math.isfinite(value) or value < 0:
            raise self.error(field, f"expected a time >= 0 in seconds, got {value!r}")
        return value

    def options(self, value: Any, field: str, strip_prefixes: bool) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            raise self.error(field, f"expected a non-empty list of option texts, got {value!r:.80}")
        if len(value) > 26:
            raise self.error(field, f"{len(value)} options; at most 26 (A-Z) are supported")
        options = []
        for position, option in enumerate(value):
            if not isinstance(option, str) or not option.strip():
                raise self.error(field, f"option {position} is not a non-empty string: {option!r}")
            options.append(strip_option_prefix(option, position) if strip_prefixes else option.strip())
        return tuple(options)

    def letter(self, value: Any, n_options: int, field: str = "answer") -> str:
        letters = [chr(ord("A") + i) for i in range(n_options)]
        if not isinstance(value, str) or value.strip() not in letters:
            raise self.error(field, f"expected one of the option letters {letters}, got {value!r}")
        return value.strip()

    def index_letter(self, value: Any, n_options: int, field: str) -> str:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_options:
            raise self.error(field, f"expected an option index in 0..{n_options - 1}, got {value!r}")
        return chr(ord("A") + value)


def strip_option_prefix(option: str, position: int) -> str:
    """Drop a leading "A. ", "A) " or "(A) " whose letter matches the option's position."""
    match = _OPTION_PREFIX.match(option)
    if match and (match.group(1) or match.group(2)) == chr(ord("A") + position):
        return option[match.end() :].strip()
    return option.strip()


def parse_time_stamp(text: str) -> float:
    """ "HH:MM:SS" (or "H:MM:SS.s") -> seconds. Raises ValueError on anything else."""
    match = _TIME_STAMP.match(text.strip())
    if not match:
        raise ValueError(f"expected a time stamp HH:MM:SS, got {text!r}")
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({error}); re-download the annotation file") from error


def _json_list(path: Path) -> list:
    data = _read_json(path)
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _check_dict(record: _Record, item: Any) -> dict:
    if not isinstance(item, dict):
        raise BenchmarkFormatError(
            f"{record.path}: record {record.index}: expected an object, got {type(item).__name__}"
        )
    return item


# ---------------------------------------------------------------- StreamingBench


def load_streamingbench(path: Path) -> list[Question]:
    """Real_Time_Visual_Understanding.csv -> one mc Question per row, asked at time_stamp."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in STREAMINGBENCH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkFormatError(
                f"{path}: missing CSV columns {missing}; expected header {','.join(STREAMINGBENCH_COLUMNS)}"
            )
        rows = list(reader)
    questions = []
    for index, row in enumerate(rows):
        record = _Record(path, index, row.get("question_id"))
        for column in ("question_id", "task_type", "question", "time_stamp", "answer", "options"):
            if row.get(column) is None or not row[column].strip():
                raise record.error(column, "empty")
        match = _SB_QUESTION_ID.search(row["question_id"])
        if not match:
            raise record.error("question_id", "expected '..._sample_<video>_<k>'")
        try:
            raw_options = ast.literal_eval(row["options"])
        except (ValueError, SyntaxError) as error:
            raise record.error("options", f"not a Python list literal ({error})") from error
        options = record.options(raw_options, "options", strip_prefixes=True)
        try:
            ask_time = parse_time_stamp(row["time_stamp"])
        except ValueError as error:
            raise record.error("time_stamp", str(error)) from error
        questions.append(
            Question(
                benchmark="streamingbench",
                qid=row["question_id"],
                video=f"sample_{match.group(1)}/video.mp4",
                question=row["question"],
                options=options,
                answer=record.letter(row["answer"], len(options)),
                ask_time=ask_time,
                task=row["task_type"].strip(),
                kind="mc",
                extra={
                    "frames_required": row.get("frames_required"),
                    "temporal_clue_type": row.get("temporal_clue_type"),
                },
            )
        )
    return questions


# ---------------------------------------------------------------- OVO-Bench


def rec_question(activity: str) -> str:
    """The REC probe question, as OVO-Bench words it."""
    return f"How many times did they {activity}?"


def load_ovobench(path: Path) -> list[Question]:
    """ovo_bench_new.json -> one Question per backward/real-time item and per forward probe."""
    questions = []
    for index, item in enumerate(_json_list(path)):
        record = _Record(path, index, item.get("id") if isinstance(item, dict) else None)
        item = _check_dict(record, item)
        item_id = record.get(item, "id", (int, str))
        task = record.get(item, "task", str)
        if task not in OVO_GROUPS:
            raise record.error("task", f"unknown task {task!r}; expected one of {sorted(OVO_GROUPS)}")
        group = OVO_GROUPS[task]
        video = record.text(item, "video")
        if group != "forward":
            options = record.options(record.get(item, "options", list), "options", strip_prefixes=False)
            questions.append(
                Question(
                    benchmark="ovobench",
                    qid=str(item_id),
                    video=video,
                    question=record.text(item, "question"),
                    options=options,
                    answer=record.index_letter(item.get("gt"), len(options), "gt"),
                    ask_time=record.seconds(item, "realtime"),
                    task=task,
                    kind="mc",
                    group=group,
                )
            )
            continue
        probes = record.get(item, "test_info", list)
        if not probes:
            raise record.error("test_info", "empty list of probes")
        if task == "REC":
            question_text = rec_question(record.text(item, "activity"))
        elif task == "CRR":
            question_text = record.text(item, "question")
        for probe_index, probe in enumerate(probes):
            probe_record = _Record(path, index, f"{item_id}#{probe_index}")
            if not isinstance(probe, dict):
                raise probe_record.error("test_info", f"probe {probe_index} is not an object")
            ask_time = probe_record.seconds(probe, "realtime")
            extra: dict[str, Any] = {"item_id": item_id, "probe_index": probe_index}
            if task == "REC":
                count = probe_record.get(probe, "count", int)
                if count < 0:
                    raise probe_record.error("count", f"negative count {count}")
                kind, answer = "count", str(count)
                extra["activity"] = item["activity"]
            else:
                probe_type = probe_record.get(probe, "type", int)
                if probe_type not in (0, 1):
                    raise probe_record.error("type", f"expected 0 or 1, got {probe_type}")
                kind, answer = "yesno", "Yes" if probe_type == 1 else "No"
                if task == "SSR":
                    question_text = probe_record.text(probe, "step")
                    extra.update(step=question_text, tutorial=item.get("tutorial"))
            questions.append(
                Question(
                    benchmark="ovobench",
                    qid=f"{item_id}#{probe_index}",
                    video=video,
                    question=question_text,
                    options=(),
                    answer=answer,
                    ask_time=ask_time,
                    task=task,
                    kind=kind,
                    group="forward",
                    extra=extra,
                )
            )
    return questions


# ---------------------------------------------------------------- MLVU / EgoSchema


def _video_entries(path: Path, name: str):
    """Yield (record, video entry, conversation index, conversation) of a ReKV-style JSON."""
    for index, item in enumerate(_json_list(path)):
        record = _Record(path, index, item.get("video_id") if isinstance(item, dict) else None)
        item = _check_dict(record, item)
        record.get(item, "video_id", (str, int))
        conversations = record.get(item, "conversations", list)
        if not conversations:
            raise record.error("conversations", f"no questions for this {name} video")
        for k, conversation in enumerate(conversations):
            if not isinstance(conversation, dict):
                raise record.error("conversations", f"entry {k} is not an object")
            yield record, item, k, conversation


def load_mlvu(path: Path) -> list[Question]:
    """MLVU dev JSON -> offline mc Questions; video = "<task_dir>/<name>.mp4" from video_path; qid =
    "<task_dir>/<video_id>#<k>" (a video name may recur in two task folders)."""
    questions = []
    for record, item, k, conversation in _video_entries(path, "MLVU"):
        video_path = PurePosixPath(record.text(item, "video_path").replace("\\", "/"))
        choices = record.options(record.get(conversation, "choices", list), "choices", strip_prefixes=False)
        answer_text = record.get(conversation, "answer", str)
        if answer_text not in choices:
            raise record.error("answer", f"conversation {k}: answer {answer_text!r} is not one of the choices")
        questions.append(
            Question(
                benchmark="mlvu",
                qid=f"{'/'.join(video_path.parts[-2:-1] + (str(item['video_id']),))}#{k}",
                video="/".join(video_path.parts[-2:]),
                question=record.text(conversation, "question"),
                options=choices,
                answer=chr(ord("A") + choices.index(answer_text)),
                ask_time=None,
                task=record.text(conversation, "question_type"),
                kind="mc",
                extra={"duration": item.get("duration")},
            )
        )
    return questions


def load_egoschema(path: Path) -> list[Question]:
    """EgoSchema subset JSON -> offline mc Questions; the answer index maps to "ABCDE"."""
    questions = []
    for record, item, k, conversation in _video_entries(path, "EgoSchema"):
        if "video_path" in item:
            video = PurePosixPath(record.text(item, "video_path").replace("\\", "/")).name
        else:
            video = f"{item['video_id']}.mp4"
        choices = record.options(record.get(conversation, "choices", list), "choices", strip_prefixes=False)
        qid = conversation.get("question_idx", item["video_id"] if k == 0 else f"{item['video_id']}#{k}")
        questions.append(
            Question(
                benchmark="egoschema",
                qid=str(qid),
                video=video,
                question=record.text(conversation, "question"),
                options=choices,
                answer=record.index_letter(conversation.get("answer"), len(choices), "answer"),
                ask_time=None,
                task="egoschema",
                kind="mc",
                extra={"video_id": item["video_id"]},
            )
        )
    return questions


# ---------------------------------------------------------------- Video-MME

VIDEOMME_FIELDS = ("videoID", "question_id", "duration", "task_type", "question", "options", "answer")


def _videomme_rows(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except ImportError as error:
            raise ImportError(
                f"reading {path} needs a parquet engine: `pip install pyarrow`, or export the rows "
                "to JSON lines (one object per line) and load the .jsonl file instead"
            ) from error
        return [
            {key: (value.tolist() if hasattr(value, "tolist") else value) for key, value in row.items()}
            for row in frame.to_dict(orient="records")
        ]
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise BenchmarkFormatError(f"{path}: line {line_number} is not valid JSON ({error})") from error
        return rows
    if suffix == ".json":
        return _json_list(path)
    raise BenchmarkFormatError(f"{path}: Video-MME annotations must be .parquet, .jsonl or .json, got {suffix!r}")


def load_videomme(path: Path) -> list[Question]:
    """Video-MME rows (parquet fields) -> offline mc Questions grouped by duration category."""
    questions = []
    for index, row in enumerate(_videomme_rows(path)):
        record = _Record(path, index, row.get("question_id") if isinstance(row, dict) else None)
        row = _check_dict(record, row)
        for field in VIDEOMME_FIELDS:
            if field not in row:
                raise record.error(field, "missing")
        duration = record.text(row, "duration")
        if duration not in ("short", "medium", "long"):
            raise record.error("duration", f"expected short/medium/long, got {duration!r}")
        options = record.options(row["options"], "options", strip_prefixes=True)
        questions.append(
            Question(
                benchmark="videomme",
                qid=str(row["question_id"]),
                video=f"{record.text(row, 'videoID')}.mp4",
                question=record.text(row, "question"),
                options=options,
                answer=record.letter(row["answer"], len(options)),
                ask_time=None,
                task=record.text(row, "task_type"),
                kind="mc",
                group=duration,
                extra={key: row.get(key) for key in ("video_id", "domain", "sub_category")},
            )
        )
    return questions


LOADERS: MappingProxyType[str, Callable[[Path], list[Question]]] = MappingProxyType(
    {
        "streamingbench": load_streamingbench,
        "ovobench": load_ovobench,
        "mlvu": load_mlvu,
        "egoschema": load_egoschema,
        "videomme": load_videomme,
    }
)


def load_benchmark(name: str, annotation_path: str | Path) -> list[Question]:
    """Read a benchmark's annotation file into Questions, in file order.

    name: "streamingbench" | "ovobench" | "mlvu" | "egoschema" | "videomme", or
        "synthetic-<name>" to read a synthetic-suite file (same schema; records are tagged with
        that name so results never mix with the real benchmark's).
    """
    base = name.removeprefix("synthetic-")
    if base not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(LOADERS)} (or 'synthetic-<name>')")
    path = Path(annotation_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file {path} for {name} not found; run `python -m stc.benchmarks.download {base}` "
            "on a machine with network, or `python -m stc.benchmarks.synthetic OUT_DIR` for the offline suite"
        )
    questions = LOADERS[base](path)
    seen: dict[str, int] = {}
    for index, question in enumerate(questions):
        if question.qid in seen:
            raise BenchmarkFormatError(
                f"{path}: question id {question.qid!r} appears twice (questions {seen[question.qid]} and {index})"
            )
        seen[question.qid] = index
    if name != base:
        questions = [dataclasses.replace(q, benchmark=name) for q in questions]
    return questions
