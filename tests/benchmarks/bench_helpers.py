"""Helpers for the benchmark tests: tiny mp4 files whose frames encode their index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "benchmarks"


def frame_level(index: int) -> int:
    """Grey level of frame `index` in the test videos (decoded back by `decoded_index`)."""
    return 10 + 5 * index


def decoded_index(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 10) / 5))


def write_mp4(path: Path, n_frames: int = 40, fps: int = 4, size: int = 64, faststart: bool = True) -> Path:
    """An H.264 mp4 of n_frames grey frames; frame i has mean level 10 + 5 i (n_frames <= 48)."""
    import av

    assert n_frames <= 48, "levels must stay below 255"
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(fps), "crf": "10"}
        for index in range(n_frames):
            # Zero-mean texture keeps the data part of the file large, so that cutting the file
            # hits frames rather than the header.
            texture = np.random.default_rng(index).integers(-8, 9, size=(size, size, 1))
            image = np.broadcast_to(frame_level(index) + texture, (size, size, 3)).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def zero_tail(path: Path, keep_fraction: float = 0.5) -> Path:
    """Overwrite the file's bytes after keep_fraction with zeros (like StreamingBench's sample_332)."""
    data = bytearray(path.read_bytes())
    cut = int(len(data) * keep_fraction)
    data[cut:] = bytes(len(data) - cut)
    path.write_bytes(bytes(data))
    return path
