"""STC-Cacher: reuse the vision encoder's work across the frames of a stream.

Reference frames (every N-th frame of a stream, N = ``cache_interval``) get a full encoder forward,
and every layer caches, for that frame: the key projection K_ref, the value projection V_ref, the
attention output A_ref (after out_proj) and the MLP output M_ref. Every other frame, at every layer:

1. computes K for all T tokens and scores each token by the similarity of a feature (K by default)
   to the reference frame's feature at the same position;
2. recomputes only the k = floor(T * (1 - R)) least similar ("dynamic") tokens, R = ``reuse_ratio``
   (R_Cacher in the paper): their Q and V, their attention over all current keys with
   V_full = V_ref with dynamic rows replaced, and their MLP;
3. gives every other ("static") token its current input plus the reference frame's cached attention
   and MLP deltas: out = x + A_ref + M_ref (rows of A_ref / M_ref replaced for dynamic tokens).

This module holds the algorithm as tensor functions (`select_dynamic_tokens`, `reference_layer`,
`selective_layer`) and the glue that attaches it to Hugging Face vision encoders
(`attach_cacher`). All state of a stream lives in a `CacherState` that the caller owns and passes to
each forward as the keyword ``stc_state``; the encoder modules hold none, so several streams can share
one model::

    with attach_cacher(model.model.vision_tower, CacherConfig(cache_interval=4, reuse_ratio=0.75)) as cacher:
        state = cacher.new_state()
        for chunk in frames:                     # [F, 3, H, W], in stream order
            out = model.model.vision_tower(chunk, stc_state=state, output_hidden_states=True)
        print(state.recomputed_tokens)           # per frame, tokens recomputed at each layer

A forward without ``stc_state`` runs the original layers untouched.

Frames are reference frames by their index in the stream (index % N == 0), whether they arrive one
at a time or in chunks, and a chunk gives exactly what its frames give one at a time. (The public code
decides per chunk; in the ReKV setting a chunk is one frame and both agree.)
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from stc.patching import LayerPatch, encoder_layers, patch_owner

REUSE_MODES = ("attn+mlp", "attn", "mlp")
SELECTION_FEATURES = ("key", "value", "hidden")
METRICS = ("cosine", "l1", "l2", "dot")
STATE_KWARG = "stc_state"


@dataclass(frozen=True)
class CacherConfig:
    """Settings of STC-Cacher.

    cache_interval: N, one reference frame every N frames of a stream (>= 1, or math.inf for only the
        first frame). N = 1 makes every frame a reference frame (no reuse).
    reuse_ratio: R_Cacher in [0, 1): the fraction of tokens whose cached outputs are reused on
        non-reference frames; k = floor(T * (1 - R)) tokens are recomputed per frame and layer.
    reuse: which cached outputs static tokens reuse: "attn+mlp" (paper default), "attn" (attention
        output reused, MLP recomputed for all tokens) or "mlp" (full attention, MLP output reused).
    selection_feature: what picks the dynamic tokens: "key" (default), "value", or "hidden" (the
        layer's input hidden state).
    metric: similarity to the reference feature: "cosine" (default), "l1", "l2" (negative distances)
        or "dot". The least similar tokens are recomputed.
    per_layer_selection: select dynamic tokens at every layer (default); if False, layer 0 selects and
        every layer reuses that selection (the later public code's approximation).
    """

    cache_interval: float = 4
    reuse_ratio: float = 0.75
    reuse: str = "attn+mlp"
    selection_feature: str = "key"
    metric: str = "cosine"
    per_layer_selection: bool = True

    def __post_init__(self):
        n = self.cache_interval
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(n):
            raise ValueError(f"cache_interval must be an integer >= 1 or math.inf, got {n!r}")
        if n < 1 or (not math.isinf(n) and n != int(n)):
            raise ValueError(f"cache_interval must be an integer >= 1 or math.inf, got {n!r}")
        r = self.reuse_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 <= r < 1.0:
            raise ValueError(
                f"reuse_ratio must be in [0, 1) (the fraction of tokens reused), got {r!r}; "
                "use cache_interval=1 to recompute every frame fully"
            )
        for name, allowed in (("reuse", REUSE_MODES), ("selection_feature", SELECTION_FEATURES), ("metric", METRICS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def recomputed_tokens(self, num_tokens: int) -> int:
        """k = floor(T * (1 - R)), the dynamic tokens per non-reference frame and layer.

        Raises ValueError where k would be 0 (R >= 1 - 1/T): a selective layer needs a token to recompute."""
        # round() first so that e.g. 729 * 0.25 is not floored to 182.2499... -> 182 by accident
        k = math.floor(round(num_tokens * (1.0 - self.reuse_ratio), 9))
        if k < 1:
            raise ValueError(
                f"reuse_ratio={self.reuse_ratio} leaves no token to recompute in frames of {num_tokens} tokens "
                f"(k = floor(T * (1 - R)) = 0); use reuse_ratio <= {1 - 1 / num_tokens:.6g}")
        return k

    def is_reference(self, frame_index: int) -> bool:
        if math.isinf(self.cache_interval):
            return frame_index == 0
        return frame_index % int(self.cache_interval) == 0


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


def token_similarity(current: torch.Tensor, reference: torch.Tensor, metric: str) -> torch.Tensor:
    """Similarity of each token to the same position of the reference, higher = more similar.

    current: [B, T, C]; reference: [B, T, C] or [1, T, C] (broadcast, not copied). Returns [B, T]:
    the cosine in the inputs' dtype (bounded, and a ranking needs no more), the unbounded dot product
    and distances in float32 at least (in fp16 a product or a sum over SigLIP's 1,152 channels can pass
    65,504 and become a tie at infinity).
    """
    a, b = current, reference
    if metric == "cosine":
        return nn.functional.cosine_similarity(a, b, dim=-1)
    acc = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(acc), b.to(acc)
    if metric == "dot":
        return (a * b).sum(-1)
    if metric == "l1":
        return -(a - b).abs().sum(-1)
    if metric == "l2":
        return -(a - b).norm(dim=-1)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def select_dynamic_tokens(current: torch.Tensor, reference: torch.Tensor, k: int, metric: str, ascending: bool = True) -> torch.Tensor:
    """Indices of the k least similar tokens of each frame, ties going to the lower index (the stable
    sort's ranking, which `stc.vit_kernel.rank_select` computes in one kernel: both give the same
    tokens, also in bf16, where equal similarities are common). In ascending index order, unless
    ascending=False: then in ascending order of similarity.

    current, reference: [B, T, C] (reference may be [1, T, C]). Returns int64 [B, k].
    """
    sim = token_similarity(current, reference, metric)
    idx = torch.sort(sim, dim=1, stable=True).indices[:, :k]
    return idx.sort(dim=1).values if ascending else idx


def _rows(idx: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per-frame token indices [B, k] -> row indices into the flattened [B * T] tokens (computed once
    per layer: every gather and scatter of the layer uses them)."""
    if idx.shape[0] == 1:
        return idx.reshape(-1)
    return (idx + tokens * torch.arange(idx.shape[0], device=idx.device)[:, None]).reshape(-1)


def _gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, C], rows from `_rows` [B * k] -> [B, k, C] (a row gather)."""
    b, t, c = x.shape
    return x.reshape(b * t, c).index_select(0, rows).view(b, -1, c)


def token_positions(idx: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per-frame token indices [B, k] -> int64 [B * tokens]: for token t of frame b, its row among the
    recomputed ones (b * k + j where idx[b, j] == t), or -1 where it is reused. The selective layer
    merges recomputed rows into cached ones by a gather through it (`_merge`), which a compiler fuses
    into the pass that writes the merged tensor; `stc.vit_kernel.rank_positions` computes it with the
    selection."""
    b, k = idx.shape
    pos = torch.full((b * tokens,), -1, dtype=torch.int64, device=idx.device)
    return pos.index_copy_(0, _rows(idx, tokens), torch.arange(b * k, device=idx.device))


def _merge(base: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """base [B or 1, T, C] (broadcast to `batch` frames) with the rows that `positions` (from
    `token_positions`) marks taken from values [B, k, C]: a new [B, T, C] tensor."""
    b = batch or base.shape[0]
    t, c = base.shape[1], base.shape[2]
    pos = positions.view(b, t, 1)
    picked = values.reshape(-1, c).to(base.dtype)[pos.clamp(min=0).view(b, t)]
    return torch.where(pos >= 0, picked, base)


def merge_values(work: tuple[torch.Tensor, torch.Tensor], base: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
                 kernel: bool = False, own_rows: bool = False) -> torch.Tensor:
    """`_merge(base, positions, values)` written into a buffer that outlives the call, and returned:
    work = (buffer [B, T, C], dirty int8 [B * T], the buffer's rows that may differ from base's; see
    `stc.vit_kernel.merge_rows`). kernel: by `stc.vit_kernel.merge_rows`, which reads and writes only the
    rows that change; else the same rows change by whole-tensor operations (no faster than `_merge`; its
    reference). Either way the new rows end up marked and no other. own_rows: values is [B, T, C], every
    token's, and a marked token takes its own row of it."""
    buffer, dirty = work
    if kernel:
        from stc import vit_kernel

        vit_kernel.merge_rows(buffer, dirty, base, positions, values, own_rows)
        return buffer
    new = positions >= 0
    b = buffer.shape[0]
    write = (new | (dirty != 0)).view(b, -1, 1)
    merged = (torch.where(new.view(b, -1, 1), values, base) if own_rows else _merge(base, positions, values, batch=b))
    buffer.copy_(torch.where(write, merged, buffer))
    dirty.copy_(new)
    return buffer


@dataclass
class LayerCache:
    """What one layer caches for a reference frame; each tensor [T, C]."""

    key: torch.Tensor
    value: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    hidden: torch.Tensor | None = None


def _attention(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: bool = False,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention with the layer's own settings. q [B, Tq, C], k/v [B, T, C] -> [B, Tq, C].
    kernel: by `stc.vit_kernel.attention` (no mask, no dropout: SigLIP's and CLIP's vision attention; check
    `stc.fast.attention_kernel_supported`) instead of the layer's attention function. rows: token indices
    [B, M]: the queries are these rows of q (read in place by the kernel) -> [B, M, C]."""
    attn = layer.self_attn
    if kernel:
        from stc import vit_kernel

        return vit_kernel.attention(q, k, v, q.shape[-1] // attn.head_dim, attn.scale, 0, rows)
    if rows is not None:
        q = _gather(q, _rows(rows, q.shape[1]))
    head_dim = attn.head_dim
    b, tq, _ = q.shape
    q4 = q.view(b, tq, -1, head_dim).transpose(1, 2)
    k4 = k.view(b, k.shape[1], -1, head_dim).transpose(1, 2)
    v4 = v.view(b, v.shape[1], -1, head_dim).transpose(1, 2)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    out, _ = interface(attn, q4, k4, v4, None, is_causal=False, scaling=attn.scale, dropout=0.0)
    return out.reshape(b, tq, -1).contiguous()


def fused_mlp_supported(layer: nn.Module, device: torch.device) -> bool:
    """Whether `mlp_forward(..., fused=True)` can run this layer's MLP as one GEMM with its GELU: a
    SigLIP MLP (fc1 with a bias, tanh GELU, fc2) on a CUDA device, where `torch._addmm_activation`'s
    GELU is the tanh one (on a CPU it is the exact GELU, another function)."""
    mlp = getattr(layer, "mlp", None)
    fc1 = getattr(mlp, "fc1", None)
    return (torch.device(device).type == "cuda" and getattr(getattr(mlp, "config", None), "hidden_act", None) == "gelu_pytorch_tanh"
            and isinstance(fc1, nn.Linear) and fc1.bias is not None and isinstance(getattr(mlp, "fc2", None), nn.Linear))


def mlp_forward(layer: nn.Module, h: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The layer's MLP on h [..., C]. fused (where `fused_mlp_supported`): fc1, its bias and the tanh
    GELU as one cuBLASLt GEMM with a GELU_BIAS epilogue (`torch._addmm_activation`), then fc2: the same
    function as the Hugging Face module, without a separate GELU kernel and bias copy (on the H100 at
    SigLIP-so400m shapes, 7.7 against 12.1 us for 182 rows and 14.3 against 24.6 for 729,
    results/latency/h100_vit_mlp_epilogue.json)."""
    if not fused:
        return layer.mlp(h)
    fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
    y = torch._addmm_activation(fc1.bias, h.reshape(-1, h.shape[-1]), fc1.weight.t(), use_gelu=True)
    return fc2(y).view(*h.shape[:-1], fc2.out_features)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """norm(x); kernel: by `stc.vit_kernel.layer_norm` (check `stc.fast.norm_kernel_supported`)."""
    if not kernel:
        return norm(x)
    from stc import vit_kernel

    return vit_kernel.layer_norm(x, norm.weight, norm.bias, norm.eps)


def add_layer_norm(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor, kernel: bool = False,
                   rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) for s = x + residual (rows: the rows of x from `_rows` instead, [B * k], for a residual
    [B, k, C]); kernel: both in one pass by `stc.vit_kernel.add_layer_norm`."""
    if kernel:
        from stc import vit_kernel

        return vit_kernel.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, rows)
    s = (x if rows is None else _gather(x, rows)) + residual
    return s, norm(s)


def _merged_output(x: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, positions: torch.Tensor, mid: torch.Tensor,
                   delta: torch.Tensor) -> torch.Tensor:
    """A selective layer's output [B, T, C]: the recomputed tokens' mid + delta ([B, k, C] each) merged
    through `positions` into the reused tokens' (x + attn) + mlp, their input plus the cached deltas."""
    return _merge((x + attn) + mlp, positions, mid + delta)


def merge_layer_norm(norm: nn.LayerNorm, x: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, positions: torch.Tensor,
                     mid: torch.Tensor, delta: torch.Tensor, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, norm(out)) for a selective layer's output out [B, T, C]: the recomputed tokens' mid + delta
    ([B, k, C] each) merged through `positions` (`token_positions`) into the reused tokens' (x + attn) + mlp
    (the cached deltas [B or 1, T, C]); kernel: both in one pass by `stc.vit_kernel.merge_layer_norm`."""
    if kernel:
        from stc import vit_kernel

        return vit_kernel.merge_layer_norm(x, attn, mlp, positions, mid, delta, norm.weight, norm.bias, norm.eps)
    out = _merged_output(x, attn, mlp, positions, mid, delta)
    return out, norm(out)


PROJECTIONS = "qvk"  # the order of `fused_projection_weights`: each contiguous run of it is one GEMM


def attention_projections(layer: nn.Module) -> list[nn.Module | None]:
    """The layer's query, value and key projection modules, in `PROJECTIONS` order (None where missing)."""
    attn = getattr(layer, "self_attn", None)
    return [getattr(attn, f"{n}_proj", None) for n in PROJECTIONS]


def fused_projections_supported(layer: nn.Module) -> bool:
    """Whether `fused_projection_weights` applies: the layer's query, value and key projections are
    linear maps of one input size and output size, with biases (SigLIP, CLIP)."""
    projs = attention_projections(layer)
    return (all(isinstance(p, nn.Linear) and p.bias is not None for p in projs)
            and len({(p.in_features, p.out_features) for p in projs}) == 1)


def fused_projection_weights(layer: nn.Module, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of the layer's query, value and key projections as one linear map, in that order
    (`PROJECTIONS`): weight [3C, C] and bias [3C]. `project` runs any contiguous run of them as one GEMM.
    Check `fused_projections_supported` first; the copy does not follow later changes of the weights.
    out: an earlier copy to write into, in place (new tensors if None)."""
    projs = attention_projections(layer)
    weight, bias = out if out is not None else (None, None)
    return (torch.cat([p.weight.detach() for p in projs], out=weight), torch.cat([p.bias.detach() for p in projs], out=bias))


def project(layer: nn.Module, h: torch.Tensor, names: str, fused: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The attention projections `names` of h [..., C], each [..., C]: a contiguous run of "qvk" ("q",
    "qv", "vk", "qvk", ...). fused: the layer's `fused_projection_weights`, to compute them as one GEMM
    (the results are column slices of its output); None: one module call each."""
    if not names or names not in PROJECTIONS:
        raise ValueError(f"names must be a contiguous run of {PROJECTIONS!r}, got {names!r}")
    if fused is None:
        return tuple(getattr(layer.self_attn, f"{n}_proj")(h) for n in names)
    weight, bias = fused
    c = weight.shape[0] // len(PROJECTIONS)
    lo = PROJECTIONS.index(names) * c
    hi = lo + len(names) * c
    out = torch.addmm(bias[lo:hi], h.reshape(-1, h.shape[-1]), weight[lo:hi].t())
    return out.view(*h.shape[:-1], hi - lo).split(c, dim=-1)


def reference_layer(layer: nn.Module, x: torch.Tensor, keep_hidden: bool = False, fused_mlp: bool = False,
                    qvk: tuple[torch.Tensor, torch.Tensor] | None = None, norm_kernel: bool = False,
                    normed: torch.Tensor | None = None, next_norm: nn.LayerNorm | None = None) -> tuple:
    """The full layer forward, decomposed so that K, V and both residual deltas can be cached.

    Same operations as the Hugging Face SigLIP/CLIP encoder layer (fused_mlp: the MLP through
    `mlp_forward(fused=True)`; qvk: the layer's `fused_projection_weights`, the three projections as
    one GEMM; norm_kernel: the norms, and the residual adds with the norms after them, by
    `stc.vit_kernel`). x: [B, T, C]. normed: this layer's first norm of x, if the layer before computed
    it (`next_norm`). next_norm: the next layer's first norm, to compute on the output in the pass that
    writes it.
    Returns the output [B, T, C] and a LayerCache of [B, T, C] tensors (with qvk, K and V are column
    slices of the projections' output); with next_norm, next_norm of the output as a third element.
    """
    attn = layer.self_attn
    h = layer_norm(layer.layer_norm1, x, norm_kernel) if normed is None else normed
    q, v, k = project(layer, h, "qvk", qvk)
    a = attn.out_proj(_attention(layer, q, k, v))
    mid, h2 = add_layer_norm(layer.layer_norm2, x, a, norm_kernel)
    m = mlp_forward(layer, h2, fused_mlp)
    cache = LayerCache(key=k, value=v, attn=a, mlp=m, hidden=x if keep_hidden else None)
    if next_norm is None:
        return mid + m, cache
    out, h_next = add_layer_norm(next_norm, mid, m, norm_kernel)
    return out, cache, h_next


def selective_layer(
    layer: nn.Module,
    x: torch.Tensor,
    ref: LayerCache,
    k: int,
    config: CacherConfig,
    dynamic: torch.Tensor | None = None,
    kernels: bool = False,
    fused_mlp: bool = False,
    qvk: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm_kernel: bool = False,
    normed: torch.Tensor | None = None,
    next_norm: nn.LayerNorm | None = None,
    value_work: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_kernel: bool = False,
    project_all: bool = False,
) -> tuple:
    """The layer forward for non-reference frames: recompute k dynamic tokens, reuse the rest.

    x: [B, T, C]; ref: the reference frame's LayerCache, tensors [B, T, C] (one reference per frame)
    or [1, T, C]. dynamic: precomputed indices [B, k] (shared selection), else selected here.
    kernels: select with `stc.vit_kernel` (Triton, a GPU): the cosine by `cosine`, the ranking and the
    tokens' positions by `rank_positions` (the same tokens as without). Recomputed rows are merged
    into the cached ones by a gather (`token_positions`), one pass per merged tensor when compiled.
    fused_mlp: the MLP through `mlp_forward(fused=True)`. qvk: the layer's `fused_projection_weights`
    (the projections that a step computes for the same rows as one GEMM). norm_kernel: the norms (and
    the residual adds and merges before them) by `stc.vit_kernel` (`add_layer_norm`, `merge_layer_norm`).
    normed, next_norm: as in `reference_layer`. value_work: a buffer for the values that the attention
    reads (the cached ones with the recomputed rows merged in), kept across frames (`merge_values`; with
    kernels, only the rows that change are written), and its dirty rows; None: a new tensor each call.
    attention_kernel: the recomputed tokens' attention by `stc.vit_kernel.attention` (check
    `stc.fast.attention_kernel_supported`). project_all: the query, value and key projections of every token
    (one GEMM with qvk), of which the recomputed tokens' query and value rows are used (read in place by the
    attention kernel and the value buffer's kernel, else gathered): the same values as projecting only those
    rows, in less time where a GEMM's time is its latency (one frame per step on the H100,
    results/latency/README.md). value_work, attention_kernel and project_all apply where the layer recomputes
    only some tokens' attention: every reuse mode but "mlp".
    Returns the output [B, T, C] and the dynamic indices [B, k] (in no particular order); with
    next_norm, next_norm of the output as a third element.
    """
    if kernels:
        from stc import vit_kernel  # needs Triton; imported only here
    attn = layer.self_attn
    b, t, _ = x.shape
    h = layer_norm(layer.layer_norm1, x, norm_kernel) if normed is None else normed
    query_all = value_all = positions = None
    if config.reuse == "mlp" or project_all:  # full attention for every token, or project_all
        query_all, value_all, key = project(layer, h, "qvk", qvk)
    elif config.selection_feature == "value":
        value_all, key = project(layer, h, "vk", qvk)
    else:
        (key,) = project(layer, h, "k", qvk)
    if dynamic is None:
        feature, ref_feature = {
            "key": (key, ref.key),
            "value": (value_all, ref.value),
            "hidden": (x, ref.hidden),
        }[config.selection_feature]
        if kernels:
            sim = (vit_kernel.cosine(feature, ref_feature) if config.metric == "cosine"
                   else token_similarity(feature, ref_feature, config.metric))
            dynamic, positions = vit_kernel.rank_positions(sim, k)
        else:
            dynamic = select_dynamic_tokens(feature, ref_feature, k, config.metric, ascending=False)
    if positions is None:
        positions = token_positions(dynamic, t)
    rows = _rows(dynamic, t)

    if config.reuse == "mlp":
        # Full attention for every token; only the MLP is selective.
        a_full = attn.out_proj(_attention(layer, query_all, key, value_all))
    else:
        own = project_all and value_work is not None  # the buffer's merge reads the recomputed rows in place
        q_rows = None
        if project_all:
            q_dyn, q_rows, v_dyn = query_all, dynamic, value_all if own else _gather(value_all, rows)
        elif value_all is not None:
            (q_dyn,), v_dyn = project(layer, _gather(h, rows), "q", qvk), _gather(value_all, rows)
        else:
            q_dyn, v_dyn = project(layer, _gather(h, rows), "qv", qvk)
        v_full = (_merge(ref.value, positions, v_dyn, batch=b) if value_work is None
                  else merge_values(value_work, ref.value, positions, v_dyn, kernels, own_rows=own))
        a_dyn = attn.out_proj(_attention(layer, q_dyn, key, v_full, kernel=attention_kernel, rows=q_rows))
        if config.reuse == "attn+mlp":
            # Static rows: x + A_ref + M_ref, with no full-size A or M copies; dynamic rows overwrite.
            mid_dyn, h_dyn = add_layer_norm(layer.layer_norm2, x, a_dyn, norm_kernel, rows=rows)
            m_dyn = mlp_forward(layer, h_dyn, fused_mlp)
            if next_norm is not None:
                out, h_next = merge_layer_norm(next_norm, x, ref.attn, ref.mlp, positions, mid_dyn, m_dyn, norm_kernel)
                return out, dynamic, h_next
            return _merged_output(x, ref.attn, ref.mlp, positions, mid_dyn, m_dyn), dynamic
        a_full = _merge(ref.attn, positions, a_dyn, batch=b)
    if config.reuse == "attn":
        mid, h_mid = add_layer_norm(layer.layer_norm2, x, a_full, norm_kernel)
        m_full = mlp_forward(layer, h_mid, fused_mlp)
    else:
        mid = x + a_full
        m_dyn = mlp_forward(layer, layer_norm(layer.layer_norm2, _gather(mid, rows), norm_kernel), fused_mlp)
        m_full = _merge(ref.mlp, positions, m_dyn, batch=b)
    if next_norm is not None:
        out, h_next = add_layer_norm(next_norm, mid, m_full, norm_kernel)
        return out, dynamic, h_next
    return mid + m_full, dynamic


# ---------------------------------------------------------------------------------------------
# Per-stream state
# ---------------------------------------------------------------------------------------------


@dataclass
class FrameReport:
    """What the cacher did for one frame: its index in the stream, whether it was a reference frame,
    and the number of tokens recomputed at each layer (T at every layer for a reference frame)."""

    index: int
    reference: bool
    recomputed: list[int]
    dynamic: list[torch.Tensor] | None = None  # per layer, the recomputed token indices (if recorded)


@dataclass
class CacherState:
    """Everything the cacher remembers about one stream. Create with `Cacher.new_state()`."""

    config: CacherConfig
    num_layers: int
    record_indices: bool = False  # keep each frame's dynamic token indices per layer in its report
    frames_seen: int = 0
    reports: list[FrameReport] = field(default_factory=list)
    # Cache of the latest reference frame, per layer (committed at the end of each chunk).
    _refs: list[LayerCache | None] = field(default_factory=list, repr=False)
    # Scratch space of the chunk in flight (reset at layer 0, committed at the last layer).
    _chunk: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if not self._refs:
            self._refs = [None] * self.num_layers

    def reset(self) -> None:
        """Forget the stream: the next frame is frame 0, a reference frame."""
        self.frames_seen = 0
        self.reports = []
        self._refs = [None] * self.num_layers
        self._chunk = None

    @property
    def reference_frames(self) -> list[int]:
        return [r.index for r in self.reports if r.reference]

    @property
    def recomputed_tokens(self) -> list[int]:
        """Tokens recomputed per frame, summed over layers."""
        return [sum(r.recomputed) for r in self.reports]

    def recomputed_fraction(self, num_tokens: int) -> float:
        """Share of (token, layer) pairs recomputed over all frames seen."""
        total = len(self.reports) * self.num_layers * num_tokens
        return sum(self.recomputed_tokens) / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# Attaching to Hugging Face vision encoders
# ---------------------------------------------------------------------------------------------

class Cacher(LayerPatch):
    """STC-Cacher attached to one vision tower. Use `attach_cacher` to make one.

    Modifications to each encoder layer: its instance `forward` is replaced by one that, when called
    with ``stc_state=<CacherState>``, runs `reference_layer` or `selective_layer` per frame; without
    a state it calls the original forward unchanged. `detach()` removes the instance attribute, so
    the class forward is restored exactly.
    """

    name = "STC-Cacher"
    state_kwarg = STATE_KWARG
    state_type = CacherState

    def __init__(self, vision_tower: nn.Module, config: CacherConfig):
        super().__init__(vision_tower)
        self.config = config

    def new_state(self, record_indices: bool = False) -> CacherState:
        """A fresh state for one stream; record_indices keeps which tokens were recomputed (for plots and tests)."""
        return CacherState(config=self.config, num_layers=self.num_layers, record_indices=record_indices)

    def __repr__(self) -> str:
        return f"Cacher({self.config}, layers={self.num_layers}, attached={self.attached})"

    # -- the per-layer step ------------------------------------------------------------------

    def _layer_step(self, layer: nn.Module, idx: int, x: torch.Tensor, state: CacherState) -> torch.Tensor:
        cfg = self.config
        if state.config != cfg or state.num_layers != self.num_layers:
            raise ValueError("this CacherState was made by another Cacher; use cacher.new_state() of this one")
        if x.dim() != 3:
            raise ValueError(f"expected hidden states [frames, tokens, dim], got shape {tuple(x.shape)}")
        frames, tokens, _ = x.shape
        if idx == 0:
            first = state.frames_seen
            indices = list(range(first, first + frames))
            state._chunk = {
                "indices": indices,
                "is_ref": torch.tensor([cfg.is_reference(i) for i in indices]),
                "k": None,
                "refs": [None] * self.num_layers,
                "recomputed": [[tokens] * self.num_layers for _ in indices],
                "dynamic": [[None] * self.num_layers for _ in indices],
                "shared": None,
            }
        chunk = state._chunk
        if chunk is None or len(chunk["indices"]) != frames:
            raise RuntimeError("STC-Cacher: layers must run in order over one chunk (did a forward fail midway?)")
        is_ref = chunk["is_ref"]
        k = chunk["k"]
        out = torch.empty_like(x)
        keep_hidden = cfg.selection_feature == "hidden"

        ref_pos = is_ref.nonzero().flatten().tolist()
        new_ref = None
        if ref_pos:
            y, cache = reference_layer(layer, x[ref_pos], keep_hidden=keep_hidden)
            out[ref_pos] = y
            new_ref = cache
        dyn_pos = (~is_ref).nonzero().flatten().tolist()
        if dyn_pos:
            if k is None:  # only where a frame is selective: a chunk of reference frames needs no k
                k = chunk["k"] = cfg.recomputed_tokens(tokens)
            ref = self._references_for(state, idx, dyn_pos, ref_pos, new_ref)
            shared = chunk["shared"]
            dynamic = None if (cfg.per_layer_selection or shared is None or idx == 0) else shared
            y, dynamic = selective_layer(layer, x[dyn_pos], ref, k, cfg, dynamic=dynamic)
            out[dyn_pos] = y
            if not cfg.per_layer_selection and idx == 0:
                chunk["shared"] = dynamic
            for row, p in enumerate(dyn_pos):
                chunk["recomputed"][p][idx] = k
                if state.record_indices:
                    chunk["dynamic"][p][idx] = dynamic[row].sort().values.cpu()
        if new_ref is not None:
            last = len(ref_pos) - 1
            chunk["refs"][idx] = LayerCache(
                # clone: a slice would be a view that keeps the whole chunk's tensors alive
                *(None if t is None else t[last : last + 1].detach().clone() for t in (
                    new_ref.key, new_ref.value, new_ref.attn, new_ref.mlp, new_ref.hidden))
            )

        if idx == self.num_layers - 1:
            self._commit(state)
        return out

    def _references_for(self, state, idx, dyn_pos, ref_pos, new_ref) -> LayerCache:
        """The reference cache of each non-reference frame in the chunk, stacked [len(dyn_pos), T, C]."""
        stored = state._refs[idx]
        # Candidates: the stored reference (slot 0) and this chunk's reference frames (slots 1..).
        choice = []
        for p in dyn_pos:
            earlier = [j for j, rp in enumerate(ref_pos) if rp < p]
            if earlier:
                choice.append(earlier[-1] + 1)
            elif stored is not None:
                choice.append(0)
            else:
                raise RuntimeError("STC-Cacher: a non-reference frame has no reference frame (state was reset midway?)")
        if all(c == 0 for c in choice):
            return stored
        fields = ("key", "value", "attn", "mlp", "hidden")
        parts = {}
        for name in fields:
            fresh = getattr(new_ref, name) if new_ref is not None else None
            old = getattr(stored, name) if stored is not None else None
            if fresh is None and old is None:
                parts[name] = None
                continue
            pool = torch.cat(([old] if old is not None else [fresh[:1]]) + ([fresh] if fresh is not None else []), dim=0)
            parts[name] = pool[torch.tensor(choice, device=pool.device)]
        return LayerCache(**parts)

    def _commit(self, state: CacherState) -> None:
        chunk = state._chunk
        for layer_idx, cache in enumerate(chunk["refs"]):
            if cache is not None:
                state._refs[layer_idx] = cache
        for pos, frame_index in enumerate(chunk["indices"]):
            is_ref = bool(chunk["is_ref"][pos])
            dynamic = None if (is_ref or not state.record_indices) else chunk["dynamic"][pos]
            state.reports.append(
                FrameReport(index=frame_index, reference=is_ref, recomputed=chunk["recomputed"][pos], dynamic=dynamic)
            )
        state.frames_seen += len(chunk["indices"])
        state._chunk = None


def attach_cacher(vision_tower: nn.Module, config: CacherConfig | None = None) -> Cacher:
    """Attach STC-Cacher to a transformers 5.x SigLIP or CLIP vision tower.

    Idempotent: attaching again with the same config returns the attached Cacher; a different config
    (or another patch, e.g. ToMe) raises ValueError - detach first. Use as a context manager to
    detach on exit.
    """
    config = config or CacherConfig()
    layers = encoder_layers(vision_tower, "STC-Cacher")
    owner = patch_owner(layers[0])
    if isinstance(owner, Cacher):
        if owner.config == config:
            return owner
        raise ValueError(f"a cacher with another config is attached ({owner.config}); detach it first")
    cacher = Cacher(vision_tower, config)
    cacher._attach()
    return cacher
