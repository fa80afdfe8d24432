import math

import pytest

from stc.benchmarks.prompts import build_prompt, parse_answer, parse_count, parse_mc, parse_yesno
from stc.benchmarks.records import Question
from stc.benchmarks.scoring import is_correct, score


def mc(qid="1", options=("red", "green", "blue"), answer="B", task="ATR", benchmark="ovobench", group=None):
    return Question(benchmark, qid, "v.mp4", "What colour is it?", options, answer, 3.0, task, "mc", group)


def test_mc_prompt_is_rekvs():
    prompt = build_prompt(mc())
    assert prompt.query == (
        "Question: What colour is it?\nOptions:\n(A) red\n(B) green\n(C) blue\nOnly give the best option."
    )
    assert prompt.answer_prefix == "Best option: ("
    assert prompt.retrieval_text == "What colour is it?"
    assert prompt.max_new_tokens == 16


def test_probe_prompts_carry_the_probe_and_retrieve_on_raw_text():
    ssr = Question("ovobench", "1#0", "v.mp4", "cut in half", (), "Yes", 3.0, "SSR", "yesno", "forward")
    crr = Question("ovobench", "2#0", "v.mp4", "What happens next?", (), "No", 3.0, "CRR", "yesno", "forward")
    rec = Question("ovobench", "3#0", "v.mp4", "How many times did they jump?", (), "2", 3.0, "REC", "count")
    for question, needle in [(ssr, "performing this step right now"), (crr, "enough information")]:
        prompt = build_prompt(question)
        assert question.question in prompt.query and needle in prompt.query
        assert '"Yes" or "No"' in prompt.query
        assert prompt.answer_prefix == "" and prompt.retrieval_text == question.question
    prompt = build_prompt(rec)
    assert "How many times did they jump?" in prompt.query and "single number" in prompt.query
    assert prompt.retrieval_text == "How many times did they jump?"


@pytest.mark.parametrize(
    "response, expected",
    [("B) green", "B"), ("B", "B"), ("  C) blue\n", "C"), ("The answer is (D)", "D"), ("", ""), ("A.", "A")],
)
def test_parse_mc(response, expected):
    assert parse_mc(response) == expected


@pytest.mark.parametrize(
    "response, expected",
    [("Yes", "Yes"), ("No.", "No"), ("Y", "Yes"), ("N", "No"), ("Yes or No", ""), ("maybe", ""), ("yes", "")],
)
def test_parse_yesno(response, expected):
    assert parse_yesno(response) == expected


def test_parse_count_joins_all_digits_like_ovo():
    assert parse_count("3") == "3"
    assert parse_count("They did it 12 times.") == "12"
    assert parse_count("1 or 2") == "12"
    assert parse_count("none") == ""


def test_parse_answer_dispatches_on_kind():
    rec = Question("ovobench", "3#0", "v.mp4", "How many?", (), "2", 3.0, "REC", "count")
    assert parse_answer(rec, "2 times") == "2"
    assert parse_answer(mc(), "C) blue") == "C"


@pytest.mark.parametrize(
    "kind, answer, response, expected",
    [
        ("mc", "B", "B) green", True),
        ("mc", "B", "A) B-movie", False),  # OVO's substring rule would accept this one
        ("mc", "A", None, False),
        ("yesno", "Yes", "Yes, the step is shown.", True),
        ("yesno", "No", "Y", False),
        ("yesno", "No", "N", True),
        ("yesno", "No", "no", False),  # OVO matches case-sensitively
        ("yesno", "Yes", "Yes and No", True),  # OVO: the gold word appears
        ("yesno", "Yes", "I think Yes", True),  # ... anywhere in the response, not only at its start
        ("yesno", "No", "The answer is No.", True),
        ("yesno", "No", "I think Yes", False),
        ("count", "12", "12", True),
        ("count", "2", "2 or 3", False),
        ("count", "0", "zero", False),
    ],
)
def test_is_correct_rules(kind, answer, response, expected):
    assert is_correct(kind, answer, response) is expected


def row(qid, task, kind, answer, response, group=None, error=None):
    return {"qid": qid, "task": task, "kind": kind, "answer": answer, "response": response, "group": group,
            "error": error, "correct": None}  # fmt: skip


# benchmarks.md: "Real-time: OCR, ACR, ATR, STU, FPD, OJR. Backward: EPM, ASI, HLD. Forward: REC, SSR, CRR."
OVO_BENCHMARKS_MD = {
    **{t: "real-time" for t in ("OCR", "ACR", "ATR", "STU", "FPD", "OJR")},
    **{t: "backward" for t in ("EPM", "ASI", "HLD")},
    **{t: "forward" for t in ("REC", "SSR", "CRR")},
}


def test_ovo_groups_are_benchmarks_md():
    from stc.benchmarks.loaders import OVO_GROUPS

    assert dict(OVO_GROUPS) == OVO_BENCHMARKS_MD


