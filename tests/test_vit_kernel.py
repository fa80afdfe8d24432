"""stc.vit_kernel: the Cacher's token ranking (Triton) against a brute-force ranking, its cosine against
PyTorch's, and the selective layer with the kernels against the layer without them."""

import pytest
import torch

from stc.cacher import CacherConfig, _merge, merge_values, reference_layer, select_dynamic_tokens, selective_layer, token_positions
from tests.test_cacher import siglip, video
from tests.triton_interpreter import run_in_triton_interpreter

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")


def positions_of(idx: list[list[int]], tokens: int) -> list[int]:
    """Brute force: for each frame's tokens in turn, the flat row of the token among the chosen ones, or -1."""
    k = len(idx[0]) if idx else 0
    return [b * k + row.index(t) if t in row else -1 for b, row in enumerate(idx) for t in range(tokens)]


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


def _cosine_inputs(case, seed, dtype=torch.float32):
    """(current, reference) pairs in the layouts the Cacher passes: contiguous, a reference shared by
    every frame, a reference that is a column slice of a wider output (the reference step's fused
    projections), zero features (the norms' clamp) and several channel blocks with a ragged end."""
    b, t, c, kind = case
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn(b, t, c, generator=g).to(dtype)
    if kind == "shared":
        ref = torch.randn(1, t, c, generator=g).to(dtype)
    elif kind == "slice":
        ref = torch.randn(b, t, 3 * c, generator=g).to(dtype)[..., c : 2 * c]
    else:
        ref = (cur.float() + 0.3 * torch.randn(b, t, c, generator=g)).to(dtype)
    if kind == "zeros":
        cur[0, 1] = 0
        ref[-1, 2] = 0
    return cur, ref


COSINE_CASES = [(2, 37, 100, "same"), (3, 20, 64, "shared"), (2, 9, 1152, "slice"), (2, 5, 33, "zeros"), (1, 1, 1, "same")]


NORM_CASES = [(2, 37, 100), (3, 5, 1152), (1, 1, 7), (4, 20, 64), (0, 3, 16)]  # rows of several shapes, ragged channels


def _norm_inputs(case, seed, dtype=torch.float32, device="cpu"):
    b, t, c = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, generator=g) * 3 + 1
    res, w, bias = torch.randn(b, t, c, generator=g), torch.randn(c, generator=g), torch.randn(c, generator=g)
    return tuple(v.to(dtype).to(device) for v in (x, res, w, bias))


def norm_case(case, seed, vit_kernel, dtype=torch.float32, device="cpu"):
    """The kernels' norm, and their residual add and norm, on rows of `case`."""
    x, res, w, bias = _norm_inputs(case, seed, dtype, device)
    return vit_kernel.layer_norm(x, w, bias, 1e-6), vit_kernel.add_layer_norm(x, res, w, bias, 1e-6)


# (frames, tokens, channels, k recomputed per frame, cached deltas shared by every frame, x and deltas as column slices)
MERGE_CASES = [(2, 37, 100, 9, False, False), (3, 20, 64, 5, True, True), (2, 9, 1152, 3, False, True),
               (2, 5, 7, 0, True, False), (1, 4, 16, 4, False, False)]


def _merge_inputs(case, seed, dtype=torch.float32, device="cpu"):
    """The merge's inputs in the layouts the selective layer passes: x [B, T, C], the cached deltas
    [B or 1, T, C], positions from chosen tokens, the recomputed rows' mid and delta [B, k, C]."""
    b, t, c, k, shared, sliced = case
    g = torch.Generator().manual_seed(seed)

    def rand(frames, rows):
        wide = torch.randn(frames, rows, 2 * c if sliced else c, generator=g) * 2 + 0.5
        return wide[..., c:] if sliced else wide

    x, attn, mlp = rand(b, t), rand(1 if shared else b, t), rand(1 if shared else b, t)
    idx = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)])
    mid, delta = torch.randn(b, k, c, generator=g), torch.randn(b, k, c, generator=g)
    w, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    moved = [v.to(dtype).to(device) for v in (x, attn, mlp, mid, delta, w, bias)]
    return (*moved[:3], token_positions(idx, t).to(device), *moved[3:])


def merge_case(case, seed, vit_kernel, dtype=torch.float32, device="cpu"):
    return vit_kernel.merge_layer_norm(*_merge_inputs(case, seed, dtype, device), 1e-6)


