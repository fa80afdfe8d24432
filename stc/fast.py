"""Per-step vision encoding as CUDA graphs, for the baseline and STC-Cacher alike.

Streaming encodes one frame per step (per stream), so the stock eager encoder is launch-bound. A
`GraphedVision` captures each kind of step once and replays it:

- baseline: the unmodified encoder layers (their Hugging Face forward) -> features, or, with the fused
  MLP (`fused_mlp`, on a GPU) or projections (`fused_qkv`), for every method alike, the same operations
  as `reference_layer`;
- STC-Cacher, reference step: `reference_layer` per layer; its K, V, A, M outputs are the static buffers
  (captured first, then rewritten by each replay, not copied);
- STC-Cacher, other steps: `selective_layer` per layer, reading those buffers;
- the ToMe baseline: `stc.baselines.tome.tome_layer` per layer with its fixed merge schedule (every
  layer's token count is known in advance, so the step has static shapes), then the merged tokens in
  raster order of their first patch.

Every method's step starts from the same patch embedding: one GEMM over the patches
(`patch_embeddings`, for SigLIP), or the module's convolution made row-major.

Semantics are exactly those of `stc.cacher` (the same tensor functions run inside the graphs), for
B synchronised streams: every stream in a step is at the same frame index, so all are reference
frames or none. Each stream's caches belong to its `CacherState`; the static buffers hold the
caches of the streams that used the runner last and are swapped (copied) only when the caller
passes other states. Outputs are cloned out of the graph's buffers: nothing returned aliases a later
step. Without CUDA (or with use_graphs=False) the same code runs eagerly.

With ``compile=True`` each layer function (the encoder layer, `reference_layer`, `selective_layer`,
ToMe's `tome_layer`) goes through `torch.compile` before capture, for every method alike: the compiler fuses the
small element-wise, normalisation, similarity and gather/scatter kernels that bound a one-frame step.
The graphs then replay the compiled kernels. One compiled function serves all layers (their weights
are inputs), so compiling costs seconds, once per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP

from stc.cacher import (CacherConfig, CacherState, FrameReport, LayerCache, attention_projections, encoder_layers,
                        fused_mlp_supported, fused_projection_weights, fused_projections_supported, reference_layer,
                        selective_layer)

_FIELDS = ("key", "value", "attn", "mlp", "hidden")


def _copy_caches(dst: list[LayerCache], src: list[LayerCache], row: int | None = None) -> None:
    """Copy each layer's cached tensors from src into dst (into batch row `row` of dst only, if given)."""
    for d, s in zip(dst, src):
        for f in _FIELDS:
            t = getattr(d, f)
            if t is not None:
                (t if row is None else t[row : row + 1]).copy_(getattr(s, f))


@contextlib.contextmanager
def no_gc():
    """Python's cyclic garbage collector off for the block (a CUDA graph capture), after one collection.

    Otherwise objects that only reference cycles hold are destroyed inside the capture, whenever Python's
    allocations set the collector off, and a destructor that releases CUDA resources (another runner's
    captured graphs; Triton 3.8, unlike the 3.6 measured here, also unloads a freed kernel's module)
    can invalidate the capture, which then fails at its next launch ("operation failed due to a
    previous error during capture"). Captures failed so, at random, on the H200 in repeated StreamBatch
    runs while dropped batches and their runners waited in a reference cycle
    (results/latency/h200_capture_failure_b4.txt); the cycle is gone too. With both changes, three
    StreamBatch runs of six methods each at commit fdcfea0 had no failure (results/latency/README.md)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def encoder_layer(layer: nn.Module, x: torch.Tensor, fused_mlp: bool = False,
                  qvk: tuple[torch.Tensor, torch.Tensor] | None = None, norm_kernel: bool = False,
                  normed: torch.Tensor | None = None, next_norm: nn.LayerNorm | None = None):
    """The baseline's layer: the unmodified Hugging Face encoder layer, or with fused_mlp, qvk,
    norm_kernel, normed or next_norm the same operations as `reference_layer` computes them (its MLP as
    one GEMM with the GELU, its three projections as one GEMM, its norms by `stc.vit_kernel`, the next
    layer's first norm in the pass of its output, as STC's layers). Returns the output, and with
    next_norm the pair (output, next_norm of it)."""
    if fused_mlp or qvk is not None or norm_kernel or normed is not None or next_norm is not None:
        out = reference_layer(layer, x, fused_mlp=fused_mlp, qvk=qvk, norm_kernel=norm_kernel, normed=normed, next_norm=next_norm)
        return out[0] if next_norm is None else (out[0], out[2])
    return layer(x, None)


def patch_gemm_supported(embeddings: nn.Module) -> bool:
    """Whether `patch_embeddings` computes these embeddings: a SigLIP-style module whose patch
    convolution is a plain patchify (kernel = stride, no padding, groups or dilation), followed by
    one learned position per patch (no class token, as in CLIP)."""
    conv = getattr(embeddings, "patch_embedding", None)
    pos = getattr(embeddings, "position_embedding", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(pos, nn.Embedding) or hasattr(embeddings, "class_embedding"):
        return False
    plain = (conv.kernel_size == conv.stride and conv.groups == 1 and conv.dilation == (1, 1)
             and conv.padding in ("valid", (0, 0)) and conv.bias is not None)
    ids = getattr(embeddings, "position_ids", None)
    return plain and ids is not None and torch.equal(ids.flatten().cpu(), torch.arange(pos.num_embeddings))


def patch_embeddings(embeddings: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A SigLIP vision embeddings forward ([B, 3, S, S] -> [B, T, C], without position interpolation)
    with the patch convolution as one GEMM: the patches as rows of C_in * p * p pixels, times the
    convolution's weights as a matrix, plus its bias and the position embeddings. The same values as
    the module (another summation order): a stride-p convolution with kernel p reads each pixel of
    the p * (S // p) square once, and cuDNN runs it as a slow convolution with layout conversions
    around it. Check `patch_gemm_supported` first."""
    conv = embeddings.patch_embedding
    (ph, pw), weight = conv.kernel_size, conv.weight
    b, c = pixels.shape[:2]
    gh, gw = pixels.shape[2] // ph, pixels.shape[3] // pw
    rows = (pixels[:, :, : gh * ph, : gw * pw].to(weight.dtype)
            .reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * ph * pw))
    out = torch.addmm(conv.bias, rows, weight.reshape(weight.shape[0], -1).t())
    return out.view(b, gh * gw, -1) + embeddings.position_embedding.weight


