"""Time the pieces of one SigLIP-so400m layer step on a GPU, at the shapes of the streaming ViT: which
attention backend, which token selection (and key similarity), which projections, which patch
embedding, which LayerNorm kernel, LLaVA-OneVision's pooling after the projector (and, on request, a
Qwen2-7B MLP, its projections, its SiLU * up step, its down projection split over its input features,
and the LLM's attention over a static KV window). Each variant is
timed as CUDA-graph replays (median, triton's do_bench_cudagraph), at B = 1 and 16 frames per step.

    python scripts/bench_vit_kernels.py --out results/latency/h100_vit_kernels.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from stc.latency import environment

T, C, HEADS, INTER = 729, 1152, 16, 4304
SCALE = (C // HEADS) ** -0.5  # SigLIP's attention scale
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def heads(x):  # [B, T, C] -> [B, H, T, D], a strided view as in the Hugging Face layer
    b, t, _ = x.shape
    return x.view(b, t, HEADS, -1).transpose(1, 2)


def recomputed(b, k):  # int64 [B, k]: k distinct random tokens of each of b frames, as a Cacher's recomputed ones
    return torch.stack([torch.randperm(T, device="cuda")[:k] for _ in range(b)])


def attention_rows(b, tq):
    """PyTorch's attention backends and `stc.vit_kernel.attention` for tq queries over a frame's keys."""
    q = torch.randn(b, tq, C, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, T, C, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, T, C, device="cuda", dtype=torch.bfloat16)

    def reference(queries):  # float32, [B, tq, C]
        return F.scaled_dot_product_attention(heads(queries).float(), heads(k).float(), heads(v).float()).transpose(1, 2).reshape(b, tq, C)

    want = reference(q)
    rows = []

    def timed(name, fn, want):  # a row with fn's error against want and its replay time
        err = ((fn().float() - want).norm() / want.norm()).item()
        rows.append({"op": "attention", "variant": name, "batch": b, "queries": tq, "rel_err": err,
                     "us": 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")})

    for name, backend in BACKENDS.items():
        def fn(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(b, tq, C)
        try:
            fn()
        except RuntimeError as err:
            rows.append({"op": "attention", "variant": name, "batch": b, "queries": tq, "error": str(err)[:120]})
            continue
        timed(name, fn, want)
    from stc import vit_kernel

    for tiles in (0, 1, 3):  # stc.vit_kernel.attention: its choice (0), and each tiling
        timed(f"stc kernel{f', {tiles} tiles' if tiles else ''}", lambda tiles=tiles: vit_kernel.attention(q, k, v, HEADS, SCALE, tiles),
              want)
    # the queries read through a row map (GraphedVision's project_all) against the gathered ones
    frame = torch.randn(b, T, C, device="cuda", dtype=torch.bfloat16)
    idx = recomputed(b, tq)
    gathered = torch.gather(frame, 1, idx[..., None].expand(-1, -1, C))
    want = reference(gathered)
    timed("stc kernel, gathered queries", lambda: vit_kernel.attention(gathered, k, v, HEADS, SCALE), want)
    timed("stc kernel, row map", lambda: vit_kernel.attention(frame, k, v, HEADS, SCALE, 0, idx), want)
    return rows


def _rank(key, ref, k):  # cosine (compiled with the caller) and stc.vit_kernel.rank_select
    from stc import vit_kernel

    return vit_kernel.rank_select(F.cosine_similarity(key, ref, dim=-1), k)


def _kernel_rank(key, ref, k):  # both stc.vit_kernel kernels: the cosine and the ranking
    from stc import vit_kernel

    return vit_kernel.rank_select(vit_kernel.cosine(key, ref), k)


def _cos_topk(key, ref, k):
    return torch.topk(F.cosine_similarity(key, ref, dim=-1), k, dim=1, largest=False, sorted=False).indices


def _cos_sort(key, ref, k):
    return torch.sort(F.cosine_similarity(key, ref, dim=-1), dim=1).indices[:, :k]


def _unit_topk(key, unit_ref, k):  # reference keys stored normalised: one norm fewer per frame
    return torch.topk((key * unit_ref).sum(-1) / key.norm(dim=-1), k, dim=1, largest=False, sorted=False).indices


def selection_rows(b):
    k = 182
    key = torch.randn(b, T, C, device="cuda", dtype=torch.bfloat16)
    ref = key + 0.5 * torch.randn_like(key)
    unit = ref / ref.norm(dim=-1, keepdim=True)
    want = [set(r) for r in _cos_topk(key.float(), ref.float(), k).tolist()]  # fp32 reference selection
    rows = []
    for name, fn, other in (("cosine+topk", _cos_topk, ref), ("cosine+sort", _cos_sort, ref), ("unit_ref+topk", _unit_topk, unit),
                            ("cosine+rank_select", _rank, ref), ("cosine kernel+rank_select", _kernel_rank, ref)):
        for compiled in (False, True):
            f = torch.compile(fn, dynamic=False) if compiled else fn
            got = f(key, other, k).tolist()
            # bf16 similarities reorder near-ties at the boundary: report the mean overlap with fp32's choice
            overlap = sum(len(w & set(g)) for w, g in zip(want, got)) / (k * b)
            rows.append({"op": "selection", "variant": name, "compiled": compiled, "batch": b, "overlap_with_fp32": overlap,
                         "us": 1e3 * do_bench_cudagraph(lambda: f(key, other, k), rep=50, return_mode="median")})
    return rows


def cosine_rows(b):
    """The key similarity alone, in the selective layer's layouts (the reference keys a column slice of
    the reference step's fused projections): inductor's fused reduction against `stc.vit_kernel.cosine`."""
    from stc import vit_kernel

    ref = torch.randn(b, T, 3 * C, device="cuda", dtype=torch.bfloat16)[..., 2 * C :]
    key = ref + 0.5 * torch.randn(b, T, C, device="cuda", dtype=torch.bfloat16)
    want = F.cosine_similarity(key.float(), ref.float(), dim=-1)
    rows = []
    for name, fn in (("inductor", torch.compile(lambda a, r: F.cosine_similarity(a, r, dim=-1), dynamic=False)),
                     ("stc kernel", vit_kernel.cosine)):
        err = (fn(key, ref).float() - want).abs().max().item()
        rows.append({"op": "cosine", "variant": name, "batch": b, "max_abs_err": err,
                     "us": 1e3 * do_bench_cudagraph(lambda: fn(key, ref), rep=50, return_mode="median")})
    return rows


def projection_rows(b):
    rows = []
    for m in (182, 729):
        x = torch.randn(b * m, C, device="cuda", dtype=torch.bfloat16)
        wq, wv, wk = (torch.randn(C, C, device="cuda", dtype=torch.bfloat16) / C**0.5 for _ in range(3))
        bq, bv, bk = (torch.randn(C, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        wqv, bqv = torch.cat([wq, wv]), torch.cat([bq, bv])
        wqvk, bqvk = torch.cat([wq, wv, wk]), torch.cat([bq, bv, bk])
        w1 = torch.randn(INTER, C, device="cuda", dtype=torch.bfloat16) / C**0.5
        b1 = torch.randn(INTER, device="cuda", dtype=torch.bfloat16)
        fc1_gelu = torch.compile(lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"), dynamic=False)
        want = F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh")
        for name, fn in (("q,v separate", lambda: (F.linear(x, wq, bq), F.linear(x, wv, bv))),
                         ("q,v fused", lambda: F.linear(x, wqv, bqv).split(C, dim=-1)),
                         ("q,v,k separate", lambda: (F.linear(x, wq, bq), F.linear(x, wv, bv), F.linear(x, wk, bk))),
                         ("q,v,k fused", lambda: torch.addmm(bqvk, x, wqvk.t()).split(C, dim=-1)),  # as stc.cacher.project
                         ("one 1152x1152", lambda: F.linear(x, wq, bq)),
                         ("fc1 1152x4304", lambda: F.linear(x, w1)),
                         ("fc1 + bias", lambda: F.linear(x, w1, b1)),
                         # SigLIP's fc1 and tanh GELU: inductor (GEMM, then a fused kernel) against cuBLASLt's
                         # GELU_BIAS epilogue (one kernel)
                         ("fc1 + bias + gelu inductor", fc1_gelu),
                         ("fc1 + bias + gelu epilogue", lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True))):
            row = {"op": "projection", "variant": name, "batch": b, "rows": m}
            if "gelu" in name:
                row["rel_err"] = ((fn().float() - want).norm() / want.norm()).item()
            rows.append({**row, "us": 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")})
    return rows


def selective_projection_rows(b, k=182):
    """A selective layer's projections two ways: the key projection of every token, then the query and
    value projections of the k gathered dynamic rows (as `stc.cacher.selective_layer` computes them), or
    all three projections of every token as one GEMM, the dynamic rows' query gathered after it (or read in
    place, as an attention that takes a row map would)."""
    x = torch.randn(b * T, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3 * C, C, device="cuda", dtype=torch.bfloat16) / C**0.5
    bias = torch.randn(3 * C, device="cuda", dtype=torch.bfloat16)
    rows = (torch.randperm(T, device="cuda")[:k] + T * torch.arange(b, device="cuda")[:, None]).reshape(-1)

    def key_then_dynamic():
        key = torch.addmm(bias[2 * C:], x, w[2 * C:].t())
        return key, torch.addmm(bias[:2 * C], x.index_select(0, rows), w[:2 * C].t())

    def all_rows():
        return torch.addmm(bias, x, w.t())

    def all_rows_gather():
        out = torch.addmm(bias, x, w.t())
        return out, out[:, :C].index_select(0, rows)

    return [{"op": "selective projections", "variant": name, "batch": b, "rows": k,
             "us": 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")}
            for name, fn in (("k all, q,v dynamic", key_then_dynamic), ("q,v,k all", all_rows),
                             ("q,v,k all + q gather", all_rows_gather))]


def layer_chain_rows(b, k=182, layers=26):
    """What a layer's GEMMs and attention alone take, chained over `layers` layers as in the tower: the full
    layer's (the projections of every token, cuDNN's attention, the output projection, fc1 with its GELU
    epilogue, fc2) and the selective layer's at its fastest (the projections of every token,
    `stc.vit_kernel.attention` for the k recomputed queries of each frame through a row map, the rest on
    those k rows). Every other kernel of a layer (norms, selection, merges) is left out, so the selective
    chain is a floor for a selective layer built from these kernels. Each layer has its own weights (cold
    in L2, as in the tower), or every layer one layer's (hot). us: per layer."""
    from stc import vit_kernel

    def layer():  # the weights of the projections, the output projection, fc1 and fc2, then their biases
        shapes = ((3 * C, C), (C, C), (INTER, C), (C, INTER))
        return ([torch.randn(o, i, device="cuda", dtype=torch.bfloat16) / i**0.5 for o, i in shapes]
                + [torch.randn(o, device="cuda", dtype=torch.bfloat16) for o, _ in shapes])

    weights = [layer() for _ in range(layers)]
    x = torch.randn(b, T, C, device="cuda", dtype=torch.bfloat16)
    idx = recomputed(b, k)

    def mlp(a, w):  # the output projection, fc1 with its GELU and fc2, on a's rows
        o = F.linear(a, w[1], w[5]).flatten(0, 1)
        return F.linear(torch._addmm_activation(w[6], o, w[2].t(), use_gelu=True), w[3], w[7])

    def full(w):
        q, kk, v = (heads(t) for t in F.linear(x, w[0], w[4]).split(C, dim=-1))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            a = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(b, T, C)
        return mlp(a, w)

    def selective(w):
        q, kk, v = F.linear(x, w[0], w[4]).split(C, dim=-1)
        return mlp(vit_kernel.attention(q, kk, v, HEADS, SCALE, 0, idx), w)

    rows = []
    for name, fn in (("full", full), ("selective", selective)):
        for state, ws in (("cold", weights), ("hot", weights[:1] * layers)):
            us = 1e3 * do_bench_cudagraph(lambda fn=fn, ws=ws: [fn(w) for w in ws], rep=50, return_mode="median") / layers
            rows.append({"op": "layer chain", "variant": f"{name}, weights {state}", "batch": b, "rows": T if name == "full" else k,
                         "layers": layers, "us": us})
    return rows


