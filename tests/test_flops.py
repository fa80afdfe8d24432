"""The floor model's counts against brute force: FLOPs counted by torch's FlopCounterMode on real
modules, and bytes from the parameters of the 7B architecture."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stc.flops import (llm_answer_bytes, llm_prefill_floor_ms, llm_prefill_flops, llm_weight_bytes, vit_floor_ms, vit_floors_ms,
                       vit_frame_flops, vit_weight_bytes)
from stc.models import architecture_config, build_model


def counted(fn) -> int:
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


def test_vit_and_prefill_flops_equal_counted_flops():
    model, _ = build_model("tiny", attn_implementation="eager")  # attention as plain matmuls, which are counted
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    pixels = torch.randn(1, 3, vcfg.image_size, vcfg.image_size)
    tower = model.model.vision_tower
    patches = counted(lambda: tower.embeddings(pixels))
    with torch.no_grad():
        total = counted(lambda: tower(pixels))
    assert total - patches == vit_frame_flops(vcfg)  # the encoder layers (no head in LLaVA-OV's tower)
    embeds = torch.randn(1, 10, tcfg.hidden_size)
    with torch.no_grad():
        lm = counted(lambda: model.model.language_model(inputs_embeds=embeds))
    # counted attention is the full 10 x 10 square (masked); the model counts the causal half
    square = 2 * tcfg.num_hidden_layers * 2 * 10 * 10 * tcfg.hidden_size
    causal = 2 * tcfg.num_hidden_layers * 2 * 10 * (10 + 1) / 2 * tcfg.hidden_size
    assert lm - square == llm_prefill_flops(tcfg, 10, past_tokens=0) - causal


def test_weight_and_answer_bytes_equal_the_7b_parameters():
    model, _ = build_model("llava-ov-7b", device="meta")
    tcfg = architecture_config("llava-ov-7b").text_config
    layers = model.model.language_model.layers
    linear = sum(p.numel() for n, p in layers.named_parameters() if n.endswith("proj.weight"))
    assert llm_weight_bytes(tcfg) == 2 * linear
    head = model.lm_head.weight.numel()
    kv_per_token = 2 * len(layers) * tcfg.num_key_value_heads * (tcfg.hidden_size // tcfg.num_attention_heads)
    # 16 tokens: retrieval pass + prompt + 15 decode steps read the weights; 16 passes yield logits and read the KV
    want = 2 * (17 * linear + 16 * head + 16 * kv_per_token * 3000)
    assert llm_answer_bytes(tcfg, 16, 3000) == want
    assert llm_answer_bytes(tcfg, 1, 3000) == 2 * (2 * linear + head + kv_per_token * 3000)


def test_vit_weight_bytes_equal_the_7b_encoder_layers():
    model, _ = build_model("llava-ov-7b", device="meta")
    layers = model.model.vision_tower.encoder.layers
    weights = sum(p.numel() for n, p in layers.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert vit_weight_bytes(architecture_config("llava-ov-7b").vision_config) == 2 * weights


RATES = {"matmul_flops": 800e12, "copy_bytes_per_s": 3e12}  # about an H100's measured rates


def test_prefill_floor_is_the_mean_of_its_steps_floors():
    """Brute force: step i prefills n tokens per stream after i * n (at most the window), its floor the
    larger of its FLOP time and the weights' read, the batch sharing one read; the floor of a mean over
    the first c steps is the mean of theirs."""
    tcfg = architecture_config("llava-ov-7b").text_config
    weights_ms = llm_weight_bytes(tcfg) / RATES["copy_bytes_per_s"] * 1e3

    def step(n, past, batch):
        return max(batch * llm_prefill_flops(tcfg, n, past) / RATES["matmul_flops"] * 1e3, weights_ms) / batch

    for n, frames, batch, window in ((196, 64, 4, None), (49, 64, 16, None), (196, 16, 1, None), (196, 100, 4, 15000)):
        past = [i * n if window is None else min(i * n, window) for i in range(frames)]
        want = sum(step(n, p, batch) for p in past) / frames
        assert llm_prefill_floor_ms(tcfg, RATES, n, frames, batch, window=window) == pytest.approx(want, rel=1e-12)
    # where the FLOPs bound (196 tokens, B = 4) the last step's floor is above the mean's by far; where the
    # weights' read bounds every step (49 tokens, B = 4) they are one
    last = step(196, 63 * 196, 4)
    assert llm_prefill_floor_ms(tcfg, RATES, 196, 64, 4) < 0.9 * last
    assert llm_prefill_floor_ms(tcfg, RATES, 49, 64, 4) == pytest.approx(weights_ms / 4) == pytest.approx(step(49, 63 * 49, 4))
    # a window of no past: every step as the first; fp32 weights read twice the bytes
    assert llm_prefill_floor_ms(tcfg, RATES, 196, 64, 4, window=0) == pytest.approx(step(196, 0, 4))
    assert llm_prefill_floor_ms(tcfg, RATES, 8, 4, 1, bytes_per_param=4) == pytest.approx(2 * weights_ms)
    for bad in ((0, 64, 1), (196, 0, 1), (196, 64, 0)):
        with pytest.raises(ValueError, match="at least 1"):
            llm_prefill_floor_ms(tcfg, RATES, *bad)


def test_vit_floor_per_step_and_over_the_cachers_cycle():
    vcfg = architecture_config("llava-ov-7b").vision_config
    weights_ms = vit_weight_bytes(vcfg) / RATES["copy_bytes_per_s"] * 1e3
    full_ms = vit_frame_flops(vcfg) / RATES["matmul_flops"] * 1e3
    selective_ms = vit_frame_flops(vcfg, recomputed=182) / RATES["matmul_flops"] * 1e3  # floor(729 * 0.25)
    assert selective_ms < weights_ms < full_ms  # one selective frame is bound by the weights' read here
    assert vit_floor_ms(vcfg, RATES) == pytest.approx(full_ms)
    assert vit_floor_ms(vcfg, RATES, cache_interval=4) == pytest.approx((full_ms + 3 * weights_ms) / 4)
    assert vit_floor_ms(vcfg, RATES, cache_interval=float("inf")) == pytest.approx(weights_ms)
    # 16 streams share each step's read: the FLOPs bound both kinds of step
    assert vit_floor_ms(vcfg, RATES, batch=16, cache_interval=4) == pytest.approx((full_ms + 3 * selective_ms) / 4)
    assert vit_floor_ms(vcfg, RATES, batch=16, cache_interval=2, reuse_ratio=0.5) == pytest.approx(
        (full_ms + vit_frame_flops(vcfg, recomputed=364) / RATES["matmul_flops"] * 1e3) / 2)
    # the pair a full-vs-Cacher run stands against
    assert vit_floors_ms(vcfg, RATES, 4, 0.75, batch=16) == pytest.approx((full_ms, (full_ms + 3 * selective_ms) / 4))
    with pytest.raises(ValueError, match="batch"):
        vit_floor_ms(vcfg, RATES, batch=0)
