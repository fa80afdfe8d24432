"""Benchmarks: typed records, loaders of the real annotation files, prompts, official scorers,
downloads, a synthetic offline suite, and the resumable evaluation driver."""

from stc.benchmarks.loaders import load_benchmark
from stc.benchmarks.records import BenchmarkFormatError, Question
from stc.benchmarks.scoring import Summary, score

__all__ = ["BenchmarkFormatError", "Question", "Summary", "load_benchmark", "score"]
