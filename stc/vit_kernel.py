"""Triton kernels for the graph-captured SigLIP step on a GPU (`stc.fast.GraphedVision`): STC-Cacher's
token selection and its value merge, and every method's LayerNorms.

`stc.cacher.selective_layer(..., kernels=True)` calls them; the module needs Triton and is imported
only then. `rank_select` is a `torch.library.triton_op` (``stc::rank_select``), so `torch.compile`
sees through it and CUDA graphs capture it. Its result equals the PyTorch selection of
`stc.cacher.select_dynamic_tokens` (tests: a brute-force ranking, in Triton's interpreter on a CPU
and on the H100).

One frame of SigLIP-so400m is 729 tokens, of which a non-reference frame recomputes 182. At B = 1
every kernel of the selective layer is bound by its latency, not its work, and choosing the dynamic
tokens with `torch.topk` takes 12 us with the cosine similarity (compiled; a stable `torch.sort`
20 us), of a layer of about 100 us (results/latency/h100_vit_kernels.json). `rank_select` is one
kernel: each program ranks a block of tokens against all of the frame's similarities (rank = how
many are smaller, ties to the lower index) and writes the tokens of rank < k at their rank: 6 us with
the cosine (results/latency/h100_vit_kernels_stc.json).

`cosine` (``stc::cosine``) computes the similarities that `rank_select` ranks when the metric is the
cosine: each token's feature against the reference frame's, as
``torch.nn.functional.cosine_similarity`` over the channels, in one pass over both. Inductor's fused
reduction reads the two at about 1.3 TB/s at B = 16 (40 us per layer); this kernel at about 3 TB/s
(19 us), and 2.8 against 3.8 us at B = 1 (results/latency/h100_vit_cosine_kernel.json).

`layer_norm` (``stc::layer_norm``), `add_layer_norm` (``stc::add_layer_norm``, the residual add and the
norm after it, optionally over gathered rows) and `merge_layer_norm` (``stc::merge_layer_norm``, a selective
layer's output, its recomputed rows merged into the reused ones, with the next layer's first norm of it)
are custom ops for every method's encoder layers (`stc.cacher.layer_norm`, `GraphedVision(norm_kernel=...)`):
one program normalises a few whole rows in one pass. Inductor compiles SigLIP's norm of 1152 channels as a
looped reduction, 51.6 us for 16 frames on the H200, against 17.7 here (results/latency/h200_vit_layer_norm.json).

`merge_rows` (``stc::merge_rows``) keeps a selective layer's values (the cached ones with the recomputed rows
merged in) in a buffer across a stream's frames (`stc.cacher.merge_values`, `GraphedVision(value_buffer=...)`):
each frame writes its recomputed rows and restores the last frame's, instead of reading all the cached values
and writing a new tensor.

`attention` (``stc::attention``) is the selective layer's attention, its recomputed queries over the whole
frame's keys (`GraphedVision(attention_kernel=...)`): a FlashAttention-style online softmax that computes a
head of 72 channels as 64 + 16 (cuDNN's kernel on the H100 is named for tiles of 128 channels) and, with 16
frames, three tiles of 64 queries per program that share each block of keys and values. For 182 queries on the
H100 it takes 43 us at 16 frames against cuDNN's 55.5, and 12.4 against 16.6 for one frame
(results/latency/h100_vit_attention_kernel.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _rank_select(SIM, IDX, POS, T, K, stride_sb, BLOCK_I: tl.constexpr, TP: tl.constexpr, WRITE_POS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.arange(0, TP)
    inf = float("inf")
    s_all = tl.load(SIM + b * stride_sb + j, mask=j < T, other=inf).to(tl.float32)
    s_all = tl.where(s_all != s_all, inf, s_all)  # NaN ranks last, as in torch.sort
    s_i = tl.load(SIM + b * stride_sb + i, mask=i < T, other=inf).to(tl.float32)
    s_i = tl.where(s_i != s_i, inf, s_i)
    before = (s_all[None, :] < s_i[:, None]) | ((s_all[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
    rank = tl.sum((before & (j[None, :] < T)).to(tl.int32), axis=1)
    chosen = rank < K
    tl.store(IDX + b * K + rank, i.to(tl.int64), mask=chosen & (i < T))
    if WRITE_POS:
        tl.store(POS + b * T + i, tl.where(chosen, b * K + rank, -1), mask=i < T)


def _check_rank_inputs(sim: torch.Tensor, k: int) -> None:
    if sim.dim() != 2 or not 0 <= k <= sim.shape[1]:
        raise ValueError(f"rank_select: expected sim [B, T] and 0 <= k <= T, got {tuple(sim.shape)} and k={k}")


def _launch_rank(sim: torch.Tensor, k: int, positions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, t = sim.shape
    idx = torch.empty(b, k, dtype=torch.int64, device=sim.device)
    pos = torch.empty(b * t, dtype=torch.int64, device=sim.device) if positions else None
    if b == 0 or t == 0:
        return idx, pos
    if k == 0:
        if pos is not None:
            pos.fill_(-1)
        return idx, pos
    sim = sim.contiguous()
    block_i = 16
    wrap_triton(_rank_select)[(b, triton.cdiv(t, block_i))](
        sim, idx, idx if pos is None else pos, t, k, sim.stride(0), BLOCK_I=block_i, TP=triton.next_power_of_2(t),
        WRITE_POS=positions, num_warps=4)
    return idx, pos


@triton_op("stc::rank_select", mutates_args={})
def rank_select(sim: torch.Tensor, k: int) -> torch.Tensor:
    """sim [B, T] (any float dtype) -> int64 [B, k]: the k least similar tokens of each frame in
    ascending order of similarity, ties to the lower index, NaN last. Equal to
    ``torch.sort(sim, dim=1, stable=True).indices[:, :k]``."""
    _check_rank_inputs(sim, k)
    return _launch_rank(sim, k, positions=False)[0]


@triton_op("stc::rank_positions", mutates_args={})
def rank_positions(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rank_select`'s indices [B, k] and, from the same kernel, each token's place among them: int64
    [B * T], b * k + rank for token t of frame b if it is chosen, else -1 (`stc.cacher.token_positions`
    of the indices), so that the selective layer merges recomputed rows by a gather."""
    _check_rank_inputs(sim, k)
    return _launch_rank(sim, k, positions=True)


