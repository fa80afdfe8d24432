"""A deterministic synthetic benchmark suite, written in every real benchmark's schema.

    python -m stc.benchmarks.synthetic OUT_DIR [--seed 0] [--n-videos 4] [--duration 16]

Each video shows, on a dark background, a coloured square that stays in the left or right half
and moves up or down; its colour, half, direction and a two-digit number in the top-left corner
change every segment (4 s or more, a whole number of even seconds, so 0.5 fps sampling sees each
segment at least twice), and a white disc flashes in the top-right corner for 2 s from some
even seconds. Every question is generated from that script, so it is answerable from the frames
a causal stream has seen when it is asked: "What colour is the square right now?", "What number
is shown?", "How many white discs have appeared so far?", REC probes counting the discs, SSR
probes about the current segment, CRR probes about the next colour, ...

`make_synthetic_suite(out_dir)` writes one folder per benchmark, laid out like the real download
(see stc.paths), so `load_benchmark(name, path)` (or "synthetic-<name>") reads it unchanged.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from stc.paths import annotation_path_in, videos_dir_in

PALETTE = (
    ("red", (220, 40, 40)), ("green", (40, 180, 60)), ("blue", (50, 90, 230)), ("yellow", (235, 215, 40)),
    ("purple", (150, 60, 200)), ("orange", (245, 140, 30)), ("cyan", (40, 205, 215)),
)  # fmt: skip
COLOUR_NAMES = tuple(name for name, _ in PALETTE)
DISC_RGB = (250, 250, 250)
DISC_SECONDS = 2

# A 3x5 bitmap font for the digits, one string of 15 bits (rows top to bottom) per digit.
_DIGITS = (
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
    "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111",
)  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """One stretch of a synthetic video: [start, end) seconds and what it shows."""

    start: int
    end: int
    colour: str
    number: int
    side: str  # "left" | "right": the half the square stays in
    direction: str  # "up" | "down": where the square moves


@dataclass(frozen=True)
class Script:
    """Everything a synthetic video shows, from which frames and answers are both derived."""

    duration: int
    fps: int
    size: int
    background: tuple[int, int, int]
    segments: tuple[Segment, ...]
    disc_starts: tuple[int, ...]  # a white disc is visible during [s, s + DISC_SECONDS)

    def segment_at(self, t: float) -> Segment:
        for segment in self.segments:
            if segment.start <= t < segment.end:
                return segment
        return self.segments[-1]

    def discs_seen(self, t: float) -> int:
        """Discs that have appeared by time t (a disc counts from its first frame)."""
        return sum(start <= t for start in self.disc_starts)

    def discs_finished(self, t: float) -> int:
        """Discs whose flash (counted as ending 1 s after it starts) is over by time t."""
        return sum(start + 1 <= t for start in self.disc_starts)


def make_script(rng: np.random.Generator, duration_s: int = 16, fps: int = 4, size: int = 64) -> Script:
    """Draw a random script. duration_s >= 8; segments last an even number (>= 4) of seconds."""
    if duration_s < 8:
        raise ValueError(f"duration_s must be >= 8 seconds, got {duration_s}")
    if not 1 <= fps <= 30:
        raise ValueError(f"fps must be in 1..30, got {fps}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number of pixels >= 32, got {size}")
    segment_seconds = max(4, 2 * math.ceil(duration_s / (2 * len(PALETTE))))
    n_segments = duration_s // segment_seconds
    colours = rng.permutation(len(PALETTE))[:n_segments]
    numbers = rng.choice(np.arange(10, 100), size=n_segments, replace=False)
    segments = tuple(
        Segment(
            start=k * segment_seconds,
            end=(k + 1) * segment_seconds,
            colour=COLOUR_NAMES[colours[k]],
            number=int(numbers[k]),
            side=("left", "right")[int(rng.integers(2))],
            direction=("up", "down")[int(rng.integers(2))],
        )
        for k in range(n_segments)
    )
    duration = n_segments * segment_seconds
    # Disc flashes start at even seconds 2, 6, 10, ... so flashes never touch.
    candidates = np.arange(2, duration - 1, 4)
    chosen = candidates[rng.random(len(candidates)) < 0.5]
    if len(chosen) == 0:
        chosen = candidates[:1]
    background = tuple(int(v) for v in rng.integers(20, 60, size=3))
    return Script(duration, fps, size, background, segments, tuple(int(s) for s in chosen))


def square_box(script: Script, t: float) -> tuple[int, int, int]:
    """Where the square is at time t: (top row, left column, side) in pixels."""
    size = script.size
    segment = script.segment_at(t)
    side = size // 4
    progress = (t - segment.start) / max(segment.end - segment.start, 1e-9)
    top_limit, bottom_limit = size // 4, size - side - 2
    y_from, y_to = (bottom_limit, top_limit) if segment.direction == "up" else (top_limit, bottom_limit)
    y = int(round(y_from + (y_to - y_from) * progress))
    x = size // 8 if segment.side == "left" else size - size // 8 - side
    return y, x, side


def render_frame(script: Script, t: float) -> np.ndarray:
    """The frame at time t -> [size, size, 3] uint8."""
    size = script.size
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[:] = script.background
    segment = script.segment_at(t)
    y, x, side = square_box(script, t)
    frame[y : y + side, x : x + side] = dict(PALETTE)[segment.colour]
    _draw_number(frame, segment.number, scale=max(1, size // 32))
    if any(start <= t < start + DISC_SECONDS for start in script.disc_starts):
        # Top-right corner: clear of the number (top-left) and of the square (below size // 4).
        radius = size // 10
        cy, cx = radius + 2, size - radius - 2
        yy, xx = np.ogrid[:size, :size]
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = DISC_RGB
    return frame


def _draw_number(frame: np.ndarray, number: int, scale: int) -> None:
    x = scale
    for digit in f"{number:02d}":
        bits = np.array([int(b) for b in _DIGITS[int(digit)]], dtype=bool).reshape(5, 3)
        glyph = np.kron(bits, np.ones((scale, scale), dtype=bool))
        region = frame[scale : scale + glyph.shape[0], x : x + glyph.shape[1]]
        region[glyph] = 255
        x += glyph.shape[1] + scale


def write_video(script: Script, path: Path) -> Path:
    """Encode the script as H.264 mp4 (yuv420p, moov atom first) with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=script.fps)
        stream.width = stream.height = script.size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(2 * script.fps), "crf": "18", "preset": "veryfast"}
        for index in range(script.duration * script.fps):
            image = render_frame(script, index / script.fps)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------- question templates


