#!/bin/bash
# $1 = A or B
cd /work/abl
export PYTHONPATH=/work/ablsrc OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
CMD="$PY -m d2g_fast.cli toy ablate --out /work/abl/ablation --threads 1 --no-progress"
if [ "$1" = A ]; then
  /usr/bin/time -v $CMD --seeds 0 && /usr/bin/time -v $CMD --seeds 2 --rows mse pseudo_huber pixel_lpips latentlpips e_latentlpips diffusion_d z_conditioning
else
  /usr/bin/time -v $CMD --seeds 1 && /usr/bin/time -v $CMD --seeds 2 --rows r1 multiscale mix_and_match
fi
echo DONE $1 $(date)
