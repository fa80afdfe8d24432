"""STC-Pruner: keep the most distinct visual tokens of each frame, before the LLM.

Works on one stream's visual tokens after projector and pooling, [frames, tokens, dim]
(196 tokens per frame for LLaVA-OneVision at 384 px). Two strategies:

``dual_anchor`` (the paper, Eq. 8-9). For a frame with tokens z_1..z_N:
    spatial anchor   a_s = mean of the frame's tokens
    temporal anchor  a_t = mean of the FIFO buffer H of the past W frames' a_s
                     (for the first frame of a stream H is empty and a_t = a_s)
    score            S(z) = alpha * (1 - cos(z, a_t)) + (1 - alpha) * (1 - cos(z, a_s))
    keep the k highest scores (the most distinct tokens), then push a_s into H.

``gaussian`` (the public code's default). Per chunk of frames:
    keep the half of the channels with the lowest variance across the chunk's tokens (for scoring
    only); L2-normalise; frame anchor = per-frame mean of the normalised tokens; memory anchor =
    the normalised mean of all chunk means seen so far in the stream (this chunk included; chunk means
    are taken before normalisation, over each chunk's own channel subset, as the public code does);
    g(x, a) = sum over alpha in {1/8, 1/4, 1/2, 1, 2} of exp(-||x - a||^2 / (2 alpha));
    score = g(x, memory) + g(x, frame); keep the k LOWEST scores.

Kept tokens stay in spatial order and their indices are returned. The budget is ``keep_ratio``
(1 - R_Pruner: the paper's R_Pruner = 75% is keep_ratio = 0.25) or ``tokens_per_frame``.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from stc.compress import Compressed, VisionContext, gather_frames, take_tokens

STRATEGIES = ("dual_anchor", "gaussian")
GAUSSIAN_BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class PrunerConfig:
    """Settings of STC-Pruner.

    strategy: "dual_anchor" (paper) or "gaussian" (public code).
    keep_ratio: fraction of tokens kept per frame, 1 - R_Pruner, in (0, 1]; k = floor(N * keep_ratio).
    tokens_per_frame: alternatively, a fixed number of tokens kept per frame (>= 1).
        Give at most one of keep_ratio and tokens_per_frame; neither means keep_ratio = 0.25
        (the paper's Pruner-alone default, R_Pruner = 75%).
    alpha: weight of the temporal anchor in [0, 1] (dual_anchor; 0.5 = equal weights, the paper's best;
        0 = spatial anchor only, 1 = temporal anchor only).
    window: W, the number of past frame means in the temporal buffer (dual_anchor; >= 1). The paper
        does not give W.
    channel_fraction: share of lowest-variance channels used for scoring (gaussian), in (0, 1].
    """

    strategy: str = "dual_anchor"
    keep_ratio: float | None = None
    tokens_per_frame: int | None = None
    alpha: float = 0.5
    window: int = 16
    channel_fraction: float = 0.5

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.keep_ratio is None and self.tokens_per_frame is None:
            object.__setattr__(self, "keep_ratio", 0.25)
        if self.keep_ratio is not None and self.tokens_per_frame is not None:
            raise ValueError(
                "give one token budget: keep_ratio (e.g. 0.25) or tokens_per_frame (e.g. 49), not both; "
                f"got keep_ratio={self.keep_ratio!r}, tokens_per_frame={self.tokens_per_frame!r}"
            )
        if self.keep_ratio is not None and not (
            isinstance(self.keep_ratio, numbers.Real) and not isinstance(self.keep_ratio, bool) and 0 < self.keep_ratio <= 1
        ):
            raise ValueError(f"keep_ratio must be in (0, 1] (1 - R_Pruner), got {self.keep_ratio!r}")
        if self.tokens_per_frame is not None and (
            isinstance(self.tokens_per_frame, bool) or not isinstance(self.tokens_per_frame, numbers.Integral) or self.tokens_per_frame < 1
        ):
            raise ValueError(f"tokens_per_frame must be an integer >= 1, got {self.tokens_per_frame!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not 0.0 < self.channel_fraction <= 1.0:
            raise ValueError(f"channel_fraction must be in (0, 1], got {self.channel_fraction!r}")

    def kept_tokens(self, num_tokens: int) -> int:
        """k for a frame of num_tokens tokens (never more than the frame has)."""
        if self.tokens_per_frame is not None:
            return min(self.tokens_per_frame, num_tokens)
        return max(1, math.floor(round(num_tokens * self.keep_ratio, 9)))


@dataclass
class PrunerState:
    """The temporal memory of one stream. Create with `Pruner.new_state()`; `reset()` between videos."""

    window: int
    frame_means: deque = field(default=None)  # dual_anchor: the last W spatial anchors, [dim] each
    chunk_means: list = field(default_factory=list)  # gaussian: every frame's mean so far (a one-frame chunk), [dim'] each

    def __post_init__(self):
        if self.frame_means is None:
            self.frame_means = deque(maxlen=self.window)

    def reset(self) -> None:
        self.frame_means.clear()
        self.chunk_means.clear()

    @property
    def frames_seen_in_window(self) -> int:
        return len(self.frame_means)


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


def dual_anchor_scores(tokens: torch.Tensor, temporal_anchor: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 9: alpha * (1 - cos(z, a_t)) + (1 - alpha) * (1 - cos(z, a_s)), a_s = the frame mean.

    tokens: [..., N, D] (a frame, or one frame of each of several streams); temporal_anchor: [..., D].
    Returns float32 [..., N]; higher = more distinct.
    """
    z = tokens.float()
    spatial = z.mean(-2)
    cos_t = nn.functional.cosine_similarity(z, temporal_anchor.float().unsqueeze(-2), dim=-1)
    cos_s = nn.functional.cosine_similarity(z, spatial.unsqueeze(-2), dim=-1)
    return alpha * (1 - cos_t) + (1 - alpha) * (1 - cos_s)


def gaussian_kernel(x: torch.Tensor, anchor: torch.Tensor, bandwidths=GAUSSIAN_BANDWIDTHS) -> torch.Tensor:
    """sum_alpha exp(-||x - a||^2 / (2 alpha)). x: [..., N, D]; anchor broadcastable. Returns [..., N]."""
    dist2 = (x - anchor).pow(2).sum(-1)
    return sum(torch.exp(-dist2 / (2 * a)) for a in bandwidths)


def lowest_variance_channels(tokens: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the int(D * fraction) channels with the lowest variance over all tokens. tokens: [M, D]."""
    var = tokens.float().var(dim=0, unbiased=False)
    k = max(1, int(var.shape[0] * fraction))
    return torch.topk(var, k, largest=False).indices


def _top_sorted(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    return torch.topk(scores, k, dim=-1, largest=largest).indices.sort(dim=-1).values


# ---------------------------------------------------------------------------------------------
# The pruner
# ---------------------------------------------------------------------------------------------


@dataclass
class PruneOutput:
    """tokens: [F, k, D], kept tokens in spatial order; indices: int64 [F, k], ascending."""

    tokens: torch.Tensor
    indices: torch.Tensor


class Pruner:
    """STC-Pruner. Stateless itself: the stream's memory is the `PrunerState` passed to each call."""

    def __init__(self, config: PrunerConfig | None = None):
        self.config = config or PrunerConfig()

    def new_state(self) -> PrunerState:
        return PrunerState(window=self.config.window)

    def select(self, tokens: torch.Tensor, state: PrunerState) -> torch.Tensor:
        """Indices of kept tokens, [F, k] ascending, for one chunk [F, N, D] of one stream; updates state."""
        if tokens.dim() != 3:
            raise ValueError(f"expected tokens of shape [frames, tokens, dim], got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"expected at least one frame and one token, got shape {tuple(tokens.shape)}")
        if not isinstance(state, PrunerState):
            raise TypeError(f"state must be a PrunerState from pruner.new_state(), got {type(state).__name__}")
        k = self.config.kept_tokens(tokens.shape[1])
        if self.config.strategy == "dual_anchor":
            return self._select_dual_anchor(tokens, state, k)
        return self._select_gaussian(tokens, state, k)

    def prune(self, tokens: torch.Tensor, state: PrunerState) -> PruneOutput:
        """Keep the selected tokens of each frame of one chunk [F, N, D]; updates state."""
        idx = self.select(tokens, state)
        return PruneOutput(tokens=take_tokens(tokens, idx), indices=idx)

    def compress(self, tokens: torch.Tensor, state: PrunerState, context: VisionContext | None = None) -> Compressed:
        """The `FrameCompressor` interface (see stc.compress)."""
        out = self.prune(tokens, state)
        return Compressed(tokens=list(out.tokens), indices=list(out.indices))

    def select_streams(self, tokens: torch.Tensor, states: list[PrunerState]) -> torch.Tensor:
        """One frame of each of B streams, tokens [B, N, D], the streams' states in the same order: the
        indices [B, k] that `select(tokens[b : b + 1], states[b])` gives for each b, and the same state
        updates. The dual anchor scores and ranks every stream's frame at once where the states hold
        equally many past frames (synchronised streams); otherwise, and for the gaussian strategy, one
        stream at a time."""
        if tokens.dim() != 3 or tokens.shape[0] != len(states):
            raise ValueError(f"expected tokens [streams, tokens, dim] with one state per stream, got {tuple(tokens.shape)} "
                             f"and {len(states)} states")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("each stream needs its own PrunerState: the same state was given twice")
        if not all(isinstance(s, PrunerState) for s in states):
            raise TypeError("states must be PrunerStates from pruner.new_state()")
        if tokens.shape[1] == 0:
            raise ValueError(f"expected at least one token, got shape {tuple(tokens.shape)}")
        if self.config.strategy != "dual_anchor" or len({len(s.frame_means) for s in states}) != 1:
            return torch.cat([self.select(tokens[b : b + 1], s) for b, s in enumerate(states)])
        b, n, d = tokens.shape
        spatial = tokens.float().mean(1)
        past = len(states[0].frame_means)
        temporal = (torch.stack([m for s in states for m in s.frame_means]).view(b, past, d).mean(1) if past else spatial)
        scores = dual_anchor_scores(tokens, temporal, self.config.alpha)
        for row, s in enumerate(states):
            s.frame_means.append(spatial[row].detach())
        return _top_sorted(scores, self.config.kept_tokens(n), largest=True)

    def compress_streams(self, tokens: torch.Tensor, states: list[PrunerState],
                         contexts: list[VisionContext] | None = None) -> Compressed:
        """`compress` of one frame of each of B streams at once (`select_streams`): entry b of the result
        is stream b's frame."""
        return gather_frames(tokens, self.select_streams(tokens, states))

    def _select_dual_anchor(self, tokens, state, k):
        picks = []
        for frame in tokens:  # frames in a chunk are causal: each sees the ones before it
            spatial = frame.float().mean(0)
            temporal = torch.stack(list(state.frame_means)).mean(0) if state.frame_means else spatial
            scores = dual_anchor_scores(frame, temporal, self.config.alpha)
            picks.append(_top_sorted(scores, k, largest=True))
            state.frame_means.append(spatial.detach())
        return torch.stack(picks)

    def _select_gaussian(self, tokens, state, k):
        # One frame at a time, as the public code's one-frame encode chunks (ReKV's protocol): the channels
        # and the memory come from this frame and the ones before it, never from later frames of a push.
        picks = []
        for frame in tokens:
            channels = lowest_variance_channels(frame, self.config.channel_fraction)
            feats = frame.float()[:, channels]
            state.chunk_means.append(feats.mean(dim=0).detach())
            memory = nn.functional.normalize(torch.stack(state.chunk_means).mean(0), dim=-1)
            normed = nn.functional.normalize(feats, dim=-1)
            frame_anchor = normed.mean(dim=0, keepdim=True)
            scores = gaussian_kernel(normed, memory.view(1, -1)) + gaussian_kernel(normed, frame_anchor)
            picks.append(_top_sorted(scores, k, largest=False))
        return torch.stack(picks)
