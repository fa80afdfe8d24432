"""Every data path of the project, in one place.

`Paths(root)` names the folders; `BENCHMARK_LAYOUTS` says where each benchmark keeps its
annotation file and its videos inside its own folder, exactly as `stc.benchmarks.download`
lays out a real download and `stc.benchmarks.synthetic` lays out the offline suite:

    <root>/data/benchmarks/<name>/<layout.annotation>
    <root>/data/benchmarks/<name>/<layout.videos>/<Question.video>

The root is the repository root (the parent of the `stc` package) unless the environment
variable STC_ROOT names another one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchmarkLayout:
    """Where a benchmark keeps its files, relative to its benchmark folder.

    annotation: the annotation file the loader reads.
    videos: the folder that `Question.video` paths are relative to.
    """

    annotation: str
    videos: str


BENCHMARK_LAYOUTS = MappingProxyType(
    {
        "streamingbench": BenchmarkLayout("Real_Time_Visual_Understanding.csv", "videos"),
        "ovobench": BenchmarkLayout("ovo_bench_new.json", "src_videos"),
        "mlvu": BenchmarkLayout("mlvu_dev_mc.json", "MLVU/video"),
        "egoschema": BenchmarkLayout("egoschema_subset.json", "videos"),
        # The HF parquet converted to JSON lines by the download step (pyarrow needed there).
        "videomme": BenchmarkLayout("videomme/test-00000-of-00001.jsonl", "data"),
    }
)


def benchmark_layout(name: str) -> BenchmarkLayout:
    """The layout of benchmark `name` ("synthetic-<name>" shares the layout of <name>)."""
    base = name.removeprefix("synthetic-")
    if base not in BENCHMARK_LAYOUTS:
        raise ValueError(
            f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARK_LAYOUTS)} "
            "(optionally prefixed with 'synthetic-')"
        )
    return BENCHMARK_LAYOUTS[base]


def annotation_path_in(benchmark_dir: Path | str, name: str) -> Path:
    """The annotation file of benchmark `name` inside `benchmark_dir`."""
    return Path(benchmark_dir) / benchmark_layout(name).annotation


def videos_dir_in(benchmark_dir: Path | str, name: str) -> Path:
    """The video folder of benchmark `name` inside `benchmark_dir`."""
    return Path(benchmark_dir) / benchmark_layout(name).videos


def _default_root() -> Path:
    env_root = os.environ.get("STC_ROOT")
    return Path(env_root).expanduser().resolve() if env_root else REPO_ROOT


@dataclass(frozen=True)
class Paths:
    """The project's folders under one root (default: STC_ROOT or the repository root)."""

    root: Path = field(default_factory=_default_root)

    def __post_init__(self) -> None:
        if not isinstance(self.root, Path):
            object.__setattr__(self, "root", Path(self.root))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.data / "models"

    @property
    def hf_cache(self) -> Path:
        """Where hub checkpoints are downloaded and looked for (the workflow's model cache)."""
        return self.models / "hf"

    @property
    def benchmarks(self) -> Path:
        return self.data / "benchmarks"

    @property
    def synthetic(self) -> Path:
        """The synthetic suite; holds one folder per benchmark, laid out like `benchmarks`."""
        return self.benchmarks / "synthetic"

    def benchmark_dir(self, name: str) -> Path:
        """The folder of a real benchmark, or of its synthetic twin for "synthetic-<name>"."""
        benchmark_layout(name)  # validates the name
        if name.startswith("synthetic-"):
            return self.synthetic / name.removeprefix("synthetic-")
        return self.benchmarks / name

    def videos_dir(self, name: str) -> Path:
        return videos_dir_in(self.benchmark_dir(name), name)

    def annotation_path(self, name: str) -> Path:
        return annotation_path_in(self.benchmark_dir(name), name)

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
