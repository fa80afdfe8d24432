import json
import math

import numpy as np
import pytest
from bench_helpers import decoded_index, write_mp4, zero_tail

from stc.benchmarks.driver import plan, read_results, run_benchmark, shard_blocks
from stc.benchmarks.records import Question
from stc.video import VideoError, iter_frames, load_video


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


class FakeStream:
    def __init__(self, engine):
        self.engine = engine
        self.timestamps: list[float] = []
        self.indices: list[int] = []
        self.closed = False

    def push_frames(self, frames, timestamps):
        assert not self.closed
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
        assert len(frames) == len(timestamps) > 0
        timestamps = list(timestamps)
        assert timestamps == sorted(timestamps) and (not self.timestamps or timestamps[0] > self.timestamps[-1])
        self.timestamps += timestamps
        self.indices += [decoded_index(frame) for frame in frames]
        self.engine.pushes.append(len(frames))

    def ask(self, query, *, answer_prefix="", retrieval_text=None, max_new_tokens=16):
        engine = self.engine
        if engine.kill_after is not None and len(engine.asks) >= engine.kill_after:
            raise Killed()
        engine.asks.append({"retrieval_text": retrieval_text, "timestamps": list(self.timestamps),
                            "indices": list(self.indices), "stream": self.serial})  # fmt: skip
        seen = len(self.timestamps)
        # The answer is a function of what the stream saw, so a resumed run must replay it exactly.
        if answer_prefix == "Best option: (":
            n_options = query.count("\n(")
            return f"{chr(ord('A') + seen % n_options)}) option"
        if "single number" in query:
            return str(seen)
        return "Yes" if seen % 2 else "No"

    def close(self):
        self.closed = True
        self.engine.closed += 1


class FakeEngine:
    def __init__(self, kill_after=None):
        self.kill_after = kill_after
        self.asks: list[dict] = []
        self.pushes: list[int] = []
        self.opened = 0
        self.closed = 0

    def open_stream(self):
        self.opened += 1
        stream = FakeStream(self)
        stream.serial = self.opened  # not id(): a closed stream's id can be reused by the next one
        return stream


def q(qid, video, ask_time, kind="mc", task="OCR", benchmark="ovobench", answer=None):
    if kind == "mc":
        return Question(benchmark, qid, video, f"question {qid}?", ("a", "b", "c"), answer or "B", ask_time, task, "mc")
    if kind == "yesno":
        return Question(benchmark, qid, video, f"step {qid}", (), answer or "Yes", ask_time, "SSR", "yesno", "forward")
    return Question(benchmark, qid, video, f"How many {qid}?", (), answer or "3", ask_time, "REC", "count", "forward")


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "videos"
    write_mp4(root / "v1.mp4", n_frames=40, fps=4)  # sampled at 0.5 fps: t = 0, 2, 4, 6, 8
    write_mp4(root / "v2.mp4", n_frames=48, fps=4)  # t = 0, 2, ..., 10
    write_mp4(root / "sub" / "v3.mp4", n_frames=20, fps=2)  # t = 0, 2, ..., 8
    return root


STREAM_QUESTIONS = [
    q("a1", "v1.mp4", 5.0),
    q("a2", "v1.mp4", 0.0),
    q("a3", "v1.mp4", 3.2),  # cutoff ceil(3.2) = 4
    q("a4", "v1.mp4", 9.5, kind="yesno"),
    q("a5", "v1.mp4", 6.0, kind="count"),
    q("b1", "v2.mp4", 11.0),
    q("b2", "v2.mp4", 1.0, kind="count"),
    q("b3", "v2.mp4", 7.0, kind="yesno", answer="No"),
    q("c1", "sub/v3.mp4", 2.0),
    q("c2", "sub/v3.mp4", 2.0, kind="yesno"),
    q("c3", "sub/v3.mp4", 4.0),
]


def without_elapsed(rows):
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]


