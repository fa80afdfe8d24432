"""VisionZip (Yang et al., CVPR 2025) as a post-projector compressor.

Per frame, VisionZip keeps
- dominant tokens: the tokens that receive the most attention at a vision encoder layer;
- contextual tokens: the remaining tokens merged into a few groups. Evenly spaced remaining tokens are
  the targets; every other remaining token joins the target whose key (averaged over heads) is most
  similar by cosine, and each group becomes the plain mean of its members.

Adaptations, for LLaVA-OneVision and for streaming:
- Attention score. VisionZip ranks by the CLS token's attention. SigLIP has no CLS token, so the score
  of a token is the attention it receives averaged over all queries and heads (VisionZip's choice for
  CLS-free encoders). For a tower with a CLS token (CLIP) the CLS query's attention is used, as in the
  original. The attention is recomputed from the chosen layer's input hidden states
  (`VisionContext.hidden_states[layer]`, embeddings first) with that layer's own layer_norm1, q_proj
  and k_proj (`VisionContext.vision_tower`). The default layer is the last one, whose output is the
  feature LLaVA-OneVision uses (VisionZip takes the layer that produces the LLM's features).
- Pooling. The compressor sees tokens after the projector and LLaVA-OneVision's 2x2 bilinear pooling
  (27x27 -> 14x14). The per-patch scores and keys are mapped to that grid the same way the tokens were:
  bilinear interpolation to ceil(h/2) x ceil(w/2) (in general: to `VisionContext.grid`).
- Merging happens on projected tokens (the protocol's input), where VisionZip averages vision features
  before the projector; the projector is not linear, so this is an approximation.
- VisionZip is per frame (no memory), hence causal.

Budget: ``dominant`` and ``contextual`` counts per frame, or a total (``keep_ratio`` / ``tokens_per_frame``,
see `stc.baselines.simple`) split as in VisionZip's settings (54 + 10 of 64, 108 + 20 of 128, 162 + 30
of 192): contextual = round(total * 10 / 64), the rest dominant.

Output per frame: the dominant tokens in spatial order (their input indices, ascending), then the
contextual tokens in the spatial order of their targets, with index -1 (or the target's index when
no other token joined it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stc.baselines.simple import FrameCounter, check_budget, check_tokens, kept_tokens, token_grid
from stc.compress import Compressed, VisionContext, take_tokens

# VisionZip's contextual share: 10 of 64 (= 20 of 128 = 30 of 192).
CONTEXTUAL_SHARE = 10 / 64


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


#: Attention probabilities held at once by `attention_received`: frames are scored in groups of at
#: most this many elements of [frames, heads, T, T] float32 (2**27: 512 MB; 15 SigLIP frames).
ATTENTION_ELEMENTS = 2**27


def attention_received(layer: nn.Module, hidden: torch.Tensor, class_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each patch receives at one SigLIP/CLIP encoder layer, and the layer's keys.

    layer: the encoder layer (layer_norm1, self_attn.q_proj / k_proj, head_dim, scale).
    hidden: [F, T, C], the layer's input hidden states.
    class_token: token 0 is a CLS token: score = its attention to the patches; else the attention
        received averaged over all queries. Both are averaged over heads.
    Returns scores float32 [F, P] and keys averaged over heads [F, P, head_dim], P = T - class_token.
    Frames are scored in groups whose probabilities fit ATTENTION_ELEMENTS.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be [frames, tokens, dim], got shape {tuple(hidden.shape)}")
    attn = layer.self_attn
    f, t, _ = hidden.shape
    h = layer.layer_norm1(hidden)
    q = attn.q_proj(h).view(f, t, -1, attn.head_dim).transpose(1, 2).float()  # [F, heads, T, head_dim]
    k = attn.k_proj(h).view(f, t, -1, attn.head_dim).transpose(1, 2).float()
    group = max(1, ATTENTION_ELEMENTS // (q.shape[1] * t * t))
    scores = []
    for start in range(0, f, group):
        qg, kg = q[start : start + group], k[start : start + group]
        if class_token:
            qg = qg[:, :, :1]  # only the CLS query's row is needed
        probs = torch.softmax((qg @ kg.transpose(-1, -2)) * attn.scale, dim=-1)  # [group, heads, queries, T]
        scores.append(probs[..., 1:].mean(dim=(1, 2)) if class_token else probs.mean(dim=(1, 2)))
    keys = k.mean(1)
    return torch.cat(scores), keys[:, 1:] if class_token else keys


def pool_to_grid(x: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """Resize per-patch values the way LLaVA-OneVision pools features: bilinear, align_corners=False.

    x: [F, h * w] or [F, h * w, C] on a grid (h, w). Returns [F, oh * ow] or [F, oh * ow, C].
    """
    h, w = grid
    oh, ow = out_grid
    squeeze = x.dim() == 2
    feats = x.unsqueeze(-1) if squeeze else x
    f, p, c = feats.shape
    if p != h * w:
        raise ValueError(f"expected {h}x{w} = {h * w} values per frame, got {p}")
    if (oh, ow) != (h, w):
        img = feats.reshape(f, h, w, c).permute(0, 3, 1, 2)
        img = nn.functional.interpolate(img, size=(oh, ow), mode="bilinear", align_corners=False)
        feats = img.permute(0, 2, 3, 1).reshape(f, oh * ow, c)
    return feats.squeeze(-1) if squeeze else feats


def merge_contextual(tokens: torch.Tensor, metric: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merging of the remaining (non-dominant) tokens, of one frame or of F at once.

    tokens: [R, D] or [F, R, D] in spatial order; metric: [R, C] or [F, R, C] (keys), compared by cosine;
    contextual: c in [1, R]. Targets are positions 0, s, 2s, ... (s = max(1, R // c), the first c of
    them); every other token joins its most similar target; each group is averaged.
    Returns merged tokens [(F,) c, D], target positions int64 [c] (the same for every frame), and group
    sizes int64 [(F,) c].
    """
    single = tokens.dim() == 2
    if single:
        tokens, metric = tokens.unsqueeze(0), metric.unsqueeze(0)
    f, r, d = tokens.shape
    if not 1 <= contextual <= r:
        raise ValueError(f"contextual must be in [1, {r}] (the remaining tokens), got {contextual}")
    step = max(1, r // contextual)
    targets = torch.arange(0, r, step, device=tokens.device)[:contextual]
    # is_target by arithmetic: an index assignment of a Python scalar copies it from the host
    pos = torch.arange(r, device=tokens.device)
    is_target = (pos % step == 0) & (pos < contextual * step)
    # the others in ascending order: a stable sort puts the False entries first (no host sync, unlike nonzero)
    others = torch.argsort(is_target.to(torch.uint8), stable=True)[: r - contextual]
    normed = nn.functional.normalize(metric.float(), dim=-1)
    group = (normed[:, others] @ normed[:, targets].transpose(1, 2)).argmax(dim=-1)  # [F, R - c]: a target slot
    acc = torch.promote_types(tokens.dtype, torch.float32)  # average in at least fp32
    sums = tokens[:, targets].to(acc).scatter_add(1, group.unsqueeze(-1).expand(-1, -1, d), tokens[:, others].to(acc))
    sizes = torch.ones(f, contextual, dtype=torch.int64, device=tokens.device).scatter_add(1, group, torch.ones_like(group))
    merged = (sums / sizes.unsqueeze(-1)).to(tokens.dtype)
    return (merged[0], targets, sizes[0]) if single else (merged, targets, sizes)


# ---------------------------------------------------------------------------------------------
# The compressor
# ---------------------------------------------------------------------------------------------


def _is_count(value) -> bool:
    return value is not None and not isinstance(value, bool) and isinstance(value, int) and value >= 0


@dataclass(frozen=True)
class VisionZip:
    """VisionZip per frame: `dominant` top-attention tokens plus `contextual` merged tokens.

    Budget: either `dominant` and/or `contextual` (counts per frame; a missing one is 0), or a total
    (`keep_ratio` / `tokens_per_frame`, default keep_ratio = 0.25) split by `contextual_share`.
    attention_layer: the encoder layer whose attention ranks tokens (negative counts from the end;
        -1 = the last layer, LLaVA-OneVision's feature layer).
    Needs VisionContext.vision_tower and the input of that layer: VisionContext.layer_inputs (the
    CUDA-graph path keeps it, see `vision_layer_input`) or VisionContext.hidden_states (embeddings first).
    """

    keep_ratio: float | None = None
    tokens_per_frame: int | None = None
    dominant: int | None = None
    contextual: int | None = None
    attention_layer: int = -1
    contextual_share: float = CONTEXTUAL_SHARE

    def __post_init__(self):
        counts_given = self.dominant is not None or self.contextual is not None
        if counts_given:
            if self.keep_ratio is not None or self.tokens_per_frame is not None:
                raise ValueError(
                    "give the budget either as dominant/contextual counts or as keep_ratio/tokens_per_frame, not both"
                )
            for name in ("dominant", "contextual"):
                value = getattr(self, name)
                if value is None:
                    object.__setattr__(self, name, 0)
                elif not _is_count(value):
                    raise ValueError(f"{name} must be an integer >= 0 (tokens per frame), got {value!r}")
            if self.dominant + self.contextual < 1:
                raise ValueError("dominant + contextual must keep at least one token per frame, got 0")
        else:
            ratio, count = check_budget(self.keep_ratio, self.tokens_per_frame)
            object.__setattr__(self, "keep_ratio", ratio)
            object.__setattr__(self, "tokens_per_frame", count)
        if isinstance(self.attention_layer, bool) or not isinstance(self.attention_layer, int):
            raise ValueError(f"attention_layer must be an integer layer index, got {self.attention_layer!r}")
        share = self.contextual_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ValueError(f"contextual_share must be in [0, 1), got {share!r}")

    @property
    def vision_layer_input(self) -> int:
        """The encoder layer whose input this compressor reads (may be negative: from the end)."""
        return self.attention_layer

    def split(self, num_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of a frame of num_tokens tokens."""
        if self.dominant is not None:
            if self.dominant + self.contextual > num_tokens:
                raise ValueError(
                    f"dominant + contextual = {self.dominant + self.contextual} exceeds the {num_tokens} tokens per frame"
                )
            return self.dominant, self.contextual
        total = kept_tokens(num_tokens, self.keep_ratio, self.tokens_per_frame)
        contextual = math.floor(total * self.contextual_share + 0.5)
        return total - contextual, contextual

    def new_state(self) -> FrameCounter:
        return FrameCounter()

    def _attention_input(self, context: VisionContext | None) -> tuple[nn.Module, torch.Tensor]:
        """The attention layer and its input hidden states [F, T, C], from the context."""
        message = ("VisionZip needs the vision tower and the input of its attention layer (hidden states): pass "
                   "VisionContext(hidden_states=..., vision_tower=..., grid=...) (run the tower with "
                   "output_hidden_states=True) or VisionContext(layer_inputs={layer: input}, vision_tower=..., grid=...)")
        if context is None or context.vision_tower is None:
            raise ValueError(message)
        layers = getattr(getattr(context.vision_tower, "encoder", None), "layers", None)
        if layers is None:
            raise TypeError(
                f"{type(context.vision_tower).__name__} has no .encoder.layers: pass the SigLIP/CLIP vision tower"
            )
        n_layers = len(layers)
        if not -n_layers <= self.attention_layer < n_layers:
            raise ValueError(f"attention_layer {self.attention_layer} is out of range for {n_layers} layers")
        idx = self.attention_layer % n_layers
        if idx in context.layer_inputs:
            return layers[idx], context.layer_inputs[idx]
        if context.hidden_states is None:
            raise ValueError(message)
        if len(context.hidden_states) != n_layers + 1:
            raise ValueError(
                f"expected {n_layers + 1} hidden states (embeddings first, one per layer), got {len(context.hidden_states)}"
            )
        return layers[idx], context.hidden_states[idx]  # the input of layer idx

    def scores(self, num_frames: int, num_tokens: int, context: VisionContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention scores [F, N] and keys [F, N, head_dim] on the compressor's token grid."""
        layer, hidden = self._attention_input(context)
        return self._scores(layer, hidden, num_frames, num_tokens, context)

    def _scores(self, layer: nn.Module, hidden: torch.Tensor, num_frames: int, num_tokens: int,
                context: VisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.shape[0] != num_frames:
            raise ValueError(f"hidden states hold {hidden.shape[0]} frames but tokens hold {num_frames}")
        patches = hidden.shape[1]
        class_token = type(layer).__name__.startswith("CLIP")
        side = math.isqrt(patches - class_token)
        if side * side != patches - class_token:
            raise ValueError(f"{patches} vision tokens per frame do not form a square patch grid")
        with torch.no_grad():
            scores, keys = attention_received(layer, hidden, class_token=class_token)
        grid = token_grid(num_tokens, context)
        return pool_to_grid(scores, (side, side), grid), pool_to_grid(keys, (side, side), grid)

    def compress(self, tokens: torch.Tensor, state: FrameCounter, context: VisionContext | None = None) -> Compressed:
        check_tokens(tokens)
        _check_state(state)
        scores, keys = self.scores(tokens.shape[0], tokens.shape[1], context)
        state.frames_seen += tokens.shape[0]
        return self._keep(tokens, scores, keys)

    def compress_streams(self, tokens: torch.Tensor, states: list[FrameCounter],
                         contexts: list[VisionContext]) -> Compressed:
        """`compress` of one frame of each of B streams at once (what `stc.engine.StreamBatch` calls):
        tokens [B, N, D]; states and contexts one per stream, in the same order, the contexts of one
        vision tower and grid. Entry b of the result is stream b's frame."""
        check_tokens(tokens)
        if not len(states) == len(contexts) == tokens.shape[0]:
            raise ValueError(f"expected one state and one context per stream: tokens hold {tokens.shape[0]} streams, "
                             f"got {len(states)} states and {len(contexts)} contexts")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("each stream needs its own state: the same state was given twice")
        for state in states:
            _check_state(state)
        inputs = [self._attention_input(c) for c in contexts]
        if len({id(layer) for layer, _ in inputs}) != 1 or len({c.grid for c in contexts}) != 1:
            raise ValueError("the streams' contexts must share one vision tower and one grid")
        if any(hidden.shape[0] != 1 for _, hidden in inputs):
            raise ValueError("each stream's context must hold the hidden states of its one frame")
        hidden = torch.cat([hidden for _, hidden in inputs])
        scores, keys = self._scores(inputs[0][0], hidden, tokens.shape[0], tokens.shape[1], contexts[0])
        for state in states:
            state.frames_seen += 1
        return self._keep(tokens, scores, keys)

    def _keep(self, tokens: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor) -> Compressed:
        """Dominant and contextual tokens of every frame of tokens [F, N, D], from scores [F, N], keys [F, N, C]."""
        frames, n, _ = tokens.shape
        dominant, contextual = self.split(n)
        scores, keys = scores.to(tokens.device), keys.to(tokens.device)
        top = torch.topk(scores, dominant, dim=1).indices.sort(dim=1).values  # [F, dominant], spatial order
        out_tokens, out_indices = [take_tokens(tokens, top)], [top]
        if contextual:
            rest_mask = torch.ones(frames, n, dtype=torch.bool, device=tokens.device)
            rest_mask.scatter_(1, top, False)
            # ascending in each frame: a stable sort puts the kept (False) entries last (no host sync, unlike nonzero)
            rest = torch.argsort((~rest_mask).to(torch.uint8), dim=1, stable=True)[:, : n - dominant]
            merged, targets, sizes = merge_contextual(take_tokens(tokens, rest), take_tokens(keys, rest), contextual)
            out_tokens.append(merged)
            out_indices.append(torch.where(sizes == 1, rest[:, targets], torch.full_like(sizes, -1)))
        return Compressed(tokens=list(torch.cat(out_tokens, 1)), indices=list(torch.cat(out_indices, 1)))


def _check_state(state) -> None:
    if not isinstance(state, FrameCounter):
        raise TypeError(f"state must come from VisionZip.new_state(), got {type(state).__name__}")