def autotune_rows(b):
    """The layer's GEMMs as cuBLAS runs them against inductor's max-autotune (Triton templates and ATen,
    the fastest per shape), at the row counts of a full (729) and a selective (182) layer."""
    rows = []
    for m in (182, 729):
        x = torch.randn(b * m, C, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(b * m, INTER, device="cuda", dtype=torch.bfloat16)
        wqvk, bqvk = torch.randn(3 * C, C, device="cuda", dtype=torch.bfloat16) / C**0.5, torch.randn(3 * C, device="cuda", dtype=torch.bfloat16)
        w1, b1 = torch.randn(INTER, C, device="cuda", dtype=torch.bfloat16) / C**0.5, torch.randn(INTER, device="cuda", dtype=torch.bfloat16)
        w2, b2 = torch.randn(C, INTER, device="cuda", dtype=torch.bfloat16) / INTER**0.5, torch.randn(C, device="cuda", dtype=torch.bfloat16)
        gemms = {"q,v,k": lambda: F.linear(x, wqvk, bqvk), "fc2": lambda: F.linear(y, w2, b2),
                 "fc1 + gelu": lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh")}
        for name, fn in gemms.items():
            want = fn().float()
            for variant, f in (("cuBLAS", fn if name != "fc1 + gelu" else lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True)),
                               ("max-autotune", torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False))):
                err = ((f().float() - want).norm() / want.norm()).item()
                rows.append({"op": "autotune", "variant": f"{name} {variant}", "batch": b, "rows": m, "rel_err": err,
                             "us": 1e3 * do_bench_cudagraph(f, rep=50, return_mode="median")})
    return rows