@triton.jit
def _cosine(A, B, OUT, R, T, C, stride_ab, stride_at, stride_bb, stride_bt, eps,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    frame, token = (r // T).to(tl.int64), (r % T).to(tl.int64)
    a_row = A + frame * stride_ab + token * stride_at
    b_row = B + frame * stride_bb + token * stride_bt
    dot = tl.zeros((BLOCK_R,), tl.float32)
    aa = tl.zeros((BLOCK_R,), tl.float32)
    bb = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (r < R)[:, None] & (c < C)[None, :]
        a = tl.load(a_row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(a * b, axis=1)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
    norms = tl.maximum(tl.sqrt(aa), eps) * tl.maximum(tl.sqrt(bb), eps)
    tl.store(OUT + r, (dot / norms).to(OUT.dtype.element_ty), mask=r < R)


@triton_op("stc::cosine", mutates_args={})
def cosine(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """current [B, T, C], reference [B, T, C] or [1, T, C] (broadcast; any frame and token strides)
    -> [B, T] in their dtype: ``torch.nn.functional.cosine_similarity(current, reference, dim=-1)``
    (each norm clamped at 1e-8), accumulated in float32."""
    if (current.dim() != 3 or reference.dim() != 3 or reference.shape[0] not in (1, current.shape[0])
            or reference.shape[1:] != current.shape[1:]):
        raise ValueError(f"cosine: expected current [B, T, C] and reference [B or 1, T, C], got "
                         f"{tuple(current.shape)} and {tuple(reference.shape)}")
    if current.dtype != reference.dtype:
        raise ValueError(f"cosine: current and reference must share a dtype, got {current.dtype} and {reference.dtype}")
    b, t, c = current.shape
    out = torch.empty(b, t, dtype=current.dtype, device=current.device)
    if out.numel() == 0:
        return out
    current = current if current.stride(2) == 1 else current.contiguous()
    reference = reference if reference.stride(2) == 1 else reference.contiguous()
    ref_frame = reference.stride(0) if reference.shape[0] > 1 else 0
    block_r, block_c = 1, 512  # the best of a sweep at B = 1, within 8% of the best at B = 16
    wrap_triton(_cosine)[(triton.cdiv(b * t, block_r),)](
        current, reference, out, b * t, t, c, current.stride(0), current.stride(1), ref_frame, reference.stride(1), 1e-8,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=1)
    return out


def supported(dtype: torch.dtype) -> bool:
    """Whether the kernels compare and rank features of this dtype (on a CUDA device: `stc.fast.vit_kernels_supported`)."""
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _normalised(x, c, inside, C, eps, W, BIAS):
    """Rows x [BLOCK_R, BLOCK_C] in float32 (channel c < C where `inside`) -> their LayerNorm with weight W
    and bias BIAS (statistics over the C channels), float32."""
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(inside[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    w = tl.load(W + c, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(BIAS + c, mask=inside, other=0.0).to(tl.float32)
    return diff * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _layer_norm(X, IDX, RES, W, BIAS, Y, SUM, R, C, eps, stride_x, stride_res, stride_y, stride_sum,
                HAS_RES: tl.constexpr, INDEXED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    inside = c < C
    mask = (r < R)[:, None] & inside[None, :]
    if INDEXED:  # row r of x is row IDX[r] of the tensor
        xr = tl.load(IDX + r, mask=r < R, other=0).to(tl.int64)
    else:
        xr = r
    x = tl.load(X + xr[:, None] * stride_x + c[None, :], mask=mask, other=0.0)
    if HAS_RES:  # the residual sum, rounded to the dtype as the unfused add would, then normalised
        x = x + tl.load(RES + r[:, None] * stride_res + c[None, :], mask=mask, other=0.0)
        tl.store(SUM + r[:, None] * stride_sum + c[None, :], x, mask=mask)
    y = _normalised(x.to(tl.float32), c, inside, C, eps, W, BIAS)
    tl.store(Y + r[:, None] * stride_y + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as rows [R, C] with unit channel stride (a view where the layout allows)."""
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, t.shape[-1])


def _norm_tiles(rows: int, c: int) -> tuple[tuple[int], dict]:
    """The grid and tile settings of a norm kernel over `rows` rows of c channels: whole rows per program,
    a few of them where rows are short."""
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(16, 4096 // block_c))
    return (triton.cdiv(rows, block_r),), dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_c <= 2048 else 8)


def _launch_norm(x, residual, weight, bias, eps, index=None):
    if weight.dim() != 1 or bias.dim() != 1 or weight.shape != bias.shape or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"layer_norm: expected x [..., C] and weight, bias [C], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    shape = x.shape if index is None else residual.shape
    if residual is not None and (residual.shape != shape or residual.dtype != x.dtype):
        raise ValueError(f"layer_norm: the residual must match x (or its indexed rows), got {tuple(residual.shape)} "
                         f"{residual.dtype} and {tuple(shape)} {x.dtype}")
    rows = _rows_of(x)
    if index is not None and (index.dim() != 1 or index.numel() * x.shape[-1] != residual.numel()):
        raise ValueError(f"layer_norm: expected one row index per residual row, got {tuple(index.shape)} for "
                         f"{tuple(residual.shape)}")
    r, c = (index.numel() if index is not None else rows.shape[0]), rows.shape[1]
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    total = torch.empty(shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if r == 0 or c == 0:
        return y, total
    res = _rows_of(residual) if residual is not None else rows
    grid, tiles = _norm_tiles(r, c)
    _layer_norm[grid](
        rows, rows if index is None else index, res, weight, bias, y, y if total is None else total, r, c, eps,
        rows.stride(0), res.stride(0), c, c, HAS_RES=residual is not None, INDEXED=index is not None, **tiles)
    return y, total


# The norms are custom ops that torch.compile calls as they are, not triton_ops that it traces: traced
# into a compiled function, the norm of 16 frames took 27.8 us against 17.7 for the kernel called alone on
# the H200 (results/latency/h200_vit_layer_norm.json; likely one more copy of an output, not verified).
# Being opaque, they launch their kernels directly: `wrap_triton`, called outside tracing with a num_warps,
# wraps the kernel in a new one-config Autotuner on every call and records it in torch's kernel side table
# (torch/_higher_order_ops/triton_kernel_wrap.py; the Autotuner shows in the H200's traceback in
# results/latency/h200_capture_failure_b4.txt).
@torch.library.custom_op("stc::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`` for x [..., C], in one pass over
    the rows (statistics in float32, output in x's dtype)."""
    return _launch_norm(x, None, weight, bias, eps)[0]


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("stc::add_layer_norm", mutates_args=())
def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s)) for s = x + residual, both [..., C] of one dtype: the residual add of an
    encoder layer and the norm after it in one pass (s rounded to the dtype before it is normalised,
    as the two separate operations do). rows: int64 [R] to add the residual [..., C] (R rows) to those
    rows of x's flattened rows instead (a gather in the same pass); s and the norm are shaped as the
    residual."""
    y, total = _launch_norm(x, residual, weight, bias, eps, rows)
    return total, y


@add_layer_norm.register_fake
def _(x, residual, weight, bias, eps, rows=None):
    out = residual if rows is not None else x
    return (torch.empty_like(out, memory_format=torch.contiguous_format),
            torch.empty_like(out, memory_format=torch.contiguous_format))


@triton.jit
def _merge_layer_norm(X, A, M, POS, MID, DELTA, W, BIAS, OUT, Y, R, T, C, NEW, eps, stride_xb, stride_xt, stride_ab,
                      stride_at, stride_mb, stride_mt, stride_new, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    inside = c < C
    live = r < R
    mask = live[:, None] & inside[None, :]
    frame, token = r // T, r % T
    p = tl.load(POS + r, mask=live, other=-1)
    new = (p >= 0) & (p < NEW)  # a recomputed token's row among the new ones (a position outside them: reused)
    p = tl.where(new, p, 0)
    fresh = mask & new[:, None]
    kept = mask & ~new[:, None]  # only the reused rows read the input and the cached deltas
    v = (tl.load(MID + p[:, None] * stride_new + c[None, :], mask=fresh, other=0.0)
         + tl.load(DELTA + p[:, None] * stride_new + c[None, :], mask=fresh, other=0.0))
    x = tl.load(X + (frame * stride_xb + token * stride_xt)[:, None] + c[None, :], mask=kept, other=0.0)
    a = tl.load(A + (frame * stride_ab + token * stride_at)[:, None] + c[None, :], mask=kept, other=0.0)
    m = tl.load(M + (frame * stride_mb + token * stride_mt)[:, None] + c[None, :], mask=kept, other=0.0)
    s = tl.where(new[:, None], v, (x + a) + m)  # each sum rounded to the dtype, as the unfused adds
    tl.store(OUT + r[:, None] * C + c[None, :], s, mask=mask)
    y = _normalised(s.to(tl.float32), c, inside, C, eps, W, BIAS)
    tl.store(Y + r[:, None] * C + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@torch.library.custom_op("stc::merge_layer_norm", mutates_args=())
def merge_layer_norm(x: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, positions: torch.Tensor, mid: torch.Tensor,
                     delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s)): a selective layer's output s [B, T, C] and the next layer's first norm of it,
    in one pass. Token t of frame b is recomputed where p = positions[b * T + t] >= 0 (int64 [B * T],
    `stc.cacher.token_positions`): s = mid + delta at row p of those ([B, k, C] each: the attention's
    residual sum and the MLP's output of the recomputed tokens); else it is reused: s = (x + attn) + mlp,
    its input x [B, T, C] plus the reference frame's cached deltas ([B or 1, T, C], any frame and token
    strides). Each sum is rounded to the dtype, as the unfused adds; a position past the recomputed rows
    counts as reused."""
    b, t, c = x.shape if x.dim() == 3 else (None, None, None)
    if (x.dim() != 3 or any(v.dim() != 3 or v.shape[0] not in (1, b) or v.shape[1:] != x.shape[1:] for v in (attn, mlp))
            or mid.shape != delta.shape or mid.shape[-1:] != (c,) or weight.shape != (c,) or bias.shape != (c,)):
        raise ValueError(f"merge_layer_norm: expected x [B, T, C], attn and mlp [B or 1, T, C], mid and delta [..., C] "
                         f"and weight, bias [C], got {tuple(x.shape)}, {tuple(attn.shape)}, {tuple(mlp.shape)}, "
                         f"{tuple(mid.shape)}, {tuple(delta.shape)}, {tuple(weight.shape)} and {tuple(bias.shape)}")
    if positions.dtype != torch.int64 or positions.shape != (b * t,):
        raise ValueError(f"merge_layer_norm: expected int64 positions [B * T] = [{b * t}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if len({v.dtype for v in (x, attn, mlp, mid, delta)}) != 1:
        raise ValueError("merge_layer_norm: x, attn, mlp, mid and delta must share a dtype")
    out = torch.empty(b, t, c, dtype=x.dtype, device=x.device)
    y = torch.empty_like(out)
    if out.numel() == 0:
        return out, y
    x, attn, mlp = (v if v.stride(2) == 1 else v.contiguous() for v in (x, attn, mlp))
    mid, delta = _rows_of(mid).contiguous(), _rows_of(delta).contiguous()
    frame_stride = [v.stride(0) if v.shape[0] > 1 else 0 for v in (x, attn, mlp)]
    grid, tiles = _norm_tiles(b * t, c)
    _merge_layer_norm[grid](
        x, attn, mlp, positions.contiguous(), mid, delta, weight, bias, out, y, b * t, t, c, mid.shape[0], eps,
        frame_stride[0], x.stride(1), frame_stride[1], attn.stride(1), frame_stride[2], mlp.stride(1), c, **tiles)
    return out, y


@merge_layer_norm.register_fake
def _(x, attn, mlp, positions, mid, delta, weight, bias, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@triton.jit
def _merge_rows(WORK, DIRTY, BASE, POS, VALUES, R, T, C, NEW, stride_bb, stride_bt, stride_v,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, OWN: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    inside = c < C
    live = r < R
    frame, token = r // T, r % T
    p = tl.load(POS + r, mask=live, other=-1)
    new = live & (p >= 0) & (p < NEW)
    stale = live & ~new & (tl.load(DIRTY + r, mask=live, other=0) != 0)
    p = tl.where(new, r if OWN else p, 0)  # OWN: a marked token takes its own row of VALUES [B * T]
    v = tl.load(VALUES + p[:, None] * stride_v + c[None, :], mask=new[:, None] & inside[None, :], other=0.0)
    base = tl.load(BASE + (frame * stride_bb + token * stride_bt)[:, None] + c[None, :], mask=stale[:, None] & inside[None, :],
                   other=0.0)
    out = tl.where(new[:, None], v.to(WORK.dtype.element_ty), base)
    tl.store(WORK + r[:, None] * C + c[None, :], out, mask=(new | stale)[:, None] & inside[None, :])
    tl.store(DIRTY + r, new.to(tl.int8), mask=live)


def _check_merge_rows(work, dirty, base, positions, values, own_rows) -> None:
    b, t, c = work.shape if work.dim() == 3 else (None, None, None)
    if (work.dim() != 3 or not work.is_contiguous() or base.dim() != 3 or base.shape[0] not in (1, b)
            or base.shape[1:] != work.shape[1:] or values.shape[-1:] != (c,)):
        raise ValueError(f"merge_rows: expected a contiguous work [B, T, C], base [B or 1, T, C] and values [..., C], got "
                         f"{tuple(work.shape)}, {tuple(base.shape)} and {tuple(values.shape)}")
    if own_rows and values.shape != work.shape:
        raise ValueError(f"merge_rows: own_rows needs values of work's shape {tuple(work.shape)}, got {tuple(values.shape)}")
    if dirty.dtype != torch.int8 or dirty.shape != (b * t,) or not dirty.is_contiguous():
        raise ValueError(f"merge_rows: expected contiguous int8 dirty rows [B * T] = [{b * t}], got {dirty.dtype} {tuple(dirty.shape)}")
    if positions.dtype != torch.int64 or positions.shape != (b * t,):
        raise ValueError(f"merge_rows: expected int64 positions [B * T] = [{b * t}], got {positions.dtype} {tuple(positions.shape)}")
    if len({work.dtype, base.dtype, values.dtype}) != 1:
        raise ValueError("merge_rows: work, base and values must share a dtype")


# A custom op that mutates its first two arguments, which torch.compile calls as it is (in place).
@torch.library.custom_op("stc::merge_rows", mutates_args=("work", "dirty"))
def merge_rows(work: torch.Tensor, dirty: torch.Tensor, base: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
               own_rows: bool = False) -> None:
    """Make work [B, T, C] the merge of base [B or 1, T, C] (any frame and token strides) with the rows of
    values [B, k, C] that positions marks (int64 [B * T], `stc.cacher.token_positions`: token t of frame b
    takes row positions[b * T + t] of values where it is >= 0), writing only the rows that change.
    own_rows: values is [B, T, C], every token's (a selective layer that projected every token,
    `stc.cacher.selective_layer(project_all=True)`), and a marked token takes its own row of it.

    work is a buffer that outlives the call: dirty (int8 [B * T]) marks its rows that may differ from
    base's; rows not marked must already equal base's. Each call writes the new rows and the marked ones
    (from base), then marks the new rows. Set every mark after base changes (a new reference frame) or
    work's rows are written elsewhere. For consecutive frames whose recomputed tokens mostly coincide, this
    writes about their rows instead of the whole tensor: ``stc.cacher._merge`` reads all of base and writes
    a new tensor."""
    _check_merge_rows(work, dirty, base, positions, values, own_rows)
    b, t, c = work.shape
    if work.numel() == 0:
        return
    base = base if base.stride(2) == 1 else base.contiguous()
    values = _rows_of(values)  # a view where it can be (the projections' column slice): no copy
    grid, tiles = _norm_tiles(b * t, c)
    _merge_rows[grid](work, dirty, base, positions.contiguous(), values, b * t, t, c, values.shape[0],
                      base.stride(0) if base.shape[0] > 1 else 0, base.stride(1), values.stride(0), **tiles,
                      OWN=bool(own_rows))


@merge_rows.register_fake
def _(work, dirty, base, positions, values, own_rows=False):
    return None


@triton.jit
def _attention_kv(KB, VB, skn, svn, start, N, d0, d1, dmask, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """A block of BLOCK_N keys and values of one head, each as its first 64 channels and the rest."""
    cols = start + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if MASK:
        k0 = tl.load(KB + cols[:, None] * skn + d0[None, :], mask=cmask[:, None], other=0.0)
        v0 = tl.load(VB + cols[:, None] * svn + d0[None, :], mask=cmask[:, None], other=0.0)
        tail = cmask[:, None] & dmask[None, :]
    else:
        k0 = tl.load(KB + cols[:, None] * skn + d0[None, :])
        v0 = tl.load(VB + cols[:, None] * svn + d0[None, :])
        tail = dmask[None, :]
    k1 = tl.load(KB + cols[:, None] * skn + d1[None, :], mask=tail, other=0.0)
    v1 = tl.load(VB + cols[:, None] * svn + d1[None, :], mask=tail, other=0.0)
    return k0, k1, v0, v1, cmask


@triton.jit
def _attention_update(acc0, acc1, l_i, m_i, q0, q1, k0, k1, v0, v1, scale2, cmask, MASK: tl.constexpr,
                      IEEE: tl.constexpr):
    """One online-softmax step of a tile of 64 queries over a block of keys (logits in base 2)."""
    if IEEE:
        s = tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0), input_precision="ieee"), input_precision="ieee")
    else:
        s = tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0)))
    if MASK:
        s = tl.where(cmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale2)
    p = tl.exp2(s * scale2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v0.dtype)
    if IEEE:
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision="ieee")
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision="ieee")
    else:
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None])
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
    return acc0, acc1, l_i, m_new


@triton.jit
def _attention_query(QB, sqm, IB, TQ, rows, M, d0, d1, dmask, ROWMAP: tl.constexpr):
    """A tile of queries: rows of the query, or (ROWMAP) the query rows that IB lists for them (clamped into
    the frame's TQ rows, so that a wrong index cannot read outside it)."""
    live = rows < M
    if ROWMAP:
        src = tl.minimum(tl.maximum(tl.load(IB + rows, mask=live, other=0), 0), TQ - 1)
    else:
        src = rows
    q0 = tl.load(QB + src[:, None] * sqm + d0[None, :], mask=live[:, None], other=0.0)
    q1 = tl.load(QB + src[:, None] * sqm + d1[None, :], mask=live[:, None] & dmask[None, :], other=0.0)
    return q0, q1


@triton.jit
def _attention_store(OB, rows, M, C, acc0, acc1, l_i, d0, d1, dmask):
    live = rows < M
    inv = 1.0 / l_i
    tl.store(OB + rows[:, None] * C + d0[None, :], (acc0 * inv[:, None]).to(OB.dtype.element_ty), mask=live[:, None])
    tl.store(OB + rows[:, None] * C + d1[None, :], (acc1 * inv[:, None]).to(OB.dtype.element_ty),
             mask=live[:, None] & dmask[None, :])


@triton.jit
def _attention(Q, IDX, K, V, O, sqb, sqm, skb, skn, svb, svn, M, N, H, TQ, scale2, D: tl.constexpr, DT: tl.constexpr,
               BLOCK_N: tl.constexpr, TILES: tl.constexpr, IEEE: tl.constexpr, ROWMAP: tl.constexpr):
    # One program: 64 * TILES queries of one head of one frame. Its tiles of 64 share each block of keys
    # and values (loaded once). A head's D channels are its first 64 and a tail of DT (masked past D).
    # ROWMAP: query i of frame b is row IDX[b, i] of the frame's Q.
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    rows = tl.program_id(0) * (64 * TILES) + tl.arange(0, 64)
    d0 = tl.arange(0, 64)
    d1 = 64 + tl.arange(0, DT)
    dmask = d1 < D
    QB = Q + b * sqb + h * D
    KB = K + b * skb + h * D
    VB = V + b * svb + h * D
    IB = IDX + b * M
    qa0, qa1 = _attention_query(QB, sqm, IB, TQ, rows, M, d0, d1, dmask, ROWMAP)
    ma = tl.full((64,), float("-inf"), tl.float32)
    la = tl.zeros((64,), tl.float32)
    aa0 = tl.zeros((64, 64), tl.float32)
    aa1 = tl.zeros((64, DT), tl.float32)
    if TILES == 3:
        qb0, qb1 = _attention_query(QB, sqm, IB, TQ, rows + 64, M, d0, d1, dmask, ROWMAP)
        qc0, qc1 = _attention_query(QB, sqm, IB, TQ, rows + 128, M, d0, d1, dmask, ROWMAP)
        mb = tl.full((64,), float("-inf"), tl.float32)
        mc = tl.full((64,), float("-inf"), tl.float32)
        lb = tl.zeros((64,), tl.float32)
        lc = tl.zeros((64,), tl.float32)
        ab0 = tl.zeros((64, 64), tl.float32)
        ac0 = tl.zeros((64, 64), tl.float32)
        ab1 = tl.zeros((64, DT), tl.float32)
        ac1 = tl.zeros((64, DT), tl.float32)
    full = (N // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):  # whole blocks: no key mask
        k0, k1, v0, v1, cmask = _attention_kv(KB, VB, skn, svn, start, N, d0, d1, dmask, BLOCK_N, False)
        aa0, aa1, la, ma = _attention_update(aa0, aa1, la, ma, qa0, qa1, k0, k1, v0, v1, scale2, cmask, False, IEEE)
        if TILES == 3:
            ab0, ab1, lb, mb = _attention_update(ab0, ab1, lb, mb, qb0, qb1, k0, k1, v0, v1, scale2, cmask, False, IEEE)
            ac0, ac1, lc, mc = _attention_update(ac0, ac1, lc, mc, qc0, qc1, k0, k1, v0, v1, scale2, cmask, False, IEEE)
    if full < N:  # the last, partial block
        k0, k1, v0, v1, cmask = _attention_kv(KB, VB, skn, svn, full, N, d0, d1, dmask, BLOCK_N, True)
        aa0, aa1, la, ma = _attention_update(aa0, aa1, la, ma, qa0, qa1, k0, k1, v0, v1, scale2, cmask, True, IEEE)
        if TILES == 3:
            ab0, ab1, lb, mb = _attention_update(ab0, ab1, lb, mb, qb0, qb1, k0, k1, v0, v1, scale2, cmask, True, IEEE)
            ac0, ac1, lc, mc = _attention_update(ac0, ac1, lc, mc, qc0, qc1, k0, k1, v0, v1, scale2, cmask, True, IEEE)
    C = H * D
    OB = O + b * M * C + h * D
    _attention_store(OB, rows, M, C, aa0, aa1, la, d0, d1, dmask)
    if TILES == 3:
        _attention_store(OB, rows + 64, M, C, ab0, ab1, lb, d0, d1, dmask)
        _attention_store(OB, rows + 128, M, C, ac0, ac1, lc, d0, d1, dmask)


def attention_supported(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether `attention` runs heads of this size and dtype: 64 < head_dim <= 128 (SigLIP's 72; a head of
    64, CLIP's, is left to PyTorch's attention), float16, bfloat16 or float32."""
    return 64 < head_dim <= 128 and dtype in (torch.float16, torch.bfloat16, torch.float32)


def attention_tiles(frames: int, heads: int, queries: int, device: torch.device) -> int:
    """How many tiles of 64 queries each program of `attention` computes: 3 (sharing each block of keys and
    values) where that still gives every SM a program, else 1. On the H100 at SigLIP-so400m's shapes (182
    queries over 729 keys, 16 heads of 72, bf16; results/latency/h100_vit_attention_kernel.json): 16 frames
    43.0 us with 3 tiles, 49.3 with 1 (cuDNN 55.5); 4 frames 18.1 with 1, 27.4 with 3 (cuDNN 17.3); one frame
    12.4 with 1, 27.4 with 3 (cuDNN 16.6)."""
    device = torch.device(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return 3 if frames * heads * triton.cdiv(queries, 192) >= sms else 1


@torch.library.custom_op("stc::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float,
              tiles: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention without a mask: softmax(q k^T * scale) v for each head, query [B, M, H * D] and
    key, value [B, N, H * D] (any frame and token strides) -> [B, M, H * D], contiguous. rows: int64 [B, M'],
    the queries are these rows of each frame's query [B, T, H * D] instead (a selective layer that projected
    every token, `stc.cacher.selective_layer(project_all=True)`; no gathered copy) -> [B, M', H * D]; an
    index outside [0, T) reads the nearest row.

    For the selective layer's few queries over a whole frame (`stc.cacher.selective_layer`,
    `GraphedVision(attention_kernel=...)`): each program computes one or three tiles of 64 queries of one
    head (tiles: 1 or 3; 0 chooses by `attention_tiles`) over blocks of 64 keys, in the online softmax of
    FlashAttention, with float32 statistics and accumulators. A head of 72 is computed as 64 + 16 channels
    (a tail of 16, 32 or 64 channels past the first 64). Needs `attention_supported`; float32 inputs are multiplied
    in IEEE float32 (not TF32)."""
    b, m, c = query.shape if query.dim() == 3 else (None, None, None)
    if (query.dim() != 3 or key.dim() != 3 or key.shape != value.shape or key.shape[0] != b or key.shape[2] != c
            or not isinstance(heads, int) or heads <= 0 or c % heads):
        raise ValueError(f"attention: expected query [B, M, H * D] and key, value [B, N, H * D] with H = heads, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} and heads={heads!r}")
    d = c // heads
    if not attention_supported(d, query.dtype) or len({query.dtype, key.dtype, value.dtype}) != 1:
        raise ValueError(f"attention: needs 64 < head size <= 128 and one dtype of float16, bfloat16 and float32, got "
                         f"heads of {d} and {query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape[1] == 0:
        raise ValueError("attention: needs at least one key")
    if tiles not in (0, 1, 3):
        raise ValueError(f"attention: tiles must be 0 (chosen), 1 or 3, got {tiles!r}")
    tq = m
    if rows is not None:
        if rows.dtype != torch.int64 or rows.dim() != 2 or rows.shape[0] != b or rows.device != query.device:
            raise ValueError(f"attention: rows must be int64 [B, M'] = [{b}, M'] on the query's device, got "
                             f"{rows.dtype} {tuple(rows.shape)} on {rows.device}")
        m = rows.shape[1]
    out = torch.empty(b, m, c, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    if tq == 0:
        raise ValueError("attention: rows index a query of no rows")
    query, key, value = (t if t.stride(2) == 1 else t.contiguous() for t in (query, key, value))
    tiles = tiles or attention_tiles(b, heads, m, query.device)
    n = key.shape[1]
    _attention[(triton.cdiv(m, 64 * tiles), b * heads)](
        query, query if rows is None else rows.contiguous(), key, value, out, query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), m, n, heads, tq, scale * 1.4426950408889634,
        D=d, DT=max(16, triton.next_power_of_2(d - 64)), BLOCK_N=64, TILES=tiles, IEEE=query.dtype == torch.float32,
        ROWMAP=rows is not None, num_warps=4, num_stages=3)
    return out


@attention.register_fake
def _(query, key, value, heads, scale, tiles=0, rows=None):
    shape = query.shape if rows is None else (query.shape[0], rows.shape[1], query.shape[2])
    return torch.empty(shape, dtype=query.dtype, device=query.device)
