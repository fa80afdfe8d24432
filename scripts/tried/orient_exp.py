"""Experiment: the LLM's GEMMs at a few hundred rows in both cuBLAS orientations (x W^T, and (W x^T)^T)."""
import json, os
import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

H, I = 3584, 18944
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.cache_size_limit = 256


def bench(fn):
    return 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-6)
    read_bw = src.numel() / (bench(lambda: src.view(torch.int64).sum()) * 1e-6)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw": copy_bw, "read_bw": read_bw, "rows": []}
    shapes = {"gate|up": (2 * I, H), "down": (H, I), "qkv": (H + 1024, H), "o": (H, H)}
    ws = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16, generator=g) / kk**0.5 for k, (n, kk) in shapes.items()}
    for m in (49, 196, 232, 784):
        for name, w in ws.items():
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16, generator=g)
            a = bench(lambda: F.linear(x, w))
            xt = x.t().contiguous().t()  # same values
            b = bench(lambda: torch.mm(w, x.t()))
            r = {"gemm": name, "rows": m, "xWt_us": a, "WxT_us": b, "floor_us": w.numel() * 2 / copy_bw * 1e6,
                 "read_floor_us": w.numel() * 2 / read_bw * 1e6}
            print(r, flush=True)
            out["rows"].append(r)
        wg, wd = ws["gate|up"], ws["down"]

        def mlp(x):
            gate, up = F.linear(x, wg).split(I, dim=-1)
            return F.linear(F.silu(gate) * up, wd)

        def mlp_t(x):  # tokens along columns: cuBLAS sees the token count as its n
            gu = torch.mm(wg, x.t())
            gate, up = gu.split(I, dim=0)
            return torch.mm(wd, F.silu(gate) * up).t()

        def mlp_mix(x):
            gu = torch.mm(wg, x.t())
            gate, up = gu.split(I, dim=0)
            return F.linear((F.silu(gate) * up).t(), wd)

        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        want = mlp(x.float()) if False else None
        for nm, f in (("mlp", mlp), ("mlp_t", mlp_t), ("mlp_mix", mlp_mix)):
            c = torch.compile(f, dynamic=False)
            o = c(x)
            ref = torch.compile(mlp, dynamic=False)(x)
            r = {"mlp": nm, "rows": m, "us": bench(lambda: c(x)), "max_diff": (o.float() - ref.float()).abs().max().item(),
                 "floor_us": (wg.numel() + wd.numel()) * 2 / copy_bw * 1e6}
            print(r, flush=True)
            out["rows"].append(r)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "orient.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
