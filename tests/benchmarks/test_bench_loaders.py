import json

import pytest
from bench_helpers import FIXTURES

from stc.benchmarks.loaders import load_benchmark, parse_time_stamp, strip_option_prefix
from stc.benchmarks.records import BenchmarkFormatError, Question

SB_CSV = FIXTURES / "streamingbench" / "Real_Time_Visual_Understanding.csv"
OVO_JSON = FIXTURES / "ovobench" / "ovo_bench_new.json"
MLVU_JSON = FIXTURES / "mlvu" / "mlvu_dev_mc.json"
EGO_JSON = FIXTURES / "egoschema" / "egoschema_subset.json"
VMME_JSONL = FIXTURES / "videomme" / "test-00000-of-00001.jsonl"


def by_qid(questions):
    return {q.qid: q for q in questions}


def test_streamingbench_rows():
    questions = load_benchmark("streamingbench", SB_CSV)
    assert len(questions) == 6
    first = questions[0]
    assert first == Question(
        benchmark="streamingbench",
        qid="Real-Time Visual Understanding_sample_1_1",
        video="sample_1/video.mp4",
        question="What logos are visible in the background?",
        options=("FIFA and La Liga.", "UEFA and La Liga.", "Bundesliga and La Liga.", "Aeromexico and La Liga."),
        answer="D",
        ask_time=4.0,
        task="Object Perception",
        kind="mc",
        extra={"frames_required": "single", "temporal_clue_type": "Prior"},
    )
    quoted = by_qid(questions)["Real-Time Visual Understanding_sample_1_5"]
    assert quoted.question == 'What is the color of the cooler labeled "PRIME" near the team bench?'
    assert quoted.ask_time == 128.0
    two_options = by_qid(questions)["Real-Time Visual Understanding_sample_12_1"]
    assert two_options.video == "sample_12/video.mp4"
    assert two_options.ask_time == 3600 + 64
    assert two_options.options == ('"Gordon Ramsay in 10".', "\"Jamie Oliver's 30-Minute Meals\".")
    # The file's times are not sorted (1:22 before 1:20); the loader keeps file order.
    assert [q.ask_time for q in questions[:5]] == [4.0, 53.0, 82.0, 80.0, 128.0]


def test_ovobench_items_and_probes():
    questions = by_qid(load_benchmark("ovobench", OVO_JSON))
    assert len(questions) == 4 + 3 + 4 + 3
    epm = questions["0"]
    assert (epm.kind, epm.answer, epm.group, epm.ask_time, epm.task) == ("mc", "C", "backward", 215.0, "EPM")
    assert epm.video == "Ego4D/ec4a3ba3-eb00-4aa8-9b41-36043ece98f7.mp4"
    assert epm.options[2] == "a person with blue shirt"
    assert questions["25"].options == ("yes", "no") and questions["25"].answer == "A"
    assert len(questions["8"].options) == 5 and questions["8"].answer == "D"
    ocr = questions["1423"]
    assert (ocr.group, ocr.ask_time, ocr.answer) == ("real-time", 259.84, "C")

    crr = [questions[f"1502#{i}"] for i in range(3)]
    assert [q.answer for q in crr] == ["No", "No", "Yes"]
    assert [q.ask_time for q in crr] == [1149.0, 1187.0, 1228.0]
    assert {q.kind for q in crr} == {"yesno"} and {q.group for q in crr} == {"forward"}
    assert crr[0].question == "The woman is walking on the road. What does she come across next?"

    ssr = [questions[f"1526#{i}"] for i in range(4)]
    assert [q.answer for q in ssr] == ["Yes", "No", "Yes", "No"]
    assert [q.question for q in ssr] == ["cut both ends and remove fruit seeds"] + ["cut in half"] * 3
    assert ssr[1].extra["tutorial"] == "CutGrapeFruit"

    rec = [questions[f"1582#{i}"] for i in range(3)]
    assert [q.answer for q in rec] == ["0", "1", "1"] and {q.kind for q in rec} == {"count"}
    assert rec[0].question == "How many times did they showing something to the camera?"
    assert rec[2].ask_time == 34.0


def test_mlvu_conversations():
    questions = by_qid(load_benchmark("mlvu", MLVU_JSON))
    assert set(questions) == {"1_plotQA/movie101_16#0", "1_plotQA/movie101_16#1", "4_count/count_170#0", "5_order/order_53#0"}
    plot = questions["1_plotQA/movie101_16#1"]
    assert plot.video == "1_plotQA/movie101_16.mp4"  # last two parts of an absolute path
    assert (plot.answer, plot.task, plot.ask_time) == ("D", "plotQA", None)  # "Green" is choice 3
    count = questions["4_count/count_170#0"]
    assert count.answer == "D" and count.video == "4_count/count_170.mp4"
    assert questions["5_order/order_53#0"].options == ("1->2", "2->1")


