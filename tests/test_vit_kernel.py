"""stc.vit_kernel: the Cacher's token ranking and selective attention (Triton) against brute-force
references, and the selective layer with the kernels against the layer without them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stc.cacher import CacherConfig, reference_layer, selective_layer
from tests.test_cacher import siglip, video

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")


def ranked(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Brute force: each frame's tokens by (similarity, index), NaN last, the first k."""
    out = []
    for row in sim.double().tolist():
        key = [(float("inf") if v != v else v, 1 if v != v else 0, i) for i, v in enumerate(row)]
        out.append([i for *_, i in sorted(key)[:k]])
    return out


def attention_reference(query, key, value_ref, value_dyn, pos, heads, scale):
    """float64, frame by frame and head by head, with the full-size values built explicitly."""
    b, n, c = query.shape
    t, d = key.shape[1], c // heads
    out = torch.empty(b, n, c, dtype=torch.float64)
    for f in range(b):
        v = value_ref[min(f, value_ref.shape[0] - 1)].double().clone()
        for tok in range(t):
            if pos[f, tok] >= 0:
                v[tok] = value_dyn[f, pos[f, tok]].double()
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            w = (scale * query[f, :, cols].double() @ key[f, :, cols].double().T).softmax(-1)
            out[f, :, cols] = w @ v[:, cols]
    return out


RANK_CASES = [(1, 729, 182), (3, 50, 7), (2, 33, 33), (2, 9, 0)]
ATTENTION_CASES = [  # frames, queries, keys, heads, head size, reference frames
    (1, 182, 729, 4, 72, 1),  # SigLIP's head size (padded in the kernel), keys split into chunks
    (2, 37, 300, 3, 16, 2),
    (1, 5, 1000, 2, 64, 1),   # many chunks; the last is shortened
    (3, 64, 130, 4, 8, 3),    # one chunk
]


def _rank_inputs(case, seed):
    b, t, k = case
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(b, t, generator=g).to(torch.bfloat16).float()  # bf16 values: many ties
    sim[0, : min(4, t)] = sim[0, min(4, t - 1)]
    if t > 10:
        sim[0, 7] = float("nan")
        sim[-1, 3] = float("-inf")
    return sim, k


def _attention_inputs(case, seed):
    b, n, t, heads, d, refs = case
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    q, key = torch.randn(b, n, c, generator=g), torch.randn(b, t, c, generator=g)
    vr, vd = torch.randn(refs, t, c, generator=g), torch.randn(b, n, c, generator=g)
    pos = torch.full((b, t), -1, dtype=torch.int32)
    for f in range(b):
        rows = torch.randperm(t, generator=g)[:n]
        pos[f, rows] = torch.arange(n, dtype=torch.int32)
    return q, key, vr, vd, pos, heads


