"""Attention for the engine's static KV windows, without repeating K/V and without a mask when it can.

Two ways, one result (the engine's CUDA-graph mode switches its language model to this function,
registered with transformers' `AttentionInterface` as "stc_packed_sdpa", and back on close):

- **Packed SDPA with a mask.** With a mask, transformers' SDPA path expands the 4 KV heads of
  Qwen2-7B to its 28 query heads (`repeat_kv`), a 7x copy of the whole context at every layer and
  step. Packing instead puts the g = heads / kv_heads query heads that share a KV head into the
  query length: q [b, kv_heads, g * n, d] against k, v [b, kv_heads, L, d], with the mask's rows
  repeated per group. A mask whose row count is already g * n is taken as packed (the engine builds
  it once per step instead of once per layer).
- **No mask, over the used slots.** A static window is a buffer [b, kv_heads, L, d] whose first
  `used` slots hold the context and then the n new tokens: the mask only hides the unused slots and
  the new tokens' future. When the engine passes those lengths (the keyword `stc_kv_used`, int32
  [b], a device tensor, so one captured graph serves every step of a window), `window_attention`
  runs causal attention over the used slots alone, with no mask, no work on unused slots and no
  copy of K/V: `stc.window_kernel` (Triton; it packs the query heads of a KV head into one block
  and splits the context across the GPU), or, where Triton is missing, PyTorch's variable-length
  FlashAttention-2 with `seqused_k` (decoded tokens only: for frames it is no faster than the mask).
  On the H100 at Qwen2-7B shapes the kernel takes 79 us for a 196-token frame over 12,544 slots
  against 327 us masked (FlashAttention-2 374 us), and 20 us for a decoded token (FlashAttention-2
  29 us, masked 261 us): `scripts/bench_vit_kernels.py --window-attention`,
  results/latency/h100_window_kernel.json.
- **A window that starts past slot 0.** A window that advances instead of moving its tokens (its
  init tokens rewritten before its oldest kept token; see `StreamingEngine._slide_window`) starts
  at a later slot: the engine then passes that slot too (`stc_kv_first`, int32 [b]), which only
  the Triton kernel takes.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

NAME = "stc_packed_sdpa"
KV_USED = "stc_kv_used"  # keyword the engine passes through the decoder to this function
KV_FIRST = "stc_kv_first"  # with KV_USED: the first slot attended to


def pack_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, 1, n, L] -> [b, 1, groups * n, L], rows ordered (group, query)."""
    return mask.repeat(1, 1, groups, 1)


def flash_window_supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether `flash_window` can run: FlashAttention-2 in this PyTorch, on this device and dtype."""
    device = torch.device(device)
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def kernel_supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether stc.window_kernel (Triton) can run: Triton installed, a CUDA device, fp16/bf16, and a
    power-of-two head size from 16 to 256."""
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from stc import window_kernel
    except ImportError:
        return False
    return window_kernel.supported_head_dim(head_dim)


def window_supported(dtype: torch.dtype, device: torch.device, head_dim: int, new_tokens: int,
                     first: bool = False) -> bool:
    """Whether `window_attention` can run for steps of `new_tokens` tokens (the engine then passes
    `stc_kv_used` instead of a mask), and with `first`, for windows that start past slot 0."""
    if kernel_supported(dtype, device, head_dim):
        return True
    return new_tokens == 1 and not first and flash_window_supported(dtype, device, head_dim)


def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, used: torch.Tensor,
                     scaling: float | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of n new queries over the used slots of static windows: query
    [b, heads, n, d] (the newest n tokens, at slots used - n .. used - 1); key, value
    [b, kv_heads, L, d]; used: integers [b] on the device, n <= used <= L; first: integers [b] on the
    device, the first slot attended to (None: 0). Query i sees slots first .. used - n + i. Returns
    [b, n, heads, d]. The Triton kernel where it runs, else FlashAttention-2 (which takes no `first`)."""
    if kernel_supported(query.dtype, query.device, query.shape[-1]):
        from stc import window_kernel

        return window_kernel.window_attention(query, key, value, used, scaling, first=first)
    if first is not None:
        raise RuntimeError("a window that starts past slot 0 needs stc.window_kernel (Triton on a CUDA GPU, fp16/bf16)")
    return flash_window(query, key, value, used, scaling)


def flash_window(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, used: torch.Tensor,
                 scaling: float | None = None) -> torch.Tensor:
    """`window_attention` by PyTorch's variable-length FlashAttention-2 (needs contiguous K/V): each
    (stream, KV head) is one sequence with its g query heads, aligned at the end of its used slots."""
    b, heads, n, d = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    g = heads // kv_heads
    if not (key.is_contiguous() and value.is_contiguous()):
        raise ValueError("flash_window needs contiguous K/V buffers [b, kv_heads, L, d]")
    seqs, dev = b * kv_heads, query.device
    q = query.reshape(b, kv_heads, g, n, d).transpose(2, 3).reshape(seqs * n, g, d)
    k = key.reshape(seqs * slots, 1, d)
    v = value.reshape(seqs * slots, 1, d)
    cu_q = torch.arange(0, (seqs + 1) * n, n, dtype=torch.int32, device=dev)
    cu_k = torch.arange(0, (seqs + 1) * slots, slots, dtype=torch.int32, device=dev)
    seen = used.to(torch.int32)[:, None].expand(b, kv_heads).contiguous().view(seqs)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, n, slots, 0.0, True, False, scale=scaling, seqused_k=seen)[0]
    return out.view(b, kv_heads, n, g, d).permute(0, 2, 1, 3, 4).reshape(b, n, heads, d)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [b, heads, n, d]; key, value [b, kv_heads, L, d]. Returns ([b, n, heads, d], None)."""
    used = kwargs.pop(KV_USED, None)
    first = kwargs.pop(KV_FIRST, None)
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if used is not None:
        if dropout or not window_supported(query.dtype, query.device, d, n, first is not None):
            raise RuntimeError(f"{KV_USED} was passed but window_attention cannot run here; pass a mask instead")
        return window_attention(query, key, value, used, scaling, first=first), None
    if first is not None:
        raise ValueError(f"{KV_FIRST} needs {KV_USED}")
    if attention_mask is None or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    mask = attention_mask if attention_mask.shape[-2] == groups * n else pack_mask(attention_mask, groups)
    q = query.reshape(b, kv_heads, groups * n, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, n, d).transpose(1, 2).contiguous(), None


# a graph break in compiled decoder layers (stc.fast.compiled_decoder): the Triton kernel's launch
# reads shapes and plans on the host
AttentionInterface.register(NAME, torch.compiler.disable(packed_sdpa))
