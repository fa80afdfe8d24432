"""Analytic FLOP counts, for the floor model of the latency benchmarks (2 FLOPs per multiply-add).

floor(stage) = max(FLOPs / measured matmul rate, weight bytes / measured copy bandwidth) (+ attention
over the past, which the FLOP count includes), per step: B synchronised streams share one read of the
weights. A stage measured as a mean over frames has the mean of its steps' floors as its floor
(`vit_floor_ms`, `llm_prefill_floor_ms`).
"""

from __future__ import annotations

import math

VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per weight of each dtype name the benchmarks take


def vit_layer_flops(tokens: int, dim: int, mlp_dim: int, recomputed: int | None = None, reuse: str = "attn+mlp") -> float:
    """One SigLIP/CLIP encoder layer for one frame; `recomputed` = k dynamic tokens (None = full layer).

    Full: q, k, v, out projections (4 T D^2 MACs), attention (2 T^2 D), MLP (2 T D M).
    STC-Cacher (attn+mlp): k projection for all T; q, v, out for k tokens; attention k x T; MLP for k.
    """
    t, d, m = tokens, dim, mlp_dim
    if recomputed is None:
        return 2 * (4 * t * d * d + 2 * t * t * d + 2 * t * d * m)
    k = recomputed
    attn_rows = t if reuse == "mlp" else k
    mlp_rows = t if reuse == "attn" else k
    macs = t * d * d  # keys of every token (the selection needs them)
    macs += 3 * attn_rows * d * d  # q, v and out projections
    macs += 2 * attn_rows * t * d  # QK^T and AV
    macs += 2 * mlp_rows * d * m
    return 2 * macs


def vit_frame_flops(vision_config, recomputed: int | None = None, reuse: str = "attn+mlp") -> float:
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    return vision_config.num_hidden_layers * vit_layer_flops(
        tokens, vision_config.hidden_size, vision_config.intermediate_size, recomputed, reuse
    )


def _cacher_cycle(vision_config, cache_interval: float, reuse_ratio: float, per_frame) -> float:
    """Mean of per_frame(recomputed) over STC-Cacher's cycle of N frames: one full (recomputed None) and
    N - 1 recomputing floor(T * (1 - R)) tokens; N = inf: the selective frames alone."""
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    selective = per_frame(math.floor(round(tokens * (1 - reuse_ratio), 9)))
    if math.isinf(cache_interval):
        return selective
    n = int(cache_interval)
    return (per_frame(None) + (n - 1) * selective) / n


def vit_stream_flops_per_frame(vision_config, cache_interval: float, reuse_ratio: float) -> float:
    """Mean ViT FLOPs per frame of a long stream with STC-Cacher (one full frame every N)."""
    return _cacher_cycle(vision_config, cache_interval, reuse_ratio, lambda k: vit_frame_flops(vision_config, k))


def vit_weight_bytes(vision_config, bytes_per_param: int = 2) -> float:
    """Bytes of encoder-layer weights read by one forward step (the patch and position embeddings excluded)."""
    d, m = vision_config.hidden_size, vision_config.intermediate_size
    return vision_config.num_hidden_layers * (4 * d * d + 2 * d * m) * bytes_per_param


def _step_ms(flops: float, weight_bytes: float, rates: dict) -> float:
    return max(flops / rates["matmul_flops"], weight_bytes / rates["copy_bytes_per_s"]) * 1e3


