"""Cost of the encoding window's slide at LLaVA-OV-7B's KV shape, on a GPU.

Once a stream's window holds n_local tokens, every frame drops its oldest tokens
(`StreamingEngine._slide_window`). The window advances: its init tokens are rewritten before the
oldest kept token, and the kept tokens stay where they are. Once it has advanced past
`EngineConfig.window_slack` slots, it moves back: the n_local kept tokens follow the init tokens at
slot 0 again, their keys rotated to their new slots from their blocks. With window_slack = 0 every
slide is a move; that was the only way before the window could advance.

For B streams of 196-token frames, Qwen2-7B's KV (28 layers, 4 KV heads of 128, bf16) and
n_local 15,000, this times one advance and one move of all B windows (CUDA events, median of 5
after one warm-up; the advance and the move as the engine runs them, by `stc.rope_kernel.rotate_into` where
Triton runs, and by the engine's PyTorch rotation, its path without Triton) and gives the slide's mean cost per stream-frame once the window is full, for the
default slack (one move per slack / frame tokens + 1 frames), for frames of 196 and of 59 tokens.

With --engine-frames N it also streams N frames (past n_local from the 77th) through `StreamBatch`
on LLaVA-OV-7B with random weights, for window_slack 0 and the default alike (one process, one
model), and reports the window stage and the prefill (which includes it) per stream-frame:

    python scripts/bench_window_slide.py --batches 1 4 8 --engine-frames 120 --engine-batches 1 4 \\
        --out results/latency/h100_bf16_window_slide.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from stc.engine import Block, EngineConfig, StreamingEngine, _StaticKV, rope_kernel_supported
from stc.latency import environment

LAYERS, KV_HEADS, HEAD_DIM, FRAME, N_INIT, N_LOCAL = 28, 4, 128, 196, 14, 15000
SLACK = EngineConfig().window_slack


def engine_stub(device, slack):
    """What `_slide_window` reads of an engine: its config and its RoPE."""
    cfg = Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=KV_HEADS, rope_theta=1e6)
    stub = SimpleNamespace(config=EngineConfig(n_local=N_LOCAL, window_slack=slack),
                           lm=SimpleNamespace(rotary_emb=Qwen2RotaryEmbedding(cfg).to(device)))
    for name in ("_rotate", "_rope_for_kernel", "_write_rotated"):
        setattr(stub, name, getattr(StreamingEngine, name).__get__(stub))
    return stub


def full_window(batch, device):
    """A window one frame past n_local, and the frame blocks it is the tail of (as a stream leaves them)."""
    cap = N_INIT + N_LOCAL + FRAME + SLACK
    shape = (LAYERS, 2, KV_HEADS, cap, HEAD_DIM) if batch == 1 else (LAYERS, 2, batch, KV_HEADS, cap, HEAD_DIM)
    buf = torch.randn(shape, device=device, dtype=torch.bfloat16)
    streams, length, frame = [[] for _ in range(batch)], N_INIT, 0
    while length - N_INIT <= N_LOCAL:
        kv = buf[..., length : length + FRAME, :].clone()
        for i, blocks in enumerate(streams):
            blocks.append(Block(frame=frame, time=None, start=length, kv=kv if batch == 1 else kv[:, :, i], mean_key=None))
        length, frame = length + FRAME, frame + 1
    return buf, length, streams


def per_frame_ms(advance_ms: float, move_ms: float, slack: int, tokens: int) -> float:
    """The slide's mean cost per frame once the window is full: after a move, the window advances
    `tokens` slots per frame and moves back at the first frame that would take it past `slack`."""
    advances = slack // tokens
    return (advances * advance_ms + move_ms) / (advances + 1)


def time_slides(batch, device):
    buf, length, streams = full_window(batch, device)
    w = _StaticKV(buf.clone(), length, advances=True)
    init = buf[..., :N_INIT, :].clone()
    out = {"batch": batch, "window_tokens": length - N_INIT, "window_gb": buf[..., N_INIT:length, :].numel() * 2 / 1e9 / batch}
    for name, slack in (("move", 0), ("move_torch", 0), ("advance", SLACK), ("advance_torch", SLACK)):
        stub = engine_stub(device, slack)
        if name.endswith("_torch"):  # the engine's path without Triton
            stub._rope_for_kernel = lambda shift, buf: None
        times = []
        for _ in range(6):
            w.buf.copy_(buf)
            w.first, w.length = 0, length
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            StreamingEngine._slide_window(stub, w, init, FRAME, streams)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        assert (w.first == 0) == name.startswith("move")
        out[f"{name}_ms"] = statistics.median(times[1:])
    out["move_kernel"] = rope_kernel_supported(torch.bfloat16, torch.device(device), HEAD_DIM)
    for tokens in (FRAME, 59):  # all tokens of a frame; the Pruner's 30%
        out[f"ms_per_stream_frame_{tokens}"] = per_frame_ms(out["advance_ms"], out["move_ms"], SLACK, tokens) / batch
        out[f"ms_per_stream_frame_{tokens}_slack_0"] = out["move_ms"] / batch
    return out


def engine_runs(frames: int, batches: list[int], methods: list[str], repeats: int, rows: list, save) -> None:
    """StreamBatch over `frames` frames on the random-weight LLaVA-OV-7B, window_slack 0 and the default;
    each row appended to `rows`, then `save()`."""
    from stc.latency import measure_batch
    from stc.models import build_model

    model, processor = build_model("llava-ov-7b", dtype=torch.bfloat16, device="cuda")
    for batch in batches:
        for method in methods:
            for slack in (0, SLACK):
                base = replace(EngineConfig(), n_local=N_LOCAL, window_slack=slack)
                r = measure_batch(model, processor, method, frames, batch, warmup=1, repeats=repeats, base=base)
                rows.append({**r, "window_slack": slack})
                print(f"B = {batch}, {method}, window_slack {slack}: window {r['window_ms_per_frame']:.3f} ms, prefill "
                      f"{r['prefill_ms_per_frame']:.3f} ms per stream-frame over {frames} frames", flush=True)
                save()
                torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8])
    p.add_argument("--engine-frames", type=int, default=0, help="also stream this many frames through the engine (0: no)")
    p.add_argument("--engine-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--engine-methods", nargs="+", default=["baseline", "pruner"])
    p.add_argument("--repeats", type=int, default=1, help="engine runs per setting, after one warm-up")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this script times a slide with CUDA events: it needs a CUDA GPU, and none is visible here")
    meta = {**environment(args.commit), "dtype": "bf16", "frame_tokens": FRAME, "n_local": N_LOCAL, "window_slack": SLACK}
    result = {"meta": meta, "rows": [], "engine": []}

    def save():  # after each row: a run that dies keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    for batch in args.batches:
        result["rows"].append(time_slides(batch, "cuda"))
        torch.cuda.empty_cache()  # the window and blocks of this B are freed with time_slides' frame
        r = result["rows"][-1]
        print(f"B = {batch}: window {r['window_tokens']} tokens ({r['window_gb']:.2f} GB of K and V per stream); one move "
              f"{r['move_ms']:.2f} ms (by PyTorch {r['move_torch_ms']:.2f} ms), one advance {r['advance_ms']:.3f} ms (by PyTorch {r['advance_torch_ms']:.3f} ms); per stream-frame with slack {SLACK}: "
              f"{r[f'ms_per_stream_frame_{FRAME}']:.3f} ms ({FRAME} tokens), {r['ms_per_stream_frame_59']:.3f} ms (59); "
              f"with slack 0: {r[f'ms_per_stream_frame_{FRAME}_slack_0']:.3f} ms", flush=True)
        save()
    if args.engine_frames:
        engine_runs(args.engine_frames, args.engine_batches, args.engine_methods, args.repeats, result["engine"], save)
    save()


if __name__ == "__main__":
    main()
