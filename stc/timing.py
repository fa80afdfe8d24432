"""Per-stage timing: CUDA events on a GPU (no host sync inside the hot path), perf_counter on the CPU."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates wall time per named stage. `summary()` syncs once and returns milliseconds.

    Stages used by the streaming engine: "upload" (pixels to the device), "capture" (CUDA-graph
    capture, once per kind of step), "vision", "projector" (projector + pooling + compressor),
    "window" (before each frame's prefill: the encoding window's slide, once it holds n_local
    tokens), "prefill", "retrieval", "decode".
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.cuda = self.device.type == "cuda"
        self._events: dict[str, list] = defaultdict(list)
        self._cpu_ms: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_ms[name].append((time.perf_counter() - t0) * 1e3)

    def times(self) -> dict[str, list[float]]:
        """Every recorded duration per stage, in ms."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out = {k: list(v) for k, v in self._cpu_ms.items()}
        for name, pairs in self._events.items():
            out.setdefault(name, []).extend(s.elapsed_time(e) for s, e in pairs)
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: total ms, count, mean ms."""
        return {
            name: {"total_ms": sum(v), "count": len(v), "mean_ms": sum(v) / len(v) if v else 0.0}
            for name, v in self.times().items()
        }

    def reset(self) -> None:
        self._events.clear()
        self._cpu_ms.clear()