def vit_floor_ms(vision_config, rates: dict, batch: int = 1, cache_interval: float | None = None,
                 reuse_ratio: float = 0.75, bytes_per_param: int = 2) -> float:
    """Floor of the ViT's mean ms per frame for `batch` synchronised streams, one frame each per step:
    max(FLOPs / rates["matmul_flops"], weight bytes / rates["copy_bytes_per_s"]) per step, over the batch.
    With cache_interval N, STC-Cacher's cycle: one full step and N - 1 selective ones (recomputing
    floor(T * (1 - reuse_ratio)) tokens), their mean; N = inf: selective steps only."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    weights = vit_weight_bytes(vision_config, bytes_per_param)

    def per_frame(recomputed: int | None) -> float:
        return _step_ms(batch * vit_frame_flops(vision_config, recomputed), weights, rates) / batch

    if cache_interval is None:
        return per_frame(None)
    return _cacher_cycle(vision_config, cache_interval, reuse_ratio, per_frame)


def vit_floors_ms(vision_config, rates: dict, cache_interval: float, reuse_ratio: float, batch: int = 1,
                  bytes_per_param: int = 2) -> tuple[float, float]:
    """The floors a full-vs-Cacher ViT measurement stands against (`vit_floor_ms`), ms per frame: the
    full encoder's, and the mean over the Cacher's cycle with this cache interval and reuse ratio."""
    both = dict(batch=batch, bytes_per_param=bytes_per_param)
    return (vit_floor_ms(vision_config, rates, **both),
            vit_floor_ms(vision_config, rates, cache_interval=cache_interval, reuse_ratio=reuse_ratio, **both))


def head_dim(text_config) -> int:
    """The decoder's attention head size (its config's head_dim, else hidden size / heads)."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def llm_weight_bytes(text_config, bytes_per_param: int = 2) -> float:
    """Bytes of decoder weights read by one forward step (embeddings excluded, lm_head excluded)."""
    d, m, L = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    kv = text_config.num_key_value_heads * head_dim(text_config)
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * m  # q, o; k, v; gate, up, down
    return L * per_layer * bytes_per_param


def llm_prefill_flops(text_config, new_tokens: int, past_tokens: int) -> float:
    """Decoder FLOPs to prefill new_tokens after past_tokens (projections, MLP, attention)."""
    d, L = text_config.hidden_size, text_config.num_hidden_layers
    macs_weights = llm_weight_bytes(text_config, 1) * new_tokens
    ctx = past_tokens + (new_tokens + 1) / 2  # causal within the new tokens
    macs_attn = L * 2 * new_tokens * ctx * d
    return 2 * (macs_weights + macs_attn)


def llm_prefill_floor_ms(text_config, rates: dict, tokens: int, frames: int, batch: int = 1,
                         window: int | None = None, bytes_per_param: int = 2) -> float:
    """Floor of the mean prefill ms per stream-frame over a run's first `frames` steps, each prefilling
    `tokens` per stream for `batch` synchronised streams after the steps before it (step i: i * tokens
    of past, at most `window`): the mean over the steps of max(FLOPs / rates["matmul_flops"], weight
    bytes / rates["copy_bytes_per_s"]), over the batch. The FLOPs grow with the past, so this is below
    the last step's floor wherever the FLOPs bound."""
    if frames < 1 or batch < 1 or tokens < 1:
        raise ValueError(f"frames, batch and tokens must be at least 1, got {frames}, {batch} and {tokens}")
    weights = llm_weight_bytes(text_config, bytes_per_param)
    steps = (_step_ms(batch * llm_prefill_flops(text_config, tokens, i * tokens if window is None else min(i * tokens, window)),
                      weights, rates) for i in range(frames))
    return sum(steps) / frames / batch


def llm_answer_bytes(text_config, new_tokens: int, context_tokens: int, bytes_per_value: int = 2) -> float:
    """Bytes an answer of new_tokens greedy tokens must read at least: the retrieval pass, the prompt's
    pass and each of the new_tokens - 1 decode steps (the last token is not fed back) read the decoder
    weights; the prompt's pass and each decode step also read lm_head (for logits) and the KV of the
    context_tokens attended to. Their FLOPs are negligible next to these reads."""
    d, L = text_config.hidden_size, text_config.num_hidden_layers
    decode_steps = max(0, new_tokens - 1)
    weights = llm_weight_bytes(text_config, bytes_per_value) * (2 + decode_steps)
    head = text_config.vocab_size * d * bytes_per_value * (1 + decode_steps)
    kv = L * 2 * text_config.num_key_value_heads * head_dim(text_config) * bytes_per_value * context_tokens * (1 + decode_steps)
    return weights + head + kv