@functools.cache
def layer_functions(backend: str | None) -> tuple:
    """(encoder_layer, reference_layer, selective_layer), compiled with `backend` unless None."""
    fns = (encoder_layer, reference_layer, selective_layer)
    if backend is None:
        return fns
    return tuple(torch.compile(f, backend=backend, dynamic=False) for f in fns)


@functools.cache
def embedding_function(backend: str | None):
    """`patch_embeddings`, compiled with `backend` unless None. Uncompiled it is three eager kernels around
    the GEMM's: the patches' permute copy, and the bias and position add; and the GEMM runs a 2-byte-aligned
    kernel (a SigLIP patch is 588 values, not a multiple of 8). Inductor may fuse the copies and pad the
    GEMM (its shape padding); which kernels it chose was not profiled, only the step's time
    (results/latency/README.md)."""
    return patch_embeddings if backend is None else torch.compile(patch_embeddings, backend=backend, dynamic=False)


@functools.cache
def tome_function(backend: str | None):
    """`stc.baselines.tome.tome_layer`, compiled with `backend` unless None. Its token count differs per
    layer, so it is compiled with dynamic shapes: one compiled function for every layer and count."""
    from stc.baselines.tome import tome_layer

    return tome_layer if backend is None else torch.compile(tome_layer, backend=backend, dynamic=True)


def compile_backend(compile: bool | str) -> str | None:
    """GraphedVision's `compile` as a torch.compile backend: False -> None (no compiling), True ->
    inductor, a string -> that backend. (Inductor's max-autotune mode was tried: autotuning the
    encoder's GEMMs had not finished after 4 minutes on the H100, so it is not offered.)"""
    if isinstance(compile, bool):
        return "inductor" if compile else None
    if isinstance(compile, str) and compile:
        return compile
    raise ValueError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")


@functools.cache
def _compiled_forward(cls: type, backend: str):
    # dynamic shapes: one compiled function serves every token count and batch (frames, prompts of
    # init tokens, decoded tokens), so every method gets the same kernels whatever ran before it
    return torch.compile(cls.forward, backend=backend, dynamic=True)


def _recompile_limit(lm: nn.Module) -> int:
    """Compiled entries allowed per code object in `compiled_decoder`: each layer is its own entry, and a
    few shapes (frames, prompts, decoded tokens) each."""
    return 8 * (len(lm.layers) + 2)


@contextlib.contextmanager
def compiled_decoder(lm: nn.Module, backend: str = "inductor"):
    """While open, the language model's decoder layers, final norm and rotary embedding run their
    own (Hugging Face) forwards through `torch.compile`, which fuses the element-wise work around the
    GEMMs: RMSNorm, RoPE, SiLU * up and the residual adds. Meant around the warm-up and capture of a
    CUDA-graph step: its replays run the compiled kernels, and nothing outside the block compiles (an
    uncaptured prompt of a new length runs eager).

    One compiled function per module class serves all layers (their weights are inputs). The KV
    write (the cache's `update`, or `rope_update` with RoPE in the fused attention) and the attention
    function are graph breaks where the engine disables compiling (its static window and
    `stc.attention`); because the layer index is passed to the KV write, each layer is its own cache entry, and the block raises dynamo's recompile
    limits to allow them; reaching them raises (instead of dynamo's silent fall-back to uncompiled
    layers, which would make a timed run measure something else). The per-instance forwards are removed on exit, also on error; a failure
    of the compiler is raised as a RuntimeError that says how to run uncompiled.
    """
    modules = [*lm.layers, lm.norm, lm.rotary_emb]
    if any("forward" in vars(m) for m in modules):
        raise RuntimeError("compiled_decoder: a decoder module already has a per-instance forward (nested compiled_decoder?)")
    entries = _recompile_limit(lm)
    try:
        for m in modules:
            m.forward = functools.partial(_compiled_forward(type(m), backend), m)
        with torch._dynamo.config.patch(recompile_limit=entries, accumulated_recompile_limit=max(256, 4 * entries),
                                        fail_on_recompile_limit_hit=True):
            yield
    except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as err:
        raise RuntimeError(f"compiling the decoder layers ({backend}) failed: {type(err).__name__}; "
                           "the engine runs them uncompiled with EngineConfig(compile_llm=False)") from err
    finally:
        for m in modules:
            vars(m).pop("forward", None)


