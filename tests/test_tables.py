"""The paper's numbers as transcribed, and the tables that put ours next to them."""

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from stc import tables
from stc.paper_numbers import FIG1_TIME_SHARES, FIG2_ADJACENT_SIMILARITY, PAPER_TABLES, PRINTED_CHANGES
from stc.workflow import TABLE_SPECS, TINY_LABEL

PAPER_MD = Path("/work/shared/docs/paper.md")


# --------------------------------------------------------------------------------------------- transcription

# Checked by hand against the paper, one or more per table and figure.
SPOT_CHECKS = [
    ("table1", "ReKV", "Overall", 52.6),
    ("table1", "ReKV", "Prefill", 482.4),
    ("table1", "Dispider", "HLD", 5.4),
    ("table1", "LiveCC +STC-Cacher", "ViT", 126.84),
    ("table1", "StreamForest +STC-Cacher", "OJR", 60.9),
    ("table1", "ReKV +ToMe", "Prefill", 257.8),
    ("table1", "ReKV +VidCom2", "ACR", 59.6),
    ("table1", "ReKV +STC-Cacher & Pruner", "ViT", 78.3),
    ("table1", "ReKV +STC-Cacher & Pruner", "FAR-Avg", 48.0),
    ("table2", "StreamForest", "CS", 82.7),
    ("table2", "ReKV", "CT", 43.6),
    ("table2", "ReKV +VisionZip", "PR", 50.7),
    ("table2", "ReKV +Cacher & Pruner", "Overall", 65.2),
    ("table3", "StreamForest", "VideoMME Short", 76.0),
    ("table3", "ReKV", "Average", 61.3),
    ("table3", "ReKV +VidCom2", "EgoSchema", 60.6),
    ("table3", "ReKV +Cacher & Pruner", "VideoMME Long", 48.3),
    ("table4", "ReKV attn only (R 85%)", "Ego", 26.2),
    ("table4", "ReKV attn+MLP (R 75%)", "REC", 23.4),
    ("table5", "ReKV only a_t", "REC", 24.1),
    ("table6", "StreamForest MLP (R 85%)", "Avg", 42.6),
    ("table7", "StreamForest value", "EPM", 58.3),
    ("table8", "ReKV N = inf", "Avg", 33.5),
    ("table8", "ReKV N = 7", "STU", 44.4),
    ("table9a", "ReKV R = 50%", "STU", 46.6),
    ("table9b", "ReKV (75%, 50%)", "REC", 26.9),
    ("table10", "ReKV 2 a_t + a_s", "Avg", 41.6),
]


@pytest.mark.parametrize("key,row,column,value", SPOT_CHECKS)
def test_spot_checks(key, row, column, value):
    assert PAPER_TABLES[key].value(row, column) == value


def test_figures_and_printed_changes():
    assert FIG1_TIME_SHARES["LLaVA-OV"]["32 frames"] == (56, 11, 33)
    assert FIG1_TIME_SHARES["Qwen2-VL"]["image"] == (28, 4, 68)
    assert all(sum(v) == 100 for model in FIG1_TIME_SHARES.values() for v in model.values())
    assert FIG2_ADJACENT_SIMILARITY["online (0.5 fps)"][20] == 0.849
    assert FIG2_ADJACENT_SIMILARITY["offline (64 uniform frames)"][5] == 0.200
    assert PRINTED_CHANGES[("table1", "ReKV +STC-Cacher & Pruner", "Prefill")] == -45.3
    assert PRINTED_CHANGES[("table1", "LiveCC +STC-Cacher", "ViT")] == -30.0


def test_table_shapes():
    assert len(PAPER_TABLES["table1"].columns) == 18 and len(PAPER_TABLES["table1"].rows) == 12
    assert len(PAPER_TABLES["table2"].rows) == 8 and len(PAPER_TABLES["table3"].rows) == 8
    assert [len(PAPER_TABLES[k].rows) for k in ("table4", "table5", "table6", "table7", "table8", "table9a",
                                                "table9b", "table10")] == [3, 3, 3, 3, 5, 3, 3, 3]  # fmt: skip