def check_merge(case, seed, got, atol, dtype=torch.float32):
    """Brute force, row by row: a recomputed token's mid + delta, a reused token's (x + attn) + mlp (each
    sum in the dtype), then PyTorch's float32 norm of the merged rows."""
    x, attn, mlp, pos, mid, delta, w, bias = _merge_inputs(case, seed, dtype)
    b, t, c = x.shape
    want = torch.empty(b, t, c, dtype=dtype)
    for f in range(b):
        for tok in range(t):
            p = int(pos[f * t + tok])
            a, m = attn[min(f, attn.shape[0] - 1), tok], mlp[min(f, mlp.shape[0] - 1), tok]
            want[f, tok] = mid.reshape(-1, c)[p] + delta.reshape(-1, c)[p] if p >= 0 else (x[f, tok] + a) + m
    out, normed = (v.cpu() for v in got)
    assert out.dtype == normed.dtype == dtype and out.shape == normed.shape == (b, t, c)
    assert torch.equal(out, want)
    torch.testing.assert_close(normed.float(), torch.nn.functional.layer_norm(want.float(), (c,), w.float(), bias.float(), 1e-6),
                               atol=atol, rtol=0)


def check_norm(case, seed, got, atol, dtype=torch.float32):
    """Against PyTorch's layer norm in float32 of the same inputs (the sum rounded to the dtype first)."""
    x, res, w, bias = (v.cpu() for v in _norm_inputs(case, seed, dtype))
    norm, (total, after) = (got[0].cpu(), (got[1][0].cpu(), got[1][1].cpu()))
    c = x.shape[-1]
    want = torch.nn.functional.layer_norm(x.float(), (c,), w.float(), bias.float(), 1e-6)
    assert norm.dtype == dtype and norm.shape == x.shape
    torch.testing.assert_close(norm.float(), want, atol=atol, rtol=0)
    assert torch.equal(total, x + res)  # the sum in the dtype, as the unfused add
    want = torch.nn.functional.layer_norm(total.float(), (c,), w.float(), bias.float(), 1e-6)
    torch.testing.assert_close(after.float(), want, atol=atol, rtol=0)


SENTINEL = 12345.0  # a value no merge computes: a row still holding it was not written


def _rows_inputs(case, seed, dtype=torch.float32, device="cpu"):
    """A value buffer's inputs over three frames, in the layouts the selective layer passes: the cached
    values base [B or 1, T, C] and per frame the positions of k recomputed tokens (drawn anew: consecutive
    frames share some) and their rows [B, k, C], both column slices where `sliced` (as the projections' outputs).
    own: every token's rows [B, T, C] instead (`merge_rows(own_rows=True)`)."""
    b, t, c, k, shared, sliced, own = case
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(1 if shared else b, t, 3 * c if sliced else c, generator=g)
    base = wide[..., c : 2 * c] if sliced else wide
    steps = []
    n = t if own else k
    for _ in range(3):
        idx = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)])
        rows = torch.randn(b, n, 2 * c, generator=g)[..., c:] if sliced else torch.randn(b, n, c, generator=g)
        steps.append((token_positions(idx, t).to(device), rows.to(dtype).to(device)))
    return base.to(dtype).to(device), steps


def rows_case(case, seed, merge, dtype=torch.float32, device="cpu"):
    """The buffer and its marks after each of the three frames' merges by merge(work, dirty, base, positions,
    values, own_rows): from a buffer of sentinels with every row marked; before the third, the clean rows that it
    does not recompute are set to the sentinel (such a row, left alone, keeps it)."""
    b, t, c = case[:3]
    base, steps = _rows_inputs(case, seed, dtype, device)
    work = torch.full((b, t, c), SENTINEL, dtype=dtype, device=device)
    dirty = torch.ones(b * t, dtype=torch.int8, device=device)
    out = []
    for i, (pos, values) in enumerate(steps):
        if i == 2:
            work.view(b * t, c)[(dirty == 0) & (pos < 0)] = SENTINEL
        merge(work, dirty, base, pos, values, case[6])
        out.append((work.clone(), dirty.clone()))
    return out


def merge_values_fallback(work, dirty, base, positions, values, own_rows):
    merge_values((work, dirty), base, positions, values, own_rows=own_rows)


