# The sweep's stage 4 (write_outputs) over the per-scale metrics written by eval_one.py.
import argparse, json, os, sys, time
from d2g_fast import demo
from d2g_fast.toy import guidance_sweep as gs
p = argparse.ArgumentParser(); demo.add_arguments(p); p.add_argument("--stage-seconds")
args = p.parse_args(sys.argv[1:])
settings, scales, eval_scales = gs.resolve(args)
out = os.path.abspath(args.out)
per_scale = {g: json.load(open(os.path.join(gs.scale_folder(out, g), "metrics.json")))
             for g in eval_scales}
stage_seconds = json.loads(args.stage_seconds)
start = time.perf_counter() - sum(stage_seconds.values())
gs.write_outputs(out, per_scale, os.path.join(out, "student_conditioned"), scales, settings, args,
                 stage_seconds, start)
print("\n".join(gs.sweep_table(per_scale)))
print("\n".join(gs.closeness(per_scale, float(args.guidance), scales)))
