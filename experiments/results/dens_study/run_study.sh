#!/usr/bin/env bash
# The DeNS study of README.md in this folder: 3 variants x 3 seeds on rMD17 ethanol (100 training structures),
# 1-layer Equiformer (Lmax 2), lr 2e-3, 2000 steps, one CPU thread per run, two workers sharing one queue.
# Resumable: run it again after a kill; finished runs (their JSON) are skipped, unfinished ones continue
# from their last checkpoint (every 250 steps). Run from the repository root.
#   experiments/results/dens_study/run_study.sh            # launch (background; logs in $LOGS)
#   experiments/results/dens_study/run_study.sh progress   # state of every run
#   experiments/results/dens_study/run_study.sh report     # summary.md + PNGs from the finished runs
set -euo pipefail
PY=${PY:-/work/main/.venv/bin/python}
LOGS=${LOGS:-/tmp/dens_study}
RUNS=${RUNS:-/tmp/dens_study/runs}
OUT=experiments/results/dens_study
DATA=${DATA:-../shared/data/md17/rmd17_ethanol_train0_1000_eV.xyz}
ARGS=(--data "$DATA" --energy-unit eV --n-train 100 --n-val 50 --seeds 0 1 2 --steps 2000 --skip-existing
      --out "$OUT" --runs "$RUNS" --override=model.backbone.num_layers=1 --override=trainer.eval_every=100
      --override=optim.lr=2.0e-3)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
case "${1:-launch}" in
  progress) exec "$PY" experiments/small_scale.py --progress --runs "$RUNS" ;;
  report) exec "$PY" experiments/small_scale.py --report --out "$OUT" ;;
  worker)  # the main comparison first (complete pairs early), then Table 6 Index 3, then the reference
    "$PY" experiments/small_scale.py "${ARGS[@]}" --variant baseline dens
    "$PY" experiments/small_scale.py "${ARGS[@]}" --variant dens_no_fe
    "$PY" experiments/small_scale.py "${ARGS[@]}" --variant baseline --reference --report ;;
  launch)
    mkdir -p "$LOGS"
    for w in 1 2; do
      nohup nice -n 10 "$0" worker > "$LOGS/worker$w.log" 2>&1 &
      echo $! >> "$LOGS/workers.pid"
      echo "worker $w: PID $! (log $LOGS/worker$w.log)"
      sleep 20  # the second worker claims the next run in the queue
    done ;;
  *) echo "usage: $0 [launch|progress|report]" >&2; exit 2 ;;
esac
