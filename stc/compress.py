"""The interface every post-projector token compressor implements (STC-Pruner and the baselines).

A compressor sees one stream's visual tokens chunk by chunk, after projector and pooling, and keeps
a subset (or a merged set) per frame. It is causal: a frame's decision uses only that frame and the
past, held in a per-stream state object that the compressor creates and the caller owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class VisionContext:
    """What the vision side of one chunk produced, for compressors that need more than tokens.

    hidden_states: the vision tower's per-layer hidden states (embeddings first), each
        [frames, vit_tokens, vit_dim], or None when they were not kept.
    vision_tower: the encoder module itself (e.g. to recompute one layer's attention).
    grid: (height, width) of the token grid after pooling, e.g. (14, 14) for LLaVA-OV at 384 px.
    layer_inputs: inputs of single encoder layers by layer index (0 = the first layer), [frames,
        vit_tokens, vit_dim] each: what the CUDA-graph path keeps instead of every hidden state, for a
        compressor that names the layer it reads (its ``vision_layer_input`` attribute).
    """

    hidden_states: tuple[torch.Tensor, ...] | None = None
    vision_tower: torch.nn.Module | None = None
    grid: tuple[int, int] | None = None
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Compressed:
    """Per-frame output of a compressor.

    tokens: one tensor per frame, [kept_f, dim]; frames may keep different numbers of tokens.
    indices: one int64 tensor per frame, [kept_f], the positions of kept tokens in the frame's
        input (ascending, i.e. spatial order); -1 marks a token that does not come from a single
        input position (e.g. a merged token).
    """

    tokens: list[torch.Tensor]
    indices: list[torch.Tensor]

    @property
    def counts(self) -> list[int]:
        return [int(t.shape[0]) for t in self.tokens]


@runtime_checkable
class FrameCompressor(Protocol):
    """A post-projector compressor: `compress(tokens [frames, tokens, dim], state, context)`."""

    def new_state(self) -> Any:
        """A fresh per-stream state (call once per video/stream)."""

    def compress(self, tokens: torch.Tensor, state: Any, context: VisionContext | None = None) -> Compressed:
        """Compress one chunk of one stream; frames in the chunk are in temporal order.

        A compressor may also define ``compress_streams(tokens [B, N, D], states, contexts)``: one frame of
        each of B streams at once, entry b of the result for stream b, equal to B `compress` calls.
        `stc.engine.StreamBatch` uses it where it exists (STC-Pruner's and VisionZip's do)."""


def take_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows `indices` [F, k] of each frame of tokens [F, N, D] -> [F, k, D]."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def gather_frames(tokens: torch.Tensor, indices: torch.Tensor) -> Compressed:
    """Keep indices [F, k] (ascending) of tokens [F, N, D] as a Compressed."""
    return Compressed(tokens=list(take_tokens(tokens, indices).unbind(0)), indices=list(indices.unbind(0)))
