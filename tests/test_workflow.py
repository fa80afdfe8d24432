"""The workflow: config validation, evaluation planning, shard merging, the paper profile's fast failure
without a GPU, and the whole tiny profile end to end through Snakemake and papermill."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from stc import workflow as wf
from stc.benchmarks.driver import read_results, run_benchmark
from stc.benchmarks.loaders import load_benchmark
from stc.benchmarks.synthetic import make_synthetic_suite
from stc.paths import annotation_path_in, videos_dir_in

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


# --------------------------------------------------------------------------------------------- config


def test_profiles_load_and_validate():
    tiny = wf.load_config({"profile": "tiny"})
    assert tiny["label"] == wf.TINY_LABEL and tiny["model"]["name"] == "tiny"
    paper = wf.load_config({})
    assert paper["profile"] == "paper" and paper["label"] == "" and paper["methods"] == "all"
    assert paper["model"]["name"] == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    # overrides merge into nested settings without dropping their siblings
    merged = wf.load_config({"profile": "tiny", "benchmarks": {"limit": 3}})
    assert merged["benchmarks"]["limit"] == 3 and merged["benchmarks"]["source"] == "synthetic"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"profile": "huge"}, "profile must be one of"),
        ({"profile": "tiny", "methods": ["cacher", "cacherr"]}, "methods[1]: unknown method 'cacherr'"),
        ({"profile": "tiny", "benchmarks": {"shards": {"ovobench": 0}}}, "benchmarks.shards.ovobench: 0 is less than"),
        ({"profile": "tiny", "benchmarks": {"shards": {"mlvu": 2}}}, "'mlvu' is not in benchmarks.names"),
        ({"profile": "tiny", "benchmarks": {"names": ["ovobench", "kinetics"]}}, "benchmarks.names.1"),
        ({"profile": "tiny", "modle": {"name": "x"}}, "Additional properties are not allowed ('modle'"),
        ({"profile": "tiny", "model": {"dtype": "fp8"}}, "model.dtype: 'fp8' is not one of"),
        ({"profile": "tiny", "tables": ["table11"]}, "tables[0]: unknown table 'table11'"),
        ({"profile": "tiny", "benchmarks": {"source": "real"}}, "the tiny profile runs offline on the synthetic suite"),
        ({"profile": "tiny", "latency": {"methods": ["fast"]}}, "latency.methods[0]: unknown method 'fast'"),
    ],
)
def test_config_errors_say_what_is_wrong(overrides, message):
    with pytest.raises(wf.ConfigError) as error:
        wf.load_config(overrides)
    assert message in str(error.value)


def test_evaluations_run_each_setting_once():
    assert wf.canonical_method("reuse-attn+mlp") == "cacher"
    assert wf.canonical_method("feature-key") == "cacher"
    assert wf.canonical_method("interval-4") == "cacher"
    assert wf.canonical_method("anchor-both") == "pruner"  # Table 5: the Pruner alone at R_Pruner 75%
    assert wf.canonical_method("joint-75-75") == "joint-75-75"
    tiny = wf.load_config({"profile": "tiny"})
    runs = wf.evaluations(tiny)
    assert {(e.benchmark, e.method) for e in runs} == {
        (b, m) for b in tiny["benchmarks"]["names"] for m in ("baseline", "cacher", "pruner", "cacher+pruner")
    }
    paper = wf.evaluations(wf.load_config({}))
    pairs = [(e.benchmark, e.method) for e in paper]
    assert len(pairs) == len(set(pairs))
    assert ("ovobench", "reuse-attn+mlp") not in pairs and ("ovobench", "cacher") in pairs
    assert ("egoschema", "reuse-attn") in pairs and ("streamingbench", "reuse-attn") not in pairs
    assert {e.shards for e in paper if e.benchmark == "ovobench"} == {8}
    # Fig. 7 (selection metric against ToMe): settings no table has, each run on OVO-Bench only
    for method in ("metric-l1", "metric-l2", "metric-dot"):
        assert wf.canonical_method(method) == method
        assert ("ovobench", method) in pairs, method
        assert [b for b, m in pairs if m == method] == ["ovobench"], method
    assert ("ovobench", "tome") in pairs and ("ovobench", "feature-hidden") in pairs and ("ovobench", "feature-value") in pairs


# --------------------------------------------------------------------------------------------- shards


class _EchoStream:
    """Answers "A" to everything: enough to exercise the driver, the shards and the scoring."""

    def push_frames(self, frames, timestamps):
        pass

    def ask(self, query, **kwargs):
        return "A"

    def close(self):
        pass


class _EchoEngine:
    def open_stream(self):
        return _EchoStream()


def test_merged_shards_equal_one_run(tmp_path):
    suite = tmp_path / "suite"
    make_synthetic_suite(suite, n_videos=3, duration_s=8, benchmarks=("streamingbench",))
    questions = load_benchmark("synthetic-streamingbench", annotation_path_in(suite / "streamingbench", "streamingbench"))
    videos = videos_dir_in(suite / "streamingbench", "streamingbench")
    whole = tmp_path / "whole.jsonl"
    run_benchmark(_EchoEngine(), questions, videos, whole, progress=False)
    layout = wf.Layout("test", str(tmp_path / "results"), str(tmp_path / "figures"))
    evaluation = wf.Evaluation("streamingbench", "baseline", 2)
    answers = [tmp_path / p for p in wf.shard_files(layout, evaluation, ".jsonl")]
    statuses = [tmp_path / p for p in wf.shard_files(layout, evaluation, ".status.json")]
    for i, (answer, status) in enumerate(zip(answers, statuses)):
        run_benchmark(_EchoEngine(), questions, videos, answer, shard=(i, 2), progress=False)
        wf.write_status(status, status="ok", shard=[i, 2])
    record = wf.merge_shards("streamingbench", "baseline", answers, statuses, tmp_path / "m.jsonl", tmp_path / "m.json",
                             loader="synthetic-streamingbench", profile="tiny", label_text=wf.TINY_LABEL)  # fmt: skip
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(read_results(tmp_path / "m.jsonl")) == strip(read_results(whole))
    assert record["status"] == "ok" and record["shards"] == 2 and record["label"] == wf.TINY_LABEL
    assert record["summary"]["n"] == len(questions)
    assert json.loads((tmp_path / "m.json").read_text())["summary"]["overall"] == record["summary"]["overall"]


def test_a_setting_the_model_cannot_run_is_recorded_unavailable(tmp_path, monkeypatch):
    """ToMe's token budget is out of reach of the tiny model's two ViT layers: the evaluation notebook
    records the shard as unavailable, with the reason, instead of failing the workflow (methods=all on the
    tiny profile); its table rows then show as missing."""
    import papermill

    monkeypatch.setenv("STC_ROOT", str(tmp_path))
    answers, status = tmp_path / "answers.jsonl", tmp_path / "status.json"
    papermill.execute_notebook(str(REPO / "notebooks" / "run_benchmark.ipynb"), str(tmp_path / "run.ipynb"),
                               kernel_name="python3", progress_bar=False,
                               parameters={"method": "tome", "out_path": str(answers), "status_path": str(status),
                                           "progress": False})
    record = json.loads(status.read_text())
    assert record["status"] == "unavailable" and record["reason"].startswith("tome: ToMe cannot reduce")
    assert answers.read_text() == "" and record["answered"] == 0


def test_unavailable_shard_makes_the_result_missing(tmp_path):
    answer, status = tmp_path / "s.jsonl", tmp_path / "s.status.json"
    answer.write_text("")
    wf.write_status(status, status="unavailable", reason="visionzip: no compressor in stc.baselines")
    record = wf.merge_shards("ovobench", "visionzip", [answer], [status], tmp_path / "a.jsonl", tmp_path / "s.json",
                             loader="ovobench", profile="paper")  # fmt: skip
    assert record["status"] == "unavailable" and record["summary"] is None and "no compressor" in record["reason"]


# --------------------------------------------------------------------------------------------- paper profile


def _snakemake(args, cwd, timeout):
    return subprocess.run(SNAKEMAKE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_paper_profile_without_gpu_fails_fast_and_says_what_to_do(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the paper profile's check passes here")
    started = time.perf_counter()
    result = _snakemake(["--cores", "1", "--config", f"root={tmp_path}", "--", "all"], tmp_path, timeout=300)
    elapsed = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no CUDA GPU" in output and "--configfile config/tiny.yaml" in output and "profile=tiny" in output
    assert "no network" in output and "llava-hf/llava-onevision-qwen2-7b-ov-hf" in output
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()  # stopped before any job
    assert elapsed < 120


def test_paper_gpu_jobs_start_on_gpus_of_their_own(tmp_path):
    """Every GPU job of the paper DAG starts through stc.gpus (a GPU of its own where there are several,
    tests/test_gpus.py); CPU jobs start as they are."""
    result = _snakemake(["-n", "-p", "--cores", "8", "--config", f"root={tmp_path}", "--", "all"], tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    commands = [line for line in result.stdout.splitlines() if line.startswith("Shell command:")]
    gpu_jobs = [c for c in commands if any(k in c for k in ("run_benchmark.ipynb", "latency.ipynb", "-m stc.analysis"))]
    assert len(gpu_jobs) > 100 and len(commands) > len(gpu_jobs)
    launcher = f"{sys.executable} -m stc.gpus --count 1 -- {sys.executable} -m "
    alone = f"{sys.executable} -m stc.gpus --count 1 --exclusive -- {sys.executable} -m papermill "  # timing runs alone
    assert all((alone if "latency.ipynb" in c else launcher) in c for c in gpu_jobs)
    assert sum("latency.ipynb" in c for c in gpu_jobs) == 1
    assert not any("stc.gpus" in c for c in commands if c not in gpu_jobs)


def test_bad_config_on_the_command_line_stops_snakemake(tmp_path):
    result = _snakemake(["-n", "--configfile", str(REPO / "config" / "tiny.yaml"), "--config", "methods=[cacherr]",
                         f"root={tmp_path}"], tmp_path, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "unknown method 'cacherr'" in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------- tiny, end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-workflow")
    started = time.perf_counter()
    result = _snakemake(["--cores", "2", "--configfile", str(REPO / "config" / "tiny.yaml"), "--config", f"root={root}",
                         "--", "all"], root, timeout=1200)  # fmt: skip
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    print(f"tiny workflow: {elapsed:.0f} s")
    return root, wf.load_config({"profile": "tiny", "root": str(root)})


def test_tiny_workflow_builds_every_table(tiny_run):
    root, config = tiny_run
    layout = wf.Layout.of(config)
    for key in config["tables"]:
        markdown = (root / layout.table(key, "md")).read_text()
        assert wf.TINY_LABEL in markdown and "paper / tiny (tiny - paper)" in markdown
        long = pd.read_csv(root / layout.table(key, "csv"))
        assert {"paper", "ours", "diff", "status"} <= set(long.columns)
        assert (long["label"] == wf.TINY_LABEL).all() and (long["profile"] == "tiny").all()
        assert long["paper"].notna().any()
    table1 = pd.read_csv(root / layout.table("table1", "csv"))
    rekv = table1[table1["row"] == "ReKV"].set_index("metric")
    # the tiny model answered: accuracies and latencies are numbers, and diff = ours - paper
    assert rekv.loc[["OCR", "EPM", "REC", "Overall", "ViT", "Prefill"], "ours"].notna().all()
    assert (rekv["diff"] - (rekv["ours"] - rekv["paper"])).abs().max() < 1e-9
    assert table1[table1["row"] == "ReKV +VisionZip"]["ours"].isna().all()  # not in the tiny profile: missing
    table4 = pd.read_csv(root / layout.table("table4", "csv"))  # attn+MLP (R 75%) = cacher's run
    assert table4[(table4["row"] == "ReKV attn+MLP (R 75%)") & (table4["metric"] == "Ego")]["ours"].notna().all()
    assert "## Table 10" in (root / layout.tables_markdown).read_text()


def test_tiny_workflow_makes_every_figure_and_keeps_its_records(tiny_run):
    root, config = tiny_run
    layout = wf.Layout.of(config)
    for name in wf.FIGURES:
        assert (root / layout.figure(name)).stat().st_size > 5000, name
    for evaluation in wf.evaluations(config):
        scores = json.loads((root / layout.scores.format(benchmark=evaluation.benchmark, method=evaluation.method)).read_text())
        assert scores["status"] == "ok" and scores["label"] == wf.TINY_LABEL and scores["summary"]["n"] > 0
        notebook = root / wf.shard_files(layout, evaluation, ".ipynb")[0]
        assert notebook.exists()
    latency = json.loads((root / layout.latency(config)).read_text())
    assert {row["method"] for row in latency["rows"]} == set(config["latency"]["methods"])
    assert latency["meta"]["label"] == wf.TINY_LABEL
    figures_nb = json.loads((root / layout.notebook_out("figures")).read_text())
    assert any(wf.TINY_LABEL in json.dumps(cell.get("source")) for cell in figures_nb["cells"])
    assert (root / layout.log("tables")).exists()


def test_tiny_workflow_is_up_to_date_afterwards(tiny_run):
    root, _ = tiny_run
    result = _snakemake(["-n", "--configfile", str(REPO / "config" / "tiny.yaml"), "--config", f"root={root}",
                         "--", "all"], root, timeout=300)  # fmt: skip
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr
