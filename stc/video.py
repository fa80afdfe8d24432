"""Video decoding with decord, sampled the way ReKV samples frames.

Frame indices follow ReKV: `range(0, n_frames, step)` with
`step = int(round(fps) / sample_fps)` (the average fps rounded to an integer, the quotient
truncated, at least 1), and a frame's timestamp is `index / fps` with the unrounded fps.
At the usual 0.5 fps on a 25 or 30 fps video that is every 50th or 60th frame, i.e. one
frame every 2 s exactly; on a 29.97 fps video it is every 60th frame (one per 2.002 s).

`load_video` decodes the sampled frames of a whole video; `iter_frames` yields them chunk by
chunk, so a stream never holds more than one chunk of decoded frames.

decord decodes ahead in a worker thread, so an error in a packet *after* the wanted frames can
surface while decoding them, depending on thread timing: on 2 cores an intact frame just before a
corrupt region failed in about 1 of 40 reads (1 of 3 with one decoding thread under load). A failed decode
is therefore tried again on freshly opened readers (`DECODE_ATTEMPTS` tries in all), and a file
counts as corrupt at a frame only when every try fails there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Tries, each on a freshly opened reader, before a decoding error is reported (module docstring).
DECODE_ATTEMPTS = 4


class VideoError(ValueError):
    """A video file exists but cannot be decoded (not a video, truncated, corrupt or empty)."""


@dataclass
class Video:
    """Sampled frames of one video.

    frames: [F, H, W, 3] uint8 RGB.
    timestamps: [F] float64 seconds from the start of the video.
    fps: the file's average frame rate; duration: n_frames / fps in seconds.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    fps: float
    duration: float
    path: Path


def sample_indices(n_frames: int, fps: float, sample_fps: float) -> np.ndarray:
    """Indices of the frames ReKV keeps: range(0, n_frames, int(round(fps) / sample_fps)).

    Returns [F] int64. The step is at least 1 (a sample_fps above the video's fps keeps all).
    """
    if sample_fps <= 0 or not math.isfinite(sample_fps):
        raise ValueError(f"sample_fps must be a positive number, got {sample_fps!r}")
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    step = max(1, int(round(fps) / sample_fps))
    return np.arange(0, max(n_frames, 0), step, dtype=np.int64)


def _open_reader(path: Path):
    """Open a decord VideoReader; returns (reader, n_frames, fps) or raises a clear error."""
    import decord  # imported here so that `import stc.video` stays cheap

    if not path.exists():
        raise FileNotFoundError(
            f"video file {path} does not exist; download the benchmark's videos "
            "(python -m stc.benchmarks.download NAME) or check the video root"
        )
    if path.is_dir():
        raise VideoError(f"{path} is a folder, not a video file; point to the .mp4 inside it")
    if path.stat().st_size == 0:
        raise VideoError(f"video file {path} is empty (0 bytes); delete it and download it again")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as error:  # decord raises RuntimeError or DECORDError
        raise VideoError(
            f"cannot open {path} as a video ({type(error).__name__}: {_first_line(error)}); "
            "the file is not a video or is truncated/corrupt: delete it and download it again"
        ) from error
    n_frames = len(reader)
    fps = float(reader.get_avg_fps())
    if n_frames == 0:
        raise VideoError(f"video {path} has no frames; delete it and download it again")
    if not math.isfinite(fps) or fps <= 0:
        raise VideoError(f"video {path} reports an invalid frame rate {fps!r}; re-encode it")
    return reader, n_frames, fps


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _decode(reader, path: Path, indices: np.ndarray) -> np.ndarray:
    """Decode `indices` -> [len(indices), H, W, 3] uint8, turning decoder failures into VideoError."""
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as error:
        raise VideoError(
            f"cannot decode frames {int(indices[0])}..{int(indices[-1])} of {path} "
            f"({type(error).__name__}: {_first_line(error)}); the file is truncated or corrupt "
            "after that point: delete it and download it again"
        ) from error
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(indices):
        raise VideoError(f"decoding {path} gave frames of shape {frames.shape}, expected [F, H, W, 3]")
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _kept_indices(n_frames: int, fps: float, sample_fps: float, max_time: float | None) -> np.ndarray:
    indices = sample_indices(n_frames, fps, sample_fps)
    if max_time is not None:
        indices = indices[indices / fps <= max_time]
    return indices


