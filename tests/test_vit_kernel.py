"""stc.vit_kernel: the Cacher's token ranking (Triton) against a brute-force ranking, and the
selective layer with the kernel against the layer without it."""

import pytest
import torch

from stc.cacher import CacherConfig, reference_layer, select_dynamic_tokens, selective_layer
from tests.test_cacher import siglip, video
from tests.triton_interpreter import run_in_triton_interpreter

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")


def ranked(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Brute force: each frame's tokens ordered by (similarity, index), NaN after everything, the first k."""
    out = []
    for row in sim.double().tolist():
        key = [(1, 0.0, i) if v != v else (0, v, i) for i, v in enumerate(row)]
        out.append([i for *_, i in sorted(key)[:k]])
    return out


RANK_CASES = [(1, 729, 182), (3, 50, 7), (2, 33, 33), (2, 9, 0), (1, 1, 1)]


def _rank_inputs(case, seed):
    b, t, k = case
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(b, t, generator=g).to(torch.bfloat16).float()  # bf16 values: many ties
    sim[0, : min(4, t)] = sim[0, min(4, t - 1)]
    if t > 10:
        sim[0, 7] = float("nan")
        sim[-1, 3] = float("-inf")
        sim[-1, 5] = float("inf")
    return sim, k


LAYER_CONFIGS = [
    CacherConfig(cache_interval=2, reuse_ratio=0.75),
    CacherConfig(cache_interval=2, reuse_ratio=0.5, reuse="attn", selection_feature="value"),
    CacherConfig(cache_interval=2, reuse_ratio=0.6, selection_feature="hidden", metric="l2"),
]


def layer_cases(kernels: bool, device: str = "cpu", attention_kernel: bool = False):
    """selective_layer on a tiny SigLIP layer (two frames against one reference, and two against
    their own references): outputs and the tokens chosen (and the reference layer's output)."""
    tower = siglip(layers=1).to(device)
    layer = tower.encoder.layers[0]
    frames = video(5).to(device)
    with torch.no_grad():
        x = tower.embeddings(frames)
        _, one = reference_layer(layer, x[:1], keep_hidden=True)
        _, own = reference_layer(layer, x[1:3], keep_hidden=True)
        results = []
        for cfg in LAYER_CONFIGS:
            k = cfg.recomputed_tokens(x.shape[1])
            for ref in (one, own):
                results.append(selective_layer(layer, x[3:5], ref, k, cfg, kernels=kernels, attention_kernel=attention_kernel))
        full, _ = reference_layer(layer, x, attention_kernel=attention_kernel)
        results.append((full, torch.zeros(0)))
    return results


def test_kernel_equals_brute_force_in_the_triton_interpreter(tmp_path):
    """The kernel, and the selective layer with it, run by Triton's interpreter on the CPU (float32)."""
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_vit_kernel import RANK_CASES, _rank_inputs, layer_cases
        from stc import vit_kernel
        out = {{"rank": [vit_kernel.rank_select(*_rank_inputs(case, i)) for i, case in enumerate(RANK_CASES)],
               "layers": layer_cases(kernels=True)}}
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """, timeout=600)
    out = torch.load(tmp_path / "out.pt")
    for i, case in enumerate(RANK_CASES):
        sim, k = _rank_inputs(case, i)
        assert out["rank"][i].dtype == torch.int64 and out["rank"][i].tolist() == ranked(sim, k)
    for (got, got_dyn), (want, want_dyn) in zip(out["layers"], layer_cases(kernels=False)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_dyn, want_dyn)  # the same tokens, in the same order


# (frames, queries, keys, heads, head dim, block_m, block_n, splits, key bias); 0: the kernel's plan
ATTENTION_CASES = [(1, 37, 100, 4, 72, 0, 0, 0, False), (2, 37, 100, 4, 72, 16, 32, 3, True), (1, 5, 129, 2, 64, 16, 64, 2, False),
                   (2, 1, 7, 3, 8, 16, 16, 1, True), (1, 70, 33, 2, 72, 64, 16, 5, False), (1, 3, 40, 2, 16, 16, 16, 40, False)]


def attention_inputs(case, seed, dtype=torch.float32, device="cpu"):
    """q and v as column slices of one [B, T, 3C] tensor (strided rows, as `stc.cacher.project` gives)."""
    b, tq, t, h, d, *_, bias = case
    g = torch.Generator().manual_seed(seed)
    c = h * d
    qkv = torch.randn(b, max(tq, t), 3 * c, generator=g).to(device, dtype)
    key_bias = torch.randn(b, t, generator=g).to(device) if bias else None
    return qkv[:, :tq, :c], torch.randn(b, t, c, generator=g).to(device, dtype), qkv[:, :t, 2 * c:], key_bias


def attention_reference(q, k, v, heads, bias):
    """softmax(q k^T / sqrt(d) + bias) v per head, in float64."""
    b, tq, c = q.shape
    d = c // heads
    qh, kh, vh = (x.double().view(b, x.shape[1], heads, d).transpose(1, 2) for x in (q, k, v))
    s = qh @ kh.transpose(-1, -2) * d**-0.5
    if bias is not None:
        s = s + bias.double()[:, None, None, :]
    return (s.softmax(-1) @ vh).transpose(1, 2).reshape(b, tq, c)


def attention_cases(dtype=torch.float32, device="cpu"):
    from stc import vit_kernel

    outs = []
    for i, case in enumerate(ATTENTION_CASES):
        q, k, v, bias = attention_inputs(case, i, dtype, device)
        outs.append(vit_kernel.attention(q, k, v, case[3], case[4] ** -0.5, bias, *case[5:8]).cpu())
    return outs


def test_attention_kernel_equals_softmax_attention_in_the_triton_interpreter(tmp_path):
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_vit_kernel import attention_cases
        torch.save(attention_cases(), {str(tmp_path / "out.pt")!r})
    """, timeout=300)
    for i, (case, got) in enumerate(zip(ATTENTION_CASES, torch.load(tmp_path / "out.pt"))):
        q, k, v, bias = attention_inputs(case, i)
        assert got.is_contiguous() and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), attention_reference(q, k, v, case[3], bias), atol=1e-5, rtol=1e-5)