def test_streaming_is_causal_and_complete(videos, tmp_path):
    engine = FakeEngine()
    out = tmp_path / "out.jsonl"
    summary = run_benchmark(engine, STREAM_QUESTIONS, videos, out, progress=False, frames_per_push=2)
    rows = read_results(out)
    assert [r["qid"] for r in rows] == ["c1", "c2", "c3", "a2", "a3", "a1", "a5", "a4", "b2", "b3", "b1"]
    assert engine.opened == engine.closed == 3  # one stream per video
    by_qid = {question.qid: question for question in STREAM_QUESTIONS}
    for row, ask in zip(rows, engine.asks, strict=True):
        question = by_qid[row["qid"]]
        sampled = load_video(videos / question.video, sample_fps=0.5)
        expected = [t for t in sampled.timestamps.tolist() if t <= math.ceil(question.ask_time)]
        assert ask["timestamps"] == expected, row["qid"]  # every frame up to ceil(ask_time), none after
        assert ask["indices"] == [round(t * sampled.fps) for t in expected]  # the frames match their times
        assert ask["retrieval_text"] == question.question
    assert max(engine.pushes) <= 2
    # a1 saw frames 0, 2, 4 -> "A" + 3 % 3 = "A" against gold "B"; b1 saw 6 -> "A"; c3 saw 3 -> "A".
    assert {r["qid"]: r["parsed"] for r in rows if r["kind"] == "mc"} == {
        "a1": "A", "a2": "B", "a3": "A", "b1": "A", "c1": "C", "c3": "A"}  # fmt: skip
    assert {r["qid"]: r["response"] for r in rows if r["kind"] != "mc"} == {
        "a4": "Yes", "a5": "4", "b2": "1", "b3": "No", "c2": "No"}  # fmt: skip
    correct = {r["qid"] for r in rows if r["correct"]}
    assert correct == {"a2", "a4", "b3"}
    assert summary.n == 11 and summary.n_errors == 0
    assert summary.per_task["OCR"] == pytest.approx(100 / 6)


def test_offline_questions_encode_the_video_once(videos, tmp_path):
    questions = [q(f"m{i}", "v2.mp4", None, benchmark="videomme", task="OCR") for i in range(3)]
    engine = FakeEngine()
    run_benchmark(engine, questions, videos, tmp_path / "o.jsonl", progress=False)
    assert engine.opened == 1 and sum(engine.pushes) == 6
    assert all(ask["timestamps"] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0] for ask in engine.asks)
    assert [r["qid"] for r in read_results(tmp_path / "o.jsonl")] == ["m0", "m1", "m2"]


def test_non_streaming_mode_opens_a_fresh_stream_per_cutoff(videos, tmp_path):
    questions = [q("x1", "v1.mp4", 4.0), q("x2", "v1.mp4", 0.0), q("x3", "v1.mp4", 3.5), q("x4", "v1.mp4", None)]
    engine = FakeEngine()
    run_benchmark(engine, questions, videos, tmp_path / "o.jsonl", streaming=False, progress=False)
    assert engine.opened == engine.closed == 3  # cutoffs 0, 4 (x3 and x1 share it), end
    assert [ask["timestamps"] for ask in engine.asks] == [
        [0.0], [0.0, 2.0, 4.0], [0.0, 2.0, 4.0], [0.0, 2.0, 4.0, 6.0, 8.0]]  # fmt: skip
    assert engine.asks[1]["stream"] == engine.asks[2]["stream"] != engine.asks[0]["stream"]


@pytest.mark.parametrize("kill_after", [0, 1, 4, 6, 10])
@pytest.mark.parametrize("streaming", [True, False])
def test_resume_after_kill_equals_uninterrupted_run(videos, tmp_path, kill_after, streaming):
    whole = tmp_path / "whole.jsonl"
    run_benchmark(FakeEngine(), STREAM_QUESTIONS, videos, whole, streaming=streaming, progress=False)
    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        run_benchmark(FakeEngine(kill_after), STREAM_QUESTIONS, videos, resumed, streaming=streaming, progress=False)
    assert len(read_results(resumed)) == kill_after
    with open(resumed, "a") as handle:
        handle.write('{"qid": "a1", "video": "v1.m')  # killed in the middle of writing a line
    engine = FakeEngine()
    summary = run_benchmark(engine, STREAM_QUESTIONS, videos, resumed, streaming=streaming, progress=False)
    assert len(engine.asks) == len(STREAM_QUESTIONS) - kill_after  # finished questions were skipped
    assert without_elapsed(read_results(resumed)) == without_elapsed(read_results(whole))
    assert resumed.read_text().endswith("\n") and summary.n == len(STREAM_QUESTIONS)
    # Running again changes nothing.
    run_benchmark(FakeEngine(), STREAM_QUESTIONS, videos, resumed, streaming=streaming, progress=False)
    assert len(read_results(resumed)) == len(STREAM_QUESTIONS)