def check_rows(case, seed, got, dtype=torch.float32):
    """Brute force, row by row: a recomputed token's row is written and marked; a marked row that is not
    recomputed is restored from base and unmarked; any other row is neither read nor written."""
    b, t, c = case[:3]
    base, steps = _rows_inputs(case, seed, dtype)
    work = torch.full((b, t, c), SENTINEL, dtype=dtype)
    dirty = [1] * (b * t)
    for i, ((pos, values), (got_work, got_dirty)) in enumerate(zip(steps, got, strict=True)):
        if i == 2:
            for r in range(b * t):
                if not dirty[r] and pos[r] < 0:
                    work.view(b * t, c)[r] = SENTINEL
        for f in range(b):
            for tok in range(t):
                r, p = f * t + tok, int(pos[f * t + tok])
                if p >= 0:
                    work[f, tok], dirty[r] = values[f, tok] if case[6] else values.reshape(-1, c)[p], 1
                elif dirty[r]:
                    work[f, tok], dirty[r] = base[min(f, base.shape[0] - 1), tok], 0
        assert got_work.dtype == dtype and torch.equal(got_work.cpu(), work)
        assert got_dirty.dtype == torch.int8 and got_dirty.cpu().tolist() == dirty
    for (pos, values), (got_work, _) in zip(steps[:2], got):  # before the sentinels: the merged values, as a new merge's
        want = (torch.where((pos >= 0).view(b, t, 1), values, base) if case[6] else _merge(base, pos, values, batch=b))
        assert torch.equal(got_work.cpu(), want)


# (frames, tokens, channels, k recomputed per frame, base shared by every frame, base and rows column slices, rows
# of every token)
ROWS_CASES = [(2, 12, 40, 5, False, True, False), (3, 7, 64, 3, True, False, False), (1, 9, 1152, 4, False, True, False),
              (2, 5, 7, 1, False, False, False), (2, 4, 3, 4, True, True, False), (2, 12, 40, 5, False, True, True),
              (3, 7, 64, 3, True, False, True), (1, 9, 1152, 4, False, True, True)]


LAYER_CONFIGS = [
    CacherConfig(cache_interval=2, reuse_ratio=0.75),
    CacherConfig(cache_interval=2, reuse_ratio=0.5, reuse="attn", selection_feature="value"),
    CacherConfig(cache_interval=2, reuse_ratio=0.6, selection_feature="hidden", metric="l2"),
    CacherConfig(cache_interval=2, reuse_ratio=0.5, reuse="mlp"),
]


def layer_cases(kernels: bool, device: str = "cpu"):
    """selective_layer on a tiny SigLIP layer (two frames against one reference, and two against
    their own references): outputs and the tokens chosen (kernels: the selection and the norms by
    stc.vit_kernel)."""
    tower = siglip(layers=1).to(device)
    layer = tower.encoder.layers[0]
    frames = video(5).to(device)
    with torch.no_grad():
        x = tower.embeddings(frames)
        _, one = reference_layer(layer, x[:1], keep_hidden=True)
        _, own = reference_layer(layer, x[1:3], keep_hidden=True)
        results = []
        nxt = tower.encoder.layers[0].layer_norm2  # a norm with other weights, as the next layer's first
        for cfg in LAYER_CONFIGS:
            k = cfg.recomputed_tokens(x.shape[1])
            for ref in (one, own):
                results.append(selective_layer(layer, x[3:5], ref, k, cfg, kernels=kernels, norm_kernel=kernels))
                # the next layer's norm in the output's pass, and this layer's norm given (as the one before computes it)
                given = layer.layer_norm1(x[3:5])
                results.append(selective_layer(layer, x[3:5], ref, k, cfg, kernels=kernels, norm_kernel=kernels, normed=given,
                                               next_norm=nxt))
            # the merged values in a buffer kept over three frames against one reference, the recomputed rows
            # projected alone or with every token's (project_all: the buffer's kernel reads them in place)
            for every in (False, True) if cfg.reuse != "mlp" else ():
                work = (torch.zeros_like(own.value), torch.ones(own.value.shape[:2].numel(), dtype=torch.int8, device=device))
                g = torch.Generator().manual_seed(k)
                for frame in (x[3:5], x[[4, 3]], x[3:5]):  # tokens given: near-ties could rank apart by rounding
                    dynamic = torch.stack([torch.randperm(x.shape[1], generator=g)[:k] for _ in range(2)]).to(device)
                    results.append(selective_layer(layer, frame, own, k, cfg, dynamic=dynamic, kernels=kernels,
                                                   norm_kernel=kernels, value_work=work, project_all=every))
        results.append((reference_layer(layer, x[3:5], norm_kernel=kernels)[0], torch.zeros(0)))  # a full layer
        out, _, normed = reference_layer(layer, x[3:5], norm_kernel=kernels, next_norm=nxt)
        results.append((out, torch.zeros(0), normed))
    return results


