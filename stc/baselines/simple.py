"""Two reference points for post-projector compression: uniform spatial subsampling and random dropping.

Both keep the same number k of tokens in every frame, chosen by a budget shared by all baselines:

``keep_ratio`` r in (0, 1]: k = floor(N * r) tokens of a frame of N (at least one);
``tokens_per_frame`` t >= 1: k = min(t, N).

Give at most one; neither means keep_ratio = 0.25, the budget of STC-Pruner alone (R_Pruner = 75%,
~49 of LLaVA-OneVision's 196 tokens per frame), which is where the paper's prefill-side baselines sit
(Table 1: all at ~-46% prefill latency). This module also holds those budget helpers for the other
baselines.

`UniformPooling` keeps a spatially uniform subset of the frame's token grid (the same positions in
every frame; it selects tokens, it does not average them). `RandomDrop` keeps k tokens drawn uniformly
at random per frame, from a seeded generator that lives in the per-stream state, so a stream is
reproducible and two streams never share randomness. Both are trivially causal. Kept tokens are
returned in spatial (ascending index) order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stc.compress import Compressed, VisionContext, gather_frames

DEFAULT_KEEP_RATIO = 0.25


# ---------------------------------------------------------------------------------------------
# Budget helpers shared by the baselines
# ---------------------------------------------------------------------------------------------


def check_budget(keep_ratio: float | None, tokens_per_frame: int | None) -> tuple[float | None, int | None]:
    """Validate a per-frame token budget; returns (keep_ratio, tokens_per_frame) with the default filled in.

    Raises ValueError when both are given or either is out of range.
    """
    if keep_ratio is not None and tokens_per_frame is not None:
        raise ValueError(
            "give one token budget: keep_ratio (e.g. 0.25) or tokens_per_frame (e.g. 49), not both; "
            f"got keep_ratio={keep_ratio!r}, tokens_per_frame={tokens_per_frame!r}"
        )
    if keep_ratio is None and tokens_per_frame is None:
        return DEFAULT_KEEP_RATIO, None
    if keep_ratio is not None:
        if (
            isinstance(keep_ratio, bool)
            or not isinstance(keep_ratio, (int, float))
            or math.isnan(keep_ratio)
            or not 0 < keep_ratio <= 1
        ):
            raise ValueError(f"keep_ratio must be a number in (0, 1], the fraction of tokens kept; got {keep_ratio!r}")
        return float(keep_ratio), None
    if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame must be an integer >= 1, got {tokens_per_frame!r}")
    return None, tokens_per_frame


def kept_tokens(num_tokens: int, keep_ratio: float | None, tokens_per_frame: int | None) -> int:
    """k for a frame of num_tokens tokens under a validated budget (1 <= k <= num_tokens)."""
    if tokens_per_frame is not None:
        return min(tokens_per_frame, num_tokens)
    # round() first so that e.g. 196 * 0.25 is not floored to 48.999... -> 48 by accident
    return max(1, min(num_tokens, math.floor(round(num_tokens * keep_ratio, 9))))


def check_tokens(tokens: torch.Tensor) -> None:
    """Raise ValueError unless tokens is a [frames, tokens, dim] tensor with at least one token per frame."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"expected tokens of shape [frames, tokens, dim], got {shape}")
    if tokens.shape[1] == 0:
        raise ValueError(f"expected at least one token per frame, got shape {tuple(tokens.shape)}")


def token_grid(num_tokens: int, context: VisionContext | None) -> tuple[int, int]:
    """(height, width) of a frame's token grid: context.grid, else the square that holds num_tokens."""
    grid = context.grid if context is not None else None
    if grid is not None:
        h, w = (int(g) for g in grid)
        if h * w != num_tokens:
            raise ValueError(f"context.grid {tuple(grid)} holds {h * w} tokens but frames have {num_tokens}")
        return h, w
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} tokens per frame is not a square grid; pass VisionContext(grid=(height, width))"
        )
    return side, side


