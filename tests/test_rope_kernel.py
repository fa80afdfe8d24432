"""stc.rope_kernel (RoPE and the KV write in one Triton kernel) against transformers' RoPE and an
index copy, and the engine's static windows that use it."""

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from stc.engine import _KV, _StaticKV, rope_kernel_supported
from tests.triton_interpreter import run_in_triton_interpreter

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")

# (streams, query heads, KV heads, tokens, head size, window slots, cos/sin per stream)
CASES = [(1, 4, 2, 3, 16, 8, False), (2, 7, 1, 5, 32, 12, True), (3, 6, 2, 1, 16, 4, False)]


def rope_inputs(case, dtype, device):
    """Views of one fused projection, as the fused decoder attention makes them; cos and sin of
    positions 11.. of a base-100 RoPE; windows that are slices of a longer NaN-filled buffer (slots
    that are not written must stay NaN) and distinct, unordered slots."""
    b, heads, kv_heads, n, d, slots, per_stream = case
    g = torch.Generator().manual_seed(sum(case[:6]))
    qkv = torch.randn(b, n, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    q, k, v = (t.view(b, n, -1, d).transpose(1, 2) for t in (q, k, v))
    pos = torch.arange(11, 11 + n, dtype=torch.float64)[None] + (torch.arange(b)[:, None] if per_stream else 0)
    freqs = pos[..., None] / 100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    buf = torch.full((2, 2, b, kv_heads, slots + 3, d), float("nan"), dtype=dtype)
    index = torch.randperm(slots, generator=g)[:n]
    return [t.to(device) for t in (q, k, v, cos, sin, buf, index)]


def rope_reference(q, k, v, cos, sin, index, slots):
    """float64: transformers' RoPE, and the keys and values at their slots of NaN windows."""
    q, k = apply_rotary_pos_emb(q.double().cpu(), k.double().cpu(), cos.double().cpu(), sin.double().cpu())
    windows = torch.full((2, *k.shape[:2], slots + 3, k.shape[-1]), float("nan"), dtype=torch.float64)
    windows[0][:, :, index.cpu()] = k
    windows[1][:, :, index.cpu()] = v.double().cpu()
    return q, windows


def test_rope_write_equals_transformers_rope_in_the_triton_interpreter(tmp_path):
    """The kernel, run by Triton's interpreter on the CPU (float32)."""
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_rope_kernel import CASES, rope_inputs
        from stc.rope_kernel import rope_write
        for i, case in enumerate(CASES):
            q, k, v, cos, sin, buf, index = rope_inputs(case, torch.float32, "cpu")
            out = rope_write(q, k, v, cos, sin, buf[1, 0], buf[1, 1], index)
            torch.save((out, buf[1]), {str(tmp_path)!r} + f"/{{i}}.pt")
    """, timeout=300)
    for i, case in enumerate(CASES):
        q, k, v, cos, sin, buf, index = rope_inputs(case, torch.float32, "cpu")
        want_q, want_windows = rope_reference(q, k, v, cos, sin, index, case[5])
        out, windows = torch.load(tmp_path / f"{i}.pt")
        assert out.shape == q.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(windows.double(), want_windows, atol=1e-6, rtol=1e-6, equal_nan=True)


@gpu
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_write_equals_transformers_rope_on_gpu(case, dtype):
    """Within one rounding to the dtype of the float64 result (the kernel rounds once)."""
    from stc.rope_kernel import rope_write

    q, k, v, cos, sin, buf, index = rope_inputs(CASES[case], dtype, "cuda")
    want_q, want_windows = rope_reference(q, k, v, cos, sin, index, CASES[case][5])
    out = rope_write(q, k, v, cos, sin, buf[1, 0], buf[1, 1], index)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double().cpu(), want_q, atol=ulp, rtol=ulp)
    torch.testing.assert_close(buf[1].double().cpu(), want_windows, atol=ulp, rtol=ulp, equal_nan=True)
    assert buf[0].isnan().all()  # the other layer's windows are not touched


def test_rope_write_refuses_bad_inputs():
    pytest.importorskip("triton")
    from stc.rope_kernel import rope_write

    q, k, v, cos, sin, buf, index = rope_inputs(CASES[0], torch.float32, "cpu")
    kw, vw = buf[0, 0], buf[0, 1]
    with pytest.raises(ValueError, match="do not match"):
        rope_write(q, k, v, cos, sin, kw, vw, index[:-1])  # a slot per token
    with pytest.raises(ValueError, match="do not match"):
        rope_write(q, k[:1, :1], v[:1, :1], cos, sin, kw, vw, index)  # keys of fewer heads than the windows
    with pytest.raises(ValueError, match="cos must be"):
        rope_write(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], cos, sin, kw, vw, index[:-1])  # cos of other tokens
    with pytest.raises(ValueError, match="cos must be"):
        rope_write(q, k, v, cos[..., :8], sin, kw, vw, index)
    with pytest.raises(ValueError, match="one dtype"):
        rope_write(q.half(), k, v, cos, sin, kw, vw, index)
    with pytest.raises(ValueError, match="unit stride"):
        rope_write(q, k, v, cos, sin, kw.transpose(-1, -2).contiguous().transpose(-1, -2), vw, index)
    with pytest.raises(ValueError, match="expected query"):
        rope_write(q[0], k, v, cos, sin, kw, vw, index)


def test_static_window_falls_back_to_transformers_rope_where_the_kernel_cannot_run():
    """On a CPU (no kernel), a static window's rope_update is transformers' RoPE and its index copy,
    exactly, for one stream and for a batch of streams."""
    assert not rope_kernel_supported(torch.bfloat16, torch.device("cpu"), 128)
    for case in (CASES[0], CASES[1]):
        q, k, v, cos, sin, buf, index = rope_inputs(case, torch.float32, "cpu")
        single = case[0] == 1
        w = _StaticKV(buf[:, :, 0].clone() if single else buf.clone(), 0)
        w.index = index
        got_q, got_k, got_v = w.rope_update(q, k, v, cos, sin, 1)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(got_q, want_q)
        assert torch.equal(got_k[:, :, index], want_k) and torch.equal(got_v[:, :, index], v)
        assert got_k.shape == (case[0], case[2], case[5] + 3, case[4])


@gpu
@pytest.mark.parametrize("streams", [1, 3])
def test_static_window_runs_the_kernel_as_transformers_rope_on_gpu(streams):
    """On a GPU, a static window with an index writes through the kernel: the same queries, keys and
    values as transformers' RoPE and the plain window (`_KV.rope_update`, index copy), up to one bf16
    rounding; the returned keys and values are the window's own buffers (views, first `visible` slots)."""
    case = (streams, 7, 1, 5, 128, 12, False)
    q, k, v, cos, sin, buf, index = rope_inputs(case, torch.bfloat16, "cuda")
    assert rope_kernel_supported(torch.bfloat16, q.device, 128)
    w = _StaticKV(buf[:, :, 0].clone() if streams == 1 else buf.clone(), 0)
    w.index, w.visible = index, 10
    got_q, got_k, got_v = w.rope_update(q, k, v, cos, sin, 1)
    assert got_k.data_ptr() == w._windows(1)[0].data_ptr() and got_k.shape[2] == 10
    want_q, want_k = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
    ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got_q.float(), want_q, atol=ulp, rtol=ulp)
    written = w._windows(1)
    torch.testing.assert_close(written[0][:, :, index].float(), want_k, atol=ulp, rtol=ulp)
    assert torch.equal(written[1][:, :, index], v)
    assert isinstance(w, _KV)


