"""RoPE and the KV write of a decoder layer as one Triton kernel, for the engine's static KV windows.

The engine's static windows (`stc.engine`) call this from the fused decoder attention
(`stc.fast.FusedDecoderProjections`); the module needs Triton and is imported only then.

In a captured prefill step, the work between a layer's query/key/value projection and its attention
was four kernels: RoPE on the queries and RoPE on the keys (fused by inductor), then the copies of
the keys and of the values into the window's slots (`index_copy_`, outside the compiled layer),
each a few microseconds of launch latency for a few hundred kilobytes. Here one program per (token,
stream) rotates the token's query and key heads, writes the queries to a new tensor, and the keys
and values straight into the window.

The rotation is computed in float32 and rounded once to the output dtype, as inductor's fused RoPE
does (transformers' eager RoPE rounds each product to the model dtype first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(src, dst, c1, c2, s1, s2, rows, keep, stride_src, stride_dst, d, HALF: tl.constexpr):
    """dst rows = src rows * cos + rotate_half(src rows) * sin, rotate_half(x) = [-x2, x1]."""
    x1 = tl.load(src + rows[:, None] * stride_src + d[None, :], mask=keep, other=0.0).to(tl.float32)
    x2 = tl.load(src + rows[:, None] * stride_src + HALF + d[None, :], mask=keep, other=0.0).to(tl.float32)
    out = dst + rows[:, None] * stride_dst + d[None, :]
    tl.store(out, (x1 * c1[None, :] - x2 * s1[None, :]).to(dst.dtype.element_ty), mask=keep)
    tl.store(out + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(dst.dtype.element_ty), mask=keep)


@triton.jit
def _rope_write(Q, K, V, COS, SIN, SLOTS, QOUT, KW, VW,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_cb, stride_cn, stride_sb, stride_sn, stride_ob, stride_on,
                stride_kwb, stride_kwh, stride_kwl, stride_vwb, stride_vwh, stride_vwl,
                H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr):
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit offsets: windows of many streams exceed 2**31 elements
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    c1 = tl.load(COS + b * stride_cb + i * stride_cn + d).to(tl.float32)
    c2 = tl.load(COS + b * stride_cb + i * stride_cn + HALF + d).to(tl.float32)
    s1 = tl.load(SIN + b * stride_sb + i * stride_sn + d).to(tl.float32)
    s2 = tl.load(SIN + b * stride_sb + i * stride_sn + HALF + d).to(tl.float32)

    h = tl.arange(0, BLOCK_H)  # query heads -> the new tensor [b, n, heads, d]
    _rotate(Q + b * stride_qb + i * stride_qn, QOUT + b * stride_ob + i * stride_on, c1, c2, s1, s2,
            h, (h < H)[:, None], stride_qh, D, d, HALF)

    slot = tl.load(SLOTS + i).to(tl.int64)  # key (rotated) and value heads -> the windows at the slot
    g = tl.arange(0, BLOCK_KV)
    keep = (g < HKV)[:, None]
    _rotate(K + b * stride_kb + i * stride_kn, KW + b * stride_kwb + slot * stride_kwl, c1, c2, s1, s2,
            g, keep, stride_kh, stride_kwh, d, HALF)
    src = V + b * stride_vb + i * stride_vn + g[:, None] * stride_vh + d[None, :]
    dst = VW + b * stride_vwb + slot * stride_vwl + g[:, None] * stride_vwh + d[None, :]
    tl.store(dst, tl.load(src, mask=keep, other=0.0), mask=keep)
    tl.store(dst + HALF, tl.load(src + HALF, mask=keep, other=0.0), mask=keep)


def supported_head_dim(head_dim: int) -> bool:
    """The kernel's tiles need a head size of twice a power of two, from 16 to 512."""
    half = head_dim // 2
    return head_dim % 2 == 0 and 8 <= half <= 256 and half & (half - 1) == 0