def uniform_grid_indices(height: int, width: int, k: int) -> torch.Tensor:
    """k positions spread evenly over a height x width grid, as ascending raster indices, int64 [k].

    Rows are spaced evenly over the height; each row's points evenly over the width, the rows' counts
    differing by at most one (k = height * width keeps everything).
    """
    n = height * width
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a {height}x{width} grid, got {k}")
    rows = round(math.sqrt(k * height / width))
    rows = min(height, k, max(rows, 1, math.ceil(k / width)))
    base, extra = divmod(k, rows)
    # Give the longer rows to the evenly spaced subset of rows, so the point density stays even.
    long_rows = {math.floor((j + 0.5) * rows / extra) for j in range(extra)} if extra else set()
    picks = []
    for i in range(rows):
        y = math.floor((i + 0.5) * height / rows)
        count = base + (1 if i in long_rows else 0)
        picks.extend(y * width + math.floor((j + 0.5) * width / count) for j in range(count))
    return torch.tensor(sorted(picks), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Compressors
# ---------------------------------------------------------------------------------------------


@dataclass
class FrameCounter:
    """Per-stream state of a memoryless compressor: only how many frames it has seen."""

    frames_seen: int = 0

    def reset(self) -> None:
        self.frames_seen = 0


@dataclass(frozen=True)
class UniformPooling:
    """Keep the same spatially uniform k tokens of every frame (see `uniform_grid_indices`).

    keep_ratio / tokens_per_frame: the per-frame budget (module docstring). The token grid comes from
    VisionContext.grid, else frames must hold a square number of tokens.
    """

    keep_ratio: float | None = None
    tokens_per_frame: int | None = None

    def __post_init__(self):
        ratio, count = check_budget(self.keep_ratio, self.tokens_per_frame)
        object.__setattr__(self, "keep_ratio", ratio)
        object.__setattr__(self, "tokens_per_frame", count)

    def new_state(self) -> FrameCounter:
        return FrameCounter()

    def compress(self, tokens: torch.Tensor, state: FrameCounter, context: VisionContext | None = None) -> Compressed:
        check_tokens(tokens)
        if not isinstance(state, FrameCounter):
            raise TypeError(f"state must come from UniformPooling.new_state(), got {type(state).__name__}")
        frames, n, _ = tokens.shape
        h, w = token_grid(n, context)
        k = kept_tokens(n, self.keep_ratio, self.tokens_per_frame)
        idx = uniform_grid_indices(h, w, k).to(tokens.device)
        state.frames_seen += frames
        return gather_frames(tokens, idx.unsqueeze(0).expand(frames, -1))


@dataclass
class RandomDropState:
    """Per-stream state of `RandomDrop`: its own generator (seeded once) and a frame count."""

    generator: torch.Generator
    frames_seen: int = 0


@dataclass(frozen=True)
class RandomDrop:
    """Keep k tokens per frame drawn uniformly without replacement, in spatial order.

    keep_ratio / tokens_per_frame: the per-frame budget (module docstring).
    seed: seeds each new stream's generator; `new_state(seed=...)` overrides it per stream.
    """

    keep_ratio: float | None = None
    tokens_per_frame: int | None = None
    seed: int = 0

    def __post_init__(self):
        ratio, count = check_budget(self.keep_ratio, self.tokens_per_frame)
        object.__setattr__(self, "keep_ratio", ratio)
        object.__setattr__(self, "tokens_per_frame", count)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def new_state(self, seed: int | None = None) -> RandomDropState:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.seed if seed is None else seed)
        return RandomDropState(generator=generator)

    def compress(self, tokens: torch.Tensor, state: RandomDropState, context: VisionContext | None = None) -> Compressed:
        check_tokens(tokens)
        if not isinstance(state, RandomDropState):
            raise TypeError(f"state must come from RandomDrop.new_state(), got {type(state).__name__}")
        frames, n, _ = tokens.shape
        k = kept_tokens(n, self.keep_ratio, self.tokens_per_frame)
        # Drawn on the CPU so that a seed gives the same tokens on every device.
        picks = [torch.randperm(n, generator=state.generator)[:k].sort().values for _ in range(frames)]
        idx = torch.stack(picks).to(tokens.device) if picks else torch.empty(0, k, dtype=torch.int64, device=tokens.device)
        state.frames_seen += frames
        return gather_frames(tokens, idx)
