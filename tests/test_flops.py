"""The floor model's counts against brute force: FLOPs counted by torch's FlopCounterMode on real
modules, and bytes from the parameters of the 7B architecture."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from stc.flops import llm_answer_bytes, llm_prefill_flops, llm_weight_bytes, vit_frame_flops
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