def _mean(values):
    return sum(values) / len(values)


# Printed averages the paper gets wrong (beyond rounding); see the tables' notes. Anything else off is a typo here.
PAPER_INCONSISTENCIES = {
    ("table1", "Dispider +STC-Cacher", "BT-Avg"), ("table1", "Dispider +STC-Cacher", "FAR-Avg"),
    ("table1", "StreamForest +STC-Cacher", "BT-Avg"), ("table1", "ReKV", "Overall"),
    ("table1", "StreamForest", "Overall"), ("table1", "StreamForest +STC-Cacher", "Overall"),
    ("table10", "ReKV 2 a_t + a_s", "Avg"),
}  # fmt: skip


def test_printed_averages_match_their_parts():
    """Every average equals the mean of its parts up to rounding, except the paper's own slips."""
    off = set()
    t1 = PAPER_TABLES["table1"]
    groups = {"RT-Avg": ["OCR", "ACR", "ATR", "STU", "FPD", "OJR"], "BT-Avg": ["EPM", "ASI", "HLD"],
              "FAR-Avg": ["REC", "SSR", "CRR"], "Overall": ["RT-Avg", "BT-Avg", "FAR-Avg"]}  # fmt: skip
    for row in t1.rows:
        for avg, parts in groups.items():
            if abs(_mean([t1.value(row.label, p) for p in parts]) - t1.value(row.label, avg)) > 0.07:
                off.add(("table1", row.label, avg))
    t3 = PAPER_TABLES["table3"]
    for row in t3.rows:
        if abs(_mean([t3.value(row.label, c) for c in ("EgoSchema", "MLVU-dev", "VideoMME Overall")])
               - t3.value(row.label, "Average")) > 0.07:  # fmt: skip
            off.add(("table3", row.label, "Average"))
    for key in ("table6", "table7", "table8", "table9a", "table9b", "table10"):
        for row in PAPER_TABLES[key].rows:
            if abs(_mean(row.values[:3]) - row.values[3]) > 0.07:
                off.add((key, row.label, "Avg"))
    assert off == PAPER_INCONSISTENCIES


def _numbers(text):
    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\d%])", re.sub(r"\([^)]*%\)", "", text))]


@pytest.mark.skipif(not PAPER_MD.exists(), reason="the paper's notes (paper.md) are not on this machine")
def test_tables_1_to_3_equal_paper_md():
    """Every value of Tables 1-3 equals the number in the same place of the paper's notes."""
    text = PAPER_MD.read_text()
    for key, heading in (("table1", "## Table 1"), ("table2", "## Table 2"), ("table3", "## Table 3")):
        block = text.split(heading, 1)[1].split("\n## ", 1)[0]
        lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
        printed = [_numbers(line.split("|")[2]) for line in lines if len(line.split("|")) > 3 and _numbers(line.split("|")[2])]
        assert [list(r.values) for r in PAPER_TABLES[key].rows] == printed, key


# --------------------------------------------------------------------------------------------- our side


def _summary(overall, per_task=None, per_group=None):
    return {"overall": overall, "per_task": per_task or {}, "per_group": per_group or {}}


OVO_TASKS = ["OCR", "ACR", "ATR", "STU", "FPD", "OJR", "EPM", "ASI", "HLD", "REC", "SSR", "CRR"]
OVO_GROUP_OF = {"RT-Avg": "real-time", "BT-Avg": "backward", "FAR-Avg": "forward"}
# Table 2's columns (paper.md) and StreamingBench's task_type values (benchmarks.md)
SB_TASKS = {"CS": "Clips Summarize", "OP": "Object Perception", "ATP": "Attribute Perception",
            "PR": "Prospective Reasoning", "ACP": "Action Perception", "SU": "Spatial Understanding",
            "EU": "Event Understanding", "CT": "Counting", "TR": "Text-Rich Understanding", "CR": "Causal Reasoning"}  # fmt: skip
