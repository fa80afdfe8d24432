"""Attention for the engine's static KV windows, without repeating K/V and without a mask when it can.

Two ways, one result (the engine's CUDA-graph mode switches its language model to this function,
registered with transformers' `AttentionInterface` as "stc_packed_sdpa", and back on close):

- **Packed SDPA with a mask.** With a mask, transformers' SDPA path expands the 4 KV heads of
  Qwen2-7B to its 28 query heads (`repeat_kv`), a 7x copy of the whole context at every layer and
  step. Packing instead puts the g = heads / kv_heads query heads that share a KV head into the
  query length: q [b, kv_heads, g * n, d] against k, v [b, kv_heads, L, d], with the mask's rows
  repeated per group. A mask whose row count is already g * n is taken as packed (the engine builds
  it once per step instead of once per layer).
- **FlashAttention over the used slots, split along the context.** A static window is a buffer
  [b, kv_heads, L, d] whose first `used` slots hold the context and then the n new tokens: the mask
  only hides the unused slots and the new tokens' future. When the engine passes those lengths (the
  keyword `stc_kv_used`, integers [b], a device tensor, so one captured graph serves every step) and
  the tensors suit FlashAttention-2 (CUDA, fp16/bf16, head dim a multiple of 8 up to 256,
  contiguous buffers), `window_attention` runs PyTorch's variable-length FlashAttention-2 with
  `seqused_k` twice, with no mask, no work on unused slots and no copy of K/V:
  - the context (slots before the new tokens), which every new query sees whole: per (stream, KV
    head), its g query heads are packed into the query length (g * n rows of one head, so each K/V
    tile serves them all and few rows are padding), and the context is cut into S chunks, each its
    own sequence, so that a small step (one stream, one frame, or one decoded token) still fills the
    GPU;
  - the new tokens among themselves, causally;
  then merges the S + 1 partial results by their log-sum-exp (float32), which is exact up to
  rounding. The engine passes the lengths only where `flash_window_supported`, and a mask otherwise.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

NAME = "stc_packed_sdpa"
KV_USED = "stc_kv_used"  # keyword the engine passes through the decoder to this function


def pack_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, 1, n, L] -> [b, 1, groups * n, L], rows ordered (group, query)."""
    return mask.repeat(1, 1, groups, 1)


def flash_window_supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether `window_attention` can run: FlashAttention-2 in this PyTorch, on this device and dtype."""
    device = torch.device(device)
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def context_splits(seqs: int, rows: int, sms: int) -> int:
    """S, the chunks the context is cut into: enough (query tile, chunk) pairs for about two per
    multiprocessor, at most 8. seqs: (stream, KV head) pairs; rows: packed query rows per pair."""
    tiles = seqs * -(-rows // _FLASH_ROWS)
    return max(1, min(8, -(-2 * sms // tiles)))


_FLASH_ROWS = 128  # FlashAttention-2's query tile (head dim 128), for sizing the split only


def _flash(q, k, v, cu_q, cu_k, max_q, max_k, causal, used, scale):
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, seqused_k=used)[:2]
    return out, lse


def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, used: torch.Tensor,
                     scaling: float | None = None, splits: int | None = None) -> torch.Tensor:
    """Causal attention of n new queries over the first `used` slots of static windows.

    query [b, heads, n, d] (the newest n tokens, which sit at slots used - n .. used - 1);
    key, value [b, kv_heads, L, d], contiguous; used: integers [b], n <= used <= L. Query i sees slots
    0 .. used - n + i. splits: S, the context chunks (default `context_splits`). Returns [b, n, heads, d].
    """
    b, heads, n, d = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    g = heads // kv_heads
    if not (key.is_contiguous() and value.is_contiguous()):
        raise ValueError("window_attention needs contiguous K/V buffers [b, kv_heads, L, d]")
    dev, i32 = query.device, torch.int32
    seqs, rows = b * kv_heads, g * n
    scale = d**-0.5 if scaling is None else scaling
    k = key.reshape(seqs * slots, 1, d)
    v = value.reshape(seqs * slots, 1, d)
    start = (used.to(i32) - n)[:, None].expand(b, kv_heads).reshape(seqs)  # context length per sequence

    # the context: seqs x S sequences of packed rows (group, token), chunk j = slots [j C, (j + 1) C)
    s_ = splits or context_splits(seqs, rows, torch.cuda.get_device_properties(dev).multi_processor_count)
    chunk = slots // s_
    first = torch.arange(s_, device=dev, dtype=i32) * chunk
    length = torch.cat([first[1:], torch.full((1,), slots, device=dev, dtype=i32)]) - first  # the last takes the rest
    base = torch.arange(seqs, device=dev, dtype=i32)[:, None] * slots
    cu_k = torch.cat([(base + first).reshape(-1), torch.full((1,), seqs * slots, device=dev, dtype=i32)])
    seen = torch.minimum((start[:, None] - first).clamp(min=0), length).reshape(-1)
    q = query.reshape(seqs, 1, rows, d).expand(seqs, s_, rows, d).reshape(seqs * s_ * rows, 1, d)
    cu_q = torch.arange(0, (seqs * s_ + 1) * rows, rows, device=dev, dtype=i32)
    o_ctx, lse_ctx = _flash(q, k, v, cu_q, cu_k, rows, int(slots - (s_ - 1) * chunk), False, seen, scale)

    # the new tokens among themselves, causally: g query heads per KV head
    q_new = query.reshape(seqs, g, n, d).transpose(1, 2).reshape(seqs * n, g, d)
    cu_new = torch.cat([base.reshape(-1) + start, (seqs - 1) * slots + start[-1:] + n])
    o_new, lse_new = _flash(q_new, k, v, torch.arange(0, (seqs + 1) * n, n, device=dev, dtype=i32), cu_new,
                            n, n, True, torch.full((seqs,), n, device=dev, dtype=i32), scale)

    # merge by log-sum-exp; an empty chunk has no keys (its lse is not finite): weight 0
    lse = torch.cat([lse_ctx.view(seqs, s_, g, n), lse_new.view(g, seqs, n).transpose(0, 1)[:, None]], dim=1)
    weight = torch.where(torch.isfinite(lse), lse, float("-inf")).softmax(dim=1)  # [seqs, S + 1, g, n]
    out = (weight[:, :s_, :, :, None] * o_ctx.view(seqs, s_, g, n, d).float()).sum(1)
    out = out + weight[:, s_, :, :, None] * o_new.view(seqs, n, g, d).transpose(1, 2).float()
    return out.view(b, heads, n, d).transpose(1, 2).to(query.dtype)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [b, heads, n, d]; key, value [b, kv_heads, L, d]. Returns ([b, n, heads, d], None)."""
    used = kwargs.pop(KV_USED, None)
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if used is not None:
        if dropout or not (key.is_contiguous() and value.is_contiguous()
                           and flash_window_supported(query.dtype, query.device, d)):
            raise RuntimeError(f"{KV_USED} was passed but FlashAttention cannot run here; pass a mask instead")
        return window_attention(query, key, value, used, scaling), None
    if attention_mask is None or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    mask = attention_mask if attention_mask.shape[-2] == groups * n else pack_mask(attention_mask, groups)
    q = query.reshape(b, kv_heads, groups * n, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, n, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa)