class _FusedQwen2Attention(Qwen2Attention):
    """A Qwen2 attention (transformers' `Qwen2Attention.forward`, step for step) whose query, key and
    value projections are one GEMM over `stc_qkv_weight`, the rows [Wq; Wk; Wv] (and `stc_qkv_bias`).
    `FusedDecoderProjections` gives modules this class and those tensors; one class for every layer
    and engine, so compiled layers are reused (a per-instance forward would be guarded by identity)."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache=None, past_key_values=None, **kwargs):
        hf = sys.modules[Qwen2Attention.__module__]
        cache = cache if cache is not None else past_key_values  # transformers >= 5.24 passes `cache`
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        n_q, n_kv = self.q_proj.out_features, self.k_proj.out_features
        q, k, v = F.linear(hidden_states, self.stc_qkv_weight, self.stc_qkv_bias).split((n_q, n_kv, n_kv), dim=-1)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        if hasattr(cache, "rope_update"):  # stc.engine's caches: RoPE and the KV write as one step
            q, k, v = cache.rope_update(q, k, v, *position_embeddings, self.layer_idx)
        else:
            q, k = hf.apply_rotary_pos_emb(q, k, *position_embeddings)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


@dataclasses.dataclass(frozen=True)
class SplitK:
    """A projection computed as `splits` GEMMs over equal slices of its input features, run as one
    batched GEMM with float32 outputs and summed after (`split_k_linear`), for inputs of `rows[0]` to
    `rows[1]` rows; other row counts run the plain GEMM.

    For Qwen2-7B's down projection (18,944 input features) with its weights read from HBM, two splits
    beat cuBLAS from 1 to 392 rows and lose at 784, us per layer with the residual add after it
    (results/latency/h200_llm_down_split.json, H200, commit 8ce5531): 38.7 -> 38.0 (1 row), 40.3 ->
    35.9 (4), 43.0 -> 38.3 (49), 47.1 -> 40.2 (98), 56.4 -> 53.0 (196), 77.4 -> 71.1 (294), 95.7 -> 90.1
    (392), 176.1 -> 180.7 (784); each timed as one compiled function with the add, as in a compiled
    decoder layer, where inductor can fuse the sum with the add (not profiled in the layer).
    """

    splits: int = 2
    rows: tuple[int, int] = (1, 1 << 30)

    def __post_init__(self):
        if self.splits < 2 or not 1 <= self.rows[0] <= self.rows[1]:
            raise ValueError(f"SplitK needs splits >= 2 and 1 <= rows[0] <= rows[1], got {self}")

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `split_k_linear` runs for x @ weight.T: the row count in range, the input features
        a multiple of the splits."""
        rows = x.numel() // x.shape[-1]
        return self.rows[0] <= rows <= self.rows[1] and weight.shape[1] % self.splits == 0