# a distinct score per task (Counting 25.0)
SB_SCORES = {task: 25.0 if task == "Counting" else 20.0 + 1.5 * i for i, task in enumerate(SB_TASKS.values())}


@pytest.fixture
def scores():
    ovo = {t: 10.0 + i for i, t in enumerate(OVO_TASKS)}
    groups = {"real-time": 12.5, "backward": 17.0, "forward": 20.0}
    return {
        ("ovobench", "baseline"): {"status": "ok", "summary": _summary(49.5, ovo, groups)},
        ("ovobench", "cacher"): {"status": "ok", "summary": _summary(40.0, {"EPM": 30.0, "STU": 60.0, "REC": 0.0})},
        ("egoschema", "cacher"): {"status": "ok", "summary": _summary(80.0)},
        ("egoschema", "baseline"): {"status": "ok", "summary": _summary(50.0)},
        ("mlvu", "baseline"): {"status": "ok", "summary": _summary(60.0)},
        ("videomme", "baseline"): {"status": "ok", "summary": _summary(70.0, per_group={"short": 80.0, "medium": 60.0})},
        ("streamingbench", "baseline"): {"status": "ok", "summary": _summary(33.0, dict(SB_SCORES))},
        ("ovobench", "visionzip"): {"status": "unavailable", "reason": "no compressor 'visionzip'", "summary": None},
    }


@pytest.fixture
def latency():
    # the 32-frame row first: a lookup must pick the 16-frame one, not the first of the method
    return pd.DataFrame([
        {"method": "baseline", "frames": 32, "vit_ms_per_frame": 9.0, "prefill_ms_per_frame": 99.0},
        {"method": "baseline", "frames": 16, "vit_ms_per_frame": 5.0, "prefill_ms_per_frame": 20.0},
        {"method": "cacher+pruner", "frames": 64, "vit_ms_per_frame": 1.0, "prefill_ms_per_frame": 2.0},
        {"method": "cacher+pruner", "frames": 16, "vit_ms_per_frame": 3.0, "prefill_ms_per_frame": 7.0},
    ])  # fmt: skip


def test_table1_ours_paper_and_difference(scores, latency):
    t = tables.build_table("table1", scores, latency, profile="tiny", label=TINY_LABEL)
    assert t.attrs["ours"] == "tiny" and t.attrs["label"] == TINY_LABEL
    assert t.loc["ReKV", ("OCR", "paper")] == 73.8
    assert t.loc["ReKV", ("OCR", "tiny")] == 10.0
    assert t.loc["ReKV", ("OCR", "diff")] == pytest.approx(10.0 - 73.8)
    assert t.loc["ReKV", ("BT-Avg", "tiny")] == 17.0
    assert t.loc["ReKV", ("Overall", "diff")] == pytest.approx(49.5 - 52.6)
    # latency: ms per frame at 16 frames, times 16
    assert t.loc["ReKV", ("ViT", "tiny")] == 80.0
    assert t.loc["ReKV", ("Prefill", "diff")] == pytest.approx(320.0 - 482.4)
    # every diff is ours - paper, NaN where either is missing
    for source in ("paper", "tiny", "diff"):
        assert t.xs(source, axis=1, level="source").shape == (len(TABLE_SPECS["table1"].rows), 18)
    paper, ours, diff = (t.xs(s, axis=1, level="source") for s in ("paper", "tiny", "diff"))
    pd.testing.assert_frame_equal(diff, ours - paper)
    # every OVO-Bench column of the ReKV row: its task, its group, Overall
    for i, task in enumerate(OVO_TASKS):
        assert t.loc["ReKV", (task, "tiny")] == 10.0 + i, task
    for column, group in OVO_GROUP_OF.items():
        assert t.loc["ReKV", (column, "tiny")] == {"real-time": 12.5, "backward": 17.0, "forward": 20.0}[group], column
    assert t.loc["ReKV", ("Overall", "tiny")] == 49.5
    # latency at 16 frames, not at 32 or 64 (listed first)
    assert (t.loc["ReKV", ("Prefill", "tiny")], t.loc["ReKV +STC-Cacher & Pruner", ("ViT", "tiny")]) == (320.0, 48.0)
    assert t.loc["ReKV +STC-Cacher & Pruner", ("Prefill", "tiny")] == 112.0


