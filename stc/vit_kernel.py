"""A Triton kernel for STC-Cacher's token selection on a GPU (`stc.fast.GraphedVision`).

`stc.cacher.selective_layer(..., kernels=True)` calls it; the module needs Triton and is imported
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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _rank_select(SIM, IDX, T, K, stride_sb, BLOCK_I: tl.constexpr, TP: tl.constexpr):
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
    tl.store(IDX + b * K + rank, i.to(tl.int64), mask=(rank < K) & (i < T))


@triton_op("stc::rank_select", mutates_args={})
def rank_select(sim: torch.Tensor, k: int) -> torch.Tensor:
    """sim [B, T] (any float dtype) -> int64 [B, k]: the k least similar tokens of each frame in
    ascending order of similarity, ties to the lower index, NaN last. Equal to
    ``torch.sort(sim, dim=1, stable=True).indices[:, :k]``."""
    if sim.dim() != 2 or not 0 <= k <= sim.shape[1]:
        raise ValueError(f"rank_select: expected sim [B, T] and 0 <= k <= T, got {tuple(sim.shape)} and k={k}")
    b, t = sim.shape
    idx = torch.empty(b, k, dtype=torch.int64, device=sim.device)
    if b == 0 or k == 0:
        return idx
    sim = sim.contiguous()
    block_i = 16
    wrap_triton(_rank_select)[(b, triton.cdiv(t, block_i))](
        sim, idx, t, k, sim.stride(0), BLOCK_I=block_i, TP=triton.next_power_of_2(t), num_warps=4)
    return idx


def supported(dtype: torch.dtype) -> bool:
    """Whether the kernel ranks similarities of this dtype (on a CUDA device: `stc.fast.vit_kernels_supported`)."""
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Attention with the keys split across programs
# ---------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


@triton.jit
def _attention_fwd(Q, K, V, BIAS, OUT, OPART, LPART, Tq, T, H, chunk, qk_scale,
                   stride_qb, stride_qt, stride_kb, stride_kt, stride_vb, stride_vt, stride_ob, stride_ot,
                   D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """One block of queries of one (frame, head) over one chunk of the keys; online softmax in base 2
    (HAS_BIAS: plus each key's bias, [B, T] contiguous, in base e). SPLIT: write the chunk's normalised
    output and log-sum-exp for `_attention_merge`, else the output."""
    bh = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    in_d = d < D
    q = tl.load(Q + b * stride_qb + rows[:, None] * stride_qt + h * D + d[None, :],
                mask=(rows[:, None] < Tq) & in_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, T)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        in_k = cols < hi
        k = tl.load(K + b * stride_kb + cols[None, :] * stride_kt + h * D + d[:, None], mask=in_k[None, :] & in_d[:, None], other=0.0)
        sc = (tl.dot(q, k, input_precision=PRECISION) * qk_scale).to(tl.float32)  # inductor passes the scale as a float64
        if HAS_BIAS:
            sc += tl.load(BIAS + b * T + cols, mask=in_k, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
        sc = tl.where(in_k[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.math.exp2(sc - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + cols[:, None] * stride_vt + h * D + d[None, :], mask=in_k[:, None] & in_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    keep = (rows[:, None] < Tq) & in_d[None, :]
    if SPLIT:
        part = (s * tl.num_programs(1) + bh) * Tq + rows
        tl.store(OPART + part[:, None] * D + d[None, :], acc, mask=keep)
        tl.store(LPART + part, m_i + tl.math.log2(l_i), mask=rows < Tq)
    else:
        tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + h * D + d[None, :], acc.to(OUT.dtype.element_ty), mask=keep)


@triton.jit
def _attention_merge(OUT, OPART, LPART, Tq, H, splits, stride_ob, stride_ot,
                     D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The chunks' outputs of one block of queries of one (frame, head), weighted by their softmax mass."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    keep = (rows[:, None] < Tq) & (d[None, :] < D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    for s in range(0, splits):
        part = (s * tl.num_programs(1) + bh) * Tq + rows
        lse = tl.load(LPART + part, mask=rows < Tq, other=0.0)
        o = tl.load(OPART + part[:, None] * D + d[None, :], mask=keep, other=0.0)
        m_new = tl.maximum(m, lse)
        scale = tl.math.exp2(m - m_new)
        w = tl.math.exp2(lse - m_new)
        acc = acc * scale[:, None] + o * w[:, None]
        total = total * scale + w
        m = m_new
    tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + h * D + d[None, :], (acc / total[:, None]).to(OUT.dtype.element_ty),
             mask=keep)


def attention_plan(batch: int, heads: int, queries: int, keys: int, sms: int = 132) -> tuple[int, int, int]:
    """(block_m, block_n, splits) for `attention`: blocks of 64 queries and 64 keys, and the keys split
    into as many chunks as it takes for about two programs per SM (at most one block of keys each)."""
    block_m, block_n = 64, 64
    programs = triton.cdiv(queries, block_m) * batch * heads
    splits = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(keys, block_n)))
    return block_m, block_n, splits


@triton_op("stc::attention", mutates_args={})
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, key_bias: torch.Tensor | None = None,
              block_m: int = 0, block_n: int = 0, splits: int = 0) -> torch.Tensor:
    """Softmax attention for every head: softmax(scale * q k^T + key_bias) v with q [B, Tq, H * D], k and
    v [B, T, H * D] (each with its last dimension contiguous; rows may be strided, such as column slices
    of one projection GEMM's output), key_bias None or [B, T] (added to every query's logits, as ToMe's
    log sizes) -> [B, Tq, H * D] (contiguous, q's dtype). The keys are split into `splits` chunks with
    one program each per block of queries and head, merged by a second kernel (split-K "flash
    decoding"): a frame's 182 recomputed queries over its 729 keys are 3 blocks x 16 heads, a fraction
    of the SMs without a split. Float32 inputs are multiplied in full float32 (not TF32). block_m,
    block_n, splits: 0 = `attention_plan`'s choice."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"attention: expected q [B, Tq, C], k and v [B, T, C], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, tq, c = q.shape
    t = k.shape[1]
    if (k.shape != (b, t, c) or v.shape != (b, t, c) or heads < 1 or c % heads or q.stride(2) != 1 or k.stride(2) != 1
            or v.stride(2) != 1 or t == 0):
        raise ValueError(f"attention: expected q [B, Tq, C], k and v [B, T, C] (T > 0) with contiguous last dimensions and "
                         f"C divisible by heads={heads}, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if key_bias is not None and key_bias.shape != (b, t):
        raise ValueError(f"attention: expected key_bias [B, T] = {(b, t)}, got {tuple(key_bias.shape)}")
    d = c // heads
    plan = attention_plan(b, heads, tq, t, torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132)
    block_m, block_n, splits = block_m or plan[0], block_n or plan[1], splits or plan[2]
    splits = min(splits, triton.cdiv(t, block_n))
    chunk = triton.cdiv(triton.cdiv(t, splits), block_n) * block_n
    splits = triton.cdiv(t, chunk)  # every chunk holds at least one key
    out = torch.empty(b, tq, c, device=q.device, dtype=q.dtype)
    if b == 0 or tq == 0:
        return out
    grid = (triton.cdiv(tq, block_m), b * heads)
    opart = lpart = out
    if splits > 1:
        opart = torch.empty(splits * b * heads * tq * d, device=q.device, dtype=torch.float32)
        lpart = torch.empty(splits * b * heads * tq, device=q.device, dtype=torch.float32)
    dp = max(16, triton.next_power_of_2(d))
    bias = out if key_bias is None else key_bias.contiguous()
    wrap_triton(_attention_fwd)[grid + (splits,)](
        q, k, v, bias, out, opart, lpart, tq, t, heads, chunk, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        D=d, DP=dp, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=splits > 1, HAS_BIAS=key_bias is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    if splits > 1:
        wrap_triton(_attention_merge)[grid](out, opart, lpart, tq, heads, splits, out.stride(0), out.stride(1),
                                            D=d, DP=dp, BLOCK_M=block_m, num_warps=4)
    return out