# ------------------------------------------------------------- rotate_into: the window's move

MOVE_CASES = [(2, 1, 2, 37, 16), (3, 2, 1, 5, 32), (1, 4, 3, 64, 16)]  # (layers, streams, KV heads, tokens, head size)


def move_inputs(case, dtype, device):
    """K and V of `tokens` tokens to write, the cos and sin of per-token shifts (float32, transformers' base-100
    RoPE as in `rope_inputs`), and the destination: a view of NaN-filled windows two slots in."""
    layers, b, kv_heads, n, d = case
    g = torch.Generator().manual_seed(n * d + layers)
    src = torch.randn(layers, 2, b, kv_heads, n, d, generator=g).to(dtype)
    shift = torch.randint(-50, 50, (n,), generator=g).double()
    freqs = shift[:, None] / 100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([freqs, freqs], dim=-1)
    buf = torch.full((layers, 2, b, kv_heads, n + 5, d), float("nan"), dtype=dtype)
    return [t.to(device) for t in (src, emb.cos().float(), emb.sin().float(), buf)]


def move_reference(src, cos, sin):
    """float64: the keys rotated by transformers' rotate_half formula, the values as they are."""
    from transformers.models.qwen2.modeling_qwen2 import rotate_half

    k = src[:, 0].double().cpu()
    return k * cos.double().cpu() + rotate_half(k) * sin.double().cpu(), src[:, 1].double().cpu()


