"""VidCom2 (Video Compression Commander, Liu et al., EMNLP 2025), made causal for streaming.

VidCom2 compresses a video's visual tokens in two steps:
1. frame compression adjustment: each frame's budget grows with its uniqueness (how unlike the
   video's global representation it is): u_t = -mean_i sim(z_ti, g); p = softmax(u / tau) over
   frames; frame t keeps a share r * (1 + p_t - mean(p)) of its tokens;
2. adaptive token compression: inside a frame, keep the tokens least similar to both the video
   representation g and the frame's own mean (score sim(z, g) + sim(z, frame mean), keep the lowest).
The public code scores on the half of the channels with the lowest variance over the video, on
L2-normalised tokens, with sim = a multi-scale Gaussian kernel sum_a exp(-||x - y||^2 / (2 a)),
a in {1/8, 1/4, 1/2, 1, 2}, and tau = 0.01.

Causal adaptation (a frame's decision uses only that frame and the past; frames are processed one by
one, so a chunk gives exactly what its frames give one at a time):
- global representation g: the mean of all PAST tokens of the stream (for the first frame: its own
  mean), restricted to the scoring channels and L2-normalised;
- scoring channels: the `channel_fraction` lowest-variance channels over all tokens seen so far,
  this frame included (running per-channel sums);
- frame weight: the softmax runs over the uniqueness of the last `window` frames (this one included),
  and the frame's weight is w_t = 1 + p_t - 1 / n (n frames in the window): 1 for an average frame,
  up to ~2 for a frame far more unique than its recent past;
- budget: the stream is cut into periods of `period` frames, each with exactly period * k tokens
  (k = the per-frame budget). Frame j of a period gets round(w_t * remaining / frames_left), clamped so
  that the rest of the period stays feasible (between `min_tokens` and N tokens per frame); the last
  frame of a period takes what is left. So the per-frame counts vary with content, the sum over every
  complete period is exact, and the average over the stream is k.

Budget: ``keep_ratio`` / ``tokens_per_frame`` give k (see `stc.baselines.simple`; default keep_ratio = 0.25).
Kept tokens are returned in spatial order with their input indices.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from stc.baselines.simple import check_budget, check_tokens, kept_tokens
from stc.compress import Compressed, VisionContext

SIMILARITIES = ("gaussian", "cosine")
GAUSSIAN_BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


def similarity(z: torch.Tensor, anchor: torch.Tensor, kind: str) -> torch.Tensor:
    """Similarity of each token to an anchor. z: [N, C] (L2-normalised); anchor: [C]. Returns [N].

    "gaussian": sum over a in GAUSSIAN_BANDWIDTHS of exp(-||z - anchor||^2 / (2 a)) (public code);
    "cosine": cos(z, anchor).
    """
    if kind == "gaussian":
        dist2 = (z - anchor).pow(2).sum(-1)
        return sum(torch.exp(-dist2 / (2 * a)) for a in GAUSSIAN_BANDWIDTHS)
    if kind == "cosine":
        return nn.functional.cosine_similarity(z, anchor.unsqueeze(0), dim=-1)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")


def frame_weight(uniqueness: torch.Tensor, temperature: float) -> float:
    """VidCom2's budget multiplier of the LAST frame of a window: 1 + p_last - 1 / n, p = softmax(u / tau).

    uniqueness: [n] in stream order, the current frame last.
    """
    p = torch.softmax(uniqueness.double() / temperature, dim=0)
    return float(1.0 + p[-1] - 1.0 / uniqueness.numel())


def frame_budget(remaining: int, frames_left: int, weight: float, num_tokens: int, min_tokens: int) -> int:
    """Tokens for the next frame of a period: round(weight * remaining / frames_left), clamped so that the
    other frames_left - 1 frames can still get between min_tokens and num_tokens each."""
    low = max(min_tokens, remaining - (frames_left - 1) * num_tokens)
    high = min(num_tokens, remaining - (frames_left - 1) * min_tokens)
    if low > high:
        raise RuntimeError(f"infeasible budget: {remaining} tokens for {frames_left} frames of {num_tokens}")
    wanted = math.floor(weight * remaining / frames_left + 0.5)
    return min(high, max(low, wanted))


def lowest_variance_channels(count: int, total: torch.Tensor, total_sq: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the max(1, int(D * fraction)) channels of lowest variance, from running sums.

    count: tokens summed; total, total_sq: float64 [D], per-channel sums of values and of squares.
    """
    mean = total / count
    var = total_sq / count - mean * mean
    k = max(1, int(var.shape[0] * fraction))
    return torch.topk(var, k, largest=False).indices.sort().values


# ---------------------------------------------------------------------------------------------
# Per-stream state
# ---------------------------------------------------------------------------------------------


