"""A Triton kernel for STC-Cacher's token selection on a GPU (`stc.fast.GraphedVision`).

`stc.cacher.selective_layer(..., kernels=True)` calls it; the module needs Triton and is imported
only then. `rank_select` is a `torch.library.triton_op` (``stc::rank_select``), so `torch.compile`
sees through it and CUDA graphs capture it. Its result equals the PyTorch selection of
`stc.cacher.select_dynamic_tokens` (tests: a brute-force ranking, in Triton's interpreter on a CPU
and on the H100).

One frame of SigLIP-so400m is 729 tokens, of which a non-reference frame recomputes 182. At B = 1
every kernel of the selective layer is bound by its latency, not its work, and choosing the dynamic
tokens with `torch.topk` takes 12 us with the cosine similarity (compiled; a stable `torch.sort`
20 us), of a layer of about 100 us (results/latency/h100_vit_kernels.json). `rank_select` is one
kernel: each program ranks a block of tokens against all of the frame's similarities (rank = how
many are smaller, ties to the lower index) and writes the tokens of rank < k at their rank: 6 us with
the cosine (results/latency/h100_vit_kernels_stc.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _rank_select(SIM, IDX, T, K, stride_sb, BLOCK_I: tl.constexpr, TP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.arange(0, TP)
    inf = float("inf")
    s_all = tl.load(SIM + b * stride_sb + j, mask=j < T, other=inf).to(tl.float32)
    s_all = tl.where(s_all != s_all, inf, s_all)  # NaN ranks last, as in torch.sort
    s_i = tl.load(SIM + b * stride_sb + i, mask=i < T, other=inf).to(tl.float32)
    s_i = tl.where(s_i != s_i, inf, s_i)
    before = (s_all[None, :] < s_i[:, None]) | ((s_all[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
    rank = tl.sum((before & (j[None, :] < T)).to(tl.int32), axis=1)
    tl.store(IDX + b * K + rank, i.to(tl.int64), mask=(rank < K) & (i < T))


@triton_op("stc::rank_select", mutates_args={})
def rank_select(sim: torch.Tensor, k: int) -> torch.Tensor:
    """sim [B, T] (any float dtype) -> int64 [B, k]: the k least similar tokens of each frame in
    ascending order of similarity, ties to the lower index, NaN last. Equal to
    ``torch.sort(sim, dim=1, stable=True).indices[:, :k]``."""
    if sim.dim() != 2 or not 0 <= k <= sim.shape[1]:
        raise ValueError(f"rank_select: expected sim [B, T] and 0 <= k <= T, got {tuple(sim.shape)} and k={k}")
    b, t = sim.shape
    idx = torch.empty(b, k, dtype=torch.int64, device=sim.device)
    if b == 0 or k == 0:
        return idx
    sim = sim.contiguous()
    block_i = 16
    wrap_triton(_rank_select)[(b, triton.cdiv(t, block_i))](
        sim, idx, t, k, sim.stride(0), BLOCK_I=block_i, TP=triton.next_power_of_2(t), num_warps=4)
    return idx


def supported(dtype: torch.dtype) -> bool:
    """Whether the kernel ranks similarities of this dtype (on a CUDA device: `stc.fast.vit_kernels_supported`)."""
    return dtype in (torch.float16, torch.bfloat16, torch.float32)