def embedding_rows(b, size=384, patch=14):
    """SigLIP's patch embedding: cuDNN's convolution (as the Hugging Face module runs it) against the
    patchify GEMM of stc.fast.patch_embeddings, both with the position embeddings added."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    from stc.fast import patch_embeddings

    cfg = SiglipVisionConfig(hidden_size=C, image_size=size, patch_size=patch)
    emb = SiglipVisionEmbeddings(cfg).to("cuda", torch.bfloat16)
    pixels = torch.randn(b, 3, size, size, device="cuda", dtype=torch.bfloat16)
    rows = []
    with torch.no_grad():
        want = emb(pixels).float()
        for name, fn in (("conv (module)", lambda: emb(pixels)), ("patchify GEMM", lambda: patch_embeddings(emb, pixels))):
            err = ((fn().float() - want).norm() / want.norm()).item()
            rows.append({"op": "embedding", "variant": name, "batch": b, "rel_err_vs_module": err,
                         "us": 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")})
    return rows


LLM_MLP_VARIANTS = ("eager", "inductor", "max-autotune", "gate|up eager", "gate|up inductor")


def _copy_bandwidth() -> float:
    """Bytes per second read and written by a 256 MiB device copy, replayed as a CUDA graph (median)."""
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (do_bench_cudagraph(lambda: dst.copy_(src), rep=50, return_mode="median") * 1e-3)


def llm_mlp_rows(m_rows, hidden=3584, inter=18944, names=LLM_MLP_VARIANTS):
    """One Qwen2-7B MLP (gate, up, SiLU * up, down) at M rows: eager, inductor, inductor max-autotune,
    and with the gate and up projections as one GEMM over their concatenated weights ("gate|up"),
    each replayed as a CUDA graph, with the weight-read floor at the bandwidth of a device copy."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16, generator=g) / i**0.5
         for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
    w_gate_up = torch.cat(w[:2])

    def mlp(x, wg, wu, wd):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def fused(x, wg, wu, wd):  # wg, wu unused: the same weights, concatenated
        gate, up = F.linear(x, w_gate_up).split(inter, dim=-1)
        return F.linear(F.silu(gate) * up, wd)

    make = {"eager": lambda: mlp, "inductor": lambda: torch.compile(mlp, dynamic=False),
            "max-autotune": lambda: torch.compile(mlp, mode="max-autotune-no-cudagraphs", dynamic=False),
            "gate|up eager": lambda: fused, "gate|up inductor": lambda: torch.compile(fused, dynamic=False)}
    variants = {name: make[name]() for name in names}
    bw = _copy_bandwidth()
    floor_us = 3 * hidden * inter * 2 / bw * 1e6
    rows = []
    for m in m_rows:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        want = mlp(x.float(), *(t.float() for t in w))
        for name, fn in variants.items():
            out = fn(x, *w)
            err = ((out.float() - want).norm() / want.norm()).item()
            rows.append({"op": "llm_mlp", "variant": name, "rows": m, "rel_err": err, "floor_us": floor_us,
                         "us": 1e3 * do_bench_cudagraph(lambda: fn(x, *w), rep=50, return_mode="median")})
    return rows


