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
