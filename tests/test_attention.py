"""stc.attention and stc.window_kernel: attention over the used slots of static windows (the Triton
split-context kernel, FlashAttention-2) against a masked float64 reference, and the engine's
mask-free path against its masked path."""

import numpy as np
import pytest
import torch

from stc import attention
from stc.cacher import CacherConfig
from stc.engine import EngineConfig, StreamingEngine
from stc.models import build_model
from stc.pruner import PrunerConfig
from tests.triton_interpreter import run_in_triton_interpreter

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels and FlashAttention need a GPU")


def masked_reference(query, key, value, used, scaling=None, first=None):
    """float64, head by head: query i of stream b sees slots first[b] .. used[b] - n + i (first: 0 if None)."""
    b, heads, n, d = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    out = torch.empty(b, n, heads, d, dtype=torch.float64)
    for s in range(b):
        for h in range(heads):
            q = query[s, h].double().cpu()
            k = key[s, h // (heads // kv_heads)].double().cpu()
            v = value[s, h // (heads // kv_heads)].double().cpu()
            scores = q @ k.T * (d**-0.5 if scaling is None else scaling)
            visible = torch.arange(slots)[None, :] <= (int(used[s]) - n + torch.arange(n))[:, None]
            visible &= torch.arange(slots)[None, :] >= (0 if first is None else int(first[s]))
            scores = scores.masked_fill(~visible, float("-inf"))
            out[s, :, h] = scores.softmax(-1) @ v
    return out


def test_mask_free_path_is_refused_where_it_cannot_run():
    assert not attention.window_supported(torch.bfloat16, "cpu", 128, 1)
    assert not attention.flash_window_supported(torch.bfloat16, "cpu", 128)
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="window_attention cannot run here"):
        attention.packed_sdpa(None, q, kv, kv, None, **{attention.KV_USED: torch.tensor([5])})
    with pytest.raises(ValueError, match="stc_kv_first needs stc_kv_used"):
        attention.packed_sdpa(None, q, kv, kv, None, **{attention.KV_FIRST: torch.tensor([2])})
    with pytest.raises(RuntimeError, match="needs stc.window_kernel"):
        attention.window_attention(q, kv, kv, torch.tensor([5]), first=torch.tensor([2]))


@gpu
@pytest.mark.parametrize("b,n,used", [(1, 1, [7]), (1, 49, [300]), (1, 49, [49]), (3, 196, [196, 500, 1023]),
                                      (2, 5, [64, 9])])
@pytest.mark.parametrize("path", ["window_attention", "flash_window"])
def test_window_attention_equals_a_masked_reference_on_gpu(b, n, used, path):
    torch.manual_seed(n)
    heads, kv_heads, slots, d = 28, 4, 1024, 128
    q = torch.randn(b, heads, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, kv_heads, slots, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, kv_heads, slots, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor(used, device="cuda", dtype=torch.int32)
    ref = masked_reference(q, k, v, lengths)
    _poison(k, v, lengths)
    out = getattr(attention, path)(q, k, v, lengths, scaling=d**-0.5)
    assert out.shape == (b, n, heads, d)
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, err


KERNEL_CASES = [  # (streams, heads, kv_heads, new tokens, slots, head dim, used per stream, tiles or None)
    (1, 4, 2, 5, 100, 16, [37], None),
    (2, 6, 2, 9, 300, 32, [250, 9], None),  # a stream whose window holds only its new tokens
    (2, 6, 2, 9, 300, 32, [250, 31], {"splits": 1}),  # no merge: the kernel writes the output itself
    (1, 2, 1, 1, 200, 16, [150], None),  # a decoded token
    (3, 4, 4, 20, 128, 16, [128, 64, 20], {"splits": 3, "BLOCK_M": 16, "BLOCK_N": 16}),  # chunks without keys
    (1, 7, 1, 3, 256, 16, [200], {"splits": 7, "BLOCK_M": 16, "BLOCK_N": 16}),  # chunks inside the new tokens
    (1, 8, 1, 20, 400, 16, [390], {"splits": 3, "BLOCK_M": 128, "BLOCK_N": 128}),  # a frame's tiles; the last chunk empty
]


def test_window_plan_fills_the_gpu_with_the_swept_tiles():
    """The plan's tiles at the engine's Qwen2-7B shapes (28 query heads over 4 KV heads, a 15,744-slot
    window, 132 SMs) are the sweeps' best or within 1% of it (results/latency/h200_window_sweep_*.json),
    and every plan keeps chunks of at least two key blocks."""
    from stc.window_kernel import plan

    frame = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    for b in (1, 4, 16):  # 196 new tokens: three chunks, 132, 528 and 2112 programs (whole waves)
        assert plan(b, 4, 7 * 196, 15744, 132) == {**frame, "splits": 3}
    assert plan(4, 4, 7 * 49, 15744, 132) == {"BLOCK_M": 64, "BLOCK_N": 64, "splits": 2, "num_warps": 4,
                                              "num_stages": 3}
    assert plan(1, 4, 7, 15744, 132)["BLOCK_M"] == 16
    assert plan(2, 4, 7 * 196, 15744, 100)["splits"] == 2  # 88 blocks: 2 and 3 chunks fill their last waves alike, the fewer
    for b, rows, slots in [(1, 1372, 300), (1, 7, 100), (64, 1372, 15744), (1, 343, 256)]:
        cfg = plan(b, 4, rows, slots, 132)
        assert 1 <= cfg["splits"] and (cfg["splits"] == 1 or cfg["splits"] * 2 * cfg["BLOCK_N"] <= slots)


@pytest.mark.parametrize("rows", [7 * 196, 7 * 49, 7])  # a frame of 196 tokens, the Pruner's 49, a decoded token
@pytest.mark.parametrize("has_first", [False, True])
def test_window_kernel_compiles_for_hopper(rows, has_first):
    """The kernel and its merge lowered to sm_90 cubins on the CPU with the plans the engine runs at Qwen2-7B's
    shapes (28 query heads over 4 KV heads of 128, bf16, a 19,840-slot window): split and direct alike."""
    from stc.window_kernel import _window_fwd, _window_merge, plan
    from tests.triton_interpreter import compile_for_hopper

    cfg = plan(4, 4, rows, 19840, 132)
    ints = ("stride_qb stride_qh stride_qn stride_kb stride_kh stride_kl stride_vb stride_vh stride_vl "
            "stride_ob stride_on stride_oh kv_heads splits N SLOTS").split()
    for direct in (True, False):
        sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "USED": "*i32", "FIRST": "*i32", "OUT": "*bf16",
               "OPART": "*bf16" if direct else "*fp32", "LPART": "*bf16" if direct else "*fp32", "scale": "fp32",
               **{name: "i32" for name in ints}}
        asm = compile_for_hopper(_window_fwd, sig, {"G": 7, "D": 128, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                                    "DIRECT": direct, "HAS_FIRST": has_first},
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        assert ".target sm_90" in asm["ptx"] and len(asm["cubin"]) > 0
    sig = {"OUT": "*bf16", "OPART": "*fp32", "LPART": "*fp32",
           **{name: "i32" for name in "kv_heads splits stride_ob stride_on stride_oh N".split()}}
    assert len(compile_for_hopper(_window_merge, sig, {"G": 7, "D": 128, "BLOCK_M": 64})["cubin"]) > 0


def _kernel_inputs(case, dtype, device):
    b, heads, kv_heads, n, slots, d, used, _ = case
    g = torch.Generator().manual_seed(n * 100 + slots)
    q = torch.randn(b, n, heads, d, generator=g).to(dtype).to(device).transpose(1, 2)  # the decoder's layout
    k = torch.randn(b, kv_heads, slots, d, generator=g).to(dtype).to(device)
    v = torch.randn(b, kv_heads, slots, d, generator=g).to(dtype).to(device)
    return q, k, v, torch.tensor(used, dtype=torch.int32, device=device)


# a window that starts past slot 0 (the engine's advanced window): per case of KERNEL_CASES, its first slots
FIRST_CASES = [
    (0, [10]),  # not a multiple of any tile
    (2, [100, 22]),  # the second stream sees its new tokens only
    (4, [5, 30, 0]),  # chunks of 16-slot tiles from slots 5 and 30; a stream from 0 (its new tokens only)
    (6, [133]),  # a frame's 128-slot tiles, from a slot inside the second tile
    (3, [149]),  # a decoded token that sees itself only
]


def _poison(k, v, used, first=None):  # slots outside [first, used) must not be read
    for s, u in enumerate(used.tolist()):
        k[s, :, u:] = float("nan")
        v[s, :, u:] = float("nan")
        if first is not None:
            k[s, :, : int(first[s])] = float("nan")
            v[s, :, : int(first[s])] = float("nan")


def test_window_kernel_equals_a_masked_reference_in_the_triton_interpreter(tmp_path):
    """The Triton kernel itself, run by Triton's interpreter on the CPU (float32; the interpreter
    mishandles bfloat16)."""
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_attention import FIRST_CASES, KERNEL_CASES, _kernel_inputs, _poison
        from stc.window_kernel import window_attention
        for i, case in enumerate(KERNEL_CASES):
            q, k, v, used = _kernel_inputs(case, torch.float32, "cpu")
            _poison(k, v, used)
            torch.save(window_attention(q, k, v, used, scaling=0.3, config=case[-1]), {str(tmp_path)!r} + f"/{{i}}.pt")
        for i, first in FIRST_CASES:
            case = KERNEL_CASES[i]
            q, k, v, used = _kernel_inputs(case, torch.float32, "cpu")
            first = torch.tensor(first, dtype=torch.int32)
            _poison(k, v, used, first)
            out = window_attention(q, k, v, used, scaling=0.3, config=case[-1], first=first)
            torch.save(out, {str(tmp_path)!r} + f"/first{{i}}.pt")
    """, timeout=300)
    for i, case in enumerate(KERNEL_CASES):
        q, k, v, used = _kernel_inputs(case, torch.float32, "cpu")
        ref = masked_reference(q, k, v, used, scaling=0.3)
        out = torch.load(tmp_path / f"{i}.pt")
        assert out.shape == ref.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for i, first in FIRST_CASES:
        q, k, v, used = _kernel_inputs(KERNEL_CASES[i], torch.float32, "cpu")
        ref = masked_reference(q, k, v, used, scaling=0.3, first=first)
        torch.testing.assert_close(torch.load(tmp_path / f"first{i}.pt").double(), ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ref, masked_reference(q, k, v, used, scaling=0.3), atol=1e-3)  # `first` matters here


@gpu
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_kernel_equals_a_masked_reference_on_gpu(case, dtype):
    from stc.window_kernel import window_attention

    q, k, v, used = _kernel_inputs(KERNEL_CASES[case], dtype, "cuda")
    ref = masked_reference(q, k, v, used, scaling=0.3)
    _poison(k, v, used)
    out = window_attention(q, k, v, used, scaling=0.3, config=KERNEL_CASES[case][-1])
    assert out.dtype == dtype
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, err


@gpu
@pytest.mark.parametrize("case", range(len(FIRST_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_kernel_from_a_first_slot_equals_a_masked_reference_on_gpu(case, dtype):
    from stc.window_kernel import window_attention

    i, first = FIRST_CASES[case]
    q, k, v, used = _kernel_inputs(KERNEL_CASES[i], dtype, "cuda")
    first = torch.tensor(first, dtype=torch.int32, device="cuda")
    ref = masked_reference(q, k, v, used, scaling=0.3, first=first)
    _poison(k, v, used, first)
    out = window_attention(q, k, v, used, scaling=0.3, config=KERNEL_CASES[i][-1], first=first)
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    # through the engine's attention function, with its default plan
    out = attention.packed_sdpa(None, q, k, v, None, scaling=0.3, **{attention.KV_USED: used, attention.KV_FIRST: first})[0]
    assert ((out.double().cpu() - ref).norm() / ref.norm()) < 1e-2


@gpu
@pytest.mark.parametrize("batch", [False, True], ids=["stream", "batch"])
def test_engine_mask_free_path_equals_its_masked_path_on_gpu(batch, monkeypatch):
    """bf16 tiny model on the GPU: the same frames and questions with window_attention over the used
    slots (the Triton kernel) and with the masked packed SDPA give the same KV and answers (up to
    bf16 rounding)."""
    model, proc = build_model("tiny", seed=0, device="cuda", dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 255, (2, 6, 64, 64, 3)).astype(np.uint8)
    cfg = EngineConfig(retrieve_top_k=2, cuda_graphs=True, n_local=40, cacher=CacherConfig(cache_interval=2),
                       pruner=PrunerConfig(keep_ratio=0.5))
    out = []
    assert attention.window_supported(torch.bfloat16, "cuda", model.config.text_config.hidden_size // 4, 16)
    for mask_free in (True, False):
        if not mask_free:
            monkeypatch.setattr(attention, "window_supported", lambda *a: False)
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


def test_window_kernel_refuses_bad_inputs():
    pytest.importorskip("triton")
    from stc.window_kernel import window_attention

    q, k, v, used = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16), torch.tensor([5])
    with pytest.raises(ValueError, match="do not match"):
        window_attention(torch.zeros(1, 3, 3, 16), k, v, used)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError, match="do not match"):
        window_attention(q, k, v, torch.tensor([5, 5]))  # a length per stream
    with pytest.raises(ValueError, match="power-of-two head size"):
        window_attention(torch.zeros(1, 4, 3, 24), torch.zeros(1, 2, 8, 24), torch.zeros(1, 2, 8, 24), used)
    with pytest.raises(ValueError, match="one dtype"):
        window_attention(q.half(), k, v, used)
    with pytest.raises(ValueError, match="expected query"):
        window_attention(q[0], k, v, used)


def _clamp_case(device, dtype):
    """A window that is a slice of a longer buffer whose slots past the window hold data: a kernel
    that read past the window would attend to them."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, 4, 16, generator=g).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(2, 2, 96, 16, generator=g).to(dtype).to(device)
    v = torch.randn(2, 2, 96, 16, generator=g).to(dtype).to(device)
    return q, k[:, :, :64], v[:, :, :64]


def _clamped_pairs(window_attention, device, dtype):
    q, k, v = _clamp_case(device, dtype)
    cfg = {"splits": 2, "BLOCK_M": 16, "BLOCK_N": 16}
    out = []
    for wrong, right in (([90, 64], [64, 64]), ([-3, 40], [0, 40])):
        out.append([window_attention(q, k, v, torch.tensor(u, dtype=torch.int32, device=device), config=cfg)
                    for u in (wrong, right)])
    return out


def test_window_kernel_clamps_used_into_the_window_in_the_triton_interpreter(tmp_path):
    """`used` is not checked on the host (that would synchronise): the kernel clamps it into [0, slots],
    so a wrong length never reads outside the window (here a slice of a longer buffer)."""
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_attention import _clamped_pairs
        from stc.window_kernel import window_attention
        torch.save(_clamped_pairs(window_attention, "cpu", torch.float32), {str(tmp_path)!r} + "/pairs.pt")
    """, timeout=120)
    for wrong, right in torch.load(tmp_path / "pairs.pt"):
        assert torch.equal(wrong, right)


@gpu
def test_window_kernel_clamps_used_into_the_window_on_gpu():
    from stc.window_kernel import window_attention

    for wrong, right in _clamped_pairs(window_attention, "cuda", torch.bfloat16):
        assert torch.equal(wrong, right)
