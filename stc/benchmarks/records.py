"""The common typed record every benchmark loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("mc", "yesno", "count")


class BenchmarkFormatError(ValueError):
    """An annotation file does not follow its benchmark's schema."""


@dataclass(frozen=True)
class Question:
    """One question (or one OVO-Bench forward probe) of a benchmark.

    benchmark: "streamingbench" | "ovobench" | "mlvu" | "egoschema" | "videomme", or
        "synthetic-<one of those>" for the offline synthetic suite.
    qid: unique within the benchmark; OVO-Bench forward probes are "<id>#<probe index>".
    video: video path relative to the benchmark's video folder.
    question: raw question text (what retrieval uses).
    options: option texts without "A. " / "(A)" prefixes; empty for yes/no and count probes.
    answer: gold answer: a letter for "mc", "Yes"/"No" for "yesno", digits for "count".
    ask_time: seconds from the video start when asked; None = after the whole video (offline).
    task: task name as the benchmark spells it (e.g. "OCR", "Object Perception", "plotQA").
    kind: "mc" | "yesno" | "count": how to prompt and to score.
    group: OVO-Bench "real-time" / "backward" / "forward"; Video-MME "short" / "medium" / "long".
    extra: anything else worth keeping (e.g. the OVO probe's step, Video-MME's domain).
    """

    benchmark: str
    qid: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    ask_time: float | None
    task: str
    kind: str
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Question {self.qid!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if self.kind == "mc":
            letters = [chr(ord("A") + i) for i in range(len(self.options))]
            if self.answer not in letters:
                raise ValueError(
                    f"Question {self.qid!r}: multiple-choice answer {self.answer!r} is not one of "
                    f"the option letters {letters}"
                )
        elif self.kind == "yesno" and self.answer not in ("Yes", "No"):
            raise ValueError(f"Question {self.qid!r}: yes/no answer must be 'Yes' or 'No', got {self.answer!r}")
        elif self.kind == "count" and not self.answer.isdigit():
            raise ValueError(f"Question {self.qid!r}: count answer must be digits, got {self.answer!r}")
        if self.ask_time is not None and not self.ask_time >= 0:
            raise ValueError(f"Question {self.qid!r}: ask_time must be >= 0 or None, got {self.ask_time!r}")

    @property
    def base_benchmark(self) -> str:
        """The schema this question follows ("synthetic-ovobench" -> "ovobench")."""
        return self.benchmark.removeprefix("synthetic-")