DOWN_SPLIT = SplitK(splits=2, rows=(1, 392))
"""The engine's split of Qwen2's down projection on a GPU, where two splits beat cuBLAS (`SplitK`).
End to end on the H200, off and on in turn in one process (results/latency/h200_bf16_down_split_ab.json),
prefill ms per stream-frame, the mean of two pairs: the Pruner 1.717 -> 1.654 at B = 4 and 5.39 -> 5.25
at B = 1, the baseline 7.45 -> 7.25 at B = 1 (its pairs +0.2% and -5.3%: noisy). The B = 4 baseline
(784 rows) is out of range."""


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """x @ weight.T as `splits` products over equal slices of the input features, one batched GEMM
    (views of x and weight, no copies) whose float32 partial products are summed in float32 and
    rounded once to x's dtype. The input features must be a multiple of `splits`."""
    *lead, k = x.shape
    n = weight.shape[0]
    if k % splits:
        raise ValueError(f"split_k_linear: {k} input features are not a multiple of {splits} splits")
    parts = x.reshape(-1, splits, k // splits).transpose(0, 1)  # [splits, rows, k / splits]
    w = weight.view(n, splits, k // splits).permute(1, 2, 0)  # [splits, k / splits, n]
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        partial = torch.bmm(parts, w, out_dtype=torch.float32)
    else:
        partial = torch.bmm(parts.float(), w.float())
    return partial.sum(0).to(x.dtype).view(*lead, n)


class _FusedQwen2MLP(Qwen2MLP):
    """A Qwen2 MLP, down(act(gate(x)) * up(x)), with gate and up as one GEMM over `stc_gate_up_weight`,
    the rows [Wgate; Wup], and the down projection as `split_k_linear` where `stc_down_split` (a
    `SplitK` or None) applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.stc_gate_up_weight).chunk(2, dim=-1)
        hidden = self.act_fn(gate) * up
        split = self.stc_down_split
        if split is not None and split.applies(hidden, self.down_proj.weight):
            return split_k_linear(hidden, self.down_proj.weight, split.splits)
        return self.down_proj(hidden)


class FusedDecoderProjections:
    """Every decoder layer of a Qwen2 language model computes its query, key and value projections
    as one GEMM, and its MLP's gate and up projections as another, for every method alike (the
    streaming engine's fast path, `EngineConfig.cuda_graphs`).

    The weights are re-homed, not copied: each layer's Wq, Wk and Wv become row blocks of one buffer
    [Wq; Wk; Wv] (their biases of one vector), Wgate and Wup of one buffer [Wgate; Wup], and the
    modules' parameters are views of these blocks with their old values. The buffers are registered as
    the modules' non-persistent buffers (not in `state_dict`), so compiled layers see their shapes as
    static. Loading weights into the parameters in place therefore changes the buffers too. The
    attention and MLP modules become subclasses of their own (`isinstance` still holds) whose forwards
    run transformers' Qwen2 forwards step for step with the fused GEMMs, inside `compiled_decoder`'s
    compiled layers too, except that a cache with a `rope_update(q, k, v, cos, sin, layer_idx)` method
    (`stc.engine`'s) does the RoPE and the KV write in one call: a static window's is one kernel
    (`stc.rope_kernel`), 3.0 us per layer of the pruned B = 4 step on the H200 where inductor's RoPE and
    two `index_copy_` took four kernels, 9.9 us. `close()` restores the classes and gives every parameter its own storage
    again (a parameter moved or replaced meanwhile, as by `model.to(...)`, is not seen: close first).

    In the pruned B = 4 prefill step of Qwen2-7B (196 rows, weights read from HBM), the three
    projections take 19.8 us per layer as one GEMM against 29.4 us as three (15.8 + 2 x 6.8), the gate
    and up projections 104 against 121 us (results/latency/h100_profile_prefill_b4_pruner_compiled.txt,
    h100_profile_prefill_b4_pruner.txt: profiles of the fused and unfused steps).

    down_split: the down projections run as `split_k_linear` where it applies (`SplitK`); None: plain
    GEMMs. The engine passes `DOWN_SPLIT` on a GPU with 16-bit weights.
    """

    def __init__(self, lm: nn.Module, down_split: SplitK | None = None):
        if not self.supported(lm):
            raise ValueError("FusedDecoderProjections needs transformers' Qwen2 decoder layers (Qwen2Attention, "
                             "Qwen2MLP) with same-dtype, same-device projections and no per-module hooks of accelerate")
        self.lm = lm
        self._groups: list[tuple[nn.Module, type, list[nn.Linear]]] = []
        with torch.no_grad():
            for layer in lm.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
                # buffers, not plain attributes: dynamo gives a module's parameters and buffers static
                # shapes inside `compiled_decoder`'s dynamic=True functions, but a plain tensor attribute
                # symbolic ones, and then every kernel after the GEMM indexes by symbolic sizes (SiLU * up
                # on the H200: 14.3 us against 4.5 for 196 rows, results/latency/h200_swiglu_dynamic.txt)
                attn.register_buffer("stc_qkv_weight", self._rehome(qkv, "weight"), persistent=False)
                attn.register_buffer("stc_qkv_bias", self._rehome(qkv, "bias") if attn.q_proj.bias is not None else None,
                                     persistent=False)
                mlp.register_buffer("stc_gate_up_weight", self._rehome(gate_up, "weight"), persistent=False)
                mlp.stc_down_split = down_split
                self._groups += [(attn, type(attn), qkv), (mlp, type(mlp), gate_up)]
                attn.__class__, mlp.__class__ = _FusedQwen2Attention, _FusedQwen2MLP

    @staticmethod
    def _rehome(linears: list[nn.Linear], name: str) -> torch.Tensor:
        """Concatenate the linears' `name` tensors along dim 0 into one new buffer and make each
        parameter a view of its block."""
        olds = [getattr(m, name) for m in linears]
        fused = torch.cat([p.detach() for p in olds])
        start = 0
        for m, old in zip(linears, olds):
            setattr(m, name, nn.Parameter(fused[start : start + old.shape[0]], requires_grad=old.requires_grad))
            start += old.shape[0]
        return fused

    @staticmethod
    def supported(lm: nn.Module) -> bool:
        """Whether the language model's decoder layers are transformers' Qwen2 layers (the forwards
        reproduce theirs; not fused already), with projections of one dtype and device each, and no
        accelerate hooks or per-instance forwards."""
        layers = getattr(lm, "layers", None)
        if not layers:
            return False
        for layer in layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if type(attn) is not Qwen2Attention or type(mlp) is not Qwen2MLP:
                return False
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            for group in (qkv, gate_up):
                if any(not isinstance(m, nn.Linear) or hasattr(m, "_hf_hook") for m in group):
                    return False
                if len({(t.dtype, t.device) for m in group for t in (m.weight, m.bias) if t is not None}) != 1:
                    return False
            if len({m.bias is None for m in qkv}) != 1 or any(m.bias is not None for m in gate_up):
                return False
            if "forward" in vars(attn) or "forward" in vars(mlp):
                return False
        return True

    def close(self) -> None:
        """Restore the classes; each parameter gets its own storage again (same values)."""
        with torch.no_grad():
            for module, cls, linears in self._groups:
                module.__class__ = cls
                for name in ("stc_qkv_weight", "stc_qkv_bias", "stc_gate_up_weight"):
                    module._buffers.pop(name, None)
                vars(module).pop("stc_down_split", None)
                for m in linears:
                    for name in ("weight", "bias"):
                        p = getattr(m, name)
                        if p is not None:
                            setattr(m, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        self._groups = []


def vit_kernels_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `stc.vit_kernel` can run for a tower of this dtype and device: Triton, a CUDA device."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from stc import vit_kernel
    except ImportError:
        return False
    return vit_kernel.supported(dtype)


def norm_kernel_supported(layer: nn.Module, device: torch.device) -> bool:
    """Whether `stc.cacher.layer_norm(..., kernel=True)` can run this layer's norms with `stc.vit_kernel`'s
    one-pass kernel: both are LayerNorms over the channels with weights and biases, and the kernels run
    (`vit_kernels_supported`)."""
    norms = [getattr(layer, n, None) for n in ("layer_norm1", "layer_norm2")]
    if not all(isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.weight is not None and m.bias is not None
               for m in norms):
        return False
    return vit_kernels_supported(norms[0].weight.dtype, device)


def attention_kernel_supported(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `stc.cacher.selective_layer(..., attention_kernel=True)` can run this layer's attention by
    `stc.vit_kernel.attention`: a SigLIP or CLIP vision attention (no mask, no dropout at inference) with heads
    the kernel supports (`stc.vit_kernel.attention_supported`: SigLIP's 72, not CLIP's 64), and the kernels run
    (`vit_kernels_supported`)."""
    attn = getattr(layer, "self_attn", None)
    if type(attn).__name__ not in ("SiglipAttention", "CLIPAttention") or not vit_kernels_supported(dtype, device):
        return False
    from stc import vit_kernel

    return vit_kernel.attention_supported(attn.head_dim, dtype)


# what the Cacher options of its selective layers need, as their refusals say it
_SELECTIVE = "a reuse mode other than 'mlp' and a cache interval above 1"


def _option(requested: bool | None, available: bool, refusal: str) -> bool:
    """A GraphedVision option: None -> where available; True where not available raises `refusal`."""
    if requested and not available:
        raise ValueError(refusal)
    return available if requested is None else bool(requested)


class FusedProjections:
    """Each layer's `stc.cacher.fused_projection_weights` ([Wq; Wv; Wk] and their biases), kept equal to
    the layer's own: `sync()` copies them again, in place (captured graphs read the same buffers), when
    a weight has changed in place since the last copy (PyTorch's version counters, which
    `load_state_dict` and optimisers advance). A parameter replaced by another object is not seen, as
    it is not by captured graphs either: build a new runner then."""

    def __init__(self, layers: list[nn.Module]):
        if not self.supported(layers):
            raise ValueError("these layers' projections cannot be fused (FusedProjections.supported)")
        self.layers = list(layers)
        self.weights = [fused_projection_weights(layer) for layer in self.layers]
        self._params = [t for layer in self.layers for t in self._sources(layer)]
        self._versions = self._stamp()

    @staticmethod
    def _sources(layer: nn.Module) -> list[torch.Tensor]:
        projs = attention_projections(layer)
        return [p.weight for p in projs] + [p.bias for p in projs]

    @classmethod
    def supported(cls, layers: list[nn.Module]) -> bool:
        """Every layer's projections fuse (`stc.cacher.fused_projections_supported`) and its weights
        have version counters (not inference tensors, whose in-place changes could not be followed)."""
        return all(fused_projections_supported(layer) and not any(t.is_inference() for t in cls._sources(layer))
                   for layer in layers)

    def _stamp(self) -> list[int]:
        return [t._version for t in self._params]

    @torch.no_grad()
    def sync(self) -> bool:
        """Copy the weights again if any changed; returns whether they did."""
        versions = self._stamp()
        if versions == self._versions:
            return False
        for layer, fused in zip(self.layers, self.weights):
            fused_projection_weights(layer, out=fused)
        self._versions = versions
        return True


class GraphedVision:
    """Vision features [B, T, C] (the output of layer `feature_layer`) for B frames, one per stream.

    tower: a SigLIP/CLIP vision tower (transformers 5.x); cacher: STC-Cacher settings or None for
    the baseline; feature_layer: index into hidden_states (-1 = last layer, LLaVA-OV's choice);
    compile: run the layer functions, and the patch embedding as a GEMM (`embedding_function`), through
    `torch.compile` (see `compile_backend`); tome: a ToMe merge schedule (tokens merged per layer,
    `stc.baselines.tome.tome_r_for_budget`) instead of a cacher (with compile, its layer function has
    dynamic shapes, `tome_function`); keep_input_of: an encoder layer index (negative: from the end)
    whose input each call also keeps, as `layer_input`
    (a copy, [B, T, C]), for compressors that read it (VisionZip); kernels: run the Cacher's
    token selection with the Triton kernel of `stc.vit_kernel` (the same tokens as without). None
    (default): where it can run (a CUDA device and Triton); True where it cannot raises. fused_mlp:
    every method's layers (baseline, Cacher, ToMe) run a SigLIP MLP's fc1, bias and GELU as one GEMM
    (`stc.cacher.mlp_forward`); None (default): where it can (`stc.cacher.fused_mlp_supported`: a CUDA
    device); True where it cannot raises. patch_gemm: every method's patch embedding as one GEMM
    (`patch_embeddings`); None (default): where the embeddings allow it (`patch_gemm_supported`: SigLIP,
    on any device); True where they do not raises. fused_qkv: every method's layers compute the
    attention's projections of the same rows as one GEMM (`stc.cacher.project`), from a copy of each
    layer's query, value and key weights (`FusedProjections`: 3 C^2 values per layer, about 0.2 GB for
    SigLIP-so400m in bf16), copied again when a weight is changed in place; None (default): where the
    layers allow it (`FusedProjections.supported`, on any device); True where they do not raises.
    norm_kernel: every method's layers run their LayerNorms, and the residual adds with the norms after
    them, as one pass each (`stc.vit_kernel.layer_norm`, `add_layer_norm`; inductor's norm of 1152
    channels is a looped reduction); a layer's output pass also computes the next layer's first norm (a
    selective layer's merges its recomputed rows too, `merge_layer_norm`; ToMe's layers do not); None
    (default): where it can (`norm_kernel_supported`: a CUDA device and Triton); True where it cannot raises.
    value_buffer: the Cacher's selective layers merge their recomputed values into the cached ones in a
    buffer per layer that outlives the step (`stc.cacher.merge_values`; a [B, T, C] tensor per layer), where
    with the kernels only the rows that change between frames are written, instead of writing a whole new
    tensor each frame; None (default): with the kernels, where the Cacher merges values (every reuse mode
    but "mlp"); True without a selective value merge raises.
    attention_kernel: the Cacher's selective layers compute their recomputed tokens' attention by
    `stc.vit_kernel.attention` instead of PyTorch's attention (cuDNN on the H100); every method's full attention
    stays PyTorch's (the kernel was not consistently faster for a whole frame's queries,
    results/latency/README.md). None (default): with the kernels, where the Cacher recomputes only some tokens'
    attention (every reuse mode but "mlp") and `attention_kernel_supported` (SigLIP's heads, a CUDA device); True
    where not raises.
    project_all: the Cacher's selective layers compute the query, value and key projections of every token as
    one GEMM and use the recomputed tokens' query and value rows (`stc.cacher.selective_layer(project_all=True)`),
    instead of the key projection of every token and then the query and value projections of the recomputed
    tokens: the same values, in less time where a GEMM's time is its latency, not its work. On the H100 at
    SigLIP-so400m's shapes: one frame, 11.5 against 15.6 us; two frames, 20.0 against 19.2
    (`h100_vit_selective_projections.json` in results/latency). None (default): with the kernels and fused_qkv,
    at one frame per step (batch 1), where the Cacher recomputes only some tokens' attention; True where it does
    not raises.
    """

    # the options a runner resolves (None: where available) and exposes as attributes of the same names
    OPTIONS = ("kernels", "fused_mlp", "patch_gemm", "fused_qkv", "norm_kernel", "value_buffer", "attention_kernel",
               "project_all")

    def __init__(self, tower: nn.Module, batch: int = 1, cacher: CacherConfig | None = None,
                 feature_layer: int = -1, use_graphs: bool | None = None, warmup: int = 2,
                 compile: bool | str = False, tome: tuple[int, ...] | None = None, keep_input_of: int | None = None,
                 kernels: bool | None = None, fused_mlp: bool | None = None, patch_gemm: bool | None = None,
                 fused_qkv: bool | None = None, norm_kernel: bool | None = None, value_buffer: bool | None = None,
                 attention_kernel: bool | None = None, project_all: bool | None = None):
        if tome is not None and cacher is not None:
            raise ValueError("GraphedVision runs either STC-Cacher or ToMe, not both")
        if keep_input_of is not None and tome is not None:
            raise ValueError("keep_input_of is not available with ToMe (its layers see merged tokens)")
        self.tower = tower
        self.layers = encoder_layers(tower)
        n = len(self.layers)
        self.depth = n if feature_layer == -1 else (feature_layer % (n + 1))
        self.batch = batch
        self.cacher = cacher
        param = next(tower.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        backend = compile_backend(compile)
        self._encoder_layer, self._reference_layer, self._selective_layer = layer_functions(backend)
        self._tome_layer = tome_function(backend) if tome is not None else None
        self._patch_embeddings = embedding_function(backend)
        self.kernels = bool(cacher) and _option(
            kernels, vit_kernels_supported(self.dtype, self.device),
            f"kernels=True needs Triton and a CUDA device (stc.vit_kernel), here {self.device} {self.dtype}")
        self.fused_mlp = _option(fused_mlp, fused_mlp_supported(self.layers[0], self.device),
                                 f"fused_mlp=True needs a SigLIP MLP (tanh GELU) on a CUDA device, here {self.device}")
        self.patch_gemm = _option(patch_gemm, patch_gemm_supported(tower.embeddings),
                                  "patch_gemm=True needs SigLIP-style patch embeddings (stc.fast.patch_gemm_supported)")
        self.norm_kernel = _option(norm_kernel, norm_kernel_supported(self.layers[0], self.device),
                                   f"norm_kernel=True needs LayerNorms with weights and biases, Triton and a CUDA device, here {self.device}")
        run = self.layers[: self.depth]
        self.fused_qkv = _option(fused_qkv, FusedProjections.supported(run),
                                 "fused_qkv=True needs linear query, key and value projections of one shape, with biases, and "
                                 "weights that are not inference tensors (stc.fast.FusedProjections.supported)")
        self._projections = FusedProjections(run) if self.fused_qkv else None
        self._qvk = self._projections.weights if self.fused_qkv else [None] * self.depth
        cfg = tower.config
        self.size = cfg.image_size
        self.pixels = torch.zeros(batch, cfg.num_channels, self.size, self.size, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            self.tokens = tower.embeddings(self.pixels).shape[1]
        # k only where some frame is selective (cache_interval 1 makes every frame a reference frame)
        self.k = cacher.recomputed_tokens(self.tokens) if cacher and cacher.cache_interval != 1 else None
        merges_values = self.k is not None and cacher.reuse != "mlp"
        self.value_buffer = merges_values and self.kernels if value_buffer is None else _option(
            value_buffer, merges_values, f"value_buffer=True needs a Cacher whose selective layers merge values ({_SELECTIVE})")
        selective_attention = merges_values and attention_kernel_supported(self.layers[0], self.dtype, self.device)
        self.attention_kernel = selective_attention and self.kernels if attention_kernel is None else _option(
            attention_kernel, selective_attention, "attention_kernel=True needs a Cacher whose selective layers recompute "
            f"some tokens' attention ({_SELECTIVE}) and SigLIP-style heads "
            f"(stc.fast.attention_kernel_supported) on a CUDA device, here {self.device} {self.dtype}")
        self.project_all = merges_values and self.kernels and self.fused_qkv and batch == 1 if project_all is None else _option(
            project_all, merges_values, "project_all=True needs a Cacher whose selective layers recompute some tokens' "
            f"attention ({_SELECTIVE})")
        self.tome = None
        if tome is not None:
            from stc.baselines.tome import CLASS_TOKEN_LAYERS, ToMeState, _normalise_schedule

            self.tome = ToMeState(schedule=_normalise_schedule(tome, n), proportional_attention=True,
                                  class_token=type(self.layers[0]).__name__ in CLASS_TOKEN_LAYERS)
        self.keep_hidden = bool(cacher) and cacher.selection_feature == "hidden"
        self.keep_input_of = self._layer_input = self.layer_input = None
        if keep_input_of is not None:
            valid = isinstance(keep_input_of, int) and not isinstance(keep_input_of, bool) and -n <= keep_input_of < n
            if not valid or keep_input_of % n >= self.depth:
                raise ValueError(f"keep_input_of must be the index of one of the {self.depth} layers run, got {keep_input_of!r}")
            self.keep_input_of = keep_input_of % n
            self._layer_input = torch.zeros(batch, self.tokens, cfg.hidden_size, device=self.device, dtype=self.dtype)
        if cacher:
            shape = (batch, self.tokens, cfg.hidden_size)
            self.refs = [
                LayerCache(*(torch.zeros(shape, device=self.device, dtype=self.dtype) if f != "hidden" or self.keep_hidden else None
                             for f in _FIELDS))
                for _ in range(self.depth)
            ]
        if self.value_buffer:  # each layer's merged values, and its rows that may differ from the cached values'
            self._dirty = torch.ones(self.depth, batch * self.tokens, device=self.device, dtype=torch.int8)
            self._value_work = [(torch.zeros(shape, device=self.device, dtype=self.dtype), dirty) for dirty in self._dirty.unbind(0)]
        else:
            self._value_work = [None] * self.depth
        self._new_refs: list[LayerCache] | None = None
        self._owners: list[weakref.ref] | None = None  # the current streams' states (`_load`)
        self._graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warmup = warmup
        self._pool = None

    # -- the steps, as plain code -----------------------------------------------------------------

    def _embed(self) -> torch.Tensor:
        if self.patch_gemm:
            return self._patch_embeddings(self.tower.embeddings, self.pixels)
        # the module's output is a transposed view (tokens of a channel adjacent), a layout that every
        # residual add would pass on to the next layer: make it row-major, as the GEMM's is
        return self.tower.embeddings(self.pixels).contiguous()

    def _next_norm(self, index: int) -> nn.LayerNorm | None:
        """The next layer's first norm, which layer `index` computes in the pass that writes its output
        (with the norm kernels; None for the last layer run)."""
        return self.layers[index + 1].layer_norm1 if self.norm_kernel and index + 1 < self.depth else None

    def _full(self) -> torch.Tensor:
        x, h = self._embed(), None
        for i, layer in enumerate(self.layers[: self.depth]):
            self._keep_input(i, x)
            nxt = self._next_norm(i)
            out = self._encoder_layer(layer, x, fused_mlp=self.fused_mlp, qvk=self._qvk[i], norm_kernel=self.norm_kernel,
                                      normed=h, next_norm=nxt)
            x, h = out if nxt is not None else (out, None)
        return x

    def _keep_input(self, index: int, x: torch.Tensor) -> None:
        if index == self.keep_input_of:
            self._layer_input.copy_(x)

    def _tome(self) -> torch.Tensor:
        x = self._embed()
        self.tome.begin(x)
        for i, layer in enumerate(self.layers[: self.depth]):
            x = self._tome_layer(layer, x, self.tome.schedule[i], self.tome, fused_mlp=self.fused_mlp, qvk=self._qvk[i],
                                 norm_kernel=self.norm_kernel)
        return self.tome.in_raster_order(x)

    def _reference(self) -> torch.Tensor:
        """The reference step. Its layers' caches become the runner's (`_adopt`): no copies."""
        x, h = self._embed(), None
        caches = []
        for i, layer in enumerate(self.layers[: self.depth]):
            self._keep_input(i, x)
            x, cache, *h = self._reference_layer(layer, x, keep_hidden=self.keep_hidden, fused_mlp=self.fused_mlp, qvk=self._qvk[i],
                                                 norm_kernel=self.norm_kernel, normed=h, next_norm=self._next_norm(i))
            h = h[0] if h else None
            caches.append(cache)
        self._new_refs = caches
        self._values_stale()
        return x

    def _values_stale(self) -> None:
        """Mark every row of the value buffers as possibly differing from the cached values (after these
        change: a reference step, caches loaded or adopted), so that the next selective step rewrites them."""
        if self.value_buffer:
            self._dirty.fill_(1)

    def _adopt(self, keep: bool) -> None:
        """Make the reference step's caches (`_new_refs`) the runner's `refs`; keep: copy the current
        caches into them first (after a capture, whose run computed nothing, for loaded streams)."""
        if keep:
            _copy_caches(self._new_refs, self.refs)
            self._values_stale()  # (a reference step marks them itself, but a capture ran nothing)
        self.refs, self._new_refs = self._new_refs, None

    def _selective(self) -> torch.Tensor:
        x, h = self._embed(), None
        shared = None
        for i, layer in enumerate(self.layers[: self.depth]):
            self._keep_input(i, x)
            reuse = None if self.cacher.per_layer_selection else shared
            x, shared, *h = self._selective_layer(layer, x, self.refs[i], self.k, self.cacher, dynamic=reuse, kernels=self.kernels,
                                                  fused_mlp=self.fused_mlp, qvk=self._qvk[i], norm_kernel=self.norm_kernel,
                                                  normed=h, next_norm=self._next_norm(i), value_work=self._value_work[i],
                                                  attention_kernel=self.attention_kernel, project_all=self.project_all)
            h = h[0] if h else None
        return x

    def _step(self, kind: str):
        return {"full": self._full, "tome": self._tome, "reference": self._reference, "selective": self._selective}[kind]

    def _graph(self, kind: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured graph of a kind of step and its output buffer (captured on first use).

        The reference graph's cache outputs are the static buffers that every replay rewrites and the
        selective graph reads, so it is captured first: its outputs stay allocated (held in `refs`)
        and the selective graph is captured reading them."""
        if kind == "selective" and "reference" not in self._graphs:
            self._graph("reference")
        if kind not in self._graphs:
            fn = self._step(kind)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(self._warmup):  # warm-ups write no stream's caches (a reference step's are adopted after capture)
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with no_gc(), torch.cuda.graph(graph, pool=self._pool):
                out = fn()
            self._pool = graph.pool()
            self._graphs[kind] = (graph, out)
            if kind == "reference":
                self._adopt(keep=True)
        return self._graphs[kind]

    def _run(self, kind: str) -> torch.Tensor:
        if not self.use_graphs:
            out = self._step(kind)()
            if kind == "reference":
                self._adopt(keep=False)
            return out
        graph, out = self._graph(kind)
        graph.replay()
        return out

    def _kind(self, index: int) -> str:
        if not self.cacher:
            return "tome" if self.tome is not None else "full"
        return "reference" if self.cacher.is_reference(index) else "selective"

    def _check_states(self, states: list[CacherState] | None) -> int:
        """The streams' common frame index (0 without a cacher)."""
        if not self.cacher:
            return 0
        if states is None or len(states) != self.batch:
            raise ValueError(f"pass one CacherState per stream ({self.batch})")
        index = states[0].frames_seen
        if any(s.frames_seen != index for s in states):
            raise ValueError("streams batched in one step must be at the same frame index")
        return index

    # -- public ----------------------------------------------------------------------------------

    def new_state(self) -> CacherState:
        """A fresh per-stream cacher state (only with a cacher)."""
        if not self.cacher:
            raise ValueError("this GraphedVision has no cacher: it keeps no per-stream state")
        return CacherState(config=self.cacher, num_layers=self.depth)

    @torch.no_grad()
    def prepare(self, states: list[CacherState] | None = None, frames: int = 1) -> None:
        """Capture now the graphs that the next `frames` calls will replay, so that those calls (and
        their timing) only replay. Calls capture on first use anyway; this is optional."""
        index = self._check_states(states)
        if not self.use_graphs:
            return
        if self.cacher:
            self._load(states)
        for i in range(index, index + frames):
            self._graph(self._kind(i))

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, states: list[CacherState] | None = None) -> torch.Tensor:
        """Features of one frame per stream: pixels [B, 3, S, S]; states: one CacherState per stream."""
        if pixels.shape != self.pixels.shape:
            raise ValueError(f"expected pixels of shape {tuple(self.pixels.shape)}, got {tuple(pixels.shape)}")
        index = self._check_states(states)
        self.pixels.copy_(pixels)
        if self._projections is not None:
            self._projections.sync()
        if self.cacher:
            self._load(states)
        kind = self._kind(index)
        out = self._run(kind).clone()
        if self._layer_input is not None:
            self.layer_input = self._layer_input.clone()
        if not self.cacher:
            return out
        for s in states:
            counts = [self.tokens if kind == "reference" else self.k] * self.depth
            s.reports.append(FrameReport(index=index, reference=kind == "reference", recomputed=counts))
            s.frames_seen += 1
        return out

    def _load(self, states: list[CacherState]) -> None:
        """Make the static buffers hold these streams' caches (a copy only when the streams change).

        The runner holds its current streams' states by weak reference: when they change, the caches of
        those still alive are saved into their states (one copy of each buffer's rows, each state keeping
        a view of its row), and a stream that nobody holds any more costs nothing."""
        owners = None if self._owners is None else [ref() for ref in self._owners]
        if owners is not None and len(owners) == len(states) and all(a is b for a, b in zip(owners, states)):
            return
        alive = [(row, o) for row, o in enumerate(owners or []) if o is not None and o.frames_seen]
        if alive:  # save before loading: a stream may come back in another row
            rows = torch.tensor([row for row, _ in alive], device=self.device)
            saved = [[None if getattr(r, f) is None else getattr(r, f).index_select(0, rows) for f in _FIELDS] for r in self.refs]
            for i, (_, owner) in enumerate(alive):
                owner._refs = [LayerCache(*(None if t is None else t[i : i + 1] for t in layer)) for layer in saved]
        for row, s in enumerate(states):
            if s.frames_seen and s._refs[0] is not None:
                _copy_caches(self.refs, s._refs, row)
        self._values_stale()
        self._owners = [weakref.ref(s) for s in states]
