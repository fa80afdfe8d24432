"""The evaluation driver: runs one engine on one benchmark's questions, resumably.

Protocol. Questions are grouped by video; videos are processed in sorted order of their paths.
Within a video, questions are answered in order of their cutoff ceil(ask_time) (questions with
ask_time None, i.e. offline questions, come last with an infinite cutoff), ties in file order.
Before a question is asked, every sampled frame with timestamp <= its cutoff has been pushed and
no later frame has (causality).
- streaming=True: one stream per video; frames are pushed once, in time order, and questions
  are asked as the stream reaches their cutoff. An offline benchmark (Video-MME: 3 questions per
  video) therefore encodes each video once.
- streaming=False: one fresh stream per distinct cutoff (questions with the same cutoff share
  it), each fed the video from its start: the "offline" protocol of OVO-Bench.

Output. One JSON line per answered question, written as it goes and fsynced, with fields
qid, video, task, group, kind, answer, response, parsed, correct, ask_time, error, elapsed.
On start the driver reads the existing file, drops a partially written last line, and skips the
questions already answered, replaying the same frame pushes for a half-done video so that a
killed run resumes to the same file (ignoring `elapsed`) as an uninterrupted one. This assumes
that `ask` does not change what later questions of the stream see.

Sharding. shard=(i, n) gives shard i the i-th of n contiguous, near-equal blocks of the sorted
video list, so the shards' files concatenated in shard order equal the whole run's file.

Errors. A missing or undecodable video (FileNotFoundError / VideoError) is recorded as an error
row (correct false, response null) for each of its questions not yet answered, and the run goes
on. Any other exception (from the engine, say) propagates: it is not the benchmark's fault.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stc.benchmarks.prompts import build_prompt, parse_answer
from stc.benchmarks.records import Question
from stc.benchmarks.scoring import Summary, is_correct, score
from stc.video import SampledVideo, VideoError

# Frames whose timestamp exceeds the cutoff by float noise only (index / fps) still count.
_TIME_TOLERANCE = 1e-6


class StreamLike(Protocol):
    """One video stream of an engine: frames go in, in time order; questions are asked."""

    def push_frames(self, frames: np.ndarray, timestamps: Sequence[float]) -> None:
        """frames [F, H, W, 3] uint8, timestamps [F] seconds, later than every frame pushed before."""
        ...

    def ask(
        self, query: str, *, answer_prefix: str = "", retrieval_text: str | None = None, max_new_tokens: int = 16
    ) -> str:
        """The greedy answer text to `query` given the frames pushed so far."""
        ...

    def close(self) -> None: ...


class EngineLike(Protocol):
    def open_stream(self) -> StreamLike: ...


def cutoff_time(question: Question) -> float:
    """The last frame time a question may see: ceil(ask_time), or +inf for offline questions."""
    return math.inf if question.ask_time is None else float(math.ceil(question.ask_time))


def plan(questions: Sequence[Question], limit: int | None = None) -> list[tuple[str, list[Question]]]:
    """[(video, its questions in answering order)] with videos sorted; `limit` keeps the first questions."""
    order = {id(q): index for index, q in enumerate(questions)}
    by_video: dict[str, list[Question]] = {}
    for question in questions:
        by_video.setdefault(question.video, []).append(question)
    videos = [
        (video, sorted(by_video[video], key=lambda q: (cutoff_time(q), order[id(q)]))) for video in sorted(by_video)
    ]
    if limit is None:
        return videos
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    limited, remaining = [], limit
    for video, video_questions in videos:
        if remaining <= 0:
            break
        limited.append((video, video_questions[:remaining]))
        remaining -= len(limited[-1][1])
    return limited


def shard_blocks(n_items: int, shard: tuple[int, int]) -> range:
    """The indices of shard i of n: the i-th of n contiguous blocks whose sizes differ by at most 1."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with n >= 1 and 0 <= i < n, got {shard!r}")
    return range(index * n_items // count, (index + 1) * n_items // count)


def read_results(out_path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete rows of a results file (a partially written last line is ignored).

    repair: also cut that partial line off the file, so that appends start on a fresh line.
    Raises ValueError when a line other than the last one is not valid JSON.
    """
    path = Path(out_path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, offset, valid_end = [], 0, 0
    while offset < len(data):
        newline = data.find(b"\n", offset)
        if newline < 0:
            break  # last line without newline: interrupted mid-write
        line = data[offset:newline]
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                if data[newline + 1 :].strip():
                    raise ValueError(
                        f"{path}: line {len(rows) + 1} is not valid JSON ({error}) and is not the last line; "
                        "the file was edited or corrupted: delete it to start the run over"
                    ) from error
                break
        offset = valid_end = newline + 1
    if repair and valid_end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(valid_end)
    return rows


class _FrameFeed:
    """Sampled frames of one video, pushed to a stream up to successive cutoffs.

    The sampled times are known before decoding, so a push stops exactly at its cutoff and a
    frame after the cutoff is never decoded (a corrupt tail only hurts the questions needing it).
    """

    def __init__(self, path: Path, sample_fps: float, frames_per_push: int) -> None:
        self._path, self._sample_fps = path, sample_fps
        self._frames_per_push = frames_per_push
        self._video: SampledVideo | None = None
        self._pushed = 0

    def push_until(self, stream: StreamLike, cutoff: float) -> None:
        """Push every not yet pushed frame with timestamp <= cutoff, in batches of frames_per_push."""
        if self._video is None:
            self._video = SampledVideo(self._path, self._sample_fps)  # opening may raise
        timestamps = self._video.timestamps
        n_due = int(np.searchsorted(timestamps, cutoff + _TIME_TOLERANCE, side="right"))
        while self._pushed < n_due:
            stop = min(self._pushed + self._frames_per_push, n_due)
            stream.push_frames(self._video.decode(self._pushed, stop), timestamps[self._pushed : stop].tolist())
            self._pushed = stop

    def close(self) -> None:
        if self._video is not None:
            self._video.close()


class _ResultsWriter:
    """Appends one JSON line per row, flushed and fsynced, so a kill loses at most one line."""

    def __init__(self, path: Path) -> None:
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _row(question: Question, response: str | None, error: str | None, elapsed: float) -> dict[str, Any]:
    parsed = None if response is None else parse_answer(question, response)
    return {
        "qid": question.qid,
        "video": question.video,
        "task": question.task,
        "group": question.group,
        "kind": question.kind,
        "answer": question.answer,
        "response": response,
        "parsed": parsed,
        "correct": error is None and is_correct(question.kind, question.answer, response),
        "ask_time": question.ask_time,
        "error": error,
        "elapsed": round(elapsed, 6),
    }


def _cutoff_groups(questions: list[Question]) -> list[tuple[float, list[Question]]]:
    groups: list[tuple[float, list[Question]]] = []
    for question in questions:
        cutoff = cutoff_time(question)
        if groups and groups[-1][0] == cutoff:
            groups[-1][1].append(question)
        else:
            groups.append((cutoff, [question]))
    return groups


def _run_video(
    engine: EngineLike,
    video_path: Path,
    questions: list[Question],
    done: set[str],
    writer: _ResultsWriter,
    progress,
    *,
    sample_fps: float,
    streaming: bool,
    frames_per_push: int,
) -> None:
    groups = _cutoff_groups(questions)
    last_pending = max(i for i, (_, group) in enumerate(groups) if any(q.qid not in done for q in group))
    stream: StreamLike | None = None
    feed: _FrameFeed | None = None
    try:
        for cutoff, group in groups[: last_pending + 1]:
            if not streaming:
                if all(q.qid in done for q in group):
                    continue  # a fresh stream per cutoff: nothing to replay
                if stream is not None:
                    stream.close()
                    feed.close()
                stream = feed = None
            if stream is None:
                stream = engine.open_stream()
                feed = _FrameFeed(video_path, sample_fps, frames_per_push)
            started = time.perf_counter()
            try:
                feed.push_until(stream, cutoff)
            except (FileNotFoundError, VideoError) as error:
                message = f"{type(error).__name__}: {error}"
                for question in questions:
                    if question.qid not in done:
                        writer.write(_row(question, None, message, 0.0))
                        done.add(question.qid)
                        progress.update(1)
                return
            for question in group:
                if question.qid in done:
                    continue
                prompt = build_prompt(question)
                response = stream.ask(
                    prompt.query,
                    answer_prefix=prompt.answer_prefix,
                    retrieval_text=prompt.retrieval_text,
                    max_new_tokens=prompt.max_new_tokens,
                )
                if not isinstance(response, str):
                    got = type(response).__name__
                    raise TypeError(f"engine answered question {question.qid!r} with {got}, not str")
                writer.write(_row(question, response, None, time.perf_counter() - started))
                done.add(question.qid)
                progress.update(1)
                started = time.perf_counter()
    finally:
        if stream is not None:
            stream.close()
        if feed is not None:
            feed.close()


def run_benchmark(
    engine: EngineLike,
    questions: Sequence[Question],
    video_root: str | Path,
    out_path: str | Path,
    *,
    sample_fps: float = 0.5,
    streaming: bool = True,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    limit: int | None = None,
    frames_per_push: int = 16,
) -> Summary:
    """Answer `questions` with `engine`, appending rows to `out_path`; returns the shard's Summary.

    video_root: the folder `Question.video` paths are relative to.
    sample_fps: frames per second fed to the engine (ReKV sampling, see stc.video).
    shard: (i, n) runs the i-th of n contiguous blocks of the sorted videos.
    limit: keep only the first `limit` questions of the whole evaluation order (before sharding).
    frames_per_push: the most frames handed to one push_frames call.
    """
    if not questions:
        raise ValueError("no questions to run; check the annotation file and the limit")
    benchmarks = {q.benchmark for q in questions}
    if len(benchmarks) != 1:
        raise ValueError(f"questions mix benchmarks {sorted(benchmarks)}; run one benchmark at a time")
    if frames_per_push < 1:
        raise ValueError(f"frames_per_push must be >= 1, got {frames_per_push}")
    qids = [q.qid for q in questions]
    if len(set(qids)) != len(qids):
        raise ValueError("question ids are not unique; load the questions with load_benchmark")
    benchmark = benchmarks.pop()
    video_root, out_path = Path(video_root), Path(out_path)

    videos = plan(questions, limit)
    videos = [videos[i] for i in shard_blocks(len(videos), shard)]
    shard_qids = {q.qid for _, video_questions in videos for q in video_questions}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    finished = read_results(out_path, repair=True)
    done = {row["qid"] for row in finished}
    foreign = sorted(done - shard_qids)
    if foreign:
        raise ValueError(
            f"{out_path} holds answers to {len(foreign)} questions outside this run (e.g. {foreign[:3]}); "
            "it belongs to another benchmark, shard or limit: use another out_path or delete it"
        )

    from tqdm.auto import tqdm

    writer = _ResultsWriter(out_path)
    bar = tqdm(total=len(shard_qids), initial=len(done), desc=f"{benchmark} {shard[0]}/{shard[1]}",
               unit="q", disable=not progress, dynamic_ncols=True)  # fmt: skip
    try:
        for video, video_questions in videos:
            if all(q.qid in done for q in video_questions):
                continue
            _run_video(engine, video_root / video, video_questions, done, writer, bar,
                       sample_fps=sample_fps, streaming=streaming, frames_per_push=frames_per_push)  # fmt: skip
    finally:
        bar.close()
        writer.close()
    return score(benchmark, read_results(out_path))