def test_mlvu_video_names_may_recur_across_task_folders(tmp_path):
    """One video name in two task folders: two questions with ids of their own, not a duplicate-id error."""
    import json

    entry = lambda task: {"video_id": "shared", "video_path": f"MLVU/video/{task}/shared.mp4", "duration": 10.0,
                          "conversations": [{"question": "Q?", "choices": ["a", "b"], "answer": "b", "question_type": task}]}  # fmt: skip
    path = tmp_path / "mlvu.json"
    path.write_text(json.dumps([entry("1_plotQA"), entry("3_ego")]))
    questions = load_benchmark("mlvu", path)
    assert [(q.qid, q.video) for q in questions] == [("1_plotQA/shared#0", "1_plotQA/shared.mp4"),
                                                     ("3_ego/shared#0", "3_ego/shared.mp4")]  # fmt: skip


def test_egoschema_answer_index_to_letter():
    questions = load_benchmark("egoschema", EGO_JSON)
    assert [(q.qid, q.answer, q.video) for q in questions] == [
        ("02413", "C", "7ad240de-34ab-4694-a6be-05a47e14793f.mp4"),
        ("02604", "E", "84389a11-7dc2-4e1d-80b1-e44d8787424a.mp4"),
    ]
    assert all(len(q.options) == 5 and q.ask_time is None for q in questions)


def test_videomme_jsonl_and_json_agree(tmp_path):
    questions = load_benchmark("videomme", VMME_JSONL)
    assert [q.qid for q in questions] == ["001-1", "001-2", "001-3", "625-1"]
    first = questions[0]
    assert first.video == "fFjv93ACGo8.mp4" and first.group == "short" and first.answer == "C"
    assert first.options == ("Apples.", "Candles.", "Berries.", "The three kinds are of the same number.")
    assert first.task == "Counting Problem" and first.extra["domain"] == "Knowledge"
    assert questions[3].group == "long"
    as_list = tmp_path / "videomme.json"
    as_list.write_text(json.dumps([json.loads(line) for line in VMME_JSONL.read_text().splitlines()]))
    assert load_benchmark("videomme", as_list) == questions


def test_videomme_parquet_needs_an_engine_or_says_so(tmp_path):
    pytest.importorskip("pandas")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path = tmp_path / "test.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            load_benchmark("videomme", path)
        return
    import pandas as pd

    rows = [json.loads(line) for line in VMME_JSONL.read_text().splitlines()]
    path = tmp_path / "test.parquet"
    pd.DataFrame(rows).to_parquet(path)
    assert load_benchmark("videomme", path) == load_benchmark("videomme", VMME_JSONL)


def test_synthetic_prefix_tags_records():
    questions = load_benchmark("synthetic-egoschema", EGO_JSON)
    assert {q.benchmark for q in questions} == {"synthetic-egoschema"}
    assert questions[0].base_benchmark == "egoschema"


def test_option_prefix_and_time_stamp_helpers():
    assert strip_option_prefix("A. Apples.", 0) == "Apples."
    assert strip_option_prefix("(B) two", 1) == "two"
    assert strip_option_prefix("C) three", 2) == "three"
    assert strip_option_prefix("B. not at its position", 0) == "B. not at its position"
    assert parse_time_stamp("00:01:22") == 82
    assert parse_time_stamp("1:00:00.5") == 3600.5
    with pytest.raises(ValueError):
        parse_time_stamp("01:22")


def test_missing_file_and_unknown_benchmark(tmp_path):
    with pytest.raises(FileNotFoundError, match="stc.benchmarks.download ovobench"):
        load_benchmark("ovobench", tmp_path / "absent.json")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("kinetics", SB_CSV)


# ---------------------------------------------------------------- malformed records


def _edit_json(source, tmp_path, edit):
    data = json.loads(source.read_text())
    edit(data)
    path = tmp_path / source.name
    path.write_text(json.dumps(data))
    return path


def _set(index, key, value):
    def edit(data):
        data[index][key] = value

    return edit


def _del(index, key):
    def edit(data):
        del data[index][key]

    return edit


def _conv(index, key, value):
    def edit(data):
        data[index]["conversations"][0][key] = value

    return edit


def _probe(index, probe, key, value):
    def edit(data):
        data[index]["test_info"][probe][key] = value

    return edit


