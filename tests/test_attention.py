"""stc.attention: FlashAttention over the used slots of static windows against a masked float64
reference, and the engine's flash path against its masked path."""

import numpy as np
import pytest
import torch

from stc import attention
from stc.cacher import CacherConfig
from stc.engine import EngineConfig, StreamingEngine
from stc.models import build_model
from stc.pruner import PrunerConfig

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention needs a GPU")


def masked_reference(query, key, value, used):
    """float64, head by head: query i of stream b sees slots 0 .. used[b] - n + i."""
    b, heads, n, d = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    out = torch.empty(b, n, heads, d, dtype=torch.float64)
    for s in range(b):
        for h in range(heads):
            q = query[s, h].double().cpu()
            k = key[s, h // (heads // kv_heads)].double().cpu()
            v = value[s, h // (heads // kv_heads)].double().cpu()
            scores = q @ k.T / d**0.5
            visible = torch.arange(slots)[None, :] <= (int(used[s]) - n + torch.arange(n))[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            out[s, :, h] = scores.softmax(-1) @ v
    return out


def test_flash_path_is_refused_where_it_cannot_run():
    assert not attention.flash_window_supported(torch.bfloat16, "cpu", 128)
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="FlashAttention cannot run here"):
        attention.packed_sdpa(None, q, kv, kv, None, **{attention.KV_USED: torch.tensor([5])})


@gpu
@pytest.mark.parametrize("b,n,used", [(1, 1, [7]), (1, 49, [300]), (1, 49, [49]), (3, 196, [196, 500, 1023]),
                                      (2, 5, [64, 9])])
def test_window_attention_equals_a_masked_reference_on_gpu(b, n, used):
    torch.manual_seed(n)
    heads, kv_heads, slots, d = 28, 4, 1024, 128
    q = torch.randn(b, heads, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, kv_heads, slots, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, kv_heads, slots, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor(used, device="cuda", dtype=torch.int32)
    ref = masked_reference(q, k, v, lengths)
    for s, u in enumerate(used):  # slots past `used` must not be read: poison them
        k[s, :, u:] = float("nan")
        v[s, :, u:] = float("nan")
    out = attention.window_attention(q, k, v, lengths, scaling=d**-0.5)
    assert out.shape == (b, n, heads, d)
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, err


@gpu
@pytest.mark.parametrize("batch", [False, True], ids=["stream", "batch"])
def test_engine_flash_path_equals_its_masked_path_on_gpu(batch, monkeypatch):
    """bf16 tiny model on the GPU: the same frames and questions with FlashAttention over the used
    slots and with the masked packed SDPA give the same KV and answers (up to bf16 rounding)."""
    model, proc = build_model("tiny", seed=0, device="cuda", dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 255, (2, 6, 64, 64, 3)).astype(np.uint8)
    cfg = EngineConfig(retrieve_top_k=2, cuda_graphs=True, n_local=40, cacher=CacherConfig(cache_interval=2),
                       pruner=PrunerConfig(keep_ratio=0.5))
    out = []
    for flash in (True, False):
        if not flash:
            monkeypatch.setattr(attention, "flash_window_supported", lambda *a: False)
        with StreamingEngine(model, proc, cfg) as engine:
            if batch:
                group = engine.open_batch(2)
                for i in range(6):
                    group.push_frames(videos[:, i])
                streams = group.streams
            else:
                streams = [engine.open_stream()]
                for i in range(6):
                    streams[0].push_frames(videos[0, i : i + 1])
            answers = [(s.answer("What moves?", max_new_tokens=4), [blk.kv.clone() for blk in s.blocks]) for s in streams]
            out.append(answers)
    for (a, kva), (b, kvb) in zip(*out):
        torch.testing.assert_close(a.logits, b.logits, atol=5e-2, rtol=5e-2)
        for x, y in zip(kva, kvb):
            torch.testing.assert_close(x, y, atol=5e-2, rtol=5e-2)