# (frames, queries, keys, heads, head size, tiles per program (0: chosen), query and key column slices of wider
# tensors as the fused projections give them, query rows of each frame when the queries are read through a row map
# (0: none)): partial query tiles and key blocks, three tiles with a second program, tails of 16, 32 and 64 channels,
# row maps with each tiling
ATTENTION_CASES = [(2, 37, 70, 3, 72, 1, True, 0), (2, 37, 70, 3, 72, 3, True, 0), (1, 200, 129, 2, 72, 3, False, 0),
                   (1, 130, 64, 2, 80, 1, False, 0), (2, 5, 3, 2, 96, 3, True, 0), (1, 9, 65, 1, 128, 0, False, 0),
                   (2, 37, 70, 3, 72, 1, True, 70), (2, 150, 70, 2, 72, 3, True, 200), (1, 9, 65, 1, 128, 0, False, 9)]


def _attention_inputs(case, seed, dtype=torch.float32, device="cpu"):
    """The arguments of `stc.vit_kernel.attention`: query, key, value, heads, scale, tiles, rows (None or [B, M],
    distinct rows of each frame's query in a random order)."""
    b, m, n, heads, d, tiles, sliced, t = case
    c = heads * d
    g = torch.Generator().manual_seed(seed)
    tq = t or m
    if sliced:
        q = torch.randn(b, tq, 3 * c, generator=g).to(device, dtype)[..., c : 2 * c]
        k = torch.randn(b, n, 2 * c, generator=g).to(device, dtype)[..., c:]
    else:
        q = torch.randn(b, tq, c, generator=g).to(device, dtype)
        k = torch.randn(b, n, c, generator=g).to(device, dtype)
    v = torch.randn(b, n, c, generator=g).to(device, dtype)
    rows = torch.stack([torch.randperm(t, generator=g)[:m] for _ in range(b)]).to(device) if t else None
    return q, k, v, heads, d**-0.5, tiles, rows


def attention_brute_force(q, k, v, heads, scale):
    """softmax(q k^T * scale) v for each frame and head, from the definition, in float64."""
    b, m, c = q.shape
    d = c // heads
    out = torch.empty(b, m, c, dtype=torch.float64)
    for f in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            logits = (q[f, :, cols].double() @ k[f, :, cols].double().T).cpu() * scale
            w = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            out[f, :, cols] = (w / w.sum(dim=1, keepdim=True)) @ v[f, :, cols].double().cpu()
    return out


def check_attention(case, seed, got, atol, dtype=torch.float32):
    q, k, v, heads, scale, _, rows = _attention_inputs(case, seed, dtype)
    if rows is not None:
        q = torch.stack([q[f, rows[f]] for f in range(q.shape[0])])
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    torch.testing.assert_close(got.cpu().double(), attention_brute_force(q, k, v, heads, scale), atol=atol, rtol=0)


def attention_layer_cases(kernel: bool, device: str = "cpu"):
    """selective_layer on a tiny SigLIP layer with SigLIP-so400m's heads of 72 channels, its recomputed
    tokens' attention with (kernel) and without `stc.vit_kernel.attention`: against one reference and their
    own, and with the value buffer over three frames; with the queries read through a row map (project_all)."""
    tower = siglip(layers=1, hidden=144, heads=2).to(device)
    layer = tower.encoder.layers[0]
    with torch.no_grad():
        x = tower.embeddings(video(5).to(device))
        _, one = reference_layer(layer, x[:1], keep_hidden=True)
        _, own = reference_layer(layer, x[1:3], keep_hidden=True)
        results = []
        for cfg in LAYER_CONFIGS[:3]:  # the reuse modes that recompute some tokens' attention
            k = cfg.recomputed_tokens(x.shape[1])
            for ref in (one, own):
                results.append(selective_layer(layer, x[3:5], ref, k, cfg, attention_kernel=kernel))
                results.append(selective_layer(layer, x[3:5], ref, k, cfg, attention_kernel=kernel, project_all=True))
            work = (torch.zeros_like(own.value), torch.ones(own.value.shape[:2].numel(), dtype=torch.int8, device=device))
            for frame in (x[3:5], x[[4, 3]], x[3:5]):
                results.append(selective_layer(layer, frame, own, k, cfg, value_work=work, attention_kernel=kernel))
    return results