def test_kernels_equal_brute_force_in_the_triton_interpreter(tmp_path):
    """Both kernels and the selective layer with them, run by Triton's interpreter on the CPU
    (float32), in a subprocess because the interpreter is chosen when kernels are defined."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the compiled kernels are tested instead")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.test_vit_kernel import RANK_CASES, ATTENTION_CASES, _rank_inputs, _attention_inputs, layer_cases
        from stc import vit_kernel
        out = {{}}
        for i, case in enumerate(RANK_CASES):
            out["rank", i] = vit_kernel.rank_select(*_rank_inputs(case, i))
        for i, case in enumerate(ATTENTION_CASES):
            out["attention", i] = vit_kernel.selective_attention(*_attention_inputs(case, i), 0.3)
        out["layers"] = layer_cases(kernels=True)
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for i, case in enumerate(RANK_CASES):
        sim, k = _rank_inputs(case, i)
        idx, pos = out["rank", i]
        want = ranked(sim, k)
        assert idx.tolist() == want
        assert torch.equal(idx, torch.sort(sim, dim=1, stable=True).indices[:, :k])  # what the eager path runs
        for f, row in enumerate(want):
            expect = [-1] * sim.shape[1]
            for r, tok in enumerate(row):
                expect[tok] = r
            assert pos[f].tolist() == expect
    for i, case in enumerate(ATTENTION_CASES):
        args = _attention_inputs(case, i)
        torch.testing.assert_close(out["attention", i].double(), attention_reference(*args, 0.3), atol=1e-5, rtol=1e-5)
    for got, want in zip(out["layers"], layer_cases(kernels=False)):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1], want[1])  # the same tokens, in the same order


LAYER_CONFIGS = [
    CacherConfig(cache_interval=2, reuse_ratio=0.75),
    CacherConfig(cache_interval=2, reuse_ratio=0.5, reuse="attn", selection_feature="value"),
    CacherConfig(cache_interval=2, reuse_ratio=0.6, selection_feature="hidden", metric="l2"),
]


def layer_cases(kernels: bool, device: str = "cpu"):
    """selective_layer on a tiny SigLIP layer (two frames against one reference, and two against
    their own references), selecting itself and with a given selection; outputs and indices."""
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
            for ref, cur in ((one, x[3:5]), (own, x[3:5])):
                out, dyn = selective_layer(layer, cur, ref, k, cfg, kernels=kernels)
                results.append((out, dyn))
                given = dyn.flip(1)  # a shared selection from an earlier layer, in another order
                results.append((selective_layer(layer, cur, ref, k, cfg, dynamic=given, kernels=kernels)[0], given))
    return results


def test_bad_inputs_are_refused_before_any_launch():
    vit_kernel = pytest.importorskip("stc.vit_kernel")
    with pytest.raises(ValueError, match="0 <= k <= T"):
        vit_kernel.rank_select(torch.zeros(1, 5), 6)
    with pytest.raises(ValueError, match=r"sim \[B, T\]"):
        vit_kernel.rank_select(torch.zeros(5), 2)
    q, key, vr, vd, pos, heads = _attention_inputs((1, 4, 10, 2, 8, 1), 0)
    with pytest.raises(ValueError, match="do not fit"):
        vit_kernel.selective_attention(q, key, vr, vd, pos.long(), heads, 0.3)
    with pytest.raises(ValueError, match="do not fit"):
        vit_kernel.selective_attention(q, key, vr, vd[:, :3], pos, heads, 0.3)
    with pytest.raises(ValueError, match="do not fit"):
        vit_kernel.selective_attention(q, key, vr, vd, pos, 3, 0.3)
    with pytest.raises(ValueError, match="one dtype"):
        vit_kernel.selective_attention(q, key.double(), vr, vd, pos, heads, 0.3)
    with pytest.raises(ValueError, match="unit stride"):
        vit_kernel.selective_attention(q, torch.randn(1, 10, 32)[..., ::2], vr, vd, pos, heads, 0.3)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_brute_force_on_gpu(dtype):
    from stc import vit_kernel

    for i, case in enumerate(RANK_CASES):
        sim, k = _rank_inputs(case, i)
        idx, pos = vit_kernel.rank_select(sim.to("cuda", dtype), k)
        assert idx.cpu().tolist() == ranked(sim.to(dtype), k)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, case in enumerate(ATTENTION_CASES + [(16, 182, 729, 16, 72, 16)]):
        args = _attention_inputs(case, i)
        cuda = [a.to("cuda", dtype) if a.is_floating_point() else a.cuda() for a in args[:5]]
        got = vit_kernel.selective_attention(*cuda, args[5], 0.3)
        want = attention_reference(*[a.cpu() for a in cuda], args[5], 0.3)
        err = ((got.double().cpu() - want).norm() / want.norm()).item()
        assert got.dtype == dtype and err < tol, (case, err)


@gpu
def test_selective_layer_with_kernels_equals_without_on_gpu():
    for got, want in zip(layer_cases(True, "cuda"), layer_cases(False, "cuda")):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1], want[1])
