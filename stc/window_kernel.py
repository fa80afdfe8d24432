"""A split-context attention kernel (Triton) for the engine's static KV windows.

`stc.attention.window_attention` calls this; the module needs Triton and is imported only then.

The problem: n new tokens (one frame, 49-196 of them, or one decoded token) attend causally over
the first `used` slots of a window of a few thousand slots, with grouped-query attention (Qwen2-7B:
28 query heads over 4 KV heads). For one stream the natural grid of a FlashAttention kernel, (query
blocks) x (heads), is far smaller than the GPU: 196 queries x 28 heads is 56 blocks of 128 rows on
132 SMs, each walking all 12,544 keys of a 64-frame window. The kernel here

- packs the g = heads / kv_heads query heads that share a KV head into the rows of one block, so a
  block loads each key and value once for all of them (rows are ordered (head in group, query));
- splits the used slots into `splits` equal chunks, one program each, written as partial outputs with
  their log-sum-exp, and a second kernel merges the chunks (split-K "flash decoding", here for
  prefill chunks as well as single tokens);
- reads `used` (and, optionally, `first`) from device tensors, so one CUDA graph serves every step of
  a window: the chunk bounds are computed in the kernel, and slots outside [first, used) are never read
  (a window that advances instead of moving its tokens starts at `first`);
- masks only the blocks that reach the new tokens (query i sees slots <= used - n + i).

All arithmetic of the softmax is float32 in base 2; the output is in the query's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_chunk(q, qk_scale, acc, m_i, l_i, K, V, stride_kl, stride_vl, lo, hi, qpos,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax of q over slots [lo, hi); with MASKED, slot j is kept only if j < hi and
    j <= qpos (per row), and rows that see nothing stay at m = -inf, l = 0."""
    offs_d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(K + cols[None, :] * stride_kl + offs_d[:, None], mask=cols[None, :] < hi, other=0.0)
        else:
            k = tl.load(K + cols[None, :] * stride_kl + offs_d[:, None])
        s = tl.dot(q, k) * qk_scale  # [M, N], in base 2
        if MASKED:
            keep = (cols[None, :] < hi) & (cols[None, :] <= qpos[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V + cols[:, None] * stride_vl + offs_d[None, :], mask=cols[:, None] < hi, other=0.0)
        else:
            v = tl.load(V + cols[:, None] * stride_vl + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _window_fwd(Q, K, V, USED, FIRST, OUT, OPART, LPART,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kl,
                stride_vb, stride_vh, stride_vl, stride_ob, stride_on, stride_oh,
                kv_heads, splits, scale, N, SLOTS,
                G: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, HAS_FIRST: tl.constexpr):
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // kv_heads).to(tl.int64)  # 64-bit offsets: windows of many streams exceed 2**31 elements
    h = pid_bh % kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows (head in group, query)
    valid = rows < G * N
    head = h * G + rows // N
    i = rows % N
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qn + offs_d[None, :],
                mask=valid[:, None], other=0.0)

    used = tl.minimum(tl.maximum(tl.load(USED + b), 0), SLOTS)  # whatever it holds, no slot outside the window is read
    first = 0
    if HAS_FIRST:
        first = tl.minimum(tl.maximum(tl.load(FIRST + b), 0), used)
    context = used - N  # slots before the new tokens; query i sees slots first .. context + i
    chunk = tl.cdiv(tl.cdiv(used - first, splits), BLOCK_N) * BLOCK_N
    lo = first + pid_s * chunk
    hi = tl.minimum(lo + chunk, used)
    # whole blocks before every query's horizon need no mask
    free = lo + tl.maximum(tl.minimum(hi, context + 1) - lo, 0) // BLOCK_N * BLOCK_N
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    acc, m_i, l_i = _attend_chunk(q, scale, acc, m_i, l_i, k_base, v_base, stride_kl, stride_vl, lo, free,
                                  context + i, BLOCK_N, D, False)
    acc, m_i, l_i = _attend_chunk(q, scale, acc, m_i, l_i, k_base, v_base, stride_kl, stride_vl, free, hi,
                                  context + i, BLOCK_N, D, True)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if DIRECT:
        ptr = OUT + b * stride_ob + i[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(ptr, out.to(OUT.dtype.element_ty), mask=valid[:, None])
    else:
        slot = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * (G * N) + rows
        tl.store(OPART + slot[:, None] * D + offs_d[None, :], out, mask=valid[:, None])
        tl.store(LPART + slot, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf")), mask=valid)


@triton.jit
def _window_merge(OUT, OPART, LPART, kv_heads, splits, stride_ob, stride_on, stride_oh, N,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // kv_heads).to(tl.int64)
    h = pid_bh % kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < G * N
    offs_d = tl.arange(0, D)
    per_split = tl.num_programs(1).to(tl.int64) * (G * N)
    base = pid_bh.to(tl.int64) * (G * N) + rows
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(0, splits):
        m = tl.maximum(m, tl.load(LPART + s * per_split + base, mask=valid, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    den = tl.zeros((BLOCK_M,), tl.float32)
    for s in range(0, splits):
        w = tl.math.exp2(tl.load(LPART + s * per_split + base, mask=valid, other=float("-inf")) - m)
        o = tl.load(OPART + (s * per_split + base)[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc += w[:, None] * o
        den += w
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    head = h * G + rows // N
    i = rows % N
    ptr = OUT + b * stride_ob + i[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(ptr, out.to(OUT.dtype.element_ty), mask=valid[:, None])


def supported_head_dim(head_dim: int) -> bool:
    """The kernel's tiles need a power-of-two head size from 16 to 256."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and head_dim <= 256


def plan(batch: int, kv_heads: int, rows: int, slots: int, sms: int) -> dict:
    """Tile sizes and the number of context chunks for `rows` packed query rows per (stream, KV
    head) over a window of `slots`: about one program per SM, and never fewer than two chunks
    (chunks of at least two key blocks). Blocks of 128 rows (frames of 196 tokens) take 128 keys per
    step, and their chunk count is the one of `base` and `base + 1` that fills the last wave of
    programs best (such a program's tiles fill an SM's shared memory, so one runs per SM). Chosen
    from sweeps at Qwen2-7B shapes (`scripts/bench_vit_kernels.py --window-attention
    --window-sweep`): on the H100 (results/latency/h100_window_kernel_sweep.json) the plan for 49
    new tokens is within 4% of the best configuration but at B = 1 (18.0 us against 16.3); on the
    H200, 196 new tokens over 12,544 slots take 316 us at B = 4 and 1259 at B = 16 with this plan,
    against 338 and 1277 with keys 64 at a time in two chunks (h200_window_sweep_*.json)."""
    block_m = 16 if rows <= 16 else 64 if rows <= 512 else 128
    block_n = 128 if block_m == 128 else 64
    blocks = triton.cdiv(rows, block_m) * batch * kv_heads
    cap = max(1, min(slots // (2 * block_n), 64))
    splits = min(max(2, round(sms / blocks)), cap)
    if block_m == 128 and splits < cap:
        def filled(s):  # the share of the last wave's SMs that have a program
            return blocks * s / (triton.cdiv(blocks * s, sms) * sms)
        splits = max((splits, splits + 1), key=lambda s: (filled(s), -s))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "splits": splits,
            "num_warps": 4 if block_m <= 64 else 8, "num_stages": 3}


def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, used: torch.Tensor,
                     scaling: float | None = None, config: dict | None = None,
                     first: torch.Tensor | None = None) -> torch.Tensor:
    """query [b, heads, n, d]; key, value [b, kv_heads, L, d] (any strides, last one 1); used:
    integers [b] on the device, n <= used <= L (not checked: reading it would synchronise; the engine
    guarantees it; the kernel clamps it into [0, L], so a wrong value gives wrong rows, never a read
    outside the window); first: integers [b] on the device, 0 <= first <= used - n (None: 0), the
    first slot attended to (clamped into [0, used]). Returns [b, n, heads, d] in the query's dtype.
    config overrides `plan` (BLOCK_M, BLOCK_N, splits, num_warps, num_stages); the plan counts all
    `used` slots."""
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
        raise ValueError(f"expected query [b, heads, n, d] and key, value [b, kv_heads, L, d], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    b, heads, n, d = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    if key.shape[0] != b or key.shape[3] != d or heads % kv_heads or used.shape != (b,):
        raise ValueError(f"query {tuple(query.shape)}, key/value {tuple(key.shape)} and used {tuple(used.shape)} do not "
                         "match (same streams and head size, heads a multiple of kv_heads, one length per stream)")
    if not (query.dtype == key.dtype == value.dtype) or not supported_head_dim(d):
        raise ValueError(f"needs one dtype for query, key and value and a power-of-two head size from 16 to 256, got "
                         f"{query.dtype}/{key.dtype}/{value.dtype} and {d}")
    g = heads // kv_heads
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("window_attention needs unit stride along the head dimension")
    cfg = plan(b, kv_heads, g * n, slots, _sms(query.device))
    cfg.update(config or {})
    splits = cfg.pop("splits")
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    scale = (scaling if scaling is not None else 1.0 / math.sqrt(d)) * LOG2E
    out = torch.empty(b, n, heads, d, dtype=query.dtype, device=query.device)
    if used.dtype != torch.int32 or not used.is_contiguous():
        used = used.to(torch.int32).contiguous()
    if first is not None:
        if first.shape != (b,):
            raise ValueError(f"first needs one slot per stream, [{b}], got {tuple(first.shape)}")
        if first.dtype != torch.int32 or not first.is_contiguous():
            first = first.to(torch.int32).contiguous()
    grid = (triton.cdiv(g * n, block_m), b * kv_heads, splits)
    if splits == 1:
        part = lse = out  # unused
    else:
        part = torch.empty(splits * b * kv_heads * g * n, d, dtype=torch.float32, device=query.device)
        lse = torch.empty(splits * b * kv_heads * g * n, dtype=torch.float32, device=query.device)
    _window_fwd[grid](query, key, value, used, used if first is None else first, out, part, lse,
                      *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
                      kv_heads, splits, scale, n, slots, G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                      DIRECT=splits == 1, HAS_FIRST=first is not None, **cfg)
    if splits > 1:
        merge_m = 64
        _window_merge[(triton.cdiv(g * n, merge_m), b * kv_heads)](
            out, part, lse, kv_heads, splits, *out.stride()[:3], n, G=g, D=d, BLOCK_M=merge_m, num_warps=4)
    return out


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter (tests on a CPU): plan as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count
