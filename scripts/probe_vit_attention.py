import json, os, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from triton.testing import do_bench_cudagraph
rows = []
H, D, T = 16, 72, 729
for B in (1, 16):
    for Q in (182, 729):
        q = torch.randn(B, H, Q, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        def add(name, fn):
            try:
                out = fn()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                us = 1e3 * do_bench_cudagraph(fn, rep=30, return_mode="median")
            except Exception as e:
                print(B, Q, name, "failed", type(e).__name__, str(e)[:200]); return
            rows.append({"B": B, "queries": Q, "variant": name, "us": us, "rel_err": err}); print(B, Q, name, f"{us:.1f}", f"{err:.4f}", flush=True)
        for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            def f(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v)
            add(str(be).split(".")[-1] + " d72", f)
            for dp in (80, 96, 128):
                qp, kp, vp = (F.pad(t, (0, dp - D)) for t in (q, k, v))
                def g(be=be, qp=qp, kp=kp, vp=vp, dp=dp):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(qp, kp, vp, scale=D ** -0.5)[..., :D]
                add(str(be).split(".")[-1] + f" padded d{dp}", g)
        # Q tokens as part of heads: fold heads into batch
        try:
            from torch.nn.attention.flex_attention import flex_attention
            fa = torch.compile(flex_attention, dynamic=False)
            add("flex d72", lambda: fa(q, k, v))
            qp, kp, vp = (F.pad(t, (0, 128 - D)) for t in (q, k, v))
            add("flex padded d128", lambda: fa(qp, kp, vp, scale=D ** -0.5)[..., :D])
        except Exception as e:
            print("flex", e)
json.dump({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__}, "rows": rows},
          open(os.path.join(os.environ.get("OUT", "."), "attn_probe.json"), "w"), indent=1)
