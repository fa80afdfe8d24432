"""Masked grouped-query attention without repeating K/V.

With a mask, transformers' SDPA path expands the 4 KV heads of Qwen2-7B to its 28 query heads
(`repeat_kv`), a 7x copy of the whole context at every layer and step. Packing instead puts the
g = heads / kv_heads query heads that share a KV head into the query length:
q [b, kv_heads, g * n, d] against k, v [b, kv_heads, L, d], with the mask's rows repeated per group.
The result is the same attention, reshaped back.

The function is registered with transformers' `AttentionInterface` as "stc_packed_sdpa" (a pure
function: the registry is transformers' extension point). The engine switches its language model to
it only in the CUDA-graph mode, and back on close. A mask whose row count is already g * n is taken
as packed (the engine builds it once per step instead of once per layer).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

NAME = "stc_packed_sdpa"


def pack_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, 1, n, L] -> [b, 1, groups * n, L], rows ordered (group, query)."""
    return mask.repeat(1, 1, groups, 1)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [b, heads, n, d]; key, value [b, kv_heads, L, d]. Returns ([b, n, heads, d], None)."""
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if attention_mask is None or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    mask = attention_mask if attention_mask.shape[-2] == groups * n else pack_mask(attention_mask, groups)
    q = query.reshape(b, kv_heads, groups * n, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, n, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa)
