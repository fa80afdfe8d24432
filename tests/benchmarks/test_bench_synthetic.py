import math

import numpy as np
import pytest

from stc.benchmarks.loaders import load_benchmark
from stc.benchmarks.synthetic import (
    COLOUR_NAMES,
    PALETTE,
    main,
    make_script,
    make_synthetic_suite,
    render_frame,
    square_box,
    write_video,
)
from stc.paths import annotation_path_in, videos_dir_in
from stc.video import load_video

N_VIDEOS = 3


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, make_synthetic_suite(out, seed=0, n_videos=N_VIDEOS, duration_s=16)


def square_colour(frame: np.ndarray) -> str:
    """The palette colour covering most pixels of a decoded frame (background and white excluded)."""
    palette = np.array([rgb for _, rgb in PALETTE], dtype=np.float64)
    distance = np.linalg.norm(frame[:, :, None, :].astype(np.float64) - palette[None, None], axis=-1)
    nearest = distance.argmin(-1)[distance.min(-1) < 50]
    return COLOUR_NAMES[np.bincount(nearest, minlength=len(PALETTE)).argmax()]


def disc_visible(frame: np.ndarray) -> bool:
    size = frame.shape[0]
    radius = size // 10
    return bool(frame[radius + 2, size - radius - 2].min() > 200)


def frames_until(path, ask_time, sample_fps=0.5):
    return load_video(path, sample_fps=sample_fps, max_time=math.ceil(ask_time)).frames


def test_every_loader_reads_the_suite_and_every_video_decodes(suite):
    out, annotations = suite
    counts = {}
    for name, path in annotations.items():
        assert path == annotation_path_in(out / name, name)  # laid out like a real download
        questions = load_benchmark(f"synthetic-{name}", path)
        counts[name] = len(questions)
        assert {q.benchmark for q in questions} == {f"synthetic-{name}"}
        for video in sorted({q.video for q in questions}):
            decoded = load_video(videos_dir_in(out / name, name) / video, sample_fps=0.5)
            assert decoded.frames.shape == (8, 64, 64, 3) and decoded.duration == pytest.approx(16.0)
    assert counts["streamingbench"] == 5 * N_VIDEOS
    assert counts["egoschema"] == N_VIDEOS
    assert counts["videomme"] == 3 * N_VIDEOS
    assert counts["mlvu"] == 2 + 1 + 2  # plotQA, findNeedle and ego videos for 3 videos
    ovo = load_benchmark("ovobench", annotations["ovobench"])
    assert {q.task for q in ovo} == {"OCR", "ACR", "ATR", "STU", "FPD", "OJR", "EPM", "ASI", "HLD", "REC", "SSR", "CRR"}
    assert {q.kind for q in ovo} == {"mc", "yesno", "count"}


# The option counts of the real schemas (docs/benchmarks.md): OVO-Bench has 2 to 5.
OPTION_COUNTS = {"streamingbench": {4}, "egoschema": {5}, "mlvu": {4}, "videomme": {4}, "ovobench": {2, 3, 4, 5}}


@pytest.mark.parametrize("name", sorted(OPTION_COUNTS))
def test_option_counts_follow_the_real_schemas(name, tmp_path):
    """Over many seeds (annotations only: scripts without their videos), every multiple-choice question has
    the option count of the benchmark's real schema, with distinct options and the gold among them."""
    from stc.benchmarks.synthetic import _WRITERS, _rng

    seen = set()
    for seed in range(20):
        rng = _rng(seed, name)
        path = _WRITERS[name](tmp_path / f"{seed}", rng, 12, lambda _path: make_script(rng, 16, 4, 64))
        for q in load_benchmark(name, path):
            if q.kind == "mc":
                seen.add(len(q.options))
                assert len(set(q.options)) == len(q.options), q
    assert seen <= OPTION_COUNTS[name] and seen