def test_pytorch_selection_ranks_ties_to_the_lower_index():
    """The selection without the kernel (eager, CPU) is the same ranking."""
    for i, case in enumerate(RANK_CASES):
        sim, k = _rank_inputs(case, i)
        # cosine against a reference of ones: a token's similarity is set by its first channel's sign
        feature = torch.stack([sim, torch.zeros_like(sim)], dim=-1)
        cos = torch.nn.functional.cosine_similarity(feature, torch.ones_like(feature), dim=-1)
        got = select_dynamic_tokens(feature, torch.ones_like(feature), k, "cosine", ascending=False)
        assert got.tolist() == ranked(cos, k)
        assert select_dynamic_tokens(feature, torch.ones_like(feature), k, "cosine").tolist() == [sorted(r) for r in ranked(cos, k)]


def test_bad_inputs_are_refused_before_any_launch():
    vit_kernel = pytest.importorskip("stc.vit_kernel")
    with pytest.raises(ValueError, match="0 <= k <= T"):
        vit_kernel.rank_select(torch.zeros(1, 5), 6)
    with pytest.raises(ValueError, match="0 <= k <= T"):
        vit_kernel.rank_select(torch.zeros(1, 5), -1)
    with pytest.raises(ValueError, match=r"sim \[B, T\]"):
        vit_kernel.rank_select(torch.zeros(5), 2)
    assert vit_kernel.rank_select(torch.zeros(2, 5), 0).shape == (2, 0)
    q = torch.zeros(1, 3, 8)
    for bad_k, bad_v, heads, bias in ((torch.zeros(1, 4, 6), q, 2, None), (torch.zeros(1, 4, 8), torch.zeros(1, 5, 8), 2, None),
                                      (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 3, None), (torch.zeros(1, 0, 8), torch.zeros(1, 0, 8), 2, None),
                                      (torch.zeros(1, 4, 8).transpose(1, 2), torch.zeros(1, 4, 8), 2, None)):
        with pytest.raises(ValueError, match="attention: expected"):
            vit_kernel.attention(q, bad_k, bad_v, heads, 1.0, bias)
    with pytest.raises(ValueError, match="key_bias"):
        vit_kernel.attention(q, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 2, 1.0, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention: expected"):
        vit_kernel.attention(q[0], q[0], q[0], 2, 1.0)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_brute_force_on_gpu(dtype):
    from stc import vit_kernel

    for i, case in enumerate(RANK_CASES + [(16, 729, 182)]):
        sim, k = _rank_inputs(case, i)
        sim = sim.to(dtype)
        assert vit_kernel.rank_select(sim.cuda(), k).cpu().tolist() == ranked(sim, k)


@gpu
def test_selective_layer_with_the_kernel_equals_without_on_gpu():
    for (got, got_dyn), (want, want_dyn) in zip(layer_cases(True, "cuda"), layer_cases(False, "cuda")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_dyn, want_dyn)


@gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3), (torch.float32, 3e-3)])
def test_attention_kernel_equals_softmax_attention_on_gpu(dtype, tol):
    """On the H100 (float32 inputs run TF32 dots), and the SigLIP shapes at B = 1 and 16 with the plan."""
    from stc import vit_kernel

    cases = ATTENTION_CASES + [(1, 182, 729, 16, 72, 0, 0, 0, False), (16, 729, 729, 16, 72, 0, 0, 0, True)]
    for i, case in enumerate(cases):
        q, k, v, bias = attention_inputs(case, i, dtype, "cuda")
        got = vit_kernel.attention(q, k, v, case[3], case[4] ** -0.5, bias, *case[5:8])
        want = attention_reference(q, k, v, case[3], bias)
        assert got.dtype == dtype and got.is_contiguous()
        assert ((got.double() - want).norm() / want.norm()).item() < tol, case


@gpu
def test_layers_with_the_attention_kernel_equal_without_on_gpu():
    for (got, got_dyn), (want, want_dyn) in zip(layer_cases(True, "cuda", attention_kernel=True), layer_cases(True, "cuda")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_dyn, want_dyn)
