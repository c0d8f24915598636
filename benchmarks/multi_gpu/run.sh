#!/usr/bin/env bash
# Multi-GPU training benchmark of TimeViper (README.md beside this file): full-size random model (SigLIP so400m +
# Nemotron-Nano-9B-v2, TransV uni_7_0.5-attn_39_0.05), 256-frame videos, the accelerate FSDP and DeepSpeed ZeRO-3
# configs of training/, 20 steps each with one process per GPU; each saved folder is then reloaded on one GPU and its
# probe logits compared with those of the trained model.
#
#     bash benchmarks/multi_gpu/run.sh               # device tool, kind nvidia-h200-x2, carry ["wheels"]
#     bash benchmarks/multi_gpu/run.sh zero3 fsdp    # engines to run, in this order (default: fsdp zero3)
#     TV_BENCH_TINY=1 PYTHON=/work/venv/bin/python bash benchmarks/multi_gpu/run.sh   # CPU smoke run
#
# Results: $OUT/results.json (rewritten after every stage, so a run cut short still returns what finished) and
# $OUT/run.log; OUT defaults to ./outputs/multi_gpu. Tables: python benchmarks/multi_gpu/report.py markdown
# results.json. Scratch: TV_BENCH_WORK, default /dev/shm/tv_multi_gpu when /dev/shm has 100 GiB free, else
# /tmp/tv_multi_gpu; it peaks at ~60 GB (bf16 input checkpoint 19 GB + the fp32 FSDP output 38 GB, deleted once
# checked). A finished preparation there is reused. Other knobs: NPROC (2), STEPS (20), FRAMES (256), WORKERS
# (data loader workers per GPU, 4; fewer when /dev/shm is small: each 256-frame sample is 0.45 GB of fp32 pixels),
# PROFILE_STEP (the step run under torch.profiler and left out of the step statistics, 10; 0 for none).
# Each stage logs its start, end and exit status with the seconds since the start; a failed stage is reported, the
# stages that need its output are skipped, and the script exits 1.
# TV_BENCH_TINY=1: tiny widths, 8 frames, 3 steps, one CPU process without accelerate (FSDP and DeepSpeed need
# GPUs): every script runs except the launcher.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
REPO="$PWD"
PYTHON="${PYTHON:-python3}"
TINY="${TV_BENCH_TINY:-}"
SCHEDULE=uni_7_0.5-attn_39_0.05
ENGINES=("$@")
[ ${#ENGINES[@]} -gt 0 ] || ENGINES=(fsdp zero3)
declare -A CONFIGS=([fsdp]=training/accelerate_configs/fsdp.yaml
                    [zero3]=training/accelerate_configs/deepspeed_zero3.yaml)
for engine in "${ENGINES[@]}"; do
    [ -n "${CONFIGS[$engine]:-}" ] || { echo "unknown engine '$engine' (fsdp, zero3)"; exit 2; }
done
OUT="${OUT:-$REPO/outputs/multi_gpu}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

if [ -n "$TINY" ]; then
    STEPS="${STEPS:-3}" FRAMES="${FRAMES:-8}" WORKERS="${WORKERS:-2}" PROFILE_STEP="${PROFILE_STEP:-2}"
    WORK="${TV_BENCH_WORK:-/tmp/tv_multi_gpu_tiny}"
    PREPARE_ARGS=(--tiny --samples 8)
    DEVICE_ARGS=(--use_cpu)  # the Trainer refuses --bf16 on a CPU without it
    export OMP_NUM_THREADS=1  # tiny models on a few busy cores: more threads slow them down many times
else
    STEPS="${STEPS:-20}" FRAMES="${FRAMES:-256}" NPROC="${NPROC:-2}" PROFILE_STEP="${PROFILE_STEP:-10}"
    shm_gib=$(df --output=avail -BG /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
    shm_gib=${shm_gib:-0}
    # Samples in flight: GPUs x workers x prefetch 2 x 0.45 GB; keep them under half of /dev/shm.
    WORKERS="${WORKERS:-$(( shm_gib / 4 < 4 ? shm_gib / 4 : 4 ))}"
    # RAM is faster than the VM's disk for the 19-38 GB folders, each written and read once.
    if [ "$shm_gib" -ge 100 ]; then WORK="${TV_BENCH_WORK:-/dev/shm/tv_multi_gpu}"
    else WORK="${TV_BENCH_WORK:-/tmp/tv_multi_gpu}"; fi
    PREPARE_ARGS=()
    DEVICE_ARGS=()
    # NVLink multicast stays off (device tool KINDS.md: it can take the host's shared GPUs down).
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    source benchmarks/gpu_setup.sh
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$WORK"

log() { printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*"; }
FAILED=()
stage() {  # stage NAME COMMAND...: run one step, log and record it (report.py stage); returns its exit status
    local name=$1 start=$SECONDS status
    shift
    log "=== $name: $*"
    "$@"
    status=$?
    log "=== $name: $([ $status -eq 0 ] && echo done || echo "FAILED (exit $status)") in $((SECONDS - start)) s"
    "$PYTHON" benchmarks/multi_gpu/report.py stage --work "$WORK" --name "$name" --status $status \
        --seconds $((SECONDS - start)) -- "$@"
    [ $status -eq 0 ] || FAILED+=("$name")
    return $status
}
collect() {
    "$PYTHON" benchmarks/multi_gpu/report.py collect --work "$WORK" --engines "${ENGINES[@]}" \
        --out "$OUT/results.json" || { log "collecting the results failed"; FAILED+=(collect); }
}

log "engines: ${ENGINES[*]}; steps $STEPS (profiled: $PROFILE_STEP), frames $FRAMES," \
    "data workers per GPU $WORKERS; work $WORK; out $OUT"
df -h "$WORK" /dev/shm 2>/dev/null
[ -n "$TINY" ] || nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
rm -f "$WORK/stages.jsonl"

if [ -f "$WORK/prepared.json" ]; then
    log "reusing the prepared model and data in $WORK"
else
    stage prepare "$PYTHON" benchmarks/multi_gpu/prepare.py --work "$WORK" --frames "$FRAMES" "${PREPARE_ARGS[@]}" \
        || { collect; exit 1; }
fi

TRAIN_ARGS=(--model "$WORK/model" --data "$WORK/data/train.jsonl" --video-root "$WORK/data"
            --num_frames "$FRAMES" --max_frames "$FRAMES" --stage 2 --token-compression "$SCHEDULE"
            --bf16 --gradient_checkpointing --per_device_train_batch_size 1 --gradient_accumulation_steps 1
            --max_steps "$STEPS" --save_strategy no --logging_steps 1 --dataloader_num_workers "$WORKERS"
            --report_to none --disable_tqdm true --seed 0 "${DEVICE_ARGS[@]}")
for engine in "${ENGINES[@]}"; do
    rm -rf "${WORK:?}/$engine"
    if [ -n "$TINY" ]; then
        LAUNCH=("$PYTHON")
    else
        LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file "${CONFIGS[$engine]}" --num_processes "$NPROC")
    fi
    if stage "train_$engine" "${LAUNCH[@]}" benchmarks/multi_gpu/train_bench.py --bench-dir "$WORK/$engine" \
        --bench-probe "$WORK/data/probe_batch.pt" --bench-profile-step "$PROFILE_STEP" \
        --output_dir "$WORK/$engine/output" "${TRAIN_ARGS[@]}"; then
        collect
        stage "reload_$engine" env CUDA_VISIBLE_DEVICES=0 "$PYTHON" benchmarks/multi_gpu/reload_check.py \
            "$WORK/$engine/output" --initial "$WORK/model" --probe "$WORK/data/probe_batch.pt" \
            --reference "$WORK/$engine/probe_logits.pt" --out "$WORK/$engine/reload.json"
    fi
    rm -rf "${WORK:?}/$engine/output"  # the next engine needs the disk (FSDP's fp32 output is 38 GB)
    collect
done

"$PYTHON" benchmarks/multi_gpu/report.py markdown "$OUT/results.json"
if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED: ${FAILED[*]}"
    exit 1
fi
log "all stages passed"