@pytest.mark.parametrize("n_shards", [2, 3, 4])
def test_shards_add_up_to_the_whole(videos, tmp_path, n_shards):
    whole = tmp_path / "whole.jsonl"
    run_benchmark(FakeEngine(), STREAM_QUESTIONS, videos, whole, progress=False)
    pieces, shard_videos = [], []
    for index in range(n_shards):
        out = tmp_path / f"shard{index}.jsonl"
        run_benchmark(FakeEngine(), STREAM_QUESTIONS, videos, out, shard=(index, n_shards), progress=False)
        rows = read_results(out)
        pieces += rows
        shard_videos.append({r["video"] for r in rows})
    assert without_elapsed(pieces) == without_elapsed(read_results(whole))
    for i in range(n_shards):
        for j in range(i + 1, n_shards):
            assert not shard_videos[i] & shard_videos[j]  # whole videos go to one shard


def test_shard_blocks():
    assert [list(shard_blocks(7, (i, 3))) for i in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [list(shard_blocks(2, (i, 3))) for i in range(3)] == [[], [0], [1]]
    for bad in [(3, 3), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="shard"):
            shard_blocks(5, bad)


def test_bad_videos_become_error_rows_and_the_run_goes_on(videos, tmp_path):
    (videos / "notes.mp4").write_text("not a video")
    corrupt = zero_tail(write_mp4(videos / "tail.mp4", n_frames=40, fps=4), 0.5)
    good_times = []
    with pytest.raises(VideoError):
        for _, timestamps in iter_frames(corrupt, sample_fps=0.5):
            good_times += timestamps.tolist()
    assert 0 < len(good_times) < 5  # the corrupt tail starts after a few sampled frames
    last_good = good_times[-1]
    questions = [
        q("g1", "v1.mp4", 2.0),
        q("m1", "missing.mp4", 1.0),
        q("m2", "missing.mp4", 3.0),
        q("n1", "notes.mp4", 0.0),
        q("t1", "tail.mp4", last_good),  # answerable: every frame up to it decodes
        q("t2", "tail.mp4", 9.0),  # needs frames past the corruption
        q("z1", "v2.mp4", 4.0),
    ]
    out = tmp_path / "o.jsonl"
    summary = run_benchmark(FakeEngine(), questions, videos, out, progress=False, frames_per_push=1)
    rows = {r["qid"]: r for r in read_results(out)}
    assert set(rows) == {q.qid for q in questions}
    for qid in ("m1", "m2"):
        assert rows[qid]["error"].startswith("FileNotFoundError") and "missing.mp4" in rows[qid]["error"]
    assert rows["n1"]["error"].startswith("VideoError") and "notes.mp4" in rows["n1"]["error"]
    assert rows["t2"]["error"].startswith("VideoError") and "truncated or corrupt" in rows["t2"]["error"]
    for qid in ("m1", "m2", "n1", "t2"):
        assert rows[qid]["correct"] is False and rows[qid]["response"] is None and rows[qid]["parsed"] is None
    for qid in ("g1", "t1", "z1"):
        assert rows[qid]["error"] is None and rows[qid]["response"] is not None
    assert summary.n == 7 and summary.n_errors == 4


def test_limit_and_plan_order(videos, tmp_path):
    ordered = plan(STREAM_QUESTIONS)
    assert [video for video, _ in ordered] == ["sub/v3.mp4", "v1.mp4", "v2.mp4"]
    assert [x.qid for x in ordered[1][1]] == ["a2", "a3", "a1", "a5", "a4"]
    limited = plan(STREAM_QUESTIONS, limit=5)
    assert [x.qid for _, qs in limited for x in qs] == ["c1", "c2", "c3", "a2", "a3"]
    out = tmp_path / "o.jsonl"
    summary = run_benchmark(FakeEngine(), STREAM_QUESTIONS, videos, out, limit=4, progress=True)
    assert summary.n == 4 and [r["qid"] for r in read_results(out)] == ["c1", "c2", "c3", "a2"]


def test_refuses_foreign_results_and_mixed_input(videos, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"qid": "other-benchmark-7"}) + "\n")
    with pytest.raises(ValueError, match="outside this run"):
        run_benchmark(FakeEngine(), STREAM_QUESTIONS, videos, out, progress=False)
    mixed = [q("1", "v1.mp4", 1.0), q("2", "v1.mp4", 1.0, benchmark="videomme")]
    with pytest.raises(ValueError, match="mix benchmarks"):
        run_benchmark(FakeEngine(), mixed, videos, tmp_path / "m.jsonl", progress=False)
    with pytest.raises(ValueError, match="no questions"):
        run_benchmark(FakeEngine(), [], videos, tmp_path / "e.jsonl", progress=False)