def test_ovobench_score_by_hand():
    rows = [
        row("1", "OCR", "mc", "A", "A) x"),
        row("2", "OCR", "mc", "A", "B) y"),  # OCR 50
        row("3", "ATR", "mc", "C", "C"),  # ATR 100
        row("3a", "ACR", "mc", "B", "B"),  # ACR 100
        row("3b", "STU", "mc", "D", "A"),  # STU 0
        row("3c", "FPD", "mc", "A", "A"),
        row("3d", "FPD", "mc", "A", "C"),
        row("3e", "FPD", "mc", "A", "A"),
        row("3f", "FPD", "mc", "A", "A"),  # FPD 75
        row("3g", "OJR", "mc", "C", "C"),  # OJR 100 -> real-time (50 + 100 + 100 + 0 + 75 + 100) / 6 = 70.8
        row("4", "EPM", "mc", "B", None, error="FileNotFoundError: gone"),  # EPM 0
        row("4a", "ASI", "mc", "A", "A"),  # ASI 100
        row("4b", "HLD", "mc", "B", "B"),
        row("4c", "HLD", "mc", "B", "B"),
        row("4d", "HLD", "mc", "B", "A"),
        row("4e", "HLD", "mc", "B", "C"),  # HLD 50 -> backward (0 + 100 + 50) / 3 = 50
        row("5#0", "REC", "count", "3", "3 times"),  # REC 100
        row("6#0", "SSR", "yesno", "Yes", "Yes"),
        row("6#1", "SSR", "yesno", "No", "Yes"),  # SSR 50
        row("7#0", "CRR", "yesno", "No", "Y"),  # CRR 0 -> forward (100 + 50 + 0) / 3 = 50
    ]
    summary = score("ovobench", rows)
    assert summary.per_task == {"ACR": 100.0, "ASI": 100.0, "ATR": 100.0, "CRR": 0.0, "EPM": 0.0, "FPD": 75.0,
                                "HLD": 50.0, "OCR": 50.0, "OJR": 100.0, "REC": 100.0, "SSR": 50.0, "STU": 0.0}  # fmt: skip
    assert summary.per_group == {"real-time": pytest.approx(425 / 6), "backward": 50.0, "forward": 50.0}
    assert list(summary.per_group) == ["real-time", "backward", "forward"]
    assert summary.overall == pytest.approx((425 / 6 + 50 + 50) / 3)
    assert (summary.n, summary.n_errors) == (20, 1)
    assert summary.task_counts["FPD"] == summary.task_counts["HLD"] == 4
    assert summary.group_counts == {"real-time": 10, "backward": 6, "forward": 4}
    # a subset of the tasks: each group averages the tasks it has, Overall the groups present
    partial = score("ovobench", [r for r in rows if r["task"] in ("OCR", "ATR", "EPM", "REC", "SSR", "CRR")])
    assert partial.per_group == {"real-time": 75.0, "backward": 0.0, "forward": 50.0}
    assert partial.overall == pytest.approx((75 + 0 + 50) / 3)
    assert partial.group_counts == {"real-time": 3, "backward": 1, "forward": 4}


def test_streamingbench_score_by_hand():
    rows = [
        row("a", "Counting", "mc", "A", "A) 1"),
        row("b", "Counting", "mc", "B", "C) 3"),
        row("c", "Counting", "mc", "D", "D"),
        row("d", "Object Perception", "mc", "B", "B) ball"),
    ]
    summary = score("streamingbench", rows)
    assert summary.per_task == {"Counting": pytest.approx(200 / 3), "Object Perception": 100.0}
    assert summary.overall == 75.0  # 3 of 4 questions
    assert summary.per_group == {}


def test_mlvu_overall_and_m_avg_by_hand():
    rows = [row("1", "plotQA", "mc", "A", "A"), row("2", "plotQA", "mc", "A", "B"),
            row("3", "plotQA", "mc", "A", "A"), row("4", "count", "mc", "B", "C")]  # fmt: skip
    summary = score("mlvu", rows)
    assert summary.overall == 50.0
    assert summary.extra["M-Avg"] == pytest.approx((200 / 3 + 0) / 2)


def test_videomme_per_duration_by_hand():
    rows = [row("1", "OCR", "mc", "A", "A", "short"), row("2", "OCR", "mc", "A", "B", "short"),
            row("3", "Counting", "mc", "C", "C", "long")]  # fmt: skip
    summary = score("videomme", rows)
    assert summary.per_group == {"short": 50.0, "long": 100.0}
    assert summary.overall == pytest.approx(200 / 3)


def test_egoschema_and_synthetic_names():
    rows = [row("1", "egoschema", "mc", "E", "E) x"), row("2", "egoschema", "mc", "A", "B) y")]
    assert score("egoschema", rows).overall == 50.0
    assert score("synthetic-egoschema", rows).benchmark == "synthetic-egoschema"


def test_empty_and_bad_rows():
    empty = score("streamingbench", [])
    assert empty.n == 0 and math.isnan(empty.overall)
    with pytest.raises(ValueError, match="lacks fields"):
        score("streamingbench", [{"qid": "1"}])
    with pytest.raises(ValueError, match="appears twice"):
        score("egoschema", [row("1", "e", "mc", "A", "A"), row("1", "e", "mc", "A", "A")])
    with pytest.raises(ValueError, match="unknown benchmark"):
        score("kinetics", [])
    with pytest.raises(ValueError, match="unknown task"):
        score("ovobench", [row("1", "XYZ", "mc", "A", "A")])


def test_to_frame_lists_every_figure():
    summary = score("ovobench", [row("1", "OCR", "mc", "A", "A"), row("2", "EPM", "mc", "A", "B")])
    frame = summary.to_frame()
    assert list(frame.columns) == ["benchmark", "level", "name", "accuracy", "n"]
    assert frame[frame.level == "overall"].accuracy.item() == 50.0
    assert set(frame[frame.level == "group"].name) == {"real-time", "backward"}
    assert set(frame[frame.level == "task"].name) == {"OCR", "EPM"}
