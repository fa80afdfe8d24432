"""ReKV streaming video QA on transformers' LlavaOnevisionForConditionalGeneration, with STC plugged in.

One `Stream` is one video arriving over time. Its life:

1. the init prompt (system + "user ") is prefilled once;
2. pushed frames go through the vision tower (optionally with STC-Cacher, per-stream state) ->
   projector -> 2x2 bilinear pooling (196 tokens/frame at 384 px) -> optionally a compressor
   (STC-Pruner or a baseline, per-stream state) -> LLM prefill, one frame at a time; each frame's
   KV is kept as one block. While encoding, a frame attends to the init tokens plus the last
   ``n_local`` tokens;
3. a question at time t sees only the frames pushed so far. Each layer scores the frame blocks by
   the dot product of the question's mean query with each block's mean key (both before RoPE) and
   keeps the top ``retrieve_top_k``; the question is prefilled over init + retrieved blocks (in
   temporal order, RoPE re-applied so that they sit at contiguous positions) and answered greedily.
   The question's KV is dropped afterwards: later questions reuse the stream's KV, nothing is
   re-encoded.

Choices where ReKV leaves room, stated here once:
- Retrieval queries come from a separate pass of the retrieval text (the raw question), which
  attends to the init tokens only; the answer pass then uses each layer's retrieved blocks.
- Keys are stored after RoPE at the positions they were computed with; when a block is used at
  other positions it is rotated by the difference (exact up to rounding; zero difference is exact).
- The encoding window does not move its tokens at every frame. Once it is full, it drops its oldest
  tokens by advancing: its init tokens are rewritten just before its oldest kept token, rotated
  (from their first copy) to sit there, and attention starts at them. A token's RoPE position is
  its slot, so only relative positions matter, and they are ReKV's: a frame sees the init tokens,
  then the last n_local tokens, then itself, at contiguous positions. Only once the window has
  advanced past ``window_slack`` slots are its kept tokens moved back behind the init tokens, their
  keys rotated from their blocks' copies (so each key is rounded once, however often it moves).
- With frames of different token counts (e.g. VidCom2), every layer keeps the first tokens, in
  temporal order, of its top-k blocks up to one shared budget (the smallest layer total, at most
  top_k x the mean block length), so all layers share one attention mask.
- Blocks beyond ``device_blocks`` most recent ones live in CPU memory; their mean keys stay on the
  accelerator for scoring, and retrieved blocks are copied back per question.

No model code is copied: the engine drives the model's own modules (vision tower, projector, the
Qwen2 decoder, ``lm_head``) through their public forwards (LLaVA-OneVision's bilinear pooling it runs
on another memory layout, `pool_frames`; a test holds it to ``apply_pooling``), passing its own
KV object as the decoder's cache argument (``past_key_values``, ``cache`` from transformers 5.24)
and a prepared mask.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, rotate_half

from stc import attention
from stc.cacher import CacherConfig, attach_cacher
from stc.compress import Compressed, FrameCompressor, VisionContext
from stc.flops import head_dim
from stc.pruner import Pruner, PrunerConfig
from stc.timing import StageTimer

INIT_PROMPT = "<|im_start|>system \nYou are a helpful assistant.<|im_end|><|im_start|>user "
QUESTION_TEMPLATE = "\n{query}<|im_end|><|im_start|>assistant\n"
SUPPORTED_ATTENTION = ("sdpa", "eager")
GRAPH_BUCKET = 1024  # cuda_graphs: context lengths are rounded up to a multiple of this many slots
MOVE_BYTES = 2**30  # a window's move joins (and rotates) as many layers at a time as keep its copy within this


def pool_frames(inner: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The pooling of `inner.apply_pooling` (`inner`: a LlavaOnevisionModel) on projected frame tokens
    [F, H * W, C] -> [F, ceil(H / 2) * ceil(W / 2), C]. LLaVA-OneVision's own (bilinear, to half the grid
    side) runs on a channels-last view of the tokens, with no copies: `apply_pooling` makes them a
    contiguous [F, C, H, W] tensor, for which PyTorch's CUDA bilinear kernel runs one thread per output
    pixel over every frame and channel (196 threads at 384 px). A model whose `apply_pooling` is another
    function is pooled by its own."""
    if type(inner).apply_pooling is not LlavaOnevisionModel.apply_pooling:
        return inner.apply_pooling(tokens)
    vcfg = inner.config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    f, t, c = tokens.shape
    if t != side * side:
        raise ValueError(f"expected {side * side} tokens per frame ({side} x {side} patches), got {t}")
    grid = tokens.view(f, side, side, c).permute(0, 3, 1, 2)  # [F, C, H, W] in the channels-last layout
    pooled = nn.functional.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(f, -1, c)


