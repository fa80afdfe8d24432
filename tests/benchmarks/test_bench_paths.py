import dataclasses
from pathlib import Path

import pytest

import stc.paths
from stc.paths import BENCHMARK_LAYOUTS, Paths, benchmark_layout

REPO = Path(stc.paths.__file__).resolve().parent.parent


def test_default_root_is_the_repository(monkeypatch):
    monkeypatch.delenv("STC_ROOT", raising=False)
    assert Paths().root == REPO
    assert (REPO / "stc" / "paths.py").is_file()


def test_stc_root_overrides_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("STC_ROOT", str(tmp_path))
    assert Paths().root == tmp_path.resolve()


def test_folders(tmp_path):
    paths = Paths(tmp_path)
    assert paths.data == tmp_path / "data"
    assert paths.models == tmp_path / "data" / "models"
    assert paths.benchmarks == tmp_path / "data" / "benchmarks"
    assert paths.results == tmp_path / "results"
    assert paths.figures == tmp_path / "figures"
    assert paths.logs == tmp_path / "logs"
    assert paths.benchmark_dir("ovobench") == tmp_path / "data" / "benchmarks" / "ovobench"
    assert paths.videos_dir("streamingbench") == tmp_path / "data" / "benchmarks" / "streamingbench" / "videos"
    assert paths.annotation_path("videomme") == (
        tmp_path / "data" / "benchmarks" / "videomme" / "videomme" / "test-00000-of-00001.jsonl")  # fmt: skip
    assert paths.benchmark_dir("synthetic-mlvu") == tmp_path / "data" / "benchmarks" / "synthetic" / "mlvu"
    assert paths.videos_dir("synthetic-mlvu") == paths.synthetic / "mlvu" / "MLVU" / "video"


def test_root_given_as_text_becomes_a_path(tmp_path):
    assert Paths(str(tmp_path)).data == tmp_path / "data"


def test_unknown_benchmark_and_immutability(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'kinetics'"):
        Paths(tmp_path).benchmark_dir("kinetics")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Paths(tmp_path).root = Path("/")
    with pytest.raises(TypeError):
        BENCHMARK_LAYOUTS["new"] = benchmark_layout("mlvu")