def rope_write(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               key_window: torch.Tensor, value_window: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE on a layer's queries and keys, with the keys and values written into windows.

    query [b, heads, n, d], key, value [b, kv_heads, n, d] (any strides: views of a fused projection);
    cos, sin [b or 1, n, d]: transformers' rotary embedding of the tokens' positions; key_window,
    value_window [b, kv_heads, L, d]; slots: integers [n] on the device, distinct and < L (not
    checked: reading them would synchronise). Writes token i's rotated keys and its values at slot
    slots[i] of every stream's windows and returns the rotated queries [b, heads, n, d] (a view of a
    new [b, n, heads, d] tensor). The last dimension of every tensor must have unit stride."""
    if query.dim() != 4 or key.shape != value.shape or key_window.dim() != 4 or key_window.shape != value_window.shape:
        raise ValueError(f"expected query [b, heads, n, d], key, value [b, kv_heads, n, d] and windows [b, kv_heads, L, d], "
                         f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}, "
                         f"{tuple(key_window.shape)}, {tuple(value_window.shape)}")
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    if (key.shape != (b, kv_heads, n, d) or key_window.shape[:2] != (b, kv_heads) or key_window.shape[3] != d
            or slots.shape != (n,)):
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)}, windows {tuple(key_window.shape)} and slots "
                         f"{tuple(slots.shape)} do not match (same streams, tokens and head size, one slot per token)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1:] != (n, d):
            raise ValueError(f"{name} must be [b or 1, n, d] = [{b} or 1, {n}, {d}], got {tuple(t.shape)}")
    if not supported_head_dim(d) or len({query.dtype, key.dtype, value.dtype, key_window.dtype, value_window.dtype}) != 1:
        raise ValueError(f"needs a head size of twice a power of two from 16 to 512 and one dtype for the queries, keys, "
                         f"values and windows, got {d} and {query.dtype}/{key.dtype}/{value.dtype}/{key_window.dtype}/"
                         f"{value_window.dtype}")
    if any(t.stride(-1) != 1 for t in (query, key, value, cos, sin, key_window, value_window)):
        raise ValueError("rope_write needs unit stride along the last dimension")
    out = torch.empty(b, n, heads, d, dtype=query.dtype, device=query.device)
    cb, sb = (t.stride(0) if t.shape[0] == b else 0 for t in (cos, sin))
    _rope_write[(n, b)](query, key, value, cos, sin, slots, out, key_window, value_window,
                        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
                        cb, cos.stride(1), sb, sin.stride(1), out.stride(0), out.stride(1),
                        *key_window.stride()[:3], *value_window.stride()[:3],
                        H=heads, HKV=kv_heads, D=d, BLOCK_H=triton.next_power_of_2(heads),
                        BLOCK_KV=triton.next_power_of_2(kv_heads), num_warps=4)
    return out.transpose(1, 2)


@triton.jit
def _rotate_into(SRC, COS, SIN, DST, n, B,
                 stride_sl, stride_s2, stride_sb, stride_sh, stride_sn,
                 stride_dl, stride_d2, stride_db, stride_dh, stride_dn,
                 HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_lb = tl.program_id(0), tl.program_id(1)
    layer = (pid_lb // B).to(tl.int64)  # 64-bit offsets: windows of many streams exceed 2**31 elements
    b = (pid_lb % B).to(tl.int64)
    HALF: tl.constexpr = D // 2
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = (rows < n)[:, None]
    d = tl.arange(0, HALF)
    c1 = tl.load(COS + rows[:, None] * D + d[None, :], mask=keep, other=0.0)
    c2 = tl.load(COS + rows[:, None] * D + HALF + d[None, :], mask=keep, other=0.0)
    s1 = tl.load(SIN + rows[:, None] * D + d[None, :], mask=keep, other=0.0)
    s2 = tl.load(SIN + rows[:, None] * D + HALF + d[None, :], mask=keep, other=0.0)
    src = SRC + layer * stride_sl + b * stride_sb
    dst = DST + layer * stride_dl + b * stride_db
    for h in range(HKV):
        k = src + h * stride_sh + rows[:, None] * stride_sn + d[None, :]
        x1 = tl.load(k, mask=keep, other=0.0).to(tl.float32)
        x2 = tl.load(k + HALF, mask=keep, other=0.0).to(tl.float32)
        out = dst + h * stride_dh + rows[:, None] * stride_dn + d[None, :]
        tl.store(out, (x1 * c1 - x2 * s1).to(DST.dtype.element_ty), mask=keep)
        tl.store(out + HALF, (x2 * c2 + x1 * s2).to(DST.dtype.element_ty), mask=keep)
        v = src + stride_s2 + h * stride_sh + rows[:, None] * stride_sn + d[None, :]
        out = dst + stride_d2 + h * stride_dh + rows[:, None] * stride_dn + d[None, :]
        tl.store(out, tl.load(v, mask=keep, other=0.0), mask=keep)
        tl.store(out + HALF, tl.load(v + HALF, mask=keep, other=0.0), mask=keep)


def rotate_into(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dst: torch.Tensor) -> None:
    """Write KV tokens rotated to other positions: dst[:, 0] = RoPE of the keys src[:, 0] by the
    rotation (cos, sin) of each token, dst[:, 1] = the values src[:, 1] (the engine's window moving its
    tokens back from their blocks; `stc.engine.StreamingEngine._slide_window`).

    src, dst [layers, 2, streams, kv_heads, n, d] (dst: a view of a window; any strides, the last one
    1; src and dst must not overlap); cos, sin [n, d] float32 (transformers' rotary embedding of
    each token's shift). The rotation is computed in float32 and rounded once, as `rope_write`'s."""
    if src.dim() != 6 or src.shape != dst.shape or src.shape[1] != 2:
        raise ValueError(f"expected src and dst [layers, 2, streams, kv_heads, n, d] alike, got {tuple(src.shape)}, {tuple(dst.shape)}")
    layers, _, b, kv_heads, n, d = src.shape
    if cos.shape != (n, d) or sin.shape != (n, d) or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 [{n}, {d}], got {cos.dtype} {tuple(cos.shape)}, {sin.dtype} {tuple(sin.shape)}")
    if not supported_head_dim(d) or src.dtype != dst.dtype or src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError(f"needs a head size of twice a power of two from 16 to 512, one dtype and unit stride along it, "
                         f"got {d}, {src.dtype}/{dst.dtype}")
    if n == 0 or layers == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    block = 32
    _rotate_into[(triton.cdiv(n, block), layers * b)](src, cos, sin, dst, n, b, *src.stride()[:5], *dst.stride()[:5],
                                                      HKV=kv_heads, D=d, BLOCK_N=block, num_warps=4)
