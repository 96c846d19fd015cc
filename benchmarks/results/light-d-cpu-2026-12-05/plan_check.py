"""The d2g plan --light-d prediction against the profiler peak of a real CPU step (the
planner's own measure_step / simulate, as d2g_fast.plan.calibrate.compare does)."""
import sys, time, torch
torch.set_num_threads(1)
from d2g_fast.plan import calibrate
from d2g_fast.plan.measure import measure_step
from d2g_fast.plan.fake import portable_trunk
from d2g_fast.plan.planner import PlanRequest, _persistent_rows, plan, simulate
for width, latent, batch, opts in [(32, 16, 3, {"light_d": True}), (32, 16, 3, {"light_d": True, "lora_rank": 4}),
                                    (48, 24, 2, {"light_d": True, "lora_rank": 8})]:
    t = time.time()
    req = PlanRequest(calibrate.shaped(width, latent), batch_size=batch, gpus=1, gpu_memory_gb=1e6,
                      device="cpu", options=opts).check()
    with portable_trunk():
        measured = measure_step(req.source, req.train_config(), batch)
    timeline, state, _ = simulate(req)
    p = plan(req, timeline=timeline, state=state, max_batch=1)
    persistent = sum(b for _, b in _persistent_rows(req, state))
    print(width, latent, batch, opts, "measured", measured, "predicted total", p.peak, "persistent", persistent,
          "error %.3f" % (p.peak / measured["total"] - 1), "step error %.3f" % ((p.peak - persistent) / measured["step_peak"] - 1),
          "%.0fs" % (time.time() - t), flush=True)
