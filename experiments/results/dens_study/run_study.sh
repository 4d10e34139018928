#!/usr/bin/env bash
# The DeNS study of README.md in this folder: 3 variants x 3 seeds on rMD17 ethanol (100 training structures),
# 1-layer Equiformer (Lmax 2), lr 2e-3, 2000 steps, one CPU thread per run, two workers sharing one queue.
# Resumable: run it again after a kill; finished runs (their JSON) are skipped, unfinished ones continue
# from their last checkpoint (every 250 steps). Run from the repository root.
#   experiments/results/dens_study/run_study.sh            # launch (background; logs in $LOGS)
#   experiments/results/dens_study/run_study.sh progress   # state of every run
#   experiments/results/dens_study/run_study.sh report     # summary.md + PNGs from the finished runs
# Then the longer study: baseline and DeNS, 6000 steps (3x), validated every 200 steps, seeds paired in order
# (seed 0's pair first; seeds 0-4, or $LONG_SEEDS), then DeNS without force encoding, one worker at nice 19, in steps6000/ (runs in ${RUNS}6000, log $LOGS/long.log):
#   experiments/results/dens_study/run_study.sh long
#   experiments/results/dens_study/run_study.sh progress6000 | report6000
#   experiments/results/dens_study/run_study.sh stop       # end every worker and its runs (by recorded PID)
set -euo pipefail
PY=${PY:-python}  # the interpreter of the environment dens is installed in
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
  progress6000) exec "$PY" experiments/small_scale.py --progress --runs "${RUNS}6000" ;;
  report6000) exec "$PY" experiments/small_scale.py --report --out "$OUT/steps6000" ;;
  long-worker)
    LONG=("${ARGS[@]/#2000/6000}")
    LONG=("${LONG[@]/#$OUT/$OUT/steps6000}")
    LONG=("${LONG[@]/#$RUNS/${RUNS}6000}")
    LONG=("${LONG[@]/#--override=trainer.eval_every=100/--override=trainer.eval_every=200}")
    for seed in ${LONG_SEEDS:-0 1 2 3 4}; do  # complete pairs first
      "$PY" experiments/small_scale.py "${LONG[@]}" --seeds "$seed" --variant baseline dens  # the last --seeds wins
    done
    for seed in ${LONG_SEEDS:-0 1 2 3 4}; do  # then Table 6 Index 3 (DeNS without force encoding)
      "$PY" experiments/small_scale.py "${LONG[@]}" --seeds "$seed" --variant dens_no_fe
    done
    "$PY" experiments/small_scale.py --report --out "$OUT/steps6000" ;;
  long)
    mkdir -p "$LOGS"
    nohup nice -n 19 "$0" long-worker > "$LOGS/long.log" 2>&1 &
    echo $! >> "$LOGS/long_workers.pid"
    echo "long worker: PID $! (log $LOGS/long.log)" ;;
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
  stop)  # the recorded workers and their process trees; a killed run resumes from its last checkpoint
    tree() { local c; echo "$1"; for c in $(pgrep -P "$1"); do tree "$c"; done; }
    for f in "$LOGS/workers.pid" "$LOGS/long_workers.pid"; do
      [ -f "$f" ] || continue
      while read -r pid; do
        pids=$(tree "$pid")  # listed first, then ended parent first: a queue cannot start another run
        for p in $pids; do kill "$p" 2>/dev/null || true; done
      done < "$f"
    done
    rm -f "$RUNS"/*.lock "${RUNS}6000"/*.lock ;;
  *) echo "usage: $0 [launch|progress|report|long|progress6000|report6000|stop]" >&2; exit 2 ;;
esac
