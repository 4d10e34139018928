#!/usr/bin/env bash
# Every GPU check of issue #19 (item 5) in one run, on a machine with CUDA, from the repository's root (dens
# need not be installed: its dependencies must be, e.g. hydra-core, ase, lmdb beside a CUDA torch):
#   bash benchmarks/gpu_check.sh            # figures and logs in $OUT (default: ./gpu_check)
# 1. the tests that need CUDA (tests/test_cuda.py: GPU = CPU in float64 for every model family, a trainer
#    step with AMP none/bf16/fp16; the CUDA radius graph; the CUDA fault tests);
# 2. the demo (python -m dens.train) on CUDA;
# 3. benchmarks.models on CUDA with AMP none/bf16/fp16: training and inference times, peak memory and, for
#    EquiformerV2 OC20, structures per GPU-second beside the paper's V100 figures (1.8 for 153M, 7.1 for 31M).
# Each part has its own time limit (about 9 minutes in all) and a failed part does not stop the others; the
# return codes are in $OUT/summary.txt.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-gpu_check}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.txt, record the return code
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name: rc=$? ($((SECONDS - start)) s)" | tee -a "$summary"
}

part machine 60 bash -c 'nvidia-smi; lscpu | grep -E "Model name|^CPU\(s\)"; uptime;
    python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"'
part tests 150 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_data_graph.py \
    tests/test_faults.py -k "cuda or gpu"
part demo 120 python -m dens.train trainer.device=cuda "trainer.run_dir=$out/demo" trainer.progress_bar=false
part models_eqv2 150 python -m benchmarks.models --device cuda --models eqv2_oc20_2m,eqv2_oc20_31m \
    --amp none,bf16,fp16 --compile off --json "$out/models_eqv2.json"
part models_others 120 python -m benchmarks.models --device cuda \
    --models escn_oc20_2m,equiformer_md17_l2,equiformer_md17_l3 --amp none,bf16 --compile off \
    --json "$out/models_others.json"
cat "$summary"