@dataclass(frozen=True)
class MC:
    """A multiple-choice question drawn from a script: options in display order, gold index."""

    question: str
    options: tuple[str, ...]
    answer: int


def _choice(rng: np.random.Generator, question: str, correct: str, distractors: list[str], n_options: int) -> MC:
    pool = [d for d in dict.fromkeys(distractors) if d != correct]
    if len(pool) < n_options - 1:
        raise ValueError(f"{question!r}: {len(pool)} distinct distractors for {n_options} options")
    picked = [pool[i] for i in rng.permutation(len(pool))[: n_options - 1]]
    options = [correct, *picked]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return MC(question, tuple(options), options.index(correct))


def _colour_distractors(correct: str) -> list[str]:
    return [c for c in COLOUR_NAMES if c != correct]


def _numbers_near(value: int, low: int = 0, count: int = 6) -> list[str]:
    """The `count` integers >= low nearest to value (value excluded), as text: enough for any option count."""
    near = sorted((v for v in range(max(low, value - count), value + count + 1) if v != value),
                  key=lambda v: (abs(v - value), v))  # fmt: skip
    return [str(v) for v in near[:count]]


def _segment_mid(segment: Segment) -> int:
    """An even second inside the segment, away from its edges (a sampled frame falls on it)."""
    return segment.start + 2 * ((segment.end - segment.start) // 4)


Template = Callable[[Script, np.random.Generator, int], "tuple[MC, float | None]"]


def t_colour_now(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    q = _choice(rng, "What colour is the square right now?", segment.colour, _colour_distractors(segment.colour), n)
    return q, _segment_mid(segment)


def t_number_now(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    q = _choice(rng, "What number is written in the top-left corner right now?", str(segment.number),
                _numbers_near(segment.number, 10), n)  # fmt: skip
    return q, _segment_mid(segment)


def t_side_now(script: Script, rng, n: int):
    """n options (at most 4): the square is always in exactly one of the left and right halves."""
    segment = script.segments[int(rng.integers(len(script.segments)))]
    q = _choice(rng, "In which half of the frame is the square right now?", f"the {segment.side} half",
                ["the left half", "the right half", "in neither half: it is not in the frame",
                 "in both halves at once"], min(n, 4))  # fmt: skip
    return q, _segment_mid(segment)


def t_side_now_two(script: Script, rng, n: int):
    """t_side_now with its two real answers only (OVO-Bench has questions of two options)."""
    return t_side_now(script, rng, 2)


def t_direction_now(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    q = _choice(rng, "In which direction is the square moving right now?", segment.direction,
                ["up", "down", "left", "right"], min(n, 4))  # fmt: skip
    return q, _segment_mid(segment)


def t_next_move(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    correct = "further up" if segment.direction == "up" else "further down"
    q = _choice(rng, "Where will the square most likely move next?", correct,
                ["further up", "further down", "to the left", "to the right"], min(n, 4))  # fmt: skip
    return q, _segment_mid(segment)


def t_object_now(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    q = _choice(rng, "Which coloured shape is moving in the frame right now?", "a square",
                ["a square", "a triangle", "a star", "a heart", "a cross"], n)  # fmt: skip
    return q, _segment_mid(segment)


def t_discs_so_far(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    t = _segment_mid(segment)
    count = script.discs_seen(t)
    q = _choice(rng, "How many times has a white disc appeared so far?", str(count), _numbers_near(count), n)
    return q, t


def t_first_colour(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(1, len(script.segments)))]
    first = script.segments[0].colour
    q = _choice(rng, "What colour was the square at the very beginning of the video?", first,
                _colour_distractors(first), n)  # fmt: skip
    return q, _segment_mid(segment)


def t_previous_colour(script: Script, rng, n: int):
    k = int(rng.integers(1, len(script.segments)))
    now, before = script.segments[k], script.segments[k - 1]
    q = _choice(rng, f"What colour was the square just before it turned {now.colour}?", before.colour,
                _colour_distractors(before.colour), n)  # fmt: skip
    return q, _segment_mid(now)


def t_absent_object(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    correct = "No triangle has appeared in the video."
    q = _choice(rng, "What colour was the triangle that appeared earlier?", correct,
                [c.capitalize() + "." for c in COLOUR_NAMES], n)  # fmt: skip
    return q, _segment_mid(segment)


def t_summary_so_far(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(1, len(script.segments)))]
    q = _choice(rng, "What does the video show so far?", "A coloured square moving up or down next to a number.",
                ["A football match.", "A cooking tutorial.", "A busy city street.", "A card game."], n)  # fmt: skip
    return q, _segment_mid(segment)


# Offline (whole-video) templates: ask_time None.
def t_order(script: Script, rng, n: int):
    colours = [s.colour for s in script.segments]
    correct = " -> ".join(colours)
    distractors = [" -> ".join(colours[i] for i in rng.permutation(len(colours))) for _ in range(12)]
    distractors += [" -> ".join(reversed(colours))]
    # with few segments there are few orders: also sequences where one colour is swapped for one never shown
    unseen = [c for c in COLOUR_NAMES if c not in colours]
    for i in rng.permutation(len(colours)):
        for other in unseen[:2]:
            distractors.append(" -> ".join(other if j == i else c for j, c in enumerate(colours)))
    return _choice(rng, "In which order did the square take its colours?", correct, distractors, n), None


def t_discs_total(script: Script, rng, n: int):
    count = len(script.disc_starts)
    q = _choice(rng, "How many times does a white disc appear in the video?", str(count), _numbers_near(count, 1), n)
    return q, None


def t_number_for_colour(script: Script, rng, n: int):
    segment = script.segments[int(rng.integers(len(script.segments)))]
    q = _choice(rng, f"What number is shown while the square is {segment.colour}?", str(segment.number),
                [str(s.number) for s in script.segments] + _numbers_near(segment.number, 10), n)  # fmt: skip
    return q, None


def t_last_colour(script: Script, rng, n: int):
    last = script.segments[-1].colour
    q = _choice(rng, "What colour is the square at the end of the video?", last, _colour_distractors(last), n)
    return q, None


def t_first_colour_offline(script: Script, rng, n: int):
    first = script.segments[0].colour
    q = _choice(rng, "What colour is the square at the beginning of the video?", first, _colour_distractors(first), n)
    return q, None


def t_topic(script: Script, rng, n: int):
    q = _choice(rng, "What is the video mainly about?", "A coloured square that changes colour over time.",
                ["A football match.", "A cooking tutorial.", "A wildlife documentary.", "A news broadcast.",
                 "A card game."], n)  # fmt: skip
    return q, None


def t_anomaly(script: Script, rng, n: int):
    q = _choice(rng, "Is there anything unusual in this video? If so, what is it?", "A white disc flashes",
                ["Normal", "A car crash", "A fire", "A fight"], n)  # fmt: skip
    return q, None


# ---------------------------------------------------------------- per benchmark writers


def _rng(seed: int, benchmark: str) -> np.random.Generator:
    return np.random.default_rng([seed, sum(ord(c) * 31**i for i, c in enumerate(benchmark)) % (2**32)])


def _time_stamp(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


STREAMINGBENCH_TEMPLATES = (
    ("Object Perception", t_object_now), ("Attribute Perception", t_colour_now),
    ("Action Perception", t_direction_now), ("Text-Rich Understanding", t_number_now),
    ("Spatial Understanding", t_side_now), ("Counting", t_discs_so_far),
    ("Event Understanding", t_previous_colour), ("Causal Reasoning", t_first_colour),
    ("Clips Summarize", t_summary_so_far), ("Prospective Reasoning", t_next_move),
)  # fmt: skip


def _write_streamingbench(folder: Path, rng, n_videos: int, make: Callable[[Path], Script]) -> Path:
    rows = []
    for video_number in range(1, n_videos + 1):
        script = make(videos_dir_in(folder, "streamingbench") / f"sample_{video_number}" / "video.mp4")
        picks = rng.permutation(len(STREAMINGBENCH_TEMPLATES))[:5]
        for k, pick in enumerate(picks, start=1):
            task, template = STREAMINGBENCH_TEMPLATES[pick]
            q, t = template(script, rng, 4)
            options = [f"{chr(65 + i)}. {option}." if not option.endswith(".") else f"{chr(65 + i)}. {option}"
                       for i, option in enumerate(q.options)]  # fmt: skip
            rows.append({
                "question_id": f"Real-Time Visual Understanding_sample_{video_number}_{k}",
                "task_type": task, "question": q.question, "time_stamp": _time_stamp(t),
                "answer": chr(65 + q.answer), "options": repr(options),
                "frames_required": "multiple" if task in ("Action Perception", "Counting") else "single",
                "temporal_clue_type": "Concurrent" if "right now" in q.question else "Prior",
            })  # fmt: skip
    path = annotation_path_in(folder, "streamingbench")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


OVO_MC_TEMPLATES = (
    ("OCR", t_number_now), ("ACR", t_direction_now), ("ATR", t_colour_now), ("STU", t_side_now_two),
    ("FPD", t_next_move), ("OJR", t_object_now),
    ("EPM", t_first_colour), ("ASI", t_previous_colour), ("HLD", t_absent_object),
)  # fmt: skip


def _write_ovobench(folder: Path, rng, n_videos: int, make: Callable[[Path], Script]) -> Path:
    items: list[dict] = []

    def add(item: dict) -> None:
        items.append({"id": len(items), **item})

    for video_number in range(n_videos):
        video = f"synthetic/video_{video_number:03d}.mp4"
        script = make(videos_dir_in(folder, "ovobench") / video)
        for task, template in OVO_MC_TEMPLATES:
            q, t = template(script, rng, 4)
            add({"task": task, "video": video, "realtime": float(t), "question": q.question,
                 "answer": q.options[q.answer], "options": list(q.options), "gt": q.answer})  # fmt: skip
        # REC: count the disc flashes; a flash counts once its first second is over.
        starts = list(script.disc_starts)
        probe_times = sorted({1, *[s + 2 for s in starts], script.duration - 1})
        add({"task": "REC", "video": video, "activity": "flash a white disc",
             "start_times": starts, "end_times": [s + 1 for s in starts],
             "test_info": [{"realtime": r, "count": script.discs_finished(r)} for r in probe_times]})  # fmt: skip
        # SSR: each segment is a step; probes 1 s before (No) and 1 s after (Yes) it starts.
        steps = [f"show a {s.colour} square next to the number {s.number}" for s in script.segments]
        test_info = []
        for segment, step in zip(script.segments, steps):
            if segment.start > 0:
                test_info.append({"realtime": segment.start - 1, "step": step, "type": 0})
            test_info.append({"realtime": segment.start + 1, "step": step, "type": 1})
        add({"task": "SSR", "video": video, "tutorial": "ShowColouredSquares", "all_steps": steps,
             "start_time": [s.start for s in script.segments], "end_time": [s.end for s in script.segments],
             "test_info": test_info})  # fmt: skip
        # CRR: "what colour comes after X?" is answerable once the next segment has been seen.
        k = int(rng.integers(len(script.segments) - 1))
        now, following = script.segments[k], script.segments[k + 1]
        add({"task": "CRR", "video": video,
             "question": f"The square is {now.colour} now. Which colour does it turn next?",
             "answer": following.colour.capitalize() + ".", "ask_time": now.start + 1, "clue_time": following.start,
             "test_info": [{"realtime": now.start + 1, "type": 0}, {"realtime": following.start - 1, "type": 0},
                           {"realtime": following.start + 1, "type": 1},
                           {"realtime": script.duration - 1, "type": 1}]})  # fmt: skip
    path = annotation_path_in(folder, "ovobench")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    return path


MLVU_TASKS = (
    ("1_plotQA", "plotQA", (t_first_colour_offline, t_last_colour)),
    ("2_needle", "findNeedle", (t_number_for_colour,)),
    ("3_ego", "ego", (t_last_colour, t_number_for_colour)),
    ("4_count", "count", (t_discs_total,)),
    ("5_order", "order", (t_order,)),
    ("6_anomaly_reco", "anomaly_reco", (t_anomaly,)),
    ("7_topic_reasoning", "topic_reasoning", (t_topic,)),
)


def _write_mlvu(folder: Path, rng, n_videos: int, make: Callable[[Path], Script]) -> Path:
    entries = []
    for video_number in range(n_videos):
        task_dir, task, templates = MLVU_TASKS[video_number % len(MLVU_TASKS)]
        name = f"synthetic_{video_number:03d}"
        script = make(videos_dir_in(folder, "mlvu") / task_dir / f"{name}.mp4")
        conversations = []
        for template in templates:
            q, _ = template(script, rng, 4)
            conversations.append({"question": q.question, "choices": list(q.options),
                                  "answer": q.options[q.answer], "question_type": task})  # fmt: skip
        entries.append({"video_id": name, "video_path": f"MLVU/video/{task_dir}/{name}.mp4",
                        "duration": float(script.duration), "conversations": conversations})  # fmt: skip
    path = annotation_path_in(folder, "mlvu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return path


def _write_egoschema(folder: Path, rng, n_videos: int, make: Callable[[Path], Script]) -> Path:
    entries = []
    for video_number in range(n_videos):
        video_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        script = make(videos_dir_in(folder, "egoschema") / f"{video_id}.mp4")
        template = (t_order, t_number_for_colour, t_discs_total)[video_number % 3]
        q, _ = template(script, rng, 5)
        entries.append({"video_id": video_id, "video_path": f"videos/{video_id}.mp4",
                        "duration": float(script.duration),
                        "conversations": [{"question_idx": f"{video_number:05d}", "question": q.question,
                                           "choices": list(q.options), "answer": q.answer}]})  # fmt: skip
    path = annotation_path_in(folder, "egoschema")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return path


VIDEOMME_TEMPLATES = (
    ("Attribute Perception", t_first_colour_offline), ("Counting Problem", t_discs_total),
    ("Temporal Reasoning", t_order), ("OCR Problems", t_number_for_colour), ("Object Recognition", t_last_colour),
)  # fmt: skip


def _write_videomme(folder: Path, rng, n_videos: int, make: Callable[[Path], Script]) -> Path:
    rows = []
    for video_number in range(n_videos):
        video_id = f"{video_number + 1:03d}"
        video_name = f"synth{video_number:04d}"
        script = make(videos_dir_in(folder, "videomme") / f"{video_name}.mp4")
        duration = ("short", "medium", "long")[video_number % 3]
        for k, pick in enumerate(rng.permutation(len(VIDEOMME_TEMPLATES))[:3], start=1):
            task, template = VIDEOMME_TEMPLATES[pick]
            q, _ = template(script, rng, 4)
            rows.append({
                "video_id": video_id, "duration": duration, "domain": "Synthetic", "sub_category": "Shapes",
                "url": f"https://example.invalid/{video_name}", "videoID": video_name,
                "question_id": f"{video_id}-{k}", "task_type": task, "question": q.question,
                "options": [f"{chr(65 + i)}. {option}" for i, option in enumerate(q.options)],
                "answer": chr(65 + q.answer),
            })  # fmt: skip
    path = annotation_path_in(folder, "videomme")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


_WRITERS = MappingProxyType(
    {
        "streamingbench": _write_streamingbench,
        "ovobench": _write_ovobench,
        "mlvu": _write_mlvu,
        "egoschema": _write_egoschema,
        "videomme": _write_videomme,
    }
)


def make_synthetic_suite(
    out_dir: str | Path,
    seed: int = 0,
    n_videos: int = 4,
    duration_s: int = 16,
    *,
    fps: int = 4,
    size: int = 64,
    benchmarks: tuple[str, ...] = tuple(_WRITERS),
) -> dict[str, Path]:
    """Write the synthetic suite under out_dir/<benchmark>/ and return {benchmark: annotation path}.

    n_videos: videos per benchmark; duration_s: seconds per video (>= 8); fps (1-30) and size
    (even, >= 32 px) of the mp4 files. The same seed gives the same annotations and frames.
    """
    if n_videos < 1:
        raise ValueError(f"n_videos must be >= 1, got {n_videos}")
    unknown = sorted(set(benchmarks) - set(_WRITERS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; expected some of {sorted(_WRITERS)}")
    out_dir = Path(out_dir)
    annotations = {}
    for name in benchmarks:
        rng = _rng(seed, name)

        def make(path: Path) -> Script:
            script = make_script(rng, duration_s, fps, size)
            write_video(script, path)
            return script

        annotations[name] = _WRITERS[name](out_dir / name, rng, n_videos, make)
    return annotations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stc.benchmarks.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-videos", type=int, default=4, help="videos per benchmark")
    parser.add_argument("--duration", type=int, default=16, help="seconds per video (>= 8)")
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels")
    args = parser.parse_args(argv)
    annotations = make_synthetic_suite(
        args.out_dir, args.seed, args.n_videos, args.duration, fps=args.fps, size=args.size
    )
    for name, path in annotations.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