WINDOW_SHAPES = [(1, 196, 12544), (1, 49, 3136), (1, 1, 12544), (4, 196, 12544), (4, 49, 3136), (16, 196, 12544),
                 (16, 49, 3136)]  # (streams, new tokens, used slots): 64 frames of 196 or 49 tokens, a decoded token


def window_attention_rows(slots=15744, heads_q=28, kv_heads=4, d=128, sweep=False, shapes=None):
    """Qwen2-7B attention of n new tokens over a static window (the engine's prefill and decode step):
    the masked packed SDPA over the engine's context bucket, FlashAttention-2 over the used slots (one varlen
    call, `seqused_k`) and stc.window_kernel (split context, Triton) with its planned tiles; with
    sweep, every tile configuration and split count around the plan as well (variant "triton
    sweep", with its config). (A variant that cut the context into chunks run as separate
    FlashAttention sequences, merged by log-sum-exp, was measured at commit 9874201: slower in most
    of these shapes and in the engine, so it is not kept.)"""
    from stc import window_kernel
    from stc.attention import flash_window
    from stc.engine import _bucketed

    g = heads_q // kv_heads
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for b, n, used in shapes or WINDOW_SHAPES:
        q = torch.randn(b, n, heads_q, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # HF's layout
        k = torch.randn(b, kv_heads, slots, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lengths = torch.full((b,), used, device="cuda", dtype=torch.int32)
        bucket = min(slots, _bucketed(used))  # the engine's context bucket for a masked step
        pos = torch.arange(used - n, used, device="cuda")
        mask = torch.where(torch.arange(bucket, device="cuda")[None] > pos[:, None], torch.finfo(torch.bfloat16).min, 0.0)
        mask = mask.to(torch.bfloat16).repeat(g, 1)[None, None]

        def masked():
            out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, g * n, d), k[:, :, :bucket], v[:, :, :bucket],
                                                 attn_mask=mask)
            return out.reshape(b, heads_q, n, d).transpose(1, 2)

        def flash():
            return flash_window(q.contiguous(), k, v, lengths)

        def triton_planned(config=None):
            return lambda: window_kernel.window_attention(q, k, v, lengths, config=config)

        plan = window_kernel.plan(b, kv_heads, g * n, slots, sms)
        variants = [("masked packed sdpa", masked, None), ("flash", flash, None), ("triton", triton_planned(), plan)]
        if sweep:
            for cfg in _window_configs(plan, n):
                variants.append(("triton sweep", triton_planned(cfg), cfg))
        want = masked().float()
        flop = 4 * b * heads_q * n * used * d
        for name, fn, cfg in variants:
            err = ((fn().float() - want).norm() / want.norm()).item()
            us = 1e3 * do_bench_cudagraph(fn, rep=20 if name == "triton sweep" else 50, return_mode="median")
            rows.append({"op": "window_attention", "variant": name, "batch": b, "new_tokens": n, "used": used,
                         "rel_err_vs_masked": err, "us": us, "tflops": flop / us * 1e-6, **({"config": cfg} if cfg else {})})
    return rows


