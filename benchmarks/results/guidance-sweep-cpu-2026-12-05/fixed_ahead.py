# Train the sweep's fixed-scale student ahead, with the exact config the sweep will use (so the
# sweep resumes it finished); a helper for a loaded machine, not part of the package.
import argparse, os, sys
from d2g_fast import demo
from d2g_fast.toy import guidance_sweep as gs
p = argparse.ArgumentParser(); demo.add_arguments(p)
args = p.parse_args(sys.argv[1:])
settings, scales, _ = gs.resolve(args)
out = os.path.abspath(args.out)
print(demo.distill(out, "run_fixed", os.path.join(out, "fixed", "pairs"), settings, args, args.lambda_gan))
