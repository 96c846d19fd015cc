# One scale of the sweep's evaluation stage (the sweep's own evaluate_scales), so the five scales
# can run as parallel processes on a loaded machine; not part of the package.
import argparse, os, sys, time
from d2g_fast import demo
from d2g_fast.toy import guidance_sweep as gs
p = argparse.ArgumentParser(); demo.add_arguments(p); p.add_argument("--scale", type=float)
args = p.parse_args(sys.argv[1:])
settings, scales, _ = gs.resolve(args)
out = os.path.abspath(args.out)
while "student_fixed" not in open("/tmp/h3/fixed_ahead.log").read():  # the student is ready
    time.sleep(5)
import torch  # noqa: the imports above are done; the wait costs nothing
t = time.perf_counter()
gs.evaluate_scales(out, {gs.CONDITIONED: os.path.join(out, "student_conditioned"),
                         gs.FIXED: os.path.join(out, "student_fixed")}, [args.scale], settings, args)
print(f"scale {args.scale:g}: {time.perf_counter() - t:.1f} s")