def _window_configs(plan, n):
    """Tile configurations around the planned one: block sizes, warps, stages, split counts from half
    to three times the plan's."""
    splits = sorted({max(1, plan["splits"] // 2), plan["splits"], plan["splits"] + 1, 2 * plan["splits"], 3 * plan["splits"]})
    block_ms = [16] if n == 1 else [32, 64, 128]
    for bm in block_ms:
        for bn in (64, 128):
            for warps in ((4,) if bm == 16 else (4, 8)):
                for stages in (2, 3):
                    for sp in splits:
                        yield {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "splits": sp}


def llm_projection_rows(m_rows, layers=28, hidden=3584, inter=18944, kv=512, blas=("default",)):
    """Qwen2-7B's projections as in a decoder step: `layers` distinct weights (one per layer, so each
    is read from HBM, not from L2 as when one weight is timed again and again), each applied once per
    replay to x [M, K]; microseconds per layer. The query, key and value projections with their bias
    in the GEMM's epilogue ("qkv+bias", what F.linear(x, W, b) runs) and without ("qkv"; the bias
    added by a later kernel), and the output, gate|up and down projections. floor_us: the weight
    bytes at the bandwidth of a device copy. blas: PyTorch's preferred BLAS library for the capture
    ("default" leaves it as it is; "cublas", "cublaslt"), each timed in turn."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"qkv+bias": (hidden + 2 * kv, hidden, True), "qkv": (hidden + 2 * kv, hidden, False),
              "o": (hidden, hidden, False), "gate|up": (2 * inter, hidden, False), "down": (hidden, inter, False)}
    bw = _copy_bandwidth()
    rows = []
    for op, (n, k, bias) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5 for _ in range(layers)]
        bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g) if bias else None for _ in range(layers)]
        for m in m_rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)

            def stack():
                for w, b in zip(ws, bs):
                    F.linear(x, w, b)

            for library in blas:
                before = torch.backends.cuda.preferred_blas_library()
                if library != "default":
                    torch.backends.cuda.preferred_blas_library(library)
                try:
                    us = 1e3 * do_bench_cudagraph(stack, rep=50, return_mode="median") / layers
                finally:
                    torch.backends.cuda.preferred_blas_library(before)
                rows.append({"op": "llm_projection", "variant": op, "M": m, "blas": library, "us": us,
                             "floor_us": n * k * 2 / bw * 1e6})
        del ws, bs
        torch.cuda.empty_cache()
    return rows


def llm_down_split_rows(m_rows, splits=(2, 4), layers=28, hidden=3584, inter=18944):
    """Qwen2-7B's down projection with the residual add after it, as in a compiled decoder layer
    (inductor, shapes static), with `layers` distinct weights (cold, as in a decoder step): cuBLAS's
    GEMM (F.linear) against `stc.fast.split_k_linear` at each split count, us per layer, and each
    one's relative error against float32. floor_us: the weight bytes at the bandwidth of a device copy
    or the FLOPs at the matmul rate, whichever is larger (both from `stc.latency.device_rates`)."""
    from stc.fast import split_k_linear
    from stc.latency import device_rates

    g = torch.Generator(device="cuda").manual_seed(0)
    rates = device_rates(torch.device("cuda"))
    bw, rate = rates["copy_bytes_per_s"], rates["matmul_flops"]
    ws = [torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) / inter**0.5 for _ in range(layers)]
    variants = {"cublas": lambda h, w, r: r + F.linear(h, w)}
    variants.update({f"split {n}": (lambda n: lambda h, w, r: r + split_k_linear(h, w, n))(n) for n in splits})
    rows = []
    for m in m_rows:
        h = torch.randn(m, inter, device="cuda", dtype=torch.bfloat16, generator=g)
        res = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        want = res.float() + h.float() @ ws[0].float().T
        floor_us = max(hidden * inter * 2 / bw, 2 * m * hidden * inter / rate) * 1e6
        for name, fn in variants.items():
            fn = torch.compile(fn, dynamic=False)
            err = ((fn(h, ws[0], res).float() - want).norm() / want.norm()).item()
            us = 1e3 * do_bench_cudagraph(lambda: [fn(h, w, res) for w in ws], rep=50, return_mode="median") / layers
            rows.append({"op": "llm_down", "variant": name, "M": m, "us": us, "rel_err": err, "floor_us": floor_us})
        torch._dynamo.reset()
    del ws
    torch.cuda.empty_cache()
    return rows


@triton.jit
def _swiglu_kernel(GU, OUT, inter, stride_gu, stride_out, BLOCK: tl.constexpr):
    """OUT[m, j] = silu(GU[m, j]) * GU[m, inter + j], one row and BLOCK columns per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < inter
    g = tl.load(GU + row * stride_gu + cols, mask=keep, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + inter + cols, mask=keep, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=keep)


def _swiglu_triton(gu: torch.Tensor, block: int = 2048, num_warps: int = 4) -> torch.Tensor:
    m, two = gu.shape
    inter = two // 2
    out = torch.empty(m, inter, device=gu.device, dtype=gu.dtype)
    _swiglu_kernel[(m, triton.cdiv(inter, block))](gu, out, inter, gu.stride(0), out.stride(0), BLOCK=block,
                                                   num_warps=num_warps)
    return out


def llm_swiglu_rows(m_rows, layers=28, hidden=3584, inter=18944):
    """The Qwen2-7B MLP's SiLU(gate) * up on the gate|up GEMM's output [M, 2 * inter], as the engine's
    compiled layer runs it (inductor's kernel of `chunk`, SiLU and the product), eagerly, and as a
    hand-written Triton kernel (tile sweep): alone, and after the gate|up GEMM with `layers` distinct
    weights (cold, as in a decoder step; "GEMM alone" is the same chain without it), us per layer.
    floor_us: reading gate and up and writing the product at the bandwidth of a device copy."""
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = _copy_bandwidth()

    def reference(gu):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    variants = {"inductor": torch.compile(reference, dynamic=False), "eager": reference}
    variants.update({f"triton {b}/{w}": (lambda b, w: lambda gu: _swiglu_triton(gu, b, w))(b, w)
                     for b in (1024, 2048, 4096) for w in (4, 8)})
    ws = [torch.randn(2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) / hidden**0.5 for _ in range(layers)]
    rows = []
    for m in m_rows:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        gu = F.linear(x, ws[0])
        want = reference(gu.float())
        floor_us = 3 * m * inter * 2 / bw * 1e6

        def chain(fn=None):
            def run():
                for w in ws:
                    y = F.linear(x, w)
                    if fn is not None:
                        fn(y)
            return run

        rows.append({"op": "llm_swiglu", "variant": "GEMM alone", "M": m, "floor_us": floor_us,
                     "us": 1e3 * do_bench_cudagraph(chain(), rep=50, return_mode="median") / layers})
        for name, fn in variants.items():
            err = ((fn(gu).float() - want).norm() / want.norm()).item()
            alone = 1e3 * do_bench_cudagraph(lambda: fn(gu), rep=50, return_mode="median")
            after = 1e3 * do_bench_cudagraph(chain(fn), rep=50, return_mode="median") / layers
            rows.append({"op": "llm_swiglu", "variant": name, "M": m, "us": alone, "after_gemm_us": after,
                         "rel_err": err, "floor_us": floor_us})
    del ws
    torch.cuda.empty_cache()
    return rows


def norm_rows(b, tokens=(729, 182)):
    """SigLIP's LayerNorm (1152 channels), and the residual add with the norm after it, over b frames of
    729 and of 182 rows: ATen's kernel (eager), stc.vit_kernel's (called, and inside a compiled function)
    and inductor's (default, and with its multi-kernel or coordinate-descent options); "TB/s" counts
    the tensors read and written once. Inductor's default is a looped reduction over 1152 channels."""
    from stc import vit_kernel

    def ln(x, w, bias):
        return F.layer_norm(x, (C,), w, bias, 1e-6)

    def add_ln(x, a, w, bias):
        s = x + a
        return s, F.layer_norm(s, (C,), w, bias, 1e-6)

    def k_ln(x, w, bias):
        return vit_kernel.layer_norm(x, w, bias, 1e-6)

    def k_add_ln(x, a, w, bias):
        return vit_kernel.add_layer_norm(x, a, w, bias, 1e-6)

    options = {"default": {}, "multi_kernel": {"triton.multi_kernel": 1}, "coordinate_descent": {"coordinate_descent_tuning": True}}
    rows = []
    for t in tokens:
        x = torch.randn(b, t, C, device="cuda", dtype=torch.bfloat16)
        a = torch.randn_like(x)
        w, bias = (torch.randn(C, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for op, args, eager, kernel, tensors in (("norm", (x, w, bias), ln, k_ln, 2), ("add+norm", (x, a, w, bias), add_ln, k_add_ln, 4)):
            variants = [("aten eager", eager), ("stc kernel", kernel), ("stc kernel compiled", torch.compile(kernel, dynamic=False))]
            variants += [(f"inductor {name}", torch.compile(eager, dynamic=False, options=opts)) for name, opts in options.items()]
            want = eager(*args)
            want = (want[-1] if isinstance(want, tuple) else want).float()
            for name, fn in variants:
                got = fn(*args)
                err = ((got[-1] if isinstance(got, tuple) else got).float() - want).abs().max().item()
                us = 1e3 * do_bench_cudagraph(lambda fn=fn: fn(*args), rep=50, return_mode="median")
                rows.append({"op": op, "variant": name, "batch": b, "tokens": t, "us": us, "max_abs_err_vs_aten": err,
                             "tb_per_s": tensors * x.numel() * 2 / us * 1e-6})
    return rows


def pooling_rows(b, hidden=3584, size=384, patch=14):
    """LLaVA-OneVision's 2x2 bilinear pooling of b frames of projected tokens ([b, 729, 3584]): the
    model's apply_pooling (a contiguous [b, C, 27, 27] copy, then PyTorch's bilinear kernel) against
    stc.engine.pool_frames (the same interpolation on a channels-last view). The model's config is the
    tiny one with the 7B's grid (apply_pooling reads only the grid from it)."""
    from stc.engine import pool_frames
    from stc.models import build_model

    inner = build_model("tiny", seed=0)[0].model
    inner.config.vision_config.image_size, inner.config.vision_config.patch_size = size, patch
    x = torch.randn(b, (size // patch) ** 2, hidden, device="cuda", dtype=torch.bfloat16)
    want = inner.apply_pooling(x)
    rows = []
    for name, fn in (("apply_pooling", inner.apply_pooling), ("stc pool_frames", lambda t: pool_frames(inner, t))):
        us = 1e3 * do_bench_cudagraph(lambda fn=fn: fn(x), rep=50, return_mode="median")
        rows.append({"op": "pooling", "variant": name, "batch": b, "us": us, "equal": bool(torch.equal(fn(x), want))})
    return rows


VIT_PARTS = {"attention": lambda b: attention_rows(b, 182) + attention_rows(b, 729), "selection": selection_rows,
             "cosine": cosine_rows, "projections": projection_rows,
             "selective_projections": selective_projection_rows, "layer_chain": layer_chain_rows,
             "embedding": embedding_rows, "norm": norm_rows, "pooling": pooling_rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--llm-rows", type=int, nargs="*", default=[], help="also time a Qwen2-7B MLP at these row counts")
    p.add_argument("--llm-variants", nargs="+", default=list(LLM_MLP_VARIANTS), choices=LLM_MLP_VARIANTS,
                   help="with --llm-rows: the MLP variants to time")
    p.add_argument("--skip-vit", action="store_true")
    p.add_argument("--vit-parts", nargs="+", default=list(VIT_PARTS), choices=VIT_PARTS, help="the layer pieces to time")
    p.add_argument("--autotune", action="store_true", help="also the layer's GEMMs under inductor's max-autotune (minutes)")
    p.add_argument("--window-attention", action="store_true", help="also time the LLM's attention over a static window")
    p.add_argument("--window-sweep", action="store_true", help="with --window-attention: every tile config of the Triton kernel")
    p.add_argument("--window-shapes", nargs="+", default=None, metavar="B,N,USED",
                   help="with --window-attention: only these (streams, new tokens, used slots), e.g. 4,49,3136")
    p.add_argument("--llm-projections", type=int, nargs="*", default=[],
                   help="also time Qwen2-7B's projections at these row counts, weights cold (one per layer)")
    p.add_argument("--llm-blas", nargs="+", default=["default"], choices=["default", "cublas", "cublaslt"],
                   help="with --llm-projections: PyTorch's preferred BLAS library, each in turn")
    p.add_argument("--llm-swiglu", type=int, nargs="*", default=[],
                   help="also time the Qwen2-7B MLP's SiLU(gate) * up at these row counts: inductor, eager, a Triton kernel")
    p.add_argument("--llm-down-split", type=int, nargs="*", default=[],
                   help="also time Qwen2-7B's down projection (and residual add) at these row counts: cuBLAS against "
                        "stc.fast.split_k_linear")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this script times CUDA-graph replays: it needs a CUDA GPU, and none is visible here")
    rows = llm_mlp_rows(args.llm_rows, names=args.llm_variants) if args.llm_rows else []
    shapes = [tuple(int(v) for v in t.split(",")) for t in args.window_shapes] if args.window_shapes else None
    rows += window_attention_rows(sweep=args.window_sweep, shapes=shapes) if args.window_attention else []
    rows += llm_projection_rows(args.llm_projections, blas=args.llm_blas) if args.llm_projections else []
    rows += llm_swiglu_rows(args.llm_swiglu) if args.llm_swiglu else []
    rows += llm_down_split_rows(args.llm_down_split) if args.llm_down_split else []
    for b in [] if args.skip_vit else args.batches:
        for part in args.vit_parts:
            rows += VIT_PARTS[part](b)
        rows += autotune_rows(b) if args.autotune else []
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("op", "variant", "us")}
        print(f"{r['op']:>10} {r['variant']:>16} {r.get('us', float('nan')):8.1f} us  {extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": environment(args.commit), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
