"""Cost of one slide of the encoding window at LLaVA-OV-7B's KV shape, on a GPU.

Once a stream's window holds n_local tokens, every frame drops the oldest tokens and moves the rest
to follow the init tokens, their keys rotated to the new positions (`StreamingEngine._slide_window`).
This times one such slide (CUDA events, median of 5 after one warm-up) for B streams of 196-token
frames, Qwen2-7B's KV (28 layers, 4 KV heads of 128, bf16) and n_local 15,000, against the engine
before commit 7d31dfe, which re-rotated the window's own copy (one more rounding per slide):

    python scripts/bench_window_slide.py --batches 1 4 8 --out results/latency/h100_window_slide.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from stc.engine import Block, EngineConfig, StreamingEngine, _StaticKV
from stc.latency import environment

LAYERS, KV_HEADS, HEAD_DIM, FRAME, N_INIT, N_LOCAL = 28, 4, 128, 196, 14, 15000


def engine_stub(device):
    """What `_slide_window` reads of an engine: its config and its RoPE."""
    cfg = Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=KV_HEADS, rope_theta=1e6)
    stub = SimpleNamespace(config=EngineConfig(n_local=N_LOCAL), lm=SimpleNamespace(rotary_emb=Qwen2RotaryEmbedding(cfg).to(device)))
    stub._rotate = lambda x, delta: StreamingEngine._rotate(stub, x, delta)
    return stub


def slide_before_7d31dfe(stub, w, n_init):
    """The slide as it was: the window's copy re-rotated by the tokens dropped."""
    drop = max(0, w.length - n_init - N_LOCAL)
    if drop:
        keep = w.buf[..., n_init + drop : w.length, :].clone()
        keep[:, 0] = stub._rotate(keep[:, 0], torch.full((keep.shape[-2],), -drop, device=keep.device))
        w.buf[..., n_init : n_init + keep.shape[-2], :] = keep
        w.length -= drop


def full_window(batch, device):
    """A window one frame past n_local, and the frame blocks it is the tail of (as a stream leaves them)."""
    cap = N_INIT + N_LOCAL + FRAME
    shape = (LAYERS, 2, KV_HEADS, cap, HEAD_DIM) if batch == 1 else (LAYERS, 2, batch, KV_HEADS, cap, HEAD_DIM)
    buf = torch.randn(shape, device=device, dtype=torch.bfloat16)
    streams, length, frame = [[] for _ in range(batch)], N_INIT, 0
    while length + FRAME <= cap:
        kv = buf[..., length : length + FRAME, :].clone()
        for i, blocks in enumerate(streams):
            blocks.append(Block(frame=frame, time=None, start=length, kv=kv if batch == 1 else kv[:, :, i], mean_key=None))
        length, frame = length + FRAME, frame + 1
    return buf, length, streams


def time_slides(stub, batch, device):
    buf, length, streams = full_window(batch, device)
    w = _StaticKV(buf.clone(), length)
    out = {"batch": batch, "window_tokens": length - N_INIT, "window_gb": buf[..., N_INIT:length, :].numel() * 2 / 1e9}
    for name, slide in (("before_7d31dfe", lambda: slide_before_7d31dfe(stub, w, N_INIT)),
                        ("engine", lambda: StreamingEngine._slide_window(stub, w, N_INIT, FRAME, streams))):  # fmt: skip
        times = []
        for _ in range(6):
            w.buf.copy_(buf)
            w.length = length
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            slide()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out[f"{name}_ms"] = statistics.median(times[1:])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this script times a slide with CUDA events: it needs a CUDA GPU, and none is visible here")
    stub = engine_stub("cuda")
    rows = []
    for batch in args.batches:
        rows.append(time_slides(stub, batch, "cuda"))
        torch.cuda.empty_cache()  # the window and blocks of this B are freed with time_slides' frame
        r = rows[-1]
        print(f"B = {batch}: window {r['window_tokens']} tokens ({r['window_gb']:.2f} GB of K and V); one slide: "
              f"{r['before_7d31dfe_ms']:.2f} ms before 7d31dfe, {r['engine_ms']:.2f} ms now", flush=True)
    meta = {**environment(args.commit), "dtype": "bf16", "frame_tokens": FRAME, "n_local": N_LOCAL}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