class SampledVideo:
    """An open video whose sampled frame times are known up front; frames are decoded on demand.

    timestamps: [F] float64 seconds of the sampled frames (ReKV sampling, `max_time` applied).
    decode(start, stop) -> [stop - start, H, W, 3] uint8: sampled frames start..stop-1.
    Knowing the times without decoding lets a stream stop exactly at a cutoff without reading
    (and perhaps failing on) the frame after it. Opening raises FileNotFoundError / VideoError.
    """

    def __init__(self, path: str | Path, sample_fps: float = 0.5, max_time: float | None = None) -> None:
        self.path = Path(path)
        self._reader, self.n_frames, self.fps = _open_reader(self.path)
        self.indices = _kept_indices(self.n_frames, self.fps, sample_fps, max_time)
        self.timestamps = self.indices.astype(np.float64) / self.fps
        self.duration = self.n_frames / self.fps

    def __len__(self) -> int:
        return len(self.indices)

    def decode(self, start: int, stop: int) -> np.ndarray:
        if self._reader is None:
            raise ValueError(f"{self.path} was closed; open a new SampledVideo to decode more frames")
        if not 0 <= start < stop <= len(self.indices):
            raise ValueError(f"frame range [{start}, {stop}) is outside the {len(self.indices)} sampled frames")
        return self._decode_retrying(self.indices[start:stop])

    def _decode_retrying(self, indices: np.ndarray) -> np.ndarray:
        """Decode file frame `indices`, trying DECODE_ATTEMPTS times (see the module docstring)."""
        for _ in range(DECODE_ATTEMPTS - 1):
            try:
                return _decode(self._reader, self.path, indices)
            except VideoError:
                self._reader = _open_reader(self.path)[0]  # a reader whose worker failed is not reused
        try:
            return _decode(self._reader, self.path, indices)
        except VideoError as error:
            raise VideoError(f"{error} (tried {DECODE_ATTEMPTS} times, each on a fresh reader)") from error.__cause__

    def close(self) -> None:
        self._reader = None

    def __enter__(self) -> "SampledVideo":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_video(path: str | Path, sample_fps: float = 0.5, max_time: float | None = None) -> Video:
    """Decode the sampled frames of a video (ReKV sampling, see the module docstring).

    max_time: keep only frames with timestamp <= max_time (seconds); None keeps all.
    Raises FileNotFoundError for a missing file and VideoError for anything undecodable.
    """
    with SampledVideo(path, sample_fps, max_time) as video:
        if len(video) == 0:
            # Decode frame 0 only to learn H and W, so that the empty array still has them.
            frames = video._decode_retrying(np.zeros(1, dtype=np.int64))[:0]
        else:
            frames = video.decode(0, len(video))
        return Video(
            frames=frames, timestamps=video.timestamps, fps=video.fps, duration=video.duration, path=video.path
        )


def iter_frames(
    path: str | Path, sample_fps: float = 0.5, chunk: int = 1, max_time: float | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield the sampled frames lazily as (frames [c, H, W, 3] uint8, timestamps [c] seconds).

    Every chunk has `chunk` frames except possibly the last. The file is opened when the first
    chunk is requested; a file that fails later (truncated, zeros after some point) raises
    VideoError when the first undecodable chunk is reached, after the good chunks were yielded.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with SampledVideo(path, sample_fps, max_time) as video:
        for start in range(0, len(video), chunk):
            stop = min(start + chunk, len(video))
            yield video.decode(start, stop), video.timestamps[start:stop]