def test_rotate_into_equals_rope_in_the_triton_interpreter(tmp_path):
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_rope_kernel import MOVE_CASES, move_inputs
        from stc.rope_kernel import rotate_into
        for i, case in enumerate(MOVE_CASES):
            src, cos, sin, buf = move_inputs(case, torch.float32, "cpu")
            rotate_into(src, cos, sin, buf[..., 2 : 2 + case[3], :])
            torch.save(buf, {str(tmp_path)!r} + f"/{{i}}.pt")
    """, timeout=300)
    for i, case in enumerate(MOVE_CASES):
        src, cos, sin, _ = move_inputs(case, torch.float32, "cpu")
        buf = torch.load(tmp_path / f"{i}.pt")
        keys, values = move_reference(src, cos, sin)
        n = case[3]
        torch.testing.assert_close(buf[:, 0, ..., 2 : 2 + n, :].double(), keys, atol=1e-6, rtol=1e-6)
        assert torch.equal(buf[:, 1, ..., 2 : 2 + n, :], src[:, 1])
        assert buf[..., :2, :].isnan().all() and buf[..., 2 + n :, :].isnan().all()  # nothing else written


@gpu
@pytest.mark.parametrize("case", range(len(MOVE_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotate_into_equals_rope_on_gpu(case, dtype):
    """Within one rounding to the dtype of the float64 result (the kernel rounds once)."""
    from stc.rope_kernel import rotate_into

    src, cos, sin, buf = move_inputs(MOVE_CASES[case], dtype, "cuda")
    n = MOVE_CASES[case][3]
    rotate_into(src, cos, sin, buf[..., 2 : 2 + n, :])
    keys, values = move_reference(src, cos, sin)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(buf[:, 0, ..., 2 : 2 + n, :].double().cpu(), keys, atol=ulp, rtol=ulp)
    assert torch.equal(buf[:, 1, ..., 2 : 2 + n, :], src[:, 1])
    assert buf[..., :2, :].isnan().all() and buf[..., 2 + n :, :].isnan().all()


def test_rope_write_compiles_for_hopper():
    """`rope_write` lowered to an sm_90 cubin on the CPU at Qwen2-7B's attention (28 query heads, 4 KV heads of 128, bf16)."""
    from stc.rope_kernel import _rope_write
    from tests.triton_interpreter import compile_for_hopper

    strides = [f"stride_{x}" for x in ("qb qh qn kb kh kn vb vh vn cb cn sb sn ob on kwb kwh kwl vwb vwh vwl".split())]
    sig = {**{name: "*bf16" for name in ("Q", "K", "V", "COS", "SIN", "QOUT", "KW", "VW")}, "SLOTS": "*i64",
           **{name: "i32" for name in strides}}
    asm = compile_for_hopper(_rope_write, sig, {"H": 28, "HKV": 4, "D": 128, "BLOCK_H": 32, "BLOCK_KV": 4})
    assert len(asm["cubin"]) > 0 and ".target sm_90" in asm["ptx"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rotate_into_compiles_for_hopper(dtype):
    """The kernel lowered to an sm_90 cubin on the CPU, at Qwen2-7B's KV shape (4 KV heads of 128) and the
    engine's launch (BLOCK_N 32, 4 warps): what the interpreter tests above do not cover."""
    from stc.rope_kernel import _rotate_into
    from tests.triton_interpreter import compile_for_hopper

    strides = {f"stride_{t}{p}": "i64" for t in "sd" for p in ("l", "2", "b", "h", "n")}
    asm = compile_for_hopper(_rotate_into, {"SRC": f"*{dtype}", "COS": "*fp32", "SIN": "*fp32", "DST": f"*{dtype}",
                                            "n": "i32", "B": "i32", **strides}, {"HKV": 4, "D": 128, "BLOCK_N": 32})
    assert len(asm["cubin"]) > 0 and ".target sm_90" in asm["ptx"]


def test_rotate_into_refuses_bad_inputs():
    pytest.importorskip("triton")
    from stc.rope_kernel import rotate_into

    src, cos, sin, buf = move_inputs(MOVE_CASES[0], torch.float32, "cpu")
    dst = buf[..., :37, :]
    with pytest.raises(ValueError, match="alike"):
        rotate_into(src, cos, sin, buf)
    with pytest.raises(ValueError, match="alike"):
        rotate_into(src[:, 0], cos, sin, dst[:, 0])
    with pytest.raises(ValueError, match="float32"):
        rotate_into(src, cos.double(), sin, dst)
    with pytest.raises(ValueError, match="float32"):
        rotate_into(src, cos[:-1], sin, dst)
    with pytest.raises(ValueError, match="one dtype"):
        rotate_into(src.half(), cos, sin, dst)


def tiny_engine_slide(slide: str, streams: int, kernel: bool, device: str = "cpu", dtype=torch.float32):
    """One slide of a tiny engine's window (n_local 6, 2 init tokens, then 3 blocks of 4 tokens, the window's
    first slot 3), by `rotate_into` (kernel=True, whatever `rope_kernel_supported` says) or by PyTorch. "move"
    (window_slack 0): the 6 kept tokens back behind the init tokens at slot 0, block 1's rows from the window
    (its KV is elsewhere: on the CPU, or on the meta device when the window is). "advance" (slack 100): the
    init tokens rewritten at slot 9. Returns the window's buffer before, the init KV and the window."""
    import stc.engine
    from stc.engine import Block, EngineConfig, StreamingEngine
    from stc.models import build_model

    model, proc = build_model("tiny", seed=0, device=device, dtype=dtype)
    supported = stc.engine.rope_kernel_supported
    stc.engine.rope_kernel_supported = lambda *a: kernel
    try:
        with StreamingEngine(model, proc, EngineConfig(n_local=6, window_slack=0 if slide == "move" else 100)) as engine:
            layers, kvh, d, n_init = engine.num_layers, engine.kv_heads, engine.head_dim, 2
            g = torch.Generator().manual_seed(1)
            base = 3 + n_init
            kv = [torch.randn(layers, 2, streams, kvh, 4, d, generator=g).to(device, dtype) for _ in range(3)]
            blocks = [[Block(frame=i, time=None, start=base + 4 * i, kv=kv[i][:, :, s], mean_key=None) for i in range(3)]
                      for s in range(streams)]
            buf = torch.randn(layers, 2, streams, kvh, base + 12, d, generator=g).to(device, dtype)
            buf[..., base:, :] = torch.cat(kv, dim=-2)
            init = torch.randn(layers, 2, streams, kvh, n_init, d, generator=g).to(device, dtype)
            if streams == 1:
                buf, init, blocks = buf[:, :, 0], init[:, :, 0], blocks[:1]
            blocks[0][1].kv = blocks[0][1].kv.to("meta" if device == "cpu" else "cpu")
            w = stc.engine._KV(buf.clone(), base + 12)
            w.first = 3
            engine._slide_window(w, init, 4, blocks)
            assert (w.first, w.length) == ((0, n_init + 6) if slide == "move" else (9, base + 12))
    finally:
        stc.engine.rope_kernel_supported = supported
    return buf, init, w


def test_engine_slides_by_the_kernel_equal_the_slides_by_torch_in_the_triton_interpreter(tmp_path):
    """The engine's move and advance through `rotate_into` (float32, Triton's interpreter) against its PyTorch
    path: the kernel's views of 5- and 6-dimensional windows and of the joined blocks, to one float32 rounding."""
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_rope_kernel import tiny_engine_slide
        for slide in ("move", "advance"):
            for streams in (1, 3):
                torch.save(tiny_engine_slide(slide, streams, kernel=True)[2].buf, {str(tmp_path)!r} + f"/{{slide}}{{streams}}.pt")
    """, timeout=300)
    for slide in ("move", "advance"):
        for streams in (1, 3):
            buf, _, want = tiny_engine_slide(slide, streams, kernel=False)
            got = torch.load(tmp_path / f"{slide}{streams}.pt")
            assert not torch.equal(want.buf, buf)
            torch.testing.assert_close(got, want.buf, atol=1e-6, rtol=1e-6)


@gpu
@pytest.mark.parametrize("streams", [1, 3])
def test_window_move_by_the_kernel_equals_the_move_by_torch_on_gpu(streams):
    """A window's move on a GPU (bf16, rotate_into) against the same move through the engine's torch
    rotation: keys within one rounding, values and init tokens equal, other slots untouched; from blocks
    on the GPU and, for one block, from the window's own rows (a block in CPU memory)."""
    assert rope_kernel_supported(torch.bfloat16, torch.device("cuda"), 128)
    out = [tiny_engine_slide("move", streams, kernel, "cuda", torch.bfloat16) for kernel in (True, False)]
    buf, init, n_init = out[0][0], out[0][1], 2
    out = [w.buf for _, _, w in out]
    ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out[0][:, 0].float(), out[1][:, 0].float(), atol=2 * ulp, rtol=2 * ulp)
    assert torch.equal(out[0][:, 1, ..., : n_init + 6, :], out[1][:, 1, ..., : n_init + 6, :])
    assert torch.equal(out[0][..., :n_init, :], init)
    assert torch.equal(out[0][..., n_init + 6 :, :], buf[..., n_init + 6 :, :])  # untouched
    assert not torch.equal(out[0][:, 0, ..., n_init : n_init + 6, :], buf[:, 0, ..., 3 + n_init + 6 :, :])  # rotated


