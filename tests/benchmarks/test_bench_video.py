import numpy as np
import pytest
from bench_helpers import decoded_index, zero_tail

import stc.video
from stc.video import DECODE_ATTEMPTS, SampledVideo, Video, VideoError, iter_frames, load_video, sample_indices


@pytest.mark.parametrize(
    "n_frames, fps, sample_fps, expected",
    [
        (100, 25.0, 0.5, [0, 50]),  # round(25) / 0.5 = 50
        (130, 29.97, 0.5, [0, 60, 120]),  # fps rounds to 30 before dividing
        (20, 25.0, 3.0, [0, 8, 16]),  # int(25 / 3) = 8, truncated
        (5, 2.0, 10.0, [0, 1, 2, 3, 4]),  # step never below 1
        (0, 30.0, 0.5, []),
    ],
)
def test_sample_indices_follow_rekv(n_frames, fps, sample_fps, expected):
    assert sample_indices(n_frames, fps, sample_fps).tolist() == expected


@pytest.mark.parametrize("sample_fps", [0, -1.0, float("nan")])
def test_sample_indices_reject_bad_rate(sample_fps):
    with pytest.raises(ValueError, match="sample_fps"):
        sample_indices(10, 30.0, sample_fps)


def test_load_video_samples_the_right_frames(mp4):
    path = mp4(n_frames=40, fps=4)
    video = load_video(path, sample_fps=0.5)
    assert isinstance(video, Video)
    assert video.frames.shape == (5, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.timestamps.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert [decoded_index(f) for f in video.frames] == [0, 8, 16, 24, 32]
    assert video.fps == pytest.approx(4.0) and video.duration == pytest.approx(10.0)
    assert video.path == path


def test_load_video_max_time_keeps_frames_up_to_it(mp4):
    video = load_video(mp4(n_frames=40, fps=4), sample_fps=1.0, max_time=2.5)
    assert video.timestamps.tolist() == [0.0, 1.0, 2.0]
    assert [decoded_index(f) for f in video.frames] == [0, 4, 8]
    empty = load_video(mp4("b.mp4", n_frames=8, fps=4), sample_fps=1.0, max_time=-1)
    assert empty.frames.shape == (0, 64, 64, 3)


def test_iter_frames_chunks_equal_load_video(mp4):
    path = mp4(n_frames=40, fps=4)
    chunks = list(iter_frames(path, sample_fps=1.0, chunk=4))
    assert [len(ts) for _, ts in chunks] == [4, 4, 2]
    whole = load_video(path, sample_fps=1.0)
    np.testing.assert_array_equal(np.concatenate([f for f, _ in chunks]), whole.frames)
    np.testing.assert_array_equal(np.concatenate([t for _, t in chunks]), whole.timestamps)


def test_iter_frames_is_lazy_and_fails_late_on_a_corrupt_tail(mp4):
    # A file whose second half is zeros: the first chunk still decodes; a later one raises.
    path = zero_tail(mp4(n_frames=40, fps=4), 0.5)
    frames = iter_frames(path, sample_fps=1.0, chunk=1)
    first, timestamps = next(frames)
    assert timestamps.tolist() == [0.0] and decoded_index(first[0]) == 0
    with pytest.raises(VideoError, match="truncated or corrupt") as caught:
        list(frames)
    assert str(path) in str(caught.value)


def test_iter_frames_opens_the_file_only_when_iterated(tmp_path):
    frames = iter_frames(tmp_path / "missing.mp4")  # no error yet: nothing decoded up front
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        next(frames)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as caught:
        load_video(tmp_path / "nope.mp4")
    assert "nope.mp4" in str(caught.value) and "download" in str(caught.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        load_video(path)


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video")
    with pytest.raises(VideoError, match="not a video or is truncated") as caught:
        load_video(path)
    assert str(path) in str(caught.value)


def test_a_folder_is_not_a_video(tmp_path):
    with pytest.raises(VideoError, match="folder"):
        load_video(tmp_path)


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_file(mp4, faststart):
    # Cut in the middle: with the index at the end decord fails at open, with it first it
    # fails on the missing frames; both must be a VideoError naming the file.
    path = mp4(n_frames=40, fps=4, faststart=faststart)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoError) as caught:
        load_video(path, sample_fps=4.0)
    assert str(path) in str(caught.value) and "download it again" in str(caught.value)


def test_iter_frames_rejects_bad_chunk(mp4):
    with pytest.raises(ValueError, match="chunk"):
        next(iter_frames(mp4(n_frames=4), chunk=0))


def test_sampled_video_knows_times_before_decoding(mp4):
    path = zero_tail(mp4(n_frames=40, fps=4), 0.5)
    with SampledVideo(path, sample_fps=0.5) as video:
        assert video.timestamps.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]  # from the index, not decoded
        assert decoded_index(video.decode(0, 1)[0]) == 0
        with pytest.raises(VideoError, match="cannot decode frames 32..32"):
            video.decode(4, 5)
        with pytest.raises(ValueError, match="outside"):
            video.decode(3, 2)


class _FlakyReader:
    """A decord reader whose first `failures[0]` get_batch calls fail, like a worker error."""

    def __init__(self, reader, failures):
        self.reader, self.failures = reader, failures

    def get_batch(self, indices):
        if self.failures[0] > 0:
            self.failures[0] -= 1
            raise RuntimeError("[worker] Thread worker: Error sending packet.")
        return self.reader.get_batch(indices)


@pytest.mark.parametrize("failures", [1, DECODE_ATTEMPTS - 1, DECODE_ATTEMPTS])
def test_a_failed_decode_is_tried_again_on_fresh_readers(mp4, monkeypatch, failures):
    # decord's reader decodes ahead in a worker thread, so an error past the wanted frames can
    # surface at random; a decode fails only when every one of DECODE_ATTEMPTS tries fails.
    path = mp4(n_frames=40, fps=4)
    expected = load_video(path, sample_fps=1.0).frames[2:5]
    open_reader, opened, left = stc.video._open_reader, [], [failures]

    def flaky_open(path):
        reader, n_frames, fps = open_reader(path)
        opened.append(_FlakyReader(reader, left))
        return opened[-1], n_frames, fps

    monkeypatch.setattr(stc.video, "_open_reader", flaky_open)
    with SampledVideo(path, sample_fps=1.0) as video:
        if failures < DECODE_ATTEMPTS:
            np.testing.assert_array_equal(video.decode(2, 5), expected)
            assert len(opened) == 1 + failures  # every failed try replaced the reader
            np.testing.assert_array_equal(video.decode(2, 5), expected)  # the fresh reader is kept
            assert len(opened) == 1 + failures
        else:
            with pytest.raises(VideoError, match=f"cannot decode frames 8..16 .*tried {DECODE_ATTEMPTS} times"):
                video.decode(2, 5)
            assert len(opened) == DECODE_ATTEMPTS
