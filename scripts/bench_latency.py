"""Latency at paper scale: the LLaVA-OV-7B architecture with random weights (latency does not depend on
weight values), baseline and STC settings in one run, with the floor model. Writes one JSON file.

    python scripts/bench_latency.py --arch llava-ov-7b --out results/latency/h100.json          # GPU
    python scripts/bench_latency.py --arch llava-ov-7b --vit-only --frames 4 --device cpu ...   # CPU ViT only

Parts, each optional, all in one run and one JSON file:
- "vit": the SigLIP tower alone, eager, full vs STC-Cacher (N=4, R=0.75), per frame and per chunk;
- "vit_graphs": the graph-captured SigLIP step (stc.fast.GraphedVision), B synchronised streams,
  without and/or with torch.compile'd layer functions (--vit-compile), both sides alike;
- "rows": one stream of --frames frames pushed one per step, then one question, per method (eager, or
  --graphs: EngineConfig(cuda_graphs=True), with compiled decoder layers unless --compile-llm 0);
  per-stage ms per frame at 16/32/64 frames;
- "batched": B synchronised streams per step (StreamBatch, --stream-batches), per stream-frame.
Baseline and STC always run the same code path in the same run; floors use the rates measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from stc.attention import kernel_supported
from stc.cacher import CacherConfig
from stc.engine import EngineConfig
from stc.fast import GraphedVision
from stc.flops import VALUE_BYTES, head_dim, llm_answer_bytes, llm_prefill_floor_ms, vit_floors_ms
from stc.latency import (device_rates, environment, measure_batch, measure_graphed_vit, measure_stream, measure_vit,
                         synthetic_pixels)
from stc.methods import get_method
from stc.models import build_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def vit_row(full_ms, cacher_ms, floors, **extra) -> dict:
    floor_full, floor_stc = floors
    return {**extra, "full_ms_per_frame": full_ms, "cacher_ms_per_frame": cacher_ms, "ratio": cacher_ms / full_ms,
            "floor_full_ms": floor_full, "floor_cacher_ms": floor_stc, "ideal_ratio": floor_stc / floor_full,
            "full_vs_floor": full_ms / floor_full, "cacher_vs_floor": cacher_ms / floor_stc}


def vit_part(model, args, rates):
    tower = model.model.vision_tower
    vcfg = model.config.vision_config
    pixels = synthetic_pixels(args.vit_frames, vcfg.image_size)
    cacher = CacherConfig(cache_interval=4, reuse_ratio=0.75)
    rows = []
    # one frame per step: weights read once per frame, as at B = 1
    floors = vit_floors_ms(vcfg, rates, cacher.cache_interval, cacher.reuse_ratio, bytes_per_param=VALUE_BYTES[args.dtype])
    for chunk in args.chunks:
        full = measure_vit(tower, pixels, None, chunk=chunk, warmup=1, repeats=args.repeats)
        stc = measure_vit(tower, pixels, cacher, chunk=chunk, warmup=1, repeats=args.repeats)
        rows.append(vit_row(full["ms_per_frame"], stc["ms_per_frame"], floors, chunk=chunk))
        r = rows[-1]
        print(f"ViT chunk={chunk}: full {r['full_ms_per_frame']:.2f} ms/frame, cacher {r['cacher_ms_per_frame']:.2f} "
              f"({r['ratio']:.2f}x; floors predict {r['ideal_ratio']:.2f}x; floors {floors[0]:.2f}/{floors[1]:.2f} ms)",
              flush=True)
    return rows


def graphed_vit_part(model, args, rates):
    """Both sides CUDA-graph captured, one frame per stream per step, B synchronised streams."""
    tower = model.model.vision_tower
    vcfg = model.config.vision_config
    pixels = synthetic_pixels(args.vit_frames, vcfg.image_size)
    cacher = CacherConfig(cache_interval=4, reuse_ratio=0.75)
    rows = []
    flag = {"auto": None, "0": False, "1": True}
    settings = [(c == "1", b, flag[m], flag[e], flag[q], flag[n]) for c in args.vit_compile for b in args.batches
                for m in args.vit_fused_mlp for e in args.vit_patch_gemm for q in args.vit_fused_qkv for n in args.vit_norm_kernel]
    for compile, batch, fused, embed, qkv, norm in settings:
        both = dict(batch=batch, repeats=args.repeats, compile=compile, fused_mlp=fused, patch_gemm=embed, fused_qkv=qkv,
                    norm_kernel=norm)
        floors = vit_floors_ms(vcfg, rates, cacher.cache_interval, cacher.reuse_ratio, batch, VALUE_BYTES[args.dtype])
        full = measure_graphed_vit(tower, pixels, None, **both)
        # the Cacher's selective layers with and/or without stc.vit_kernel, its value buffer, its attention kernel
        # and its projections of every token
        for kernels, values, attention, every in [(k, v, a, e) for k in args.vit_kernels for v in args.vit_value_buffer
                                                  for a in args.vit_attention_kernel for e in args.vit_project_all]:
            stc = measure_graphed_vit(tower, pixels, cacher, kernels=flag[kernels], value_buffer=flag[values],
                                      attention_kernel=flag[attention], project_all=flag[every], **both)
            rows.append(vit_row(full["ms_per_frame"], stc["ms_per_frame"], floors, batch=batch, graphs=True, compile=compile,
                                **{name: stc[name] for name in GraphedVision.OPTIONS}))
            r = rows[-1]
            print(f"ViT graphs{f' compile={compile}' if compile else ''} B={batch} "
                  f"{' '.join(f'{name}={r[name]}' for name in GraphedVision.OPTIONS)}: full "
                  f"{r['full_ms_per_frame']:.2f} ms/frame ({r['full_vs_floor']:.1f}x floor), cacher {r['cacher_ms_per_frame']:.2f} "
                  f"({r['cacher_vs_floor']:.1f}x floor): {1 - r['ratio']:.0%} less time (the floors predict {1 - r['ideal_ratio']:.0%})", flush=True)
    return rows


def stream_part(model, processor, args, rates, rows, save):
    tcfg = model.config.text_config
    for name in args.methods:
        base = EngineConfig(max_new_tokens=16, cuda_graphs=args.graphs, compile_llm=args.compile_llm)
        try:
            res = measure_stream(model, processor, name, args.frames, warmup=1, repeats=args.repeats, base=base)
        except ValueError as err:  # a method this model or path cannot run
            print(f"{name:>14}: skipped ({err})", flush=True)
            continue
        res["cuda_graphs"] = args.graphs
        n = res["tokens_per_frame"]
        for c, stage in res["checkpoints"].items():  # the mean over the first c frames, as the times
            stage["prefill_floor_ms"] = llm_prefill_floor_ms(tcfg, rates, n, c, window=base.n_local,
                                                             bytes_per_param=VALUE_BYTES[args.dtype])
        res["qa_floor_ms"] = llm_answer_bytes(tcfg, res["qa_new_tokens"], res["qa_context_tokens"]) / rates["copy_bytes_per_s"] * 1e3
        rows.append(res)
        save()
        last = res["checkpoints"][max(res["checkpoints"])]
        print(f"{name:>14}: {n} tok/frame  ViT {last['vit_ms_per_frame']:.1f}  proj {last['projector_ms_per_frame']:.1f}  "
              f"prefill {last['prefill_ms_per_frame']:.1f} (floor {last['prefill_floor_ms']:.1f}) ms/frame  "
              f"QA {res['qa_ms']:.0f} ms (retrieval {res['qa_retrieval_ms']:.0f}; floor {res['qa_floor_ms']:.0f}, "
              f"{res['qa_new_tokens']} tokens)  peak {res['peak_memory_gb']:.1f} GB", flush=True)


def batch_part(model, processor, args, rates, rows, save):
    """B synchronised streams per step (StreamBatch, CUDA graphs), per stream-frame times and floors."""
    tcfg = model.config.text_config
    base = EngineConfig(compile_llm=args.compile_llm)
    for b in args.stream_batches:
        for name in args.methods:
            try:
                res = measure_batch(model, processor, name, args.frames, b, repeats=args.repeats, base=base)
            except ValueError as err:
                print(f"B={b} {name:>14}: skipped ({err})", flush=True)
                continue
            n = res["tokens_per_frame"]
            for c, stage in [*res["checkpoints"].items(), (args.frames, res)]:  # means over the first c frames
                stage["prefill_floor_ms"] = llm_prefill_floor_ms(tcfg, rates, n, c, batch=b, window=base.n_local,
                                                                 bytes_per_param=VALUE_BYTES[args.dtype])
            rows.append(res)
            save()
            print(f"B={b:>2} {name:>14}: {n} tok/frame  ViT {res['vit_ms_per_frame']:.2f}  projector "
                  f"{res['projector_ms_per_frame']:.2f}  prefill {res['prefill_ms_per_frame']:.2f} (floor "
                  f"{res['prefill_floor_ms']:.2f}) ms per stream-frame", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llava-ov-7b")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--vit-frames", type=int, default=32)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="synchronised streams (graphed ViT)")
    p.add_argument("--vit-compile", nargs="+", default=["0"], choices=["0", "1"],
                   help="graphed ViT without (0) and/or with (1) torch.compile'd layer functions, both sides alike")
    p.add_argument("--vit-kernels", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: the Cacher's selective layers with (1) and/or without (0) stc.vit_kernel; auto: where it runs")
    p.add_argument("--vit-fused-mlp", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: every method's MLP with (1) and/or without (0) its GELU in the fc1 GEMM; auto: where it runs")
    p.add_argument("--vit-patch-gemm", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: every method's patch embedding as one GEMM (1) and/or cuDNN's convolution (0); auto: where it applies")
    p.add_argument("--vit-fused-qkv", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: every method's attention projections as one GEMM (1) or three (0); auto: where they fuse")
    p.add_argument("--vit-norm-kernel", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: every method's LayerNorms (and the add before the second) by stc.vit_kernel (1) or "
                        "as compiled (0); auto: where it runs")
    p.add_argument("--vit-value-buffer", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: the Cacher's merged values in a buffer kept across frames, only changed rows written (1), "
                        "or a new tensor each frame (0); auto: with the kernels; '0 1 0 1' to interleave")
    p.add_argument("--vit-attention-kernel", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: the Cacher's selective attention by stc.vit_kernel.attention (1) or PyTorch's (0); "
                        "auto: with the kernels; '0 1 0 1' to interleave")
    p.add_argument("--vit-project-all", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                   help="graphed ViT: the Cacher's selective layers project every token's query, value and key as one GEMM "
                        "(1) or the key of every token and then the query and value of the recomputed ones (0); auto: with "
                        "the kernels and fused projections at B = 1; '0 1 0 1' to interleave")
    p.add_argument("--compile-llm", default="1", choices=["0", "1"],
                   help="--graphs: captured decoder steps with (1, the engine's default) or without (0) compiled decoder layers")
    p.add_argument("--skip-eager-vit", action="store_true")
    p.add_argument("--skip-graphed-vit", action="store_true")
    p.add_argument("--graphs", action="store_true", help="run the streams with EngineConfig(cuda_graphs=True)")
    p.add_argument("--stream-batches", type=int, nargs="*", default=[], help="also run B synchronised streams (StreamBatch)")
    p.add_argument("--skip-single", action="store_true", help="skip the single-stream runs")
    p.add_argument("--methods", nargs="+", default=["baseline", "cacher", "pruner", "cacher+pruner"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vit-only", action="store_true")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.compile_llm = args.compile_llm == "1"
    for name in args.methods:
        get_method(name)

    device = torch.device(args.device)
    if device.type != "cuda":  # fail before anything is measured or written (--out may be a committed GPU result)
        gpu_only = [flag for flag, on in (("--graphs", args.graphs), ("--stream-batches", bool(args.stream_batches))) if on]
        if gpu_only:
            p.error(f"{' and '.join(gpu_only)} need a CUDA device, got --device {args.device}")
        if args.vit_only and args.skip_eager_vit:
            p.error(f"nothing to measure on {args.device}: the graph-captured ViT needs a CUDA device and "
                    "--skip-eager-vit skips the eager one")
        if not args.skip_graphed_vit:
            print(f"note: the graph-captured ViT needs a CUDA device; on {args.device} only the eager parts run", flush=True)
    if args.vit_only:  # only the vision tower: the 7B's fp32 CPU copy would not fit a small machine
        from transformers import SiglipVisionModel

        from stc.models import architecture_config

        with device:
            tower = SiglipVisionModel(architecture_config(args.arch).vision_config).to(DTYPES[args.dtype]).eval()
        model = type("VisionOnly", (), {})()
        model.model = type("Inner", (), {"vision_tower": tower})()
        model.config = architecture_config(args.arch)
        processor = None
    else:
        model, processor = build_model(args.arch, dtype=DTYPES[args.dtype], device=device)
    rates = device_rates(device, DTYPES[args.dtype])
    print(f"{args.arch} {args.dtype} on {environment(args.commit)['device']}: matmul "
          f"{rates['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    kernel = kernel_supported(DTYPES[args.dtype], device, head_dim(model.config.text_config))
    result = {
        "meta": {**environment(args.commit), "arch": args.arch, "dtype": args.dtype, **rates,
                 "protocol": "one frame per step; baseline and STC on the same code path "
                             + (f"(CUDA graphs, compiled vision{' and decoder' if args.compile_llm else ''} layers, "
                                "static KV, packed GQA; answers: captured decode; "
                                + ("window attention: stc.window_kernel)" if kernel else "window attention: masked frames, FlashAttention decode)")
                                if args.graphs
                                else "(eager Hugging Face modules)"),
                 "window_kernel": kernel, "compile_llm": args.graphs and args.compile_llm,
                 "argv": sys.argv[1:], "partial": True},
        "vit": [] if args.skip_eager_vit else vit_part(model, args, rates),
    }

    def save():  # after every part and row, so a run that dies keeps what it measured ("partial": true)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)

    save()
    if torch.device(args.device).type == "cuda" and not args.skip_graphed_vit:
        result["vit_graphs"] = graphed_vit_part(model, args, rates)
        save()
    if not args.vit_only and not args.skip_single:
        stream_part(model, processor, args, rates, result.setdefault("rows", []), save)
    if not args.vit_only and args.stream_batches:
        batch_part(model, processor, args, rates, result.setdefault("batched", []), save)
    result["meta"]["partial"] = False
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
