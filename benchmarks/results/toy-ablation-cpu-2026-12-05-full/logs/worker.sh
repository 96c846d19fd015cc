#!/bin/bash
# $1 = pid to wait for, then the jobs: each job is "OUT|ARGS"
pid=$1; shift
while kill -0 $pid 2>/dev/null; do sleep 5; done
cd /work/abl
export PYTHONPATH=/work/ablsrc OMP_NUM_THREADS=1
for job in "$@"; do
  out=${job%%|*}; args=${job#*|}
  echo "START $out $args $(date)"
  /usr/bin/time -v /work/main/.venv/bin/python -m d2g_fast.cli toy ablate --out /work/abl/$out --threads 1 --no-progress $args
  echo "END $out $args rc=$? $(date)"
done
