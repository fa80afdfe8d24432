"""Triton kernels for STC-Cacher's selective layer on a GPU (`stc.fast.GraphedVision`).

`stc.cacher.selective_layer(..., kernels=True)` calls these; the module needs Triton and is imported
only then. Both are `torch.library.triton_op`s (``stc::rank_select``, ``stc::selective_attention``),
so `torch.compile` sees through them and CUDA graphs capture them. Their results equal the
PyTorch code of `stc.cacher` (tests: the Triton interpreter on a CPU, and the H100).

One frame of SigLIP-so400m is 729 tokens, and a non-reference frame recomputes 182 of them: at
B = 1 every kernel of the selective layer is bound by its latency, not its work. Two of its stages
cost more than their work suggests (results/latency/h100_vit_kernels.json):

- choosing the dynamic tokens: `torch.topk` of 182 out of 729 takes about 8.5 us, then a gather and
  a scatter of index bookkeeping. `rank_select` is one kernel: each program ranks a block of tokens
  against all of the frame's similarities (rank = how many are smaller, ties to the lower index)
  and writes both the dynamic indices, in rank order, and each token's row among them (-1 if
  static). The ranking is the stable sort's: ``torch.sort(sim, stable=True).indices[:, :k]``.
- attention of the 182 recomputed queries over all 729 keys, with the reference frame's values
  for static tokens: PyTorch needs a full-size copy of the values with the dynamic rows replaced
  (a clone and a scatter), and cuDNN's kernel has only 48 blocks of work for 132 SMs (16 us, as
  long as for 729 queries). `selective_attention` reads each value row from the reference or from
  the recomputed rows through the row map, with no copy, and splits the keys into chunks when the
  grid is small, merging them in a second kernel (as `stc.window_kernel` does for the LLM).

Head sizes that are not a power of two (SigLIP's 72) are padded to one inside the kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

LOG2E = 1.4426950408889634


@triton.jit
def _rank_select(SIM, IDX, POS, T, K, stride_sb, BLOCK_I: tl.constexpr, TP: tl.constexpr):
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
    dyn = (rank < K) & (i < T)
    tl.store(IDX + b * K + rank, i.to(tl.int64), mask=dyn)
    tl.store(POS + b * T + i, tl.where(dyn, rank, -1), mask=i < T)


@triton_op("stc::rank_select", mutates_args={})
def rank_select(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sim [B, T] (any float dtype) -> (idx int64 [B, k]: the k least similar tokens of each frame in
    ascending order of similarity, ties to the lower index; pos int32 [B, T]: each token's row in idx,
    or -1). Equal to ``torch.sort(sim, dim=1, stable=True).indices[:, :k]`` (NaN ranks last)."""
    if sim.dim() != 2 or not 0 <= k <= sim.shape[1]:
        raise ValueError(f"rank_select: expected sim [B, T] and 0 <= k <= T, got {tuple(sim.shape)} and k={k}")
    b, t = sim.shape
    idx = torch.empty(b, k, dtype=torch.int64, device=sim.device)
    pos = torch.empty(b, t, dtype=torch.int32, device=sim.device)
    if b == 0 or t == 0:
        return idx, pos
    sim = sim.contiguous()
    block_i = 16
    wrap_triton(_rank_select)[(b, triton.cdiv(t, block_i))](
        sim, idx, pos, t, k, sim.stride(0), BLOCK_I=block_i, TP=triton.next_power_of_2(t), num_warps=4)
    return idx, pos


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: full-precision products, not TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _selective_fwd(Q, K, VREF, VDYN, POS, OUT, OPART, LPART,
                   stride_qb, stride_qn, stride_kb, stride_kn, stride_rb, stride_rn,
                   stride_db, stride_dn, stride_pb, stride_ob, stride_on,
                   T, N, H, splits, scale, head_dim,
                   D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DIRECT: tl.constexpr, IEEE: tl.constexpr):
    # A head of size D is two tiles: DA (a power of two) and, if D > DA, the rest padded to DB, so
    # that SigLIP's 72 computes on 64 + 16 columns, not 128.
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < N
    da = tl.arange(0, DA)
    # the masks compare with the runtime head_dim (= D): against the constant D, Triton 3.6 took
    # the tail mask as constant over the 16 columns and read past the head (wrong values on the H100)
    dam = da < head_dim  # all true unless D < 16
    db = DA + tl.arange(0, DB)
    dbm = db < head_dim
    q_ptr = Q + b * stride_qb + rows[:, None] * stride_qn + h * D
    qa = tl.load(q_ptr + da[None, :], mask=valid[:, None] & dam[None, :], other=0.0)
    qb = tl.load(q_ptr + db[None, :], mask=valid[:, None] & dbm[None, :], other=0.0)
    chunk = tl.cdiv(tl.cdiv(T, splits), BLOCK_N) * BLOCK_N
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, T)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_a = tl.zeros((BLOCK_M, DA), tl.float32)
    acc_b = tl.zeros((BLOCK_M, DB), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cm = cols < hi
        k_ptr = K + b * stride_kb + cols[None, :] * stride_kn + h * D
        s = _dot(qa, tl.load(k_ptr + da[:, None], mask=cm[None, :] & dam[:, None], other=0.0), IEEE)
        if DA < D:
            s += _dot(qb, tl.load(k_ptr + db[:, None], mask=cm[None, :] & dbm[:, None], other=0.0), IEEE)
        s = tl.where(cm[None, :], (s * scale).to(tl.float32), float("-inf"))  # base 2; inductor passes scale as float64
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        row = tl.load(POS + b * stride_pb + cols, mask=cm, other=-1)
        ref = cm & (row < 0)
        dyn = row >= 0
        r_ptr = VREF + b * stride_rb + cols[:, None] * stride_rn + h * D
        d_ptr = VDYN + b * stride_db + row[:, None].to(tl.int64) * stride_dn + h * D
        va = (tl.load(r_ptr + da[None, :], mask=ref[:, None] & dam[None, :], other=0.0)
              + tl.load(d_ptr + da[None, :], mask=dyn[:, None] & dam[None, :], other=0.0))
        acc_a = acc_a * alpha[:, None] + _dot(p, va, IEEE)
        if DA < D:
            vb = (tl.load(r_ptr + db[None, :], mask=ref[:, None] & dbm[None, :], other=0.0)
                  + tl.load(d_ptr + db[None, :], mask=dyn[:, None] & dbm[None, :], other=0.0))
            acc_b = acc_b * alpha[:, None] + _dot(p, vb, IEEE)
        m_i = m_new
    # every chunk holds at least one key (`plan`), so l_i > 0
    if DIRECT:
        o_ptr = OUT + b * stride_ob + rows[:, None] * stride_on + h * D
        tl.store(o_ptr + da[None, :], (acc_a / l_i[:, None]).to(OUT.dtype.element_ty), mask=valid[:, None] & dam[None, :])
        if DA < D:
            tl.store(o_ptr + db[None, :], (acc_b / l_i[:, None]).to(OUT.dtype.element_ty), mask=valid[:, None] & dbm[None, :])
    else:
        slot = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * N + rows
        tl.store(OPART + slot[:, None] * (DA + DB) + da[None, :], acc_a / l_i[:, None], mask=valid[:, None])
        tl.store(OPART + slot[:, None] * (DA + DB) + db[None, :], acc_b / l_i[:, None], mask=valid[:, None])
        tl.store(LPART + slot, m_i + tl.math.log2(l_i), mask=valid)


@triton.jit
def _selective_merge(OUT, OPART, LPART, stride_ob, stride_on, N, H, splits, head_dim, width,
                     D: tl.constexpr, W: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr):
    # head_dim = D and width = W at run time, for the masks (see _selective_fwd)
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < N
    d = tl.arange(0, DP)
    per_split = tl.num_programs(1).to(tl.int64) * N
    base = pid_bh.to(tl.int64) * N + rows
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(0, splits):
        m = tl.maximum(m, tl.load(LPART + s * per_split + base, mask=valid, other=0.0))
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    den = tl.zeros((BLOCK_M,), tl.float32)
    for s in range(0, splits):
        w = tl.math.exp2(tl.load(LPART + s * per_split + base, mask=valid, other=0.0) - m)
        acc += w[:, None] * tl.load(OPART + (s * per_split + base)[:, None] * W + d[None, :],
                                    mask=valid[:, None] & (d < width)[None, :], other=0.0)
        den += w
    tl.store(OUT + b * stride_ob + rows[:, None] * stride_on + h * D + d[None, :],
             (acc / den[:, None]).to(OUT.dtype.element_ty), mask=valid[:, None] & (d < head_dim)[None, :])


@functools.cache
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter (tests on a CPU): plan as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(batch: int, heads: int, queries: int, keys: int, sms: int, block_m: int = 64, splits: int | None = None) -> dict:
    """Tiles and key chunks for `queries` rows per (frame, head) over `keys` keys: about one program
    per SM, chunks of at least two key blocks (`splits` overrides the count, for sweeps; it is still
    lowered until no chunk is empty)."""
    block_n = 64
    blocks = triton.cdiv(queries, block_m) * batch * heads
    if splits is None:
        splits = min(round(sms / blocks), keys // (2 * block_n), 16)
    splits = max(1, splits)
    while splits > 1 and (splits - 1) * triton.cdiv(triton.cdiv(keys, splits), block_n) * block_n >= keys:
        splits -= 1  # the kernel's chunks, rounded up to whole key blocks: none may be empty
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "splits": splits, "num_warps": 4, "num_stages": 2}


@triton_op("stc::selective_attention", mutates_args={})
def selective_attention(query: torch.Tensor, key: torch.Tensor, value_ref: torch.Tensor, value_dyn: torch.Tensor,
                        pos: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Attention of the recomputed tokens over all tokens of a frame, heads side by side in the channels.

    query [B, N, C] (the N recomputed tokens), key [B, T, C] (every token's current key), value_ref
    [B or 1, T, C] (the reference frame's values), value_dyn [B, N, C] (the recomputed tokens' values),
    pos int32 [B, T] (each token's row in value_dyn, or -1: its value is the reference's), C = heads
    * head size; last strides 1. Returns softmax(scale * q k^T) v_full [B, N, C] in the query's dtype,
    where v_full is value_ref with the rows of pos >= 0 replaced, as `stc.cacher.selective_layer`.
    """
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"selective_attention: expected query [B, N, C] and key [B, T, C], got {tuple(query.shape)}, {tuple(key.shape)}")
    b, n, c = query.shape
    t = key.shape[1]
    if (key.shape != (b, t, c) or value_ref.shape not in ((b, t, c), (1, t, c)) or value_dyn.shape != (b, n, c)
            or pos.shape != (b, t) or pos.dtype != torch.int32 or heads < 1 or c % heads):
        raise ValueError(f"selective_attention: query {tuple(query.shape)}, key {tuple(key.shape)}, value_ref "
                         f"{tuple(value_ref.shape)}, value_dyn {tuple(value_dyn.shape)}, pos {tuple(pos.shape)} "
                         f"{pos.dtype} and {heads} heads do not fit")
    if not (query.dtype == key.dtype == value_ref.dtype == value_dyn.dtype) or c // heads > 256:
        raise ValueError(f"selective_attention needs one dtype for query, key and values and a head size of at most "
                         f"256, got {query.dtype}/{key.dtype}/{value_ref.dtype}/{value_dyn.dtype} and {c // heads}")
    if any(x.stride(-1) != 1 for x in (query, key, value_ref, value_dyn)):
        raise ValueError("selective_attention needs unit stride along the channels")
    return launch(query, key, value_ref, value_dyn, pos, heads, scale, plan(b, heads, n, t, _sms(query.device)))


def launch(query, key, value_ref, value_dyn, pos, heads: int, scale: float, config: dict) -> torch.Tensor:
    """`selective_attention` with the tiles and chunks of `config` (as `plan` returns; for sweeps),
    arguments not checked."""
    b, n, c = query.shape
    t = key.shape[1]
    d = c // heads
    out = torch.empty(b, n, c, dtype=query.dtype, device=query.device)
    if b == 0 or n == 0:
        return out
    value_ref = value_ref.expand(b, t, c)
    cfg = dict(config)
    splits, block_m = cfg.pop("splits"), cfg["BLOCK_M"]
    grid = (triton.cdiv(n, block_m), b * heads, splits)
    da = max(16, 1 << (d.bit_length() - 1))  # the largest power of two <= d (16 at least)
    db = max(16, triton.next_power_of_2(d - da)) if d > da else 16
    if splits == 1:
        part = lse = out  # unused
    else:  # partial rows of da + db columns, column c of a row being column c of the head
        part = torch.empty(splits * b * heads * n, da + db, dtype=torch.float32, device=query.device)
        lse = torch.empty(splits * b * heads * n, dtype=torch.float32, device=query.device)
    wrap_triton(_selective_fwd)[grid](
        query, key, value_ref, value_dyn, pos, out, part, lse,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value_ref.stride(0), value_ref.stride(1),
        value_dyn.stride(0), value_dyn.stride(1), pos.stride(0), out.stride(0), out.stride(1),
        t, n, heads, splits, scale * LOG2E, d, D=d, DA=da, DB=db, DIRECT=splits == 1, IEEE=query.dtype == torch.float32, **cfg)
    if splits > 1:
        merge_m = 64
        wrap_triton(_selective_merge)[(triton.cdiv(n, merge_m), b * heads)](
            out, part, lse, out.stride(0), out.stride(1), n, heads, splits, d, da + db, D=d, W=da + db,
            DP=triton.next_power_of_2(da + db), BLOCK_M=merge_m, num_warps=4)
    return out


def supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether these kernels can run for a tower: a CUDA device, fp16/bf16/fp32, head size <= 256."""
    return torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim <= 256


