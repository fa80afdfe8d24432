"""ToMe (Token Merging, Bolya et al., ICLR 2023) inside the vision encoder.

At every encoder layer, after the attention residual and before the MLP, ToMe merges the r most
similar pairs of tokens:

1. metric: the layer's keys averaged over heads, [B, T, head_dim], L2-normalised;
2. bipartite soft matching: split tokens alternately into sets A (even positions) and B (odd); each A
   token's edge goes to its most similar B token (cosine); the r A tokens with the strongest edges are
   merged into their B partners;
3. merging is a size-weighted average, and every token carries its size (how many input patches it
   stands for);
4. proportional attention: log(size) is added to the attention logits of every key, so a merged token
   counts as often as the patches it stands for.

This module holds the algorithm as tensor functions (`bipartite_soft_matching`, `merge_tokens`,
`merge_weighted_average`, `merge_assignment`) and the glue for transformers 5.x SigLIP and CLIP vision
towers (`attach_tome`). Per-call state lives in a `ToMeState` passed to the tower's forward as the
keyword ``tome_state``; the modules hold none, so several streams can share one model::

    with attach_tome(model.model.vision_tower, r=tome_r_for_budget(729, 26, 49)) as tome:
        state = tome.new_state()
        out = model.model.vision_tower(frames, tome_state=state, output_hidden_states=True)
        merged = out.hidden_states[-1]           # [F, 49, 1152], tokens in ToMe's order
        merged = state.in_raster_order(merged)   # in raster order of their first patch

A forward without ``tome_state`` runs the original layers untouched.

Adaptations, for streaming and for LLaVA-OneVision:
- ToMe decides per frame from that frame alone (no memory), so it is causal as is.
- SigLIP has no CLS token: no token is protected. For CLIP (e.g. Dispider) the CLS token at index 0 is
  protected, as ToMe does for class tokens, and stays at index 0.
- After each merge the unmerged A tokens keep their relative (spatial) order and come first, then B;
  ToMe leaves the unmerged A tokens in edge-score order unless it protects a class token. Sorting makes
  the next layer's A/B split alternate between spatial neighbours and the output deterministic.
- Budget: r is the number of tokens merged per layer (an int for every layer, or one per layer); the
  encoder's final token count is T - sum(r). ToMe destroys the 27x27 grid, so LLaVA-OneVision's 2x2
  bilinear pooling (`apply_pooling`) cannot follow: the engine should take the merged last-layer tokens,
  project them, SKIP pooling, optionally put them in spatial order with `ToMeState.spatial_order()`,
  and pick the schedule with `tome_r_for_budget(729, 26, target)` so that `target` tokens per frame
  reach the LLM (target = 49 matches STC-Pruner's 25% of 196).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from stc.cacher import layer_norm, mlp_forward, project
from stc.compress import take_tokens
from stc.patching import LayerPatch, encoder_layers, patch_owner

STATE_KWARG = "tome_state"
# Layer types whose towers put a class token at index 0.
CLASS_TOKEN_LAYERS = ("CLIPEncoderLayer",)


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


@dataclass
class MergePlan:
    """One bipartite soft matching of B token sets of T tokens each.

    Set A holds the tokens at even positions (Ta = ceil(T / 2)), set B the odd ones (Tb = T // 2).
    unmerged: int64 [B, Ta - r], positions in A of the A tokens kept, ascending.
    src: int64 [B, r], positions in A of the A tokens merged away.
    dst: int64 [B, r], positions in B of the token each src token merges into.
    The merged token set is [A[unmerged], B] (T - r tokens).
    """

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    num_tokens: int

    @property
    def r(self) -> int:
        return int(self.src.shape[1])

    @property
    def num_merged_tokens(self) -> int:
        return self.num_tokens - self.r


def max_merges(num_tokens: int, class_token: bool = False) -> int:
    """The most tokens one bipartite matching can merge: (T - protected) // 2."""
    return max(0, (num_tokens - int(class_token)) // 2)


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False) -> MergePlan:
    """Plan ToMe's r merges from a similarity metric.

    metric: [B, T, C] (e.g. keys averaged over heads); compared by cosine similarity.
    r: merges wanted; capped at `max_merges(T, class_token)` as ToMe does.
    class_token: never merge token 0 away (it is in A, so it is only ever a kept A token).
    Returns a MergePlan with r' = min(r, cap) merges.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [batch, tokens, channels], got shape {tuple(metric.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an integer >= 0, got {r!r}")
    b, t, _ = metric.shape
    r = min(r, max_merges(t, class_token))
    ta = (t + 1) // 2
    device = metric.device
    if r == 0:
        unmerged = torch.arange(ta, device=device).expand(b, -1)
        empty = torch.empty(b, 0, dtype=torch.int64, device=device)
        return MergePlan(unmerged=unmerged, src=empty, dst=empty.clone(), num_tokens=t)
    with torch.no_grad():
        normed = nn.functional.normalize(metric.float(), dim=-1)
        a, bset = normed[:, ::2], normed[:, 1::2]
        scores = a @ bset.transpose(1, 2)  # [B, Ta, Tb]
        if class_token:
            scores[:, 0, :] = -math.inf
        best, best_dst = scores.max(dim=-1)
        # stable sort: equal edge scores resolve by position, so plans are deterministic
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        src = order[:, :r]
        unmerged = order[:, r:].sort(dim=-1).values
        dst = best_dst.gather(1, src)
    return MergePlan(unmerged=unmerged, src=src, dst=dst, num_tokens=t)


def merge_tokens(plan: MergePlan, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Apply a plan to features. x: [B, T, C]. Returns [B, T - r, C]: [A[unmerged], B with src reduced in].

    reduce: "sum" or "mean" (the mean of each B token and the A tokens merged into it).
    """
    if x.dim() != 3 or x.shape[1] != plan.num_tokens:
        raise ValueError(f"x must be [batch, {plan.num_tokens}, channels] to match the plan, got {tuple(x.shape)}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    a, bset = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    kept = take_tokens(a, plan.unmerged)
    if plan.r == 0:
        return torch.cat([kept, bset], dim=1)
    moving = take_tokens(a, plan.src)
    bset = bset.scatter_reduce(1, plan.dst.unsqueeze(-1).expand(-1, -1, c), moving, reduce=reduce, include_self=True)
    return torch.cat([kept, bset], dim=1)


def merge_weighted_average(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's size-weighted merge. x: [B, T, C]; size: [B, T] (patches per token).

    Returns (x', size'), [B, T - r, C] and [B, T - r]: each merged token is the size-weighted mean
    of its members and its size their total.
    """
    if size.shape != x.shape[:2]:
        raise ValueError(f"size must be [batch, tokens] = {tuple(x.shape[:2])}, got {tuple(size.shape)}")
    weighted = merge_tokens(plan, x * size.unsqueeze(-1).to(x.dtype), "sum")
    new_size = merge_tokens(plan, size.unsqueeze(-1), "sum").squeeze(-1)
    return weighted / new_size.unsqueeze(-1).to(x.dtype), new_size


def merge_assignment(plan: MergePlan, assignment: torch.Tensor) -> torch.Tensor:
    """Follow a plan in a source map. assignment: int64 [B, T0], the token (in [0, T)) each input patch
    is in. Returns int64 [B, T0] with values in [0, T - r)."""
    b, t = assignment.shape[0], plan.num_tokens
    ta = (t + 1) // 2
    kept = ta - plan.r
    device = assignment.device
    new_index = torch.empty(b, t, dtype=torch.int64, device=device)
    rows = torch.arange(b, device=device).unsqueeze(-1)
    new_index[rows, 2 * plan.unmerged] = torch.arange(kept, device=device).expand(b, -1)
    new_index[rows, 2 * plan.src] = kept + plan.dst
    new_index[:, 1::2] = kept + torch.arange(t // 2, device=device)
    return new_index.gather(1, assignment)


def tome_r_for_budget(n_tokens: int, n_layers: int, target: int, class_token: bool = False) -> tuple[int, ...]:
    """A per-layer merge schedule that leaves exactly `target` tokens after `n_layers` layers.

    Spreads the n_tokens - target merges evenly over the layers (earlier layers take the remainder),
    within the per-layer cap (T - protected) // 2; if that cap binds, merges are moved as early as
    possible. Raises ValueError if no schedule reaches the target (ToMe at most halves per layer).
    E.g. LLaVA-OneVision: tome_r_for_budget(729, 26, 49).
    """
    for name, value, low in (("n_tokens", n_tokens, 1), ("n_layers", n_layers, 1), ("target", target, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if target > n_tokens:
        raise ValueError(f"target ({target}) must not exceed n_tokens ({n_tokens})")
    total = n_tokens - target

    def build(even: bool) -> tuple[list[int], int]:
        schedule, t, left = [], n_tokens, total
        for layer in range(n_layers):
            want = math.ceil(left / (n_layers - layer)) if even else left
            r = min(want, max_merges(t, class_token))
            schedule.append(r)
            t -= r
            left -= r
        return schedule, left

    schedule, left = build(even=True)
    if left:
        schedule, left = build(even=False)
    if left:
        raise ValueError(
            f"ToMe cannot reduce {n_tokens} tokens to {target} in {n_layers} layers (each layer merges at "
            f"most half its tokens; the fewest reachable is {target + left}); use a larger target"
        )
    return tuple(schedule)


# ---------------------------------------------------------------------------------------------
# Per-call state
# ---------------------------------------------------------------------------------------------


@dataclass
class ToMeState:
    """What ToMe tracks through one forward of the tower (reset at layer 0). Create with `ToMe.new_state()`.

    sizes: [B, T] patches per current token (after the last layer: the final tokens).
    assignment: int64 [B, T0], the current token each input patch is merged into.
    token_counts: tokens entering each layer, then the final count (len = layers + 1).
    """

    schedule: tuple[int, ...]
    class_token: bool
    proportional_attention: bool = True
    sizes: torch.Tensor | None = None
    assignment: torch.Tensor | None = None
    token_counts: list[int] = field(default_factory=list)
    _next_layer: int = field(default=0, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.schedule)

    def begin(self, x: torch.Tensor) -> None:
        """Start a forward over hidden states x [B, T, C]: every token is one patch."""
        b, t, _ = x.shape
        self.sizes = torch.ones(b, t, dtype=torch.float32, device=x.device)
        self.assignment = torch.arange(t, device=x.device).expand(b, -1).clone()
        self.token_counts = [t]

    def positions(self) -> torch.Tensor:
        """int64 [B, T]: the smallest input patch index in each current token."""
        self._require_forward()
        b, t0 = self.assignment.shape
        t = self.sizes.shape[1]
        first = torch.full((b, t), t0, dtype=torch.int64, device=self.assignment.device)
        patches = torch.arange(t0, device=self.assignment.device).expand(b, -1)
        return first.scatter_reduce(1, self.assignment, patches, reduce="amin", include_self=True)

    def spatial_order(self) -> torch.Tensor:
        """int64 [B, T]: the permutation that sorts current tokens by `positions()` (raster order)."""
        return self.positions().argsort(dim=1, stable=True)

    def in_raster_order(self, x: torch.Tensor) -> torch.Tensor:
        """The current tokens x [B, T, C] sorted by `spatial_order()`."""
        order = self.spatial_order().to(x.device)
        return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))

    def _require_forward(self) -> None:
        if self.assignment is None or self.sizes is None:
            raise RuntimeError("this ToMeState has not been through a forward yet (pass tome_state=state to the tower)")


# ---------------------------------------------------------------------------------------------
# The patched layer
# ---------------------------------------------------------------------------------------------


def _attention(layer: nn.Module, x_normed: torch.Tensor, log_size: torch.Tensor | None,
               qvk: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's self-attention with log(size) added to every key's logits, and ToMe's metric.

    x_normed: [B, T, C] (after layer_norm1); log_size: [B, T] or None (all sizes 1); qvk: the layer's
    `stc.cacher.fused_projection_weights` (its projections as one GEMM) or None.
    Returns the attention output after out_proj [B, T, C] and the keys averaged over heads [B, T, head_dim].
    """
    attn = layer.self_attn
    b, t, _ = x_normed.shape
    heads = (b, t, -1, attn.head_dim)
    q, v, k = (p.view(heads).transpose(1, 2) for p in project(layer, x_normed, "qvk", qvk))
    impl = attn.config._attn_implementation
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    if log_size is None:
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        mask = None
    else:
        # An additive float mask: eager adds it, SDPA takes it; other kernels (flash) cannot, use SDPA.
        interface = eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS["sdpa"]
        mask = log_size[:, None, None, :].to(q.dtype)
    dropout = attn.dropout if attn.training else 0.0
    out, _ = interface(attn, q, k, v, mask, is_causal=False, scaling=attn.scale, dropout=dropout)
    return attn.out_proj(out.reshape(b, t, -1).contiguous()), k.mean(dim=1)


def tome_layer(layer: nn.Module, x: torch.Tensor, r: int, state: ToMeState, fused_mlp: bool = False,
               qvk: tuple[torch.Tensor, torch.Tensor] | None = None, norm_kernel: bool = False) -> torch.Tensor:
    """One SigLIP/CLIP encoder layer with ToMe: attention (proportional), merge r tokens, MLP (fused_mlp:
    through `stc.cacher.mlp_forward(fused=True)`; qvk: the projections as one GEMM, `stc.cacher.project`;
    norm_kernel: the norms by `stc.vit_kernel.layer_norm`).

    x: [B, T, C]. Returns [B, T - r', C] (r' = r capped); updates state.sizes / assignment.
    """
    # Until a merge happens every size is 1 and log(size) = 0: skip the mask, keep the fast kernel.
    merged_before = x.shape[1] < state.token_counts[0]
    log_size = state.sizes.log() if (state.proportional_attention and merged_before) else None
    attn_out, metric = _attention(layer, layer_norm(layer.layer_norm1, x, norm_kernel), log_size, qvk)
    x = x + attn_out
    if r > 0:
        plan = bipartite_soft_matching(metric, r, class_token=state.class_token)
        if plan.r > 0:
            x, state.sizes = merge_weighted_average(plan, x, state.sizes)
            state.assignment = merge_assignment(plan, state.assignment)
    return x + mlp_forward(layer, layer_norm(layer.layer_norm2, x, norm_kernel), fused_mlp)


# ---------------------------------------------------------------------------------------------
# Attaching to Hugging Face vision encoders
# ---------------------------------------------------------------------------------------------


def _normalise_schedule(r: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    if isinstance(r, bool):
        raise ValueError(f"r must be an integer >= 0 or one per layer, got {r!r}")
    if isinstance(r, numbers.Integral):
        schedule = (r,) * n_layers
    elif isinstance(r, Sequence) and not isinstance(r, str):
        schedule = tuple(r)
        if len(schedule) != n_layers:
            raise ValueError(f"a per-layer r needs one value per encoder layer ({n_layers}), got {len(schedule)}")
    else:
        raise ValueError(f"r must be an integer >= 0 or a sequence of one per layer, got {r!r}")
    for value in schedule:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"every r must be an integer >= 0, got {value!r} in {schedule}")
    return tuple(int(value) for value in schedule)


class ToMe(LayerPatch):
    """ToMe attached to one vision tower. Use `attach_tome` to make one.

    Modifications to each encoder layer: its instance `forward` is replaced by one that, when called
    with ``tome_state=<ToMeState>``, runs `tome_layer` (proportional attention, merge after attention,
    MLP on the merged tokens); without a state it calls the original forward unchanged. `detach()`
    removes the instance attribute, so the class forward is restored exactly.
    """

    name = "ToMe"
    state_kwarg = STATE_KWARG
    state_type = ToMeState

    def __init__(self, vision_tower: nn.Module, r: int | Sequence[int], proportional_attention: bool = True):
        super().__init__(vision_tower)
        self.schedule = _normalise_schedule(r, len(self.layers))
        if not isinstance(proportional_attention, bool):
            raise ValueError(f"proportional_attention must be True or False, got {proportional_attention!r}")
        self.proportional_attention = proportional_attention
        self.class_token = type(self.layers[0]).__name__ in CLASS_TOKEN_LAYERS

    def new_state(self) -> ToMeState:
        """A fresh per-call state; pass it as ``tome_state=`` (it is reset at layer 0 of every forward)."""
        return ToMeState(
            schedule=self.schedule, class_token=self.class_token, proportional_attention=self.proportional_attention
        )

    def final_tokens(self, num_tokens: int) -> int:
        """Tokens left after the encoder for num_tokens input tokens (the per-layer cap applied)."""
        for r in self.schedule:
            num_tokens -= min(r, max_merges(num_tokens, self.class_token))
        return num_tokens

    def __repr__(self) -> str:
        return (
            f"ToMe(schedule={self.schedule}, proportional_attention={self.proportional_attention}, "
            f"class_token={self.class_token}, attached={self.attached})"
        )

    def _layer_step(self, layer: nn.Module, idx: int, x: torch.Tensor, state: ToMeState) -> torch.Tensor:
        if state.schedule != self.schedule or state.class_token != self.class_token:
            raise ValueError("this ToMeState was made by another ToMe; use tome.new_state() of this one")
        if x.dim() != 3:
            raise ValueError(f"expected hidden states [frames, tokens, dim], got shape {tuple(x.shape)}")
        b, t, _ = x.shape
        if idx == 0:
            state.begin(x)
        elif idx != state._next_layer or state.sizes is None or state.sizes.shape != (b, t):
            raise RuntimeError("ToMe: layers must run in order over one forward (did a forward fail midway?)")
        out = tome_layer(layer, x, self.schedule[idx], state)
        state.token_counts.append(out.shape[1])
        state._next_layer = (idx + 1) % self.num_layers
        return out


def attach_tome(vision_tower: nn.Module, r: int | Sequence[int], proportional_attention: bool = True) -> ToMe:
    """Attach ToMe to a transformers 5.x SigLIP or CLIP vision tower.

    r: tokens merged per layer (an int for every layer, or one per layer; see `tome_r_for_budget`).
    Idempotent: attaching again with the same settings returns the attached ToMe; other settings (or
    another patch, e.g. STC-Cacher) raise ValueError - detach first. Use as a context manager to detach
    on exit. Raises TypeError for an unsupported model.
    """
    layers = encoder_layers(vision_tower, "ToMe")
    schedule = _normalise_schedule(r, len(layers))
    owner = patch_owner(layers[0])
    if isinstance(owner, ToMe):
        if owner.schedule == schedule and owner.proportional_attention == proportional_attention:
            return owner
        raise ValueError(f"ToMe with other settings is attached ({owner!r}); detach it first")
    tome = ToMe(vision_tower, schedule, proportional_attention)
    tome._attach()
    return tome