def test_missing_rows_stay_missing_and_say_why(scores, latency):
    t = tables.build_table("table1", scores, latency, profile="tiny")
    assert t.xs("tiny", axis=1, level="source").loc["ReKV +STC-Pruner"].isna().all()
    assert t.attrs["status"]["ReKV +STC-Pruner"].startswith("not run")
    assert t.xs("tiny", axis=1, level="source").loc["ReKV +VisionZip"].isna().all()
    assert "unavailable" in t.attrs["status"]["ReKV +VisionZip"]
    assert "not part of this artifact" in t.attrs["status"]["LiveCC"]
    assert t.loc["LiveCC", ("Overall", "paper")] == 59.7
    # a row the paper does not print: ours only
    extra = "ReKV +STC-Cacher (not in paper)"
    assert math.isnan(t.loc[extra, ("Overall", "paper")]) and t.loc[extra, ("Overall", "tiny")] == 40.0


def test_table3_average_and_ablation_columns(scores, latency):
    t3 = tables.build_table("table3", scores, latency)
    assert t3.attrs["ours"] == "ours"
    assert t3.loc["ReKV", ("VideoMME Medium", "ours")] == 60.0
    assert t3.loc["ReKV", ("Average", "ours")] == pytest.approx((50.0 + 60.0 + 70.0) / 3)
    assert math.isnan(t3.loc["ReKV", ("VideoMME Long", "ours")])
    # the Average needs all three benchmarks: without MLVU it is missing, not the mean of the other two
    no_mlvu = {k: v for k, v in scores.items() if k != ("mlvu", "baseline")}
    t3 = tables.build_table("table3", no_mlvu, latency)
    assert math.isnan(t3.loc["ReKV", ("MLVU-dev", "ours")]) and t3.loc["ReKV", ("EgoSchema", "ours")] == 50.0
    assert math.isnan(t3.loc["ReKV", ("Average", "ours")]) and math.isnan(t3.loc["ReKV", ("Average", "diff")])
    # Table 4's attn+MLP (R 75%) has the settings of "cacher": its results are reused, not rerun
    t4 = tables.build_table("table4", scores, latency)
    assert t4.loc["ReKV attn+MLP (R 75%)", ("STU", "ours")] == 60.0
    assert t4.loc["ReKV attn+MLP (R 75%)", ("Ego", "ours")] == 80.0
    t8 = tables.build_table("table8", scores, latency)
    assert t8.loc["ReKV N = 4", ("Avg", "ours")] == pytest.approx(30.0)
    assert t8.loc["ReKV N = 4", ("Avg", "diff")] == pytest.approx(30.0 - 39.9)
    # likewise an ablation's Avg lacks a part: missing
    no_rec = {**scores, ("ovobench", "cacher"): {"status": "ok", "summary": _summary(40.0, {"EPM": 30.0, "STU": 60.0})}}
    assert math.isnan(tables.build_table("table8", no_rec, latency).loc["ReKV N = 4", ("Avg", "ours")])


