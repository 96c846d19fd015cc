"""ours fused vs unfused (D2G_FUSED_TRUNK=0), fwd+bwd, interleaved rounds; per-round ratio medians."""
import os, sys, time, statistics, torch
from d2g_fast import ELatentLPIPS
n, hw, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
t = torch.randn(n, 4, hw, hw, generator=g); p = (t + 0.5 * torch.randn(n, 4, hw, hw, generator=g)).requires_grad_(True)
models = {prec: ELatentLPIPS(pretrained=False, pnet_rand=True, verbose=False, encoder="sd15", check_inputs=False,
                             augment="bg", precision=prec) for prec in ("bf16", "fp32")}
def call(prec, fused):
    def f():
        if not fused: os.environ["D2G_FUSED_TRUNK"] = "0"
        try:
            p.grad = None
            models[prec](p, t).sum().backward()
        finally:
            os.environ.pop("D2G_FUSED_TRUNK", None)
    return f
fns = {f"{prec}-{'fused' if fu else 'unfused'}": call(prec, fu) for prec in ("bf16", "fp32") for fu in (True, False)}
for f in fns.values(): f()
res = {k: [] for k in fns}
for r in range(rounds):
    for k, f in fns.items():
        t0 = time.perf_counter(); f(); res[k].append((time.perf_counter() - t0) * 1e3)
print(f"N={n} 4x{hw}x{hw} rounds={rounds} ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(native)')}")
for k in res: print(f"  {k:14s} median {statistics.median(res[k]):9.1f} ms  rounds {[round(x) for x in res[k]]}")
for prec in ("bf16", "fp32"):
    r = [a / b for a, b in zip(res[f"{prec}-fused"], res[f"{prec}-unfused"])]
    print(f"  {prec}: fused / unfused per-round ratio median {statistics.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f})")