def test_kernel_equals_brute_force_in_the_triton_interpreter(tmp_path):
    """The kernel, and the selective layer with it, run by Triton's interpreter on the CPU (float32)."""
    run_in_triton_interpreter(f"""
        import torch
        from tests.test_vit_kernel import (ATTENTION_CASES, COSINE_CASES, MERGE_CASES, NORM_CASES, RANK_CASES, ROWS_CASES,
                                           _attention_inputs, _cosine_inputs, _rank_inputs, attention_layer_cases, layer_cases,
                                           merge_case, norm_case, rows_case)
        from stc import vit_kernel
        out = {{"rank": [vit_kernel.rank_select(*_rank_inputs(case, i)) for i, case in enumerate(RANK_CASES)],
               "positions": [vit_kernel.rank_positions(*_rank_inputs(case, i)) for i, case in enumerate(RANK_CASES)],
               "cosine": [vit_kernel.cosine(*_cosine_inputs(case, i)) for i, case in enumerate(COSINE_CASES)],
               "layers": layer_cases(kernels=True),
               "norm": [norm_case(case, i, vit_kernel) for i, case in enumerate(NORM_CASES)],
               "merge": [merge_case(case, i, vit_kernel) for i, case in enumerate(MERGE_CASES)],
               "rows": [rows_case(case, i, vit_kernel.merge_rows) for i, case in enumerate(ROWS_CASES)],
               "attention": [vit_kernel.attention(*_attention_inputs(case, i)) for i, case in enumerate(ATTENTION_CASES)],
               "attention_layers": attention_layer_cases(kernel=True)}}
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """, timeout=600)
    out = torch.load(tmp_path / "out.pt")
    for i, case in enumerate(RANK_CASES):
        sim, k = _rank_inputs(case, i)
        assert out["rank"][i].dtype == torch.int64 and out["rank"][i].tolist() == ranked(sim, k)
        idx, pos = out["positions"][i]
        assert idx.tolist() == ranked(sim, k) and pos.dtype == torch.int64
        assert pos.tolist() == positions_of(ranked(sim, k), sim.shape[1])
    for i, case in enumerate(COSINE_CASES):
        want = torch.nn.functional.cosine_similarity(*_cosine_inputs(case, i), dim=-1)
        torch.testing.assert_close(out["cosine"][i], want, atol=1e-6, rtol=1e-6)
    for i, case in enumerate(NORM_CASES):
        check_norm(case, i, out["norm"][i], atol=1e-5)
    for i, case in enumerate(MERGE_CASES):
        check_merge(case, i, out["merge"][i], atol=1e-5)
    for i, case in enumerate(ROWS_CASES):
        check_rows(case, i, out["rows"][i])
    check_layers(out["layers"], layer_cases(kernels=False), atol=1e-5)
    for i, case in enumerate(ATTENTION_CASES):
        check_attention(case, i, out["attention"][i], atol=1e-5)
    check_layers(out["attention_layers"], attention_layer_cases(kernel=False), atol=1e-5)


def check_layers(got_all, want_all, atol):
    """The layers with the kernels against those without; where the next layer's norm came with the
    output, it equals that norm applied to the output (and the output equals the plain call's)."""
    for i, (got, want) in enumerate(zip(got_all, want_all, strict=True)):
        torch.testing.assert_close(got[0], want[0], atol=atol, rtol=atol)
        assert torch.equal(got[1].cpu(), want[1].cpu())  # the same tokens, in the same order
        assert len(got) == len(want)
        if len(got) == 3:
            torch.testing.assert_close(got[2], want[2], atol=atol, rtol=atol)
            torch.testing.assert_close(got[0], got_all[i - 1][0], atol=atol, rtol=atol)  # as without the fused norm


def test_value_buffer_without_the_kernel_changes_the_same_rows():
    """`merge_values` without the kernel (its whole-tensor path) leaves the buffer and marks as the kernel
    does, row by row."""
    for i, case in enumerate(ROWS_CASES):
        check_rows(case, i, rows_case(case, i, merge_values_fallback))


def test_selective_layer_with_a_value_buffer_equals_without():
    """Over frames against one reference, the attention reads the same values from the buffer as from a
    new merge: the same outputs, bit for bit (no kernel; with it, the interpreter and GPU tests compare the
    two paths)."""
    tower = siglip(layers=1)
    layer = tower.encoder.layers[0]
    with torch.no_grad():
        x = tower.embeddings(video(7))
        _, ref = reference_layer(layer, x[:2], keep_hidden=True)
        for cfg in LAYER_CONFIGS[:3]:
            k = cfg.recomputed_tokens(x.shape[1])
            work = (torch.zeros_like(ref.value), torch.ones(2 * x.shape[1], dtype=torch.int8))
            for frame in (x[2:4], x[4:6], x[5:7], x[2:4]):
                got = selective_layer(layer, frame, ref, k, cfg, value_work=work)
                want = selective_layer(layer, frame, ref, k, cfg)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


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


def test_token_positions_equal_brute_force():
    """What the selective layer merges by when the kernel does not compute the positions."""
    g = torch.Generator().manual_seed(3)
    for b, t, k in [(1, 729, 182), (3, 20, 5), (2, 6, 6), (2, 4, 0)]:
        idx = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)])
        assert token_positions(idx, t).tolist() == positions_of(idx.tolist(), t)