def test_read_results_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"qid": "1"}\n{broken\n{"qid": "2"}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_results(path)
    path.write_text('{"qid": "1"}\n{"qid": "2"')
    assert read_results(path, repair=True) == [{"qid": "1"}]
    assert path.read_text() == '{"qid": "1"}\n'


class ColourOracleStream(FakeStream):
    """Answers "What colour is the square right now?" from the latest frame it was given."""

    def push_frames(self, frames, timestamps):
        self.latest = frames[-1]
        self.timestamps += list(timestamps)

    def ask(self, query, *, answer_prefix="", retrieval_text=None, max_new_tokens=16):
        if retrieval_text != "What colour is the square right now?":
            return "A"
        from stc.benchmarks.synthetic import COLOUR_NAMES, PALETTE

        palette = np.array([rgb for _, rgb in PALETTE], dtype=float)
        distance = np.linalg.norm(self.latest[:, :, None, :].astype(float) - palette, axis=-1)
        colour = COLOUR_NAMES[np.bincount(distance.argmin(-1)[distance.min(-1) < 50], minlength=7).argmax()]
        options = [line[4:] for line in query.splitlines() if line.startswith("(")]
        return f"{chr(ord('A') + options.index(colour))}) {colour}"


class ColourOracle(FakeEngine):
    def open_stream(self):
        self.opened += 1
        return ColourOracleStream(self)


def test_end_to_end_on_the_synthetic_suite(tmp_path):
    from stc.benchmarks.loaders import load_benchmark
    from stc.benchmarks.synthetic import make_synthetic_suite
    from stc.paths import videos_dir_in

    annotations = make_synthetic_suite(tmp_path / "suite", seed=2, n_videos=2, benchmarks=("ovobench", "videomme"))
    questions = load_benchmark("synthetic-ovobench", annotations["ovobench"])
    videos = videos_dir_in(tmp_path / "suite" / "ovobench", "ovobench")
    summary = run_benchmark(ColourOracle(), questions, videos, tmp_path / "ovo.jsonl", progress=False)
    assert summary.benchmark == "synthetic-ovobench" and summary.n == len(questions) and summary.n_errors == 0
    assert summary.per_task["ATR"] == 100.0  # the colour questions are answerable causally
    assert set(summary.per_group) == {"real-time", "backward", "forward"}
    questions = load_benchmark("synthetic-videomme", annotations["videomme"])
    videos = videos_dir_in(tmp_path / "suite" / "videomme", "videomme")
    engine = ColourOracle()
    summary = run_benchmark(engine, questions, videos, tmp_path / "vmme.jsonl", progress=False)
    assert summary.n == 6 and engine.opened == 2 and set(summary.per_group) == {"short", "medium"}