def _bucketed(slots: int) -> int:
    """slots rounded up to a multiple of GRAPH_BUCKET."""
    return -(-slots // GRAPH_BUCKET) * GRAPH_BUCKET


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the streaming engine (ReKV defaults from the paper).

    n_local: tokens of recent context each frame attends to while encoding (15000).
    window_slack: slots a full encoding window may advance before it moves its tokens back (see
        the module docstring): the cost of a move (rotating n_local keys: about 9 ms per stream on
        the H100 at LLaVA-OV-7B's shapes by the PyTorch rotation) is paid once per window_slack /
        frame tokens frames instead of at every frame, for window_slack more slots of KV memory per
        stream. 0 moves at every frame.
    retrieve_top_k: frame blocks retrieved per layer for a question (64); None attends to every
        frame (no retrieval).
    device_blocks: frame blocks kept on the accelerator; older ones are moved to CPU memory. None
        keeps all on the model's device.
    max_new_tokens: default answer length (16 for multiple choice).
    cacher: STC-Cacher settings, or None.
    pruner: STC-Pruner settings, or None (another compressor can be passed to StreamingEngine).
    tome_tokens_per_frame: the ToMe baseline: merge inside the vision encoder down to this many tokens
        per frame (schedule from stc.baselines.tome_r_for_budget); merging destroys the token grid, so
        the 2x2 pooling is skipped and merged tokens are put in raster order of their first patch.
    cuda_graphs: the fast path of issue 7, for the baseline and STC alike: the vision step runs as
        CUDA graphs (`stc.fast.GraphedVision`; the Cacher ranks its tokens with `stc.vit_kernel`
        where Triton runs, and every method's SigLIP MLP runs its GELU in the fc1 GEMM, its patch
        embedding and its attention projections each as one GEMM; every decoder layer's query, key
        and value projections, and its gate and up projections, each as one GEMM, and on a GPU with
        16-bit weights its down projection split in two over its inputs for up to 392 rows
        (`stc.fast.FusedDecoderProjections`, `stc.fast.DOWN_SPLIT`; undone by `close()`), each stream's KV window is one
        static buffer written in place, every frame's prefill is a captured graph (per token count)
        attending to the window's used slots (`stc.attention.window_attention`; where it cannot run,
        to the whole buffer through a mask) after one kernel that applies RoPE and writes the keys and
        values into the window (`stc.rope_kernel`, where Triton runs), and attention packs grouped
        query heads instead of repeating K/V.
        On a CPU the same static-shape code runs without capture (that is how it is tested).
    compile_vision: with cuda_graphs on a GPU, the vision step's layer functions go through
        torch.compile (inductor) before capture, for the baseline and STC alike (it fuses the small
        kernels a one-frame step is bound by; compiling costs seconds once per process).
    compile_llm: with cuda_graphs on a GPU, captured prefill and decode steps run the decoder's own
        layer forwards through torch.compile (`stc.fast.compiled_decoder`), for every method alike: it
        fuses RMSNorm, SiLU * up and the residual adds around the GEMMs, and RoPE where the RoPE and
        KV-write kernel cannot run (the KV write and the attention kernel stay as they are). Uncaptured steps run eager.
    timing: record per-stage times.
    """

    n_local: int = 15000
    window_slack: int = 4096
    retrieve_top_k: int | None = 64
    device_blocks: int | None = None
    max_new_tokens: int = 16
    cacher: CacherConfig | None = None
    pruner: PrunerConfig | None = None
    tome_tokens_per_frame: int | None = None
    cuda_graphs: bool = False
    compile_vision: bool = True
    compile_llm: bool = True
    init_prompt: str = INIT_PROMPT
    timing: bool = True

    def __post_init__(self):
        if not _is_int(self.n_local) or self.n_local < 0:
            raise ValueError(f"n_local must be an integer >= 0, got {self.n_local!r}")
        if not _is_int(self.window_slack) or self.window_slack < 0:
            raise ValueError(f"window_slack must be an integer >= 0, got {self.window_slack!r}")
        if self.retrieve_top_k is not None and (not _is_int(self.retrieve_top_k) or self.retrieve_top_k < 1):
            raise ValueError(f"retrieve_top_k must be an integer >= 1 or None, got {self.retrieve_top_k!r}")
        if self.device_blocks is not None and (not _is_int(self.device_blocks) or self.device_blocks < 0):
            raise ValueError(f"device_blocks must be an integer >= 0 or None, got {self.device_blocks!r}")
        if self.tome_tokens_per_frame is not None and (
            not _is_int(self.tome_tokens_per_frame) or self.tome_tokens_per_frame < 1 or self.cacher is not None
        ):
            raise ValueError(f"tome_tokens_per_frame must be an integer >= 1 and excludes the cacher, got {self.tome_tokens_per_frame!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")


@dataclass
class Block:
    """One frame's KV: kv [layers, 2, kv_heads, tokens, head_dim] at positions start..start+tokens-1."""

    frame: int
    time: float | None
    start: int
    kv: torch.Tensor
    mean_key: torch.Tensor  # [layers, kv_heads, head_dim], before RoPE, float32, on the model device

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    retrieved: list[list[int]] | None  # per layer, frame indices retrieved (None without retrieval)
    logits: torch.Tensor  # [vocab] float32 on the CPU: the scores of the first answer token
    context_tokens: int = 0  # tokens the answer attended to before its prompt: init + retrieved (per layer)


def _is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _KV:
    """What the decoder's attention layers get as their KV cache (`past_key_values`; `cache` from
    transformers 5.24): one buffer [layers, 2, kvh, cap, d] holding a prepared context in slots
    first .. length - 1, to which each forward appends its tokens in place."""

    def __init__(self, buf: torch.Tensor, length: int):
        self.buf, self.length = buf, length
        self.first = 0  # the context's first slot (an encoding window that has advanced: its init tokens)
        self.pending = 0
        self.query_sink = None  # set during a retrieval pass: layer_idx, q [1, heads, n, d] -> None

    def update(self, key, value, layer_idx, *args, **kwargs):
        n = key.shape[2]
        end = self.length + n
        self.buf[layer_idx, 0, :, self.length : end] = key[0]
        self.buf[layer_idx, 1, :, self.length : end] = value[0]
        self.pending = n
        return self.buf[layer_idx, 0, :, self.first : end][None], self.buf[layer_idx, 1, :, self.first : end][None]

    def rope_update(self, query, key, value, cos, sin, layer_idx):
        """transformers' RoPE on query [b, heads, n, d] and key [b, kv_heads, n, d], then `update`:
        the step between projections and attention of `stc.fast.FusedDecoderProjections`' attention.
        Returns the rotated queries and the keys and values to attend to."""
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key, value = self.update(key, value, layer_idx)
        return query, key, value

    def commit(self) -> None:
        self.length += self.pending
        self.pending = 0


class _StaticKV(_KV):
    """A fixed-capacity window: each forward writes its tokens at `index` in place and attends to the
    whole buffer through a mask (unused slots are zeros, masked), so every step has the same shapes.
    `advances`: an encoding window, whose context may start past slot 0 (`first`)."""

    def __init__(self, buf: torch.Tensor, length: int, advances: bool = False):
        super().__init__(buf, length)
        self.advances = advances
        self.index: torch.Tensor | None = None
        self.visible = buf.shape[-2]  # slots attended to: a bucket covering the context, not the whole buffer

    @torch.compiler.disable  # a graph break in compiled decoder layers (stc.fast.compiled_decoder)
    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.index is None:
            return super().update(key, value, layer_idx)
        if self.buf.dim() == 6:  # a StreamBatch: [layers, 2, B, kvh, cap, d]
            self.buf[layer_idx, 0].index_copy_(2, self.index, key)
            self.buf[layer_idx, 1].index_copy_(2, self.index, value)
            return self.buf[layer_idx, 0, :, :, : self.visible], self.buf[layer_idx, 1, :, :, : self.visible]
        self.buf[layer_idx, 0].index_copy_(1, self.index, key[0])
        self.buf[layer_idx, 1].index_copy_(1, self.index, value[0])
        return self.buf[layer_idx, 0, :, : self.visible][None], self.buf[layer_idx, 1, :, : self.visible][None]

    def _windows(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole K and V buffers as [B, kvh, cap, d] (B = 1 for one stream)."""
        if self.buf.dim() == 6:
            return self.buf[layer_idx, 0], self.buf[layer_idx, 1]
        return self.buf[layer_idx, 0][None], self.buf[layer_idx, 1][None]

    @torch.compiler.disable  # a graph break in compiled decoder layers, as `update`
    def rope_update(self, query, key, value, cos, sin, layer_idx):
        """With `index` set and on a GPU where `stc.rope_kernel` runs, RoPE and the KV write are one
        kernel (the queries rotated as inductor would: in float32, rounded once); else
        `_KV.rope_update`."""
        if self.index is None or not rope_kernel_supported(query.dtype, query.device, query.shape[-1]):
            return super().rope_update(query, key, value, cos, sin, layer_idx)
        from stc.rope_kernel import rope_write

        kw, vw = self._windows(layer_idx)
        query = rope_write(query, key, value, cos, sin, kw, vw, self.index)
        return query, kw[:, :, : self.visible], vw[:, :, : self.visible]


def rope_kernel_supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether `stc.rope_kernel` can run: Triton installed, a CUDA device, a 16-bit dtype and a head
    size it tiles."""
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from stc import rope_kernel
    except ImportError:
        return False
    return rope_kernel.supported_head_dim(head_dim)


def _stacked_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """torch.stack(parts, dim=2) as a view, without a copy, where the parts are consecutive slices along one
    dimension of one tensor (the streams' K and V of a StreamBatch block: `kv[:, :, i]` for each i); else None.
    (A stack of such strided views copies each part by itself: a launch per stream, per layer chunk of a move.)"""
    p0, size = parts[0], parts[0].element_size()
    step = (parts[1].data_ptr() - p0.data_ptr()) // size if len(parts) > 1 else 0
    for i, p in enumerate(parts):
        if (p.shape != p0.shape or p.stride() != p0.stride() or p.dtype != p0.dtype or p.device != p0.device
                or p.untyped_storage().data_ptr() != p0.untyped_storage().data_ptr()
                or p.data_ptr() != p0.data_ptr() + i * step * size):
            return None
    if len(parts) > 1 and step <= 0:
        return None
    return p0.as_strided((*p0.shape[:2], len(parts), *p0.shape[2:]), (*p0.stride()[:2], step, *p0.stride()[2:]))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors [..., n_i, d] (alike but for n_i) joined along their tokens, in one copy. torch.cat copies in
    one CUDA launch per 128 inputs only where they are contiguous and have at most 4 dimensions (else a copy per
    input), so they are joined as [rows, n_i, d]."""
    lead, d = parts[0].shape[:-2], parts[0].shape[-1]
    joined = torch.cat([p.contiguous().view(-1, *p.shape[-2:]) for p in parts], dim=1)
    return joined.view(*lead, joined.shape[1], d)


def cache_keyword(lm: nn.Module) -> str:
    """The name of a transformers decoder's KV-cache argument: `cache` from transformers 5.24 on
    (where `past_key_values` is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"


def _causal_mask(q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """Additive mask [1, 1, q, kv]: query i sees keys j <= kv_len - q_len + i (the context, then causal)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(j > kv_len - q_len + i, torch.finfo(dtype).min)
    return mask[None, None]


def check_model(model: nn.Module) -> None:
    """TypeError unless `model` is what the engine runs: a transformers 5.x LlavaOnevisionForConditionalGeneration."""
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("vision_tower", "multi_modal_projector", "language_model", "apply_pooling")) or not hasattr(model, "lm_head"):
        raise TypeError(
            f"StreamingEngine needs a transformers 5.x LlavaOnevisionForConditionalGeneration, got {type(model).__name__}"
        )


class StreamingEngine:
    """ReKV on a LLaVA-OneVision model, shared by any number of streams.

    Modifications to the model, undone by `close()`: with a cacher (or ToMe), the vision tower's
    encoder layers get its forward (see stc.cacher); each decoder attention gets a forward pre-hook
    that reports the question's queries during retrieval passes (it does nothing for other caches);
    with cuda_graphs, the language model's attention implementation is switched to
    stc.attention's packed SDPA, and its decoder layers' projections are fused
    (`stc.fast.FusedDecoderProjections`: the parameters become views of fused buffers until then).
    """

    def __init__(self, model: nn.Module, processor, config: EngineConfig | None = None, compressor: FrameCompressor | None = None):
        self.config = config = config or EngineConfig()
        check_model(model)
        inner = model.model
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.lm = inner.language_model
        self._cache_keyword = cache_keyword(self.lm)
        text_cfg = self.lm.config
        attn = text_cfg._attn_implementation
        if attn == attention.NAME:  # set by an engine with cuda_graphs until its close()
            raise ValueError("another StreamingEngine with cuda_graphs=True still holds this model: close it "
                             "(engine.close(), or open it in a with-block) before opening a new one")
        if attn not in SUPPORTED_ATTENTION:
            raise ValueError(f"the language model uses attention {attn!r}; the engine supports {SUPPORTED_ATTENTION}")
        if getattr(text_cfg, "use_sliding_window", False):
            raise ValueError("sliding-window attention in the language model is not supported")
        if getattr(self.lm.rotary_emb, "attention_scaling", 1.0) != 1.0:
            raise ValueError("RoPE variants with attention scaling are not supported (positions are re-rotated)")
        self.device = self.lm.embed_tokens.weight.device
        self.dtype = self.lm.embed_tokens.weight.dtype
        self.num_layers = text_cfg.num_hidden_layers
        self.num_heads = text_cfg.num_attention_heads
        self.kv_heads = text_cfg.num_key_value_heads
        self.head_dim = head_dim(text_cfg)
        self.vision_layer = model.config.vision_feature_layer
        self.select_strategy = model.config.vision_feature_select_strategy
        if not isinstance(self.vision_layer, int):
            raise ValueError("only a single vision_feature_layer is supported")

        if compressor is not None and config.pruner is not None:
            raise ValueError("give either config.pruner or a compressor, not both")
        self.compressor = compressor if compressor is not None else (Pruner(config.pruner) if config.pruner else None)
        # a compressor that reads one encoder layer's input (VisionZip) names it; the graphed step keeps it
        self.vision_layer_input = getattr(self.compressor, "vision_layer_input", None)
        # What close() undoes, set before anything is patched: a failure below undoes what was done.
        self.cacher = self.tome = self.tome_schedule = None
        self._hooks: list = []
        self._attn_before = None
        self._fused_decoder = None
        self._answer: _StaticKV | None = None  # cuda_graphs: the answering window, and its graphs
        self._answer_graphs: dict[tuple, tuple] = {}
        try:
            # With cuda_graphs the GraphedVision runner below runs the cacher's tensor functions itself.
            if config.cacher and not config.cuda_graphs:
                self.cacher = attach_cacher(inner.vision_tower, config.cacher)
                self.cacher.hold()  # shared with another engine of this config: detached when the last one closes
            if config.tome_tokens_per_frame is not None:
                from stc.baselines.tome import attach_tome, tome_r_for_budget

                vcfg = model.config.vision_config
                patches = (vcfg.image_size // vcfg.patch_size) ** 2
                self.tome_schedule = tome_r_for_budget(patches, vcfg.num_hidden_layers, config.tome_tokens_per_frame)
                # With cuda_graphs the GraphedVision runner runs ToMe's layer function itself.
                if not config.cuda_graphs:
                    self.tome = attach_tome(inner.vision_tower, self.tome_schedule)
                    self.tome.hold()
            self._hooks = [
                layer.self_attn.register_forward_pre_hook(self._query_hook, with_kwargs=True) for layer in self.lm.layers
            ]
            self.capture = config.cuda_graphs and self.device.type == "cuda"
            self.compile_vision = self.capture and config.compile_vision
            self.compile_llm = self.capture and config.compile_llm
            self.vision_runner = None
            if config.cuda_graphs:
                from stc.fast import DOWN_SPLIT, FusedDecoderProjections

                self.vision_runner = self._graphed_vision(1)
                if FusedDecoderProjections.supported(self.lm):
                    sixteen_bit = self.lm.layers[0].mlp.down_proj.weight.dtype in (torch.bfloat16, torch.float16)
                    split = DOWN_SPLIT if self.capture and sixteen_bit else None
                    self._fused_decoder = FusedDecoderProjections(self.lm, split)
                self._attn_before = text_cfg._attn_implementation
                text_cfg._attn_implementation = attention.NAME
                vcfg = model.config.vision_config
                self.max_frame_tokens = (vcfg.image_size // vcfg.patch_size) ** 2
            self.init_ids = self._ids(config.init_prompt)
            self.eos_ids = {
                i for i in (self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id)
                if isinstance(i, int) and i >= 0
            }
        except BaseException:
            self.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _query_hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it `cache`
        if isinstance(cache, _KV) and cache.query_sink is not None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            q = module.q_proj(hidden)
            cache.query_sink(module.layer_idx, q.view(*q.shape[:-1], -1, module.head_dim).transpose(1, 2))
        return None

    def _ids(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.device)

    def _rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate keys x [..., n, d] by delta positions [n] (RoPE composes: R(a) R(b) = R(a + b))."""
        cos, sin = self.lm.rotary_emb(x.float(), delta.to(x.device)[None])
        return (x.float() * cos[0] + rotate_half(x.float()) * sin[0]).to(x.dtype)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        """Vision features [F, T, C] -> LLM tokens: the projector, then LLaVA-OneVision's 2x2 pooling
        (skipped after ToMe: its merged tokens have no grid to pool)."""
        tokens = self.model.model.multi_modal_projector(feats)
        return tokens if self.tome_schedule is not None else pool_frames(self.model.model, tokens)

    def _graphed_vision(self, batch: int):
        from stc.fast import GraphedVision

        return GraphedVision(self.model.model.vision_tower, batch=batch, cacher=self.config.cacher,
                             feature_layer=self.vision_layer, use_graphs=self.capture, compile=self.compile_vision,
                             tome=self.tome_schedule, keep_input_of=self.vision_layer_input)

    def _slide_window(self, w: _KV, init: torch.Tensor, incoming: int, blocks: list[list[Block]]) -> None:
        """Keep at most n_local recent tokens in the window w (buffer [layers, 2, ..., slots, d], context in
        slots w.first .. w.length - 1: the init tokens, then the recent ones). A static window must then have
        room for `incoming` tokens.

        The oldest tokens beyond n_local are dropped by advancing: w.first moves past them and the init
        tokens are rewritten there (from `init`, their KV as first written at slots 0 .. n_init - 1, keys
        rotated to the new slots), so each frame's slide writes n_init tokens whatever n_local is. Once
        w.first would pass `window_slack`, the kept tokens move back to follow the init tokens at slot 0,
        their keys rotated to their new slots from their blocks' copies.

        blocks: the frame blocks of each stream whose window w is (one list, or one per stream of a
        batch, all of the same layout); the window holds the tail of their tokens. A moved key is rotated
        from its block's copy, written once at the block's position, so it is rounded once however often
        the window moves (re-rotating the window's own copy would round it again at every move: on random keys
        with Qwen2-7B's RoPE in fp16, 5.6e-3 relative error after the 76 slides of a 196-token frame in a window
        of 15,000, against 3.6e-4). Only a block moved to CPU memory (`device_blocks`) has its rows re-rotated
        from the window. The init tokens are rotated from their first copy each time: rounded twice at most."""
        n_init = init.shape[-2]
        kept = w.length - w.first - n_init
        drop = max(0, kept - self.config.n_local)
        kept -= drop
        first = w.first + drop  # the new first slot: the init tokens right before the oldest kept token
        if first > self.config.window_slack:  # move the kept tokens back behind the init tokens at slot 0
            sources, shifts = [], []  # per block overlapping the kept tokens, newest first: its K and V, one per stream (or the window's rows)
            head, end = blocks[0], kept  # `end`: the kept tokens not yet covered; a token's new slot is n_init + its row
            for j in range(len(head) - 1, -1, -1):
                if end == 0:
                    break
                block = head[j]
                rows = min(block.length, end)
                if all(stream[j].kv.device == w.buf.device for stream in blocks):
                    parts = [stream[j].kv[..., block.length - rows :, :] for stream in blocks]
                    if w.buf.dim() == 5:
                        sources.append(parts[0])
                    else:  # the streams' K and V: one view where a batch wrote them as one tensor, else a list to stack
                        stacked = _stacked_view(parts)
                        sources.append(parts if stacked is None else stacked)
                    delta = n_init + end - rows - (block.start + block.length - rows)  # the block moves as one
                else:  # in CPU memory: the window's own rows, by -first (a view: each layer is copied before it is written)
                    sources.append(w.buf[..., first + n_init + end - rows : first + n_init + end, :])
                    delta = -first
                shifts.append(torch.full((rows,), delta, device=w.buf.device))
                end -= rows
            if end:
                raise RuntimeError(f"the KV window holds {end} tokens that are in no frame block")
            w.buf[..., :n_init, :] = init
            if kept:
                shift = torch.cat(shifts[::-1])
                rope = self._rope_for_kernel(shift, w.buf)
                # the blocks' K and V joined, then one rotation for all (a rotation per block costs more in launches
                # than it saves at B = 1), over as many layers at a time as keep the joined copy (and the float32
                # keys without the kernel) within MOVE_BYTES: all 28 of Qwen2-7B's at B = 1; at B = 16 one pass
                # over all needed more than an H100 had left
                per_layer = w.buf[0, 0, ..., :kept, :].numel() * 4
                step = max(1, min(w.buf.shape[0], MOVE_BYTES // per_layer))
                for lo in range(0, w.buf.shape[0], step):
                    hi = lo + step
                    kv = _joined([p[lo:hi] if isinstance(p, torch.Tensor) else torch.stack([x[lo:hi] for x in p], dim=2)
                                  for p in sources[::-1]])
                    # the joined copy is read before the window is written
                    self._write_rotated(kv, shift, rope, w.buf[lo:hi, ..., n_init : n_init + kept, :])
            w.first, w.length = 0, n_init + kept
        elif drop:  # advance: the init tokens move to just before the oldest kept token
            shift = torch.full((n_init,), first, device=w.buf.device)
            self._write_rotated(init, shift, self._rope_for_kernel(shift, w.buf), w.buf[..., first : first + n_init, :])
            w.first = first
        if isinstance(w, _StaticKV) and w.length + incoming > w.buf.shape[-2]:
            raise ValueError(f"a frame of {incoming} tokens does not fit the static KV window ({w.buf.shape[-2]} slots)")

    def _rope_for_kernel(self, shift: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The float32 cos and sin [n, d] of rotations by `shift` [n] for `stc.rope_kernel.rotate_into`,
        where it runs on the window `buf`; None where it does not (`_write_rotated` then rotates in PyTorch)."""
        if not rope_kernel_supported(buf.dtype, buf.device, buf.shape[-1]):
            return None
        return tuple(t[0] for t in self.lm.rotary_emb(torch.empty(0, device=buf.device), shift[None]))

    def _write_rotated(self, kv: torch.Tensor, shift: torch.Tensor, rope, dst: torch.Tensor) -> None:
        """dst[:, 0] = the keys kv[:, 0] rotated by `shift` [n] positions, dst[:, 1] = the values kv[:, 1]
        (kv, dst: [layers, 2, (streams,) kv_heads, n, d]; dst a view of a window, not overlapping kv). With
        `rope` (`_rope_for_kernel`) one `rotate_into` pass; else PyTorch, rounding the same float32 rotation
        once (the two agree within one rounding: the kernel may fuse a multiply-add)."""
        if rope is not None:
            from stc.rope_kernel import rotate_into

            rotate_into(kv if kv.dim() == 6 else kv[:, :, None], *rope, dst if dst.dim() == 6 else dst[:, :, None])
        else:
            dst[:, 0] = self._rotate(kv[:, 0], shift)
            dst[:, 1] = kv[:, 1]

    def _mean_keys(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """A block's retrieval key: the mean over its tokens of the keys before RoPE, float32.

        keys: [..., n, d], stored after RoPE at positions start..start+n-1. Returns [..., d]. The
        positions are made on the keys' device: a copy from the host would wait for the GPU (the
        frame's captured step) and leave the GPU idle while the kernels after it are launched."""
        pos = torch.arange(start, start + keys.shape[-2], device=keys.device)
        return self._rotate(keys.float(), -pos).mean(dim=-2)

    def _decoder(self, embeds: torch.Tensor, kv: _KV, mask: torch.Tensor | None) -> torch.Tensor:
        """Run the decoder over embeds [1, n, D] appended to kv's context; returns the final hidden states."""
        n = embeds.shape[1]
        pos = torch.arange(kv.length, kv.length + n, device=self.device)[None]
        masks = {"full_attention": mask, "sliding_attention": mask}
        out = self.lm(inputs_embeds=embeds, position_ids=pos, attention_mask=masks, use_cache=False,
                      **{self._cache_keyword: kv})
        kv.commit()
        return out.last_hidden_state

    def _window_slots(self, n_init: int) -> int:
        """A static encoding window's capacity: the init tokens, n_local recent ones, the largest frame that
        follows them, and the window_slack slots it may advance by before it moves back."""
        return n_init + self.config.n_local + self.max_frame_tokens + self.config.window_slack

    def _new_buffer(self, capacity: int) -> torch.Tensor:
        return torch.empty(
            self.num_layers, 2, self.kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device
        )

    def _static_step(self, w: "_StaticKV", graphs: dict, n: int, start: int, dim: int, batch: int,
                     capture: bool | None = None):
        """The prefill of n tokens per stream at `start` of a static window w, as a function of the
        tokens [batch, n, dim] (or [n, dim] for one stream) that returns the last token's final hidden
        state [batch, dim] (a buffer the next call overwrites): one graph per token count and context
        bucket (with a mask, attention covers the first `bucket` slots, a multiple of GRAPH_BUCKET,
        rather than the whole buffer). `graphs` caches them for this window. capture=False runs the
        same code uncaptured (for token counts seen once); None follows the engine."""
        # stc.attention.window_attention over the used slots where it runs (one graph serves every step), else a mask
        mask_free = attention.window_supported(self.dtype, self.device, self.head_dim, n, w.advances)
        bucket = w.buf.shape[-2] if mask_free else min(w.buf.shape[-2], _bucketed(start + n))
        if (n, bucket) not in graphs:
            inputs = {
                "embeds": torch.zeros(batch, n, dim, dtype=self.dtype, device=self.device),
                "start": torch.full((), start, dtype=torch.long, device=self.device),
                "first": torch.zeros((), dtype=torch.long, device=self.device),  # the window's first slot
            }
            slots = torch.arange(bucket, device=self.device)
            offsets = torch.arange(n, device=self.device)
            groups = self.num_heads // self.kv_heads

            def forward():
                pos = inputs["start"] + offsets
                w.index, w.visible = pos, bucket
                if mask_free:
                    mask, extra = None, {attention.KV_USED: (pos[-1:] + 1).to(torch.int32).expand(batch).contiguous()}
                    if w.advances:
                        extra[attention.KV_FIRST] = inputs["first"].to(torch.int32).expand(batch).contiguous()
                else:
                    hidden = (slots[None, :] > pos[:, None]) | (slots[None, :] < inputs["first"])
                    mask = torch.where(hidden, torch.finfo(self.dtype).min, 0.0).to(self.dtype)
                    mask, extra = mask.repeat(groups, 1)[None, None], {}  # packed for stc.attention: rows (group, query)
                masks = {"full_attention": mask, "sliding_attention": mask}
                out = self.lm(inputs_embeds=inputs["embeds"], position_ids=pos[None].expand(batch, -1),
                              attention_mask=masks, **{self._cache_keyword: w}, **extra)
                w.index, w.visible = None, w.buf.shape[-2]
                return out.last_hidden_state[:, -1]

            graph = None
            capture = self.capture if capture is None else capture and self.capture
            if capture:
                from stc.fast import compiled_decoder, no_gc

                with compiled_decoder(self.lm) if self.compile_llm else contextlib.nullcontext():
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        for _ in range(2):  # warm-up writes land in slots this step overwrites anyway
                            forward()
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    # one memory pool for a window's graphs: they replay one at a time and write only
                    # into the window; the pool lives and dies with them
                    if "pool" not in graphs:
                        graphs["pool"] = torch.cuda.graph_pool_handle()
                    with no_gc(), torch.cuda.graph(graph, pool=graphs["pool"]):
                        inputs["last"] = forward()
            if capture or not self.capture:  # an uncaptured step on a GPU (seen once) is not kept
                graphs[(n, bucket)] = (graph, inputs, forward)
        else:
            graph, inputs, forward = graphs[(n, bucket)]

        def step(tokens: torch.Tensor) -> torch.Tensor:
            inputs["embeds"].copy_(tokens.reshape(inputs["embeds"].shape))
            inputs["start"].fill_(start)
            inputs["first"].fill_(w.first)
            if graph is not None:
                graph.replay()
                last = inputs["last"]
            else:
                last = forward()
            w.length = start + n
            return last

        return step

    def _answer_window(self, slots: int) -> "_StaticKV":
        """cuda_graphs: the static window that questions are answered in, at least `slots` long. It is
        scratch (each question fills it anew; questions run one at a time), so one serves all streams
        and its captured decode step is reused; it grows, dropping its graphs, when a question needs more."""
        if self._answer is None or self._answer.buf.shape[3] < slots:
            cap = _bucketed(slots)
            if self._answer is not None:
                cap = max(cap, 2 * self._answer.buf.shape[3])
            self._answer, self._answer_graphs = None, {}  # free the old window before allocating the new
            self._answer = _StaticKV(self._new_buffer(cap).zero_(), 0)  # zeros: masked slots must be finite
        return self._answer

    def open_batch(self, streams: int) -> "StreamBatch":
        """B synchronised streams whose frames are encoded together, one frame each per step
        (needs cuda_graphs=True; on a CPU it runs the same code without capture)."""
        return StreamBatch(self, streams)

    def open_stream(self, record_indices: bool = False) -> "Stream":
        """A new stream with its own KV, cacher and compressor state; record_indices keeps which ViT
        tokens the cacher recomputed per frame and layer (in `stream.cacher_state.reports`)."""
        stream = Stream(self)
        if record_indices:
            if self.cacher is None:
                raise ValueError("record_indices needs a cacher on the eager path (EngineConfig.cacher, cuda_graphs=False)")
            stream.cacher_state = self.cacher.new_state(record_indices=True)
        return stream

    def _check_patches(self) -> None:
        """The cacher (or ToMe) this engine runs must still be attached: a model running without it would
        silently give the baseline's features."""
        for patch in (self.cacher, self.tome):
            if patch is not None and not patch.attached:
                raise RuntimeError(f"{patch.name} was detached from the vision tower while this engine holds it "
                                   "(a direct detach()?): open a new engine")

    def close(self) -> None:
        """Remove the hooks and detach the cacher. Streams of this engine are unusable afterwards."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.cacher is not None:
            self.cacher.release()
            self.cacher = None
        if self.tome is not None:
            self.tome.release()
            self.tome = None
        if self._attn_before is not None:
            self.lm.config._attn_implementation = self._attn_before
            self._attn_before = None
        if self._fused_decoder is not None:
            self._fused_decoder.close()
            self._fused_decoder = None
        self._answer, self._answer_graphs = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Stream:
    """One video stream. Push frames in time order with `push_frames`; ask with `ask`."""

    def __init__(self, engine: StreamingEngine):
        self.engine = engine
        self.cacher_state = engine.cacher.new_state() if engine.cacher else None
        if engine.vision_runner is not None and engine.config.cacher is not None:
            self.cacher_state = engine.vision_runner.new_state()
        self._graphs: dict[tuple, tuple] = {}  # cuda_graphs: (tokens, bucket) -> (graph or None, inputs, step)
        self.compressor_state = engine.compressor.new_state() if engine.compressor else None
        self.timer = StageTimer(engine.device, engine.config.timing)
        self.blocks: list[Block] = []
        self.frames_seen = 0
        self.last_time: float | None = None
        self.tokens_per_frame: list[int] = []
        self._window: _KV | None = None  # init + recent tokens, at contiguous positions (slots first .. length - 1)
        self._init_kv: torch.Tensor | None = None  # the init tokens' KV as first written, at slots 0 .. n_init - 1
        self._closed = False
        self.last_compressed: Compressed | None = None  # the latest chunk's kept tokens and indices
        self._batched = False  # a batch member takes frames through its batch (a flag, not a reference: no cycle)

    # -- encoding --------------------------------------------------------------------------------

    def _start(self) -> None:
        e = self.engine
        n = e.init_ids.shape[1]
        if e.config.cuda_graphs:
            self._window = _StaticKV(e._new_buffer(e._window_slots(n)).zero_(), 0, advances=True)  # zeros: masked slots must be finite
        else:
            self._window = _KV(e._new_buffer(n + 256), 0)
        with torch.no_grad(), self.timer.stage("prefill"):
            e._decoder(e.lm.embed_tokens(e.init_ids), self._window, _causal_mask(n, n, e.dtype, e.device))
        self._init_kv = self._window.buf[:, :, :, :n].clone()

    @property
    def _n_init(self) -> int:
        """The init prompt's tokens (0 before the first frame)."""
        return 0 if self._init_kv is None else self._init_kv.shape[-2]

    def _ensure_window(self, incoming: int) -> None:
        """Keep at most n_local recent tokens after the init tokens, and room for incoming."""
        e, w = self.engine, self._window
        e._slide_window(w, self._init_kv, incoming, [self.blocks])
        need = w.length + incoming
        if need > w.buf.shape[3]:  # a growing (eager) window
            bigger = e._new_buffer(max(need, 2 * w.buf.shape[3]))
            bigger[:, :, :, : w.length] = w.buf[:, :, :, : w.length]
            w.buf = bigger

    def _encode_frame(self, tokens: torch.Tensor, frame: int, time: float | None) -> None:
        """Prefill one frame's visual tokens [n, D] as a new block."""
        e = self.engine
        n = tokens.shape[0]
        with self.timer.stage("window"):  # the window's slide, once it is full: part of a frame's prefill
            self._ensure_window(n)
        w = self._window
        start = w.length
        if e.config.cuda_graphs:
            with self.timer.stage("capture"):  # once per (token count, bucket) and stream; not a per-frame cost
                step = self._static_step(n, start, tokens.shape[1])
        with self.timer.stage("prefill"):
            if e.config.cuda_graphs:
                step(tokens)
            else:
                e._decoder(tokens[None].to(e.dtype), w, _causal_mask(n, start + n - w.first, e.dtype, e.device))
            kv = w.buf[:, :, :, start : start + n].clone()
            mean_key = e._mean_keys(kv[:, 0], start)
            if e.config.device_blocks is not None:
                on_device = [b for b in self.blocks if b.kv.device == e.device]
                for old in on_device[: max(0, len(on_device) + 1 - e.config.device_blocks)]:
                    old.kv = old.kv.to("cpu").pin_memory() if e.device.type == "cuda" else old.kv.to("cpu")
                if e.config.device_blocks == 0:
                    kv = kv.to("cpu")
            self.blocks.append(Block(frame=frame, time=time, start=start, kv=kv, mean_key=mean_key))
        self.tokens_per_frame.append(n)

    def _static_step(self, n: int, start: int, dim: int):
        return self.engine._static_step(self._window, self._graphs, n, start, dim, batch=1)

    @torch.no_grad()
    def push_pixels(self, pixel_values: torch.Tensor, timestamps=None) -> None:
        """Push preprocessed frames [F, 3, S, S] (in time order)."""
        self._check_open()
        if self._batched:
            raise ValueError("this stream belongs to a StreamBatch: push frames to the batch")
        e = self.engine
        if pixel_values.dim() != 4:
            raise ValueError(f"expected pixel values [frames, 3, H, W], got shape {tuple(pixel_values.shape)}")
        f = pixel_values.shape[0]
        times = self._times(timestamps, f)
        if f == 0:
            return
        e._check_patches()
        if self._window is None:
            self._start()
        inner = e.model.model
        kwargs = {"stc_state": self.cacher_state} if self.cacher_state is not None else {}
        tome_state = e.tome.new_state() if e.tome is not None else None
        if tome_state is not None:
            kwargs["tome_state"] = tome_state
        with self.timer.stage("upload"):
            pix = pixel_values.to(e.device, e.dtype)
        states = [self.cacher_state] if self.cacher_state is not None else None
        if e.vision_runner is not None:
            with self.timer.stage("capture"):  # once per kind of step; not a per-frame cost
                e.vision_runner.prepare(states, frames=f)
        layer_inputs = {}
        with self.timer.stage("vision"):
            if e.vision_runner is not None:
                runner, outs, kept = e.vision_runner, [], []
                for i in range(f):
                    outs.append(runner(pix[i : i + 1], states))
                    if runner.keep_input_of is not None:
                        kept.append(runner.layer_input)
                feats = torch.cat(outs)
                layer_inputs = {runner.keep_input_of: torch.cat(kept)} if kept else {}
                out = None
            else:
                out = inner.vision_tower(pix, output_hidden_states=True, **kwargs)
                feats = out.hidden_states[e.vision_layer]
            if e.select_strategy == "default":
                feats = feats[:, 1:]
            if tome_state is not None:
                feats = tome_state.in_raster_order(feats)
        with self.timer.stage("projector"):
            tokens = e._project(feats)
            if e.compressor is not None:
                side = int(math.isqrt(tokens.shape[1]))
                hidden = out.hidden_states if out is not None else None
                ctx = VisionContext(hidden_states=hidden, vision_tower=inner.vision_tower, grid=(side, side),
                                    layer_inputs=layer_inputs)
                compressed = e.compressor.compress(tokens, self.compressor_state, ctx)
            else:
                compressed = Compressed(tokens=list(tokens), indices=[None] * f)
        for i, frame_tokens in enumerate(compressed.tokens):
            self._encode_frame(frame_tokens, self.frames_seen, times[i])
            self.frames_seen += 1
        if times[-1] is not None:
            self.last_time = times[-1]
        self.last_compressed = compressed

    def push_frames(self, frames, timestamps=None) -> None:
        """Push raw frames [F, H, W, 3] uint8 (NumPy or torch), in time order."""
        from stc.models import preprocess_frames

        arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected frames [frames, height, width, 3], got shape {arr.shape}")
        if arr.shape[0] == 0:
            return
        self.push_pixels(preprocess_frames(self.engine.processor, arr), timestamps)

    def _times(self, timestamps, f):
        if timestamps is None:
            return [None] * f
        times = [float(t) for t in timestamps]
        if len(times) != f:
            raise ValueError(f"got {f} frames but {len(times)} timestamps")
        prev = self.last_time if self.last_time is not None else -math.inf
        for t in times:
            if t < prev:
                raise ValueError(f"frames must arrive in time order: {t} s after {prev} s")
            prev = t
        return times

    # -- answering -------------------------------------------------------------------------------

    def _question_queries(self, text: str) -> list[torch.Tensor]:
        """Per layer, the text's mean query before RoPE, summed over each KV head's query group: [kvh, d].

        The text attends to the init tokens only (a retrieval pass; see the module docstring)."""
        e = self.engine
        groups = e.num_heads // e.kv_heads
        queries: list[torch.Tensor | None] = [None] * e.num_layers

        def sink(layer_idx, q):
            queries[layer_idx] = q[0].float().mean(dim=1).view(e.kv_heads, groups, -1).sum(1)

        ids = e._ids(text)
        probe = _KV(e._new_buffer(self._n_init + ids.shape[1]), self._n_init)
        probe.buf[:, :, :, : self._n_init] = self._init_kv
        probe.query_sink = sink
        e._decoder(e.lm.embed_tokens(ids), probe, _causal_mask(ids.shape[1], probe.length + ids.shape[1], e.dtype, e.device))
        return queries

    def _retrieve(self, text: str) -> list[list[int]]:
        """Per layer, the indices (into self.blocks, ascending) of the top-k blocks for this text."""
        keys = torch.stack([b.mean_key for b in self.blocks], dim=1)  # [layers, blocks, kvh, d]
        picks = []
        for layer, q in enumerate(self._question_queries(text)):
            scores = torch.einsum("bhd,hd->b", keys[layer], q)
            picks.append(sorted(torch.topk(scores, self.engine.config.retrieve_top_k).indices.tolist()))
        return picks

    def _context(self, picks: list[list[int]] | None, extra: int) -> _KV:
        """init + the chosen blocks per layer at contiguous positions, with room for `extra` tokens."""
        e = self.engine
        n_init = self._n_init
        if picks is None:
            picks = [list(range(len(self.blocks)))] * e.num_layers
        lengths = [sum(self.blocks[i].length for i in p) for p in picks]
        budget = min(lengths)
        if len(set(lengths)) > 1 and e.config.retrieve_top_k is not None:
            mean_len = sum(b.length for b in self.blocks) / len(self.blocks)
            budget = min(budget, int(e.config.retrieve_top_k * mean_len))
        kv = e._answer_window(n_init + budget + extra) if e.config.cuda_graphs else _KV(e._new_buffer(n_init + budget + extra), 0)
        kv.length = n_init + budget
        kv.buf[:, :, :, :n_init] = self._init_kv
        for layer, pick in enumerate(picks):
            parts = [self.blocks[i].kv[layer].to(e.device, non_blocking=True) for i in pick]
            old = torch.cat([torch.arange(self.blocks[i].start, self.blocks[i].start + self.blocks[i].length) for i in pick])
            ctx = torch.cat(parts, dim=2)[:, :, :budget]
            delta = torch.arange(n_init, n_init + budget) - old[:budget]
            keys = ctx[0] if not delta.any() else e._rotate(ctx[0], delta)
            kv.buf[layer, 0, :, n_init : n_init + budget] = keys
            kv.buf[layer, 1, :, n_init : n_init + budget] = ctx[1]
        return kv

    def _prefill_answer(self, kv: _KV, embeds: torch.Tensor, capture: bool = True) -> torch.Tensor:
        """Append embeds [1, n, D] to the answer context kv; returns the last token's final hidden state [1, D]."""
        e = self.engine
        n = embeds.shape[1]
        if isinstance(kv, _StaticKV):
            step = e._static_step(kv, e._answer_graphs, n, kv.length, embeds.shape[2], 1, capture=capture)
            return step(embeds[0])
        mask = _causal_mask(n, kv.length + n, e.dtype, e.device) if n > 1 else None
        return e._decoder(embeds, kv, mask)[:, -1]

    @torch.no_grad()
    def ask(self, query: str, *, answer_prefix: str = "", retrieval_text: str | None = None, max_new_tokens: int | None = None) -> str:
        """Answer a question about the frames pushed so far (greedy). Returns the answer text."""
        return self.answer(query, answer_prefix=answer_prefix, retrieval_text=retrieval_text, max_new_tokens=max_new_tokens).text

    @torch.no_grad()
    def answer(self, query: str, *, answer_prefix: str = "", retrieval_text: str | None = None, max_new_tokens: int | None = None) -> Answer:
        """Like `ask`, returning the token ids and the retrieved frames too."""
        self._check_open()
        e = self.engine
        if not self.blocks:
            raise ValueError("no frame has been pushed to this stream yet: push frames before asking")
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"the question must be a non-empty string, got {query!r}")
        if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1 or None (the config's), got {max_new_tokens!r}")
        max_new = e.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        prompt = e._ids(QUESTION_TEMPLATE.format(query=query) + answer_prefix)
        top_k = e.config.retrieve_top_k
        with self.timer.stage("retrieval"):
            picks = self._retrieve(retrieval_text or query) if top_k is not None and len(self.blocks) > top_k else None
            kv = self._context(picks, prompt.shape[1] + max_new)
            context = kv.length
        generated: list[int] = []
        with self.timer.stage("decode"):
            # the prompt's length differs per question: it runs uncaptured; each new token replays one graph
            hidden = self._prefill_answer(kv, e.lm.embed_tokens(prompt), capture=False)
            first_logits = None
            for step in range(max_new):
                logits = e.model.lm_head(hidden)
                if first_logits is None:
                    first_logits = logits[0].float().cpu()
                token = int(logits.argmax(-1))
                if token in e.eos_ids:
                    break
                generated.append(token)
                if step + 1 < max_new:
                    hidden = self._prefill_answer(kv, e.lm.embed_tokens(torch.tensor([[token]], device=e.device)))
        retrieved = None if picks is None else [[self.blocks[i].frame for i in p] for p in picks]
        text = e.tokenizer.decode(generated, skip_special_tokens=True)
        return Answer(text=text, token_ids=generated, retrieved=retrieved, logits=first_logits, context_tokens=context)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this stream is closed")
        if not self.engine._hooks:
            raise RuntimeError("the engine of this stream is closed")

    def stats(self) -> dict:
        """Per-stage times (ms), token counts and, with a cacher, its work per frame."""
        out = {
            "frames": self.frames_seen,
            "tokens_per_frame": list(self.tokens_per_frame),
            "kv_tokens": sum(self.tokens_per_frame),
            "stages": self.timer.summary(),
        }
        if self.cacher_state is not None:
            out["reference_frames"] = self.cacher_state.reference_frames
            out["vit_recomputed_tokens"] = self.cacher_state.recomputed_tokens
        if self.engine.device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.engine.device)
        return out

    def close(self) -> None:
        """Free this stream's KV."""
        self.blocks = []
        self._window = self._init_kv = None
        self._graphs = {}
        self._closed = True


class StreamBatch:
    """B synchronised streams encoded together: every step takes one frame per stream, so the frames
    of all streams share one pass over the LLM's weights (and one batched vision step).

    `streams` are ordinary `Stream`s for questions (`batch.streams[i].ask(...)`); frames are pushed
    to the batch only. All streams keep the same number of tokens per frame (fixed-budget
    compressors); each stream's KV window slides as a single stream's does (n_local recent tokens).
    """

    def __init__(self, engine: StreamingEngine, size: int):
        if not engine.config.cuda_graphs:
            raise ValueError("StreamBatch needs EngineConfig(cuda_graphs=True) (its static KV window)")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"a batch needs at least one stream, got {size!r}")
        self.engine, self.size = engine, size
        e = engine
        self.vision = e._graphed_vision(size)
        self.streams = [Stream(e) for _ in range(size)]
        for s in self.streams:
            s._batched = True
            if e.config.cacher is not None:
                s.cacher_state = self.vision.new_state()
        n_init = e.init_ids.shape[1]
        buf = torch.zeros(e.num_layers, 2, size, e.kv_heads, e._window_slots(n_init), e.head_dim, dtype=e.dtype, device=e.device)
        self._window = _StaticKV(buf, 0, advances=True)
        self._graphs: dict[tuple, tuple] = {}
        self.timer = StageTimer(e.device, e.config.timing)
        self.frames_seen = 0
        with torch.no_grad(), self.timer.stage("prefill"):
            step = e._static_step(self._window, self._graphs, n_init, 0, e.lm.config.hidden_size, size)
            step(e.lm.embed_tokens(e.init_ids).expand(size, -1, -1))
        self._init_kv = buf[..., :n_init, :].clone()  # [layers, 2, B, kvh, n_init, d]
        for i, s in enumerate(self.streams):
            s._window = _KV(buf[:, :, i], n_init)  # a view of the batch's window (for inspection)
            s._init_kv = self._init_kv[:, :, i]

    @torch.no_grad()
    def push_pixels(self, pixel_values: torch.Tensor, timestamps=None) -> None:
        """One preprocessed frame per stream: [B, 3, S, S]; timestamps: one per stream (or None)."""
        e, w = self.engine, self._window
        if pixel_values.dim() != 4 or pixel_values.shape[0] != self.size:
            raise ValueError(f"expected one frame per stream, [{self.size}, 3, H, W], got {tuple(pixel_values.shape)}")
        times = [None] * self.size if timestamps is None else [float(t) for t in timestamps]
        if len(times) != self.size:
            raise ValueError(f"got {self.size} frames but {len(times)} timestamps")
        inner = e.model.model
        states = [s.cacher_state for s in self.streams] if e.config.cacher is not None else None
        with self.timer.stage("upload"):
            pix = pixel_values.to(e.device, e.dtype)
        with self.timer.stage("capture"):
            self.vision.prepare(states)
        with self.timer.stage("vision"):
            feats = self.vision(pix, states)
            if e.select_strategy == "default":
                feats = feats[:, 1:]
        with self.timer.stage("projector"):
            tokens = e._project(feats)
            if e.compressor is not None:
                side = int(math.isqrt(tokens.shape[1]))
                index, layer_input = self.vision.keep_input_of, self.vision.layer_input
                contexts = [VisionContext(grid=(side, side), vision_tower=inner.vision_tower,
                                          layer_inputs={} if index is None else {index: layer_input[i : i + 1]})
                            for i in range(self.size)]
                states = [s.compressor_state for s in self.streams]
                together = getattr(e.compressor, "compress_streams", None)  # all streams' frames at once, where offered
                if together is not None:
                    kept = together(tokens, states, contexts).tokens
                else:
                    kept = [e.compressor.compress(tokens[i : i + 1], states[i], contexts[i]).tokens[0] for i in range(self.size)]
                if len({k.shape[0] for k in kept}) != 1:
                    raise ValueError(
                        f"streams in a batch must keep the same number of tokens per frame, got {[k.shape[0] for k in kept]}: "
                        f"{type(e.compressor).__name__} budgets frames by their content (as VidCom2 does with period > 1); "
                        "run such a compressor on separate streams (engine.open_stream())")
                tokens = torch.stack(kept)
        n = tokens.shape[1]
        with self.timer.stage("window"):  # the windows' slide, once they are full: part of a step's prefill
            e._slide_window(w, self._init_kv, n, [s.blocks for s in self.streams])
        start = w.length
        with self.timer.stage("capture"):
            step = e._static_step(w, self._graphs, n, start, tokens.shape[2], self.size)
        with self.timer.stage("prefill"):
            step(tokens)
            kv = w.buf[:, :, :, :, start : start + n].clone()  # [layers, 2, B, kvh, n, d]
            mean_keys = e._mean_keys(kv[:, 0], start)  # [layers, B, kvh, d]
        for i, s in enumerate(self.streams):
            s.blocks.append(Block(frame=self.frames_seen, time=times[i], start=start, kv=kv[:, :, i], mean_key=mean_keys[:, i]))
            s.tokens_per_frame.append(n)
            s.frames_seen += 1
            s._window.first, s._window.length = w.first, w.length
            if times[i] is not None:
                s.last_time = times[i]
        self.frames_seen += 1

    def push_frames(self, frames, timestamps=None) -> None:
        """One raw frame per stream, [B, H, W, 3] uint8."""
        from stc.models import preprocess_frames

        arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected frames [streams, height, width, 3], got shape {arr.shape}")
        self.push_pixels(preprocess_frames(self.engine.processor, arr), timestamps)

    def close(self) -> None:
        for s in self.streams:
            s.close()
        self._window = self._init_kv = None
        self._graphs = {}
