import torch, time, statistics, itertools, sys
from benchmarks.bench_train_step import _make_toy
fns = {p: _make_toy("cpu", 32, p, "fused")()["fwd+bwd"] for p in ("fp32", "bf16")}
for f in fns.values(): f(); f()
res = {k: [] for k in fns}
for r in range(int(sys.argv[1])):
    for k, f in fns.items():
        t0 = time.perf_counter(); f(); res[k].append((time.perf_counter()-t0)*1e3)
for k in res: print(k, round(statistics.median(res[k])), [round(x) for x in res[k]])
print("bf16/fp32 per-round ratio median", round(statistics.median([a/b for a,b in zip(res["bf16"], res["fp32"])]),3))