@gpu
@pytest.mark.parametrize("streams", [1, 3])
def test_window_advance_by_the_kernel_equals_the_advance_by_torch_on_gpu(streams):
    """A window's advance on a GPU (bf16, rotate_into): the init tokens rewritten just before the oldest kept
    token, keys within one rounding of the engine's torch rotation and of float64 RoPE of their first copy,
    values their first copy, and no other slot written."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from stc.models import tiny_config

    out = [tiny_engine_slide("advance", streams, kernel, "cuda", torch.bfloat16) for kernel in (True, False)]
    buf, init, n_init = out[0][0], out[0][1], 2
    out = [w.buf for _, _, w in out]
    cos, sin = Qwen2RotaryEmbedding(tiny_config().text_config)(torch.empty(0), torch.full((1, n_init), 9))
    ulp = torch.finfo(torch.bfloat16).eps
    slots = slice(9, 9 + n_init)
    torch.testing.assert_close(out[0][:, 0, ..., slots, :].float(), out[1][:, 0, ..., slots, :].float(), atol=2 * ulp, rtol=2 * ulp)
    keys, _ = move_reference(init[:, :, None] if streams == 1 else init, cos[0], sin[0])
    torch.testing.assert_close(out[0][:, 0, ..., slots, :].double().cpu(), keys if streams > 1 else keys[:, 0], atol=ulp, rtol=ulp)
    assert torch.equal(out[0][:, 1, ..., slots, :], init[:, 1])
    rest = torch.ones(buf.shape[-2], dtype=torch.bool)
    rest[slots] = False
    assert torch.equal(out[0][..., rest, :], buf[..., rest, :])