@pytest.mark.parametrize(
    "name, source, edit, expected",
    [
        ("ovobench", OVO_JSON, _set(0, "gt", 4), ["record 0", "id 0", "'gt'", "0..3"]),
        ("ovobench", OVO_JSON, _set(3, "task", "XYZ"), ["record 3", "'task'", "unknown task"]),
        ("ovobench", OVO_JSON, _del(3, "realtime"), ["record 3", "id 1423", "'realtime'", "missing"]),
        ("ovobench", OVO_JSON, _set(3, "realtime", -5), ["record 3", "'realtime'", ">= 0"]),
        ("ovobench", OVO_JSON, _set(3, "options", "A or B"), ["record 3", "'options'", "list"]),
        ("ovobench", OVO_JSON, _probe(4, 1, "type", 2), ["record 4", "1502#1", "'type'", "0 or 1"]),
        ("ovobench", OVO_JSON, _probe(6, 0, "count", "three"), ["record 6", "1582#0", "'count'", "int"]),
        ("ovobench", OVO_JSON, _set(5, "test_info", []), ["record 5", "'test_info'", "empty"]),
        ("mlvu", MLVU_JSON, _conv(1, "answer", "7"), ["record 1", "count_170", "'answer'", "not one of the choices"]),
        ("mlvu", MLVU_JSON, _del(0, "video_path"), ["record 0", "movie101_16", "'video_path'", "missing"]),
        ("egoschema", EGO_JSON, _conv(1, "answer", 5), ["record 1", "'answer'", "0..4"]),
        ("egoschema", EGO_JSON, _conv(0, "choices", []), ["record 0", "'choices'", "non-empty list"]),
    ],
)
def test_malformed_json_records(tmp_path, name, source, edit, expected):
    path = _edit_json(source, tmp_path, edit)
    with pytest.raises(BenchmarkFormatError) as caught:
        load_benchmark(name, path)
    message = str(caught.value)
    assert str(path) in message
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (",00:00:53,C,", ",00:00:53,E,", ["record 1", "sample_1_2", "'answer'", "['A', 'B', 'C', 'D']"]),
        (",00:00:53,C,", ",53s,C,", ["record 1", "'time_stamp'", "HH:MM:SS"]),
        ("\"['A. Apple.',", "\"[['A. Apple.',", ["record 2", "'options'", "not a Python list literal"]),
        ("sample_1_4,", "sample_one,", ["record 3", "'question_id'", "sample_<video>_<k>"]),
    ],
)
def test_malformed_streamingbench_rows(tmp_path, old, new, expected):
    text = SB_CSV.read_text()
    assert old in text
    path = tmp_path / SB_CSV.name
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(BenchmarkFormatError) as caught:
        load_benchmark("streamingbench", path)
    for part in [str(path), *expected]:
        assert part in str(caught.value), (part, str(caught.value))


def test_streamingbench_missing_column(tmp_path):
    path = tmp_path / SB_CSV.name
    path.write_text(SB_CSV.read_text().replace("time_stamp", "timestamp", 1))
    with pytest.raises(BenchmarkFormatError, match="missing CSV columns \\['time_stamp'\\]"):
        load_benchmark("streamingbench", path)


def test_videomme_bad_rows(tmp_path):
    lines = VMME_JSONL.read_text().splitlines()
    row = json.loads(lines[2])
    row["duration"] = "huge"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], lines[1], json.dumps(row)]))
    with pytest.raises(BenchmarkFormatError, match=r"record 2 \(id '001-3'\): field 'duration'"):
        load_benchmark("videomme", path)
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(BenchmarkFormatError, match="line 2 is not valid JSON"):
        load_benchmark("videomme", path)


def test_duplicate_ids_and_broken_json(tmp_path):
    data = json.loads(OVO_JSON.read_text())
    data[1]["id"] = 0
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BenchmarkFormatError, match="question id '0' appears twice"):
        load_benchmark("ovobench", path)
    path.write_text(OVO_JSON.read_text()[:200])
    with pytest.raises(BenchmarkFormatError, match="not valid JSON"):
        load_benchmark("ovobench", path)
    path.write_text(json.dumps({"id": 0}))
    with pytest.raises(BenchmarkFormatError, match="expected a JSON list"):
        load_benchmark("ovobench", path)


def test_question_validates_itself():
    with pytest.raises(ValueError, match="option letters"):
        Question("x", "q", "v.mp4", "?", ("a", "b"), "C", None, "t", "mc")
    with pytest.raises(ValueError, match="'Yes' or 'No'"):
        Question("x", "q", "v.mp4", "?", (), "yes", 1.0, "SSR", "yesno")
    with pytest.raises(ValueError, match="kind"):
        Question("x", "q", "v.mp4", "?", (), "1", 1.0, "REC", "number")
    with pytest.raises(ValueError, match="ask_time"):
        Question("x", "q", "v.mp4", "?", (), "1", -2.0, "REC", "count")