def test_bad_inputs_are_refused_before_any_launch():
    vit_kernel = pytest.importorskip("stc.vit_kernel")
    with pytest.raises(ValueError, match="0 <= k <= T"):
        vit_kernel.rank_select(torch.zeros(1, 5), 6)
    with pytest.raises(ValueError, match="0 <= k <= T"):
        vit_kernel.rank_select(torch.zeros(1, 5), -1)
    with pytest.raises(ValueError, match=r"sim \[B, T\]"):
        vit_kernel.rank_select(torch.zeros(5), 2)
    assert vit_kernel.rank_select(torch.zeros(2, 5), 0).shape == (2, 0)
    with pytest.raises(ValueError, match="0 <= k <= T"):
        vit_kernel.rank_positions(torch.zeros(1, 5), 6)
    idx, pos = vit_kernel.rank_positions(torch.zeros(2, 5), 0)
    assert idx.shape == (2, 0) and pos.tolist() == [-1] * 10
    with pytest.raises(ValueError, match=r"weight, bias \[C\]"):
        vit_kernel.layer_norm(torch.zeros(2, 5), torch.ones(4), torch.zeros(4), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        vit_kernel.add_layer_norm(torch.zeros(2, 5), torch.zeros(2, 4), torch.ones(5), torch.zeros(5), 1e-6)
    x, attn, mlp, pos, mid, delta, w, bias = _merge_inputs(MERGE_CASES[0], 0)
    with pytest.raises(ValueError, match=r"attn and mlp \[B or 1, T, C\]"):
        vit_kernel.merge_layer_norm(x, attn[:, 1:], mlp, pos, mid, delta, w, bias, 1e-6)
    with pytest.raises(ValueError, match=r"mid and delta"):
        vit_kernel.merge_layer_norm(x, attn, mlp, pos, mid, delta[:1], w, bias, 1e-6)
    with pytest.raises(ValueError, match="int64 positions"):
        vit_kernel.merge_layer_norm(x, attn, mlp, pos.int(), mid, delta, w, bias, 1e-6)
    with pytest.raises(ValueError, match="int64 positions"):
        vit_kernel.merge_layer_norm(x, attn, mlp, pos[1:], mid, delta, w, bias, 1e-6)
    with pytest.raises(ValueError, match="share a dtype"):
        vit_kernel.merge_layer_norm(x, attn.double(), mlp, pos, mid, delta, w, bias, 1e-6)
    base, ((pos, values), *_) = _rows_inputs(ROWS_CASES[0], 0)
    work, dirty = torch.zeros(2, 12, 40), torch.ones(24, dtype=torch.int8)
    for bad, match in [((work[:, :, :20], dirty, base, pos, values), r"work \[B, T, C\]"),
                       ((work, dirty, base, pos, values, True), "own_rows needs values of work's shape"),
                       ((work.transpose(0, 1), dirty, base, pos, values), "contiguous work"),
                       ((work, dirty, base[:, 1:], pos, values), r"base \[B or 1, T, C\]"),
                       ((work, dirty.bool(), base, pos, values), "int8 dirty"),
                       ((work, dirty[1:], base, pos, values), "int8 dirty"),
                       ((work, dirty, base, pos.int(), values), "int64 positions"),
                       ((work, dirty, base.double(), pos, values), "share a dtype")]:
        with pytest.raises(ValueError, match=match):
            vit_kernel.merge_rows(*bad)
    q, k, v, heads, scale, *_ = _attention_inputs(ATTENTION_CASES[0], 0)
    rows = torch.zeros(2, 4, dtype=torch.int64)
    for bad, match in [((q, k, v, heads, scale, 0, rows.int()), r"rows must be int64 \[B, M'\]"),
                       ((q, k, v, heads, scale, 0, rows[:1]), r"rows must be int64 \[B, M'\]"),
                       ((q, k, v, heads, scale, 0, rows[0]), r"rows must be int64 \[B, M'\]"),
                       ((q[:, :0], k, v, heads, scale, 0, rows), "rows index a query of no rows"),((q, k, v[:, 1:], heads, scale), r"key, value \[B, N, H \* D\]"),
                       ((q[:1], k, v, heads, scale), r"key, value \[B, N, H \* D\]"),
                       ((q, k, v, 5, scale), "heads=5"),
                       ((q[..., :128], k[..., :128], v[..., :128], 2, scale), "64 < head size <= 128"),
                       ((q, k.double(), v, heads, scale), "one dtype"),
                       ((q, k[:, :0], v[:, :0], heads, scale), "at least one key"),
                       ((q, k, v, heads, scale, 2), "tiles must be")]:
        with pytest.raises(ValueError, match=match):
            vit_kernel.attention(*bad)
    assert vit_kernel.attention(q[:, :0], k, v, heads, scale).shape == (2, 0, q.shape[2])
    assert vit_kernel.attention(q, k, v, heads, scale, 0, rows[:, :0]).shape == (2, 0, q.shape[2])
    with pytest.raises(ValueError, match=r"reference \[B or 1, T, C\]"):
        vit_kernel.cosine(torch.zeros(2, 5, 3), torch.zeros(3, 5, 3))
    with pytest.raises(ValueError, match=r"reference \[B or 1, T, C\]"):
        vit_kernel.cosine(torch.zeros(2, 5, 3), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match=r"reference \[B or 1, T, C\]"):
        vit_kernel.cosine(torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="share a dtype"):
        vit_kernel.cosine(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3, dtype=torch.float64))
    assert vit_kernel.cosine(torch.zeros(0, 5, 3), torch.zeros(1, 5, 3)).shape == (0, 5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_brute_force_on_gpu(dtype):
    from stc import vit_kernel

    for i, case in enumerate(RANK_CASES + [(16, 729, 182)]):
        sim, k = _rank_inputs(case, i)
        sim = sim.to(dtype)
        assert vit_kernel.rank_select(sim.cuda(), k).cpu().tolist() == ranked(sim, k)
        idx, pos = vit_kernel.rank_positions(sim.cuda(), k)
        assert idx.cpu().tolist() == ranked(sim, k)
        assert pos.cpu().tolist() == positions_of(ranked(sim, k), sim.shape[1])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_kernel_equals_pytorch_on_gpu(dtype):
    """Within one rounding of the dtype of PyTorch's float32 norm (atol: a unit of the dtype at the
    outputs' size, about 4 for these inputs)."""
    from stc import vit_kernel

    atol = {torch.float32: 1e-5, torch.bfloat16: 0.04, torch.float16: 0.005}[dtype]
    for i, case in enumerate(NORM_CASES + [(16, 729, 1152), (1, 182, 1152)]):
        check_norm(case, i, norm_case(case, i, vit_kernel, dtype, "cuda"), atol, dtype)
    x, res, w, bias = _norm_inputs((2, 30, 64), 0, dtype, "cuda")
    rows = torch.tensor([3, 0, 59, 7], device="cuda")
    torch.library.opcheck(vit_kernel.layer_norm, (x, w, bias, 1e-6))  # the custom ops' registrations, fake shapes included
    torch.library.opcheck(vit_kernel.add_layer_norm, (x, res, w, bias, 1e-6))
    torch.library.opcheck(vit_kernel.add_layer_norm, (x, res[:, :2], w, bias, 1e-6, rows))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cosine_kernel_equals_pytorch_on_gpu(dtype):
    """Against PyTorch's cosine in float32, rounded once to the dtype (the kernel accumulates in float32)."""
    from stc import vit_kernel

    for i, case in enumerate(COSINE_CASES + [(16, 729, 1152, "slice"), (16, 729, 1152, "shared")]):
        cur, ref = (t.cuda() for t in _cosine_inputs(case, i, dtype))
        want = torch.nn.functional.cosine_similarity(cur.float(), ref.float(), dim=-1).to(dtype)
        got = vit_kernel.cosine(cur, ref)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@gpu
def test_selective_layer_with_the_kernel_equals_without_on_gpu():
    check_layers(layer_cases(True, "cuda"), layer_cases(False, "cuda"), atol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_kernel_equals_brute_force_on_gpu(dtype):
    """The merged rows exactly, their norm within one rounding of the dtype of PyTorch's float32 norm."""
    from stc import vit_kernel

    atol = {torch.float32: 1e-5, torch.bfloat16: 0.04, torch.float16: 0.005}[dtype]
    for i, case in enumerate(MERGE_CASES + [(16, 729, 1152, 182, False, True), (1, 729, 1152, 182, True, False)]):
        check_merge(case, i, merge_case(case, i, vit_kernel, dtype, "cuda"), atol, dtype)
    torch.library.opcheck(vit_kernel.merge_layer_norm, (*_merge_inputs(MERGE_CASES[1], 0, dtype, "cuda"), 1e-6))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_buffer_kernel_equals_brute_force_on_gpu(dtype):
    """Exactly the rows of the brute force, marks included, also at SigLIP-so400m's size (16 frames)."""
    from stc import vit_kernel

    for i, case in enumerate(ROWS_CASES + [(16, 729, 1152, 182, False, True, False), (1, 729, 1152, 182, False, True, True)]):
        check_rows(case, i, rows_case(case, i, vit_kernel.merge_rows, dtype, "cuda"), dtype)
    base, ((pos, values), *_) = _rows_inputs(ROWS_CASES[0], 0, dtype, "cuda")
    work, dirty = torch.zeros(2, 12, 40, dtype=dtype, device="cuda"), torch.ones(24, dtype=torch.int8, device="cuda")
    torch.library.opcheck(vit_kernel.merge_rows, (work, dirty, base, pos, values))
    base, ((pos, values), *_) = _rows_inputs(ROWS_CASES[5], 0, dtype, "cuda")
    torch.library.opcheck(vit_kernel.merge_rows, (work, dirty, base, pos, values, True))


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_value_buffer_kernel_compiles_for_hopper(dtype, own):
    """`merge_rows` lowered to an sm_90 cubin on the CPU at SigLIP-so400m's width (1152 channels, the
    launch's whole-row tiles): what the interpreter test does not cover."""
    pytest.importorskip("triton")
    from stc.vit_kernel import _merge_rows, _norm_tiles
    from tests.triton_interpreter import compile_for_hopper

    _, tiles = _norm_tiles(16 * 729, 1152)
    sig = {"WORK": f"*{dtype}", "DIRTY": "*i8", "BASE": f"*{dtype}", "POS": "*i64", "VALUES": f"*{dtype}",
           **{name: "i32" for name in ("R", "T", "C", "NEW", "stride_bb", "stride_bt", "stride_v")}}
    warps = tiles.pop("num_warps")
    asm = compile_for_hopper(_merge_rows, sig, {**tiles, "OWN": own}, num_warps=warps)
    assert len(asm["cubin"]) > 0 and ".target sm_90" in asm["ptx"]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_kernel_equals_brute_force_on_gpu(dtype):
    """Also at SigLIP-so400m's selective attention (182 queries over 729 keys, 16 heads of 72) for 16 frames and
    one, with each tiling. atol: about a unit of the dtype at the outputs' size (float32: IEEE products)."""
    from stc import vit_kernel

    atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    so400m = [(16, 182, 729, 16, 72, 0, True, 0), (16, 182, 729, 16, 72, 1, True, 0), (1, 182, 729, 16, 72, 3, True, 0),
              (1, 182, 729, 16, 72, 0, True, 0), (1, 182, 729, 16, 72, 0, True, 729), (16, 182, 729, 16, 72, 0, True, 729)]
    for i, case in enumerate(ATTENTION_CASES + so400m):
        check_attention(case, i, vit_kernel.attention(*_attention_inputs(case, i, dtype, "cuda")), atol, dtype)
    assert vit_kernel.attention_tiles(16, 16, 182, "cuda") == 3 and vit_kernel.attention_tiles(1, 16, 182, "cuda") == 1
    torch.library.opcheck(vit_kernel.attention, _attention_inputs(ATTENTION_CASES[0], 0, dtype, "cuda")[:5])
    torch.library.opcheck(vit_kernel.attention, _attention_inputs(ATTENTION_CASES[6], 6, dtype, "cuda"))


@gpu
def test_selective_layer_with_the_attention_kernel_equals_without_on_gpu():
    check_layers(attention_layer_cases(True, "cuda"), attention_layer_cases(False, "cuda"), atol=1e-5)


@pytest.mark.parametrize("rowmap", [False, True])
@pytest.mark.parametrize("tiles", [1, 3])
def test_attention_kernel_compiles_for_hopper(tiles, rowmap):
    """`attention` lowered to an sm_90 cubin on the CPU at SigLIP-so400m's heads (64 + 16 channels, bf16), with
    each tiling, with and without a query row map: what the interpreter test does not cover."""
    pytest.importorskip("triton")
    from stc.vit_kernel import _attention
    from tests.triton_interpreter import compile_for_hopper

    sig = {"Q": "*bf16", "IDX": "*i64", **{name: "*bf16" for name in ("K", "V", "O")},
           **{name: "i32" for name in ("sqb", "sqm", "skb", "skn", "svb", "svn", "M", "N", "H", "TQ")}, "scale2": "fp32"}
    asm = compile_for_hopper(_attention, sig, dict(D=72, DT=16, BLOCK_N=64, TILES=tiles, IEEE=False, ROWMAP=rowmap),
                             num_warps=4, num_stages=3)
    assert len(asm["cubin"]) > 0 and ".target sm_90" in asm["ptx"]