def test_markdown_and_csv(tmp_path, scores, latency):
    t = tables.build_table("table2", scores, latency, profile="tiny", label=TINY_LABEL)
    tables.write_table(t, tmp_path / "t2.md", tmp_path / "t2.csv")
    text = (tmp_path / "t2.md").read_text()
    assert TINY_LABEL in text and "paper / tiny (tiny - paper)" in text
    assert "| ReKV | " in text and "43.6 / 25.0 (-18.6)" in text
    long = pd.read_csv(tmp_path / "t2.csv")
    assert {"row", "metric", "paper", "ours", "diff", "status", "label"} <= set(long.columns)
    assert len(long) == len(TABLE_SPECS["table2"].rows) * len(PAPER_TABLES["table2"].columns)
    hit = long[(long["row"] == "ReKV") & (long["metric"] == "CT")].iloc[0]
    assert (hit["paper"], hit["ours"], hit["diff"]) == (43.6, 25.0, pytest.approx(-18.6))
    # every column of the ReKV row: each task's own score, the overall, the latency at 16 frames
    rekv = long[long["row"] == "ReKV"].set_index("metric")
    want = {**{column: SB_SCORES[task] for column, task in SB_TASKS.items()}, "Overall": 33.0, "ViT": 80.0, "Prefill": 320.0}
    assert list(rekv.index) == list(PAPER_TABLES["table2"].columns)
    assert rekv["ours"].to_dict() == want
    paper = dict(zip(PAPER_TABLES["table2"].columns, PAPER_TABLES["table2"].row("ReKV").values))
    assert rekv["diff"].to_dict() == pytest.approx({c: want[c] - paper[c] for c in want})
    row = next(line for line in text.splitlines() if line.startswith("| ReKV | "))
    cells = [c.strip() for c in row.split("|")[2:-2]]
    assert cells == [f"{paper[c]:.1f} / {want[c]:.1f} ({want[c] - paper[c]:+.1f})" for c in PAPER_TABLES["table2"].columns]


def test_load_scores_and_latency_formats(tmp_path):
    import json

    (tmp_path / "scores" / "ovobench").mkdir(parents=True)
    (tmp_path / "scores" / "ovobench" / "cacher+pruner.json").write_text(json.dumps({"status": "ok", "summary": None}))
    assert set(tables.load_scores(tmp_path / "scores")) == {("ovobench", "cacher+pruner")}
    assert tables.load_scores(tmp_path / "missing") == {}
    nested = {"rows": [{"method": "cacher", "frames": 64, "qa_ms": 3.0,
                        "checkpoints": {"16": {"vit_ms_per_frame": 1.5, "prefill_ms_per_frame": 2.0}}}]}  # fmt: skip
    flat = {"rows": [{"method": "pruner", "frames": 16, "vit_ms_per_frame": 4.0, "prefill_ms_per_frame": 1.0}]}
    (tmp_path / "a.json").write_text(json.dumps(nested))
    (tmp_path / "b.json").write_text(json.dumps(flat))
    lat = tables.load_latency([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "absent.json"])
    assert len(lat) == 2
    # aliases: "feature-key" has the settings of "cacher"
    assert tables.latency_value(lat, "feature-key", "vit_ms_per_frame") == 1.5 * 16
    assert tables.latency_value(lat, "pruner", "prefill_ms_per_frame") == 16.0
    assert tables.latency_value(lat, "baseline", "vit_ms_per_frame") is None
    assert tables.load_latency(None).empty


def test_committed_gpu_latency_renders():
    """The paper profile's committed GPU latency (compute=false) fills Table 1's ReKV rows, baselines included."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    committed = yaml.safe_load((root / "config" / "paper.yaml").read_text())["latency"]["committed"]
    lat = tables.load_latency(root / committed)
    t = tables.build_table("table1", {}, lat)
    for row in ("ReKV", "ReKV +ToMe", "ReKV +VisionZip", "ReKV +VidCom2", "ReKV +STC-Pruner", "ReKV +STC-Cacher & Pruner"):
        assert t.loc[row, ("ViT", "ours")] > 0 and t.loc[row, ("Prefill", "ours")] > 0, row
    assert t.loc["ReKV +STC-Pruner", ("Prefill", "ours")] < t.loc["ReKV", ("Prefill", "ours")]