def test_same_seed_same_suite_other_seed_other_suite(suite, tmp_path):
    _, annotations = suite
    again = make_synthetic_suite(tmp_path / "again", seed=0, n_videos=N_VIDEOS, duration_s=16,
                                 benchmarks=("ovobench", "streamingbench"))  # fmt: skip
    for name, path in again.items():
        assert path.read_bytes() == annotations[name].read_bytes()
    other = make_synthetic_suite(tmp_path / "other", seed=1, n_videos=N_VIDEOS, duration_s=16, benchmarks=("ovobench",))
    assert other["ovobench"].read_bytes() != annotations["ovobench"].read_bytes()


def test_questions_are_answerable_from_what_the_stream_has_seen(suite):
    out, annotations = suite
    videos = videos_dir_in(out / "ovobench", "ovobench")
    questions = load_benchmark("ovobench", annotations["ovobench"])
    checked = {"ATR": 0, "SSR": 0, "REC": 0, "CRR": 0}
    for question in sorted(questions, key=lambda q: (q.video, q.ask_time)):
        frames = frames_until(videos / question.video, question.ask_time)
        latest = square_colour(frames[-1])
        if question.task == "ATR":  # "What colour is the square right now?"
            assert question.options[ord(question.answer) - 65] == latest
        elif question.task == "SSR":  # "show a <colour> square ..." is happening now?
            step_colour = question.question.split()[2]
            assert (latest == step_colour) == (question.answer == "Yes"), question.qid
        elif question.task == "REC":  # flashes counted once they are over
            assert sum(disc_visible(f) for f in frames) == int(question.answer), question.qid
        elif question.task == "CRR":  # answerable once the square has left its colour at ask time
            now = question.question.split()[3].rstrip(".")
            assert (latest != now) == (question.answer == "Yes"), question.qid
        else:
            continue
        checked[question.task] += 1
    assert all(n >= N_VIDEOS for n in checked.values()), checked


def test_streamingbench_colour_questions_match_the_frames(suite):
    out, annotations = suite
    videos = videos_dir_in(out / "streamingbench", "streamingbench")
    questions = [q for q in load_benchmark("streamingbench", annotations["streamingbench"])
                 if q.question == "What colour is the square right now?"]  # fmt: skip
    for question in questions:
        latest = square_colour(frames_until(videos / question.video, question.ask_time)[-1])
        assert question.options[ord(question.answer) - 65] == latest + "."


def test_encoded_frames_show_the_script(tmp_path):
    script = make_script(np.random.default_rng(3), duration_s=12, fps=2, size=96)
    decoded = load_video(write_video(script, tmp_path / "s.mp4"), sample_fps=1.0)
    assert len(decoded.frames) == 12
    for frame, t in zip(decoded.frames, decoded.timestamps):
        rendered = render_frame(script, t)
        assert np.abs(frame.astype(int) - rendered.astype(int)).mean() < 4
        y, x, side = square_box(script, t)
        centre = frame[y + side // 2, x + side // 2]
        assert square_colour(centre[None, None]) == script.segment_at(t).colour
        assert disc_visible(frame) == any(s <= t < s + 2 for s in script.disc_starts)


def test_scripts_are_well_formed():
    for seed in range(5):
        script = make_script(np.random.default_rng(seed), duration_s=60, fps=4, size=64)
        lengths = {s.end - s.start for s in script.segments}
        assert len(lengths) == 1 and lengths.pop() % 2 == 0
        colours = [s.colour for s in script.segments]
        assert len(set(colours)) == len(colours)  # "the colour after X" is unambiguous
        assert all(b - a >= 4 for a, b in zip(script.disc_starts, script.disc_starts[1:]))
        assert script.disc_starts and all(s % 2 == 0 for s in script.disc_starts)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"duration_s": 6}, "duration_s"), ({"n_videos": 0}, "n_videos"), ({"benchmarks": ("kinetics",)}, "unknown"),
     ({"size": 31}, "size"), ({"fps": 0}, "fps")],
)  # fmt: skip
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_suite(tmp_path, **kwargs)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "s"), "--n-videos", "1", "--duration", "8"]) == 0
    printed = capsys.readouterr().out
    assert "ovobench:" in printed and (tmp_path / "s" / "videomme" / "data").is_dir()