@dataclass
class VidCom2State:
    """Everything VidCom2 remembers about one stream. Create with `VidCom2.new_state()`.

    budgets: tokens kept per frame so far, in stream order.
    """

    window: int
    frames_seen: int = 0
    budgets: list[int] = field(default_factory=list)
    num_tokens: int | None = None
    token_count: int = 0
    channel_sum: torch.Tensor | None = field(default=None, repr=False)
    channel_sum_sq: torch.Tensor | None = field(default=None, repr=False)
    uniqueness: deque = field(default=None, repr=False)
    period_spent: int = 0

    def __post_init__(self):
        if self.uniqueness is None:
            self.uniqueness = deque(maxlen=self.window)

    def reset(self) -> None:
        """Forget the stream (call between videos)."""
        self.frames_seen = 0
        self.budgets = []
        self.num_tokens = None
        self.token_count = 0
        self.channel_sum = self.channel_sum_sq = None
        self.uniqueness.clear()
        self.period_spent = 0


# ---------------------------------------------------------------------------------------------
# The compressor
# ---------------------------------------------------------------------------------------------


def _is_int(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


@dataclass(frozen=True)
class VidCom2:
    """Causal VidCom2 (see the module docstring).

    keep_ratio / tokens_per_frame: the average per-frame budget k.
    period: frames per budget period (>= 1); every complete period keeps exactly period * k tokens.
        period = 1 gives every frame exactly k tokens (no frame adaptation).
    window: recent frames (this one included) whose uniqueness the frame is ranked against (>= 1).
    temperature: tau of the softmax over frame uniqueness (> 0; public code 0.01).
    similarity: "gaussian" (public code) or "cosine".
    channel_fraction: share of lowest-variance channels used for scoring, in (0, 1].
    min_tokens: fewest tokens any frame keeps (>= 1; capped at k).
    """

    keep_ratio: float | None = None
    tokens_per_frame: int | None = None
    period: int = 16
    window: int = 16
    temperature: float = 0.01
    similarity: str = "gaussian"
    channel_fraction: float = 0.5
    min_tokens: int = 1

    def __post_init__(self):
        ratio, count = check_budget(self.keep_ratio, self.tokens_per_frame)
        object.__setattr__(self, "keep_ratio", ratio)
        object.__setattr__(self, "tokens_per_frame", count)
        for name in ("period", "window", "min_tokens"):
            if not _is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        c = self.channel_fraction
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ValueError(f"channel_fraction must be in (0, 1], got {c!r}")

    def new_state(self) -> VidCom2State:
        return VidCom2State(window=self.window)

    def compress(self, tokens: torch.Tensor, state: VidCom2State, context: VisionContext | None = None) -> Compressed:
        check_tokens(tokens)
        if not isinstance(state, VidCom2State):
            raise TypeError(f"state must come from VidCom2.new_state(), got {type(state).__name__}")
        if state.window != self.window:
            raise ValueError("this VidCom2State was made by a VidCom2 with another window; use its own new_state()")
        n = tokens.shape[1]
        if state.num_tokens is not None and state.num_tokens != n:
            raise ValueError(
                f"frames of this stream had {state.num_tokens} tokens, this chunk has {n}; use a new state per stream"
            )
        state.num_tokens = n
        kept, indices = [], []
        for frame in tokens:  # one by one: each frame sees the frames before it, chunked or not
            idx = self._select(frame, state)
            kept.append(frame[idx])
            indices.append(idx)
        return Compressed(tokens=kept, indices=indices)

    def _select(self, frame: torch.Tensor, state: VidCom2State) -> torch.Tensor:
        """Kept indices (ascending) of one frame [N, D]; advances the state by one frame."""
        n = frame.shape[0]
        x = frame.detach().double()
        frame_sum, frame_sum_sq = x.sum(0), x.pow(2).sum(0)
        if state.channel_sum is None:
            past_mean = None
            total, total_sq, count = frame_sum, frame_sum_sq, n
        else:
            past_mean = state.channel_sum / state.token_count
            total, total_sq = state.channel_sum + frame_sum, state.channel_sum_sq + frame_sum_sq
            count = state.token_count + n
        channels = lowest_variance_channels(count, total, total_sq, self.channel_fraction)

        z = nn.functional.normalize(frame.detach().float()[:, channels], dim=-1)
        memory = (x.mean(0) if past_mean is None else past_mean)[channels].float()
        memory = nn.functional.normalize(memory, dim=0)
        sim_memory = similarity(z, memory, self.similarity)
        sim_frame = similarity(z, z.mean(0), self.similarity)

        state.uniqueness.append(float(-sim_memory.mean()))
        weight = frame_weight(torch.tensor(list(state.uniqueness)), self.temperature)
        k = kept_tokens(n, self.keep_ratio, self.tokens_per_frame)
        position = state.frames_seen % self.period
        remaining = self.period * k - state.period_spent
        budget = frame_budget(remaining, self.period - position, weight, n, min(self.min_tokens, k))

        # The most distinctive tokens: least similar to the stream so far and to their own frame.
        idx = torch.topk(sim_memory + sim_frame, budget, largest=False).indices.sort().values

        state.channel_sum, state.channel_sum_sq, state.token_count = total, total_sq, count
        state.period_spent = 0 if position == self.period - 1 else state.period_spent + budget
        state.frames_seen += 1
        state.budgets.append(budget)
        return idx
