#!/bin/bash
# The GPU measurements, sized for device-tool calls (10 minutes at most each); run from the repo root on the GPU
# machine, with the wheels from benchmarks/gpu_wheels.sh carried in .whl/. Every step writes its results and its log
# under $OUT (or benchmarks/results/gpu/ without one) as it goes, so a step cut off by the time limit still returns
# what it finished. Several steps may share one call (`bash benchmarks/gpu_run.sh smoke sd15`): each fresh machine
# costs a start, the wheels' install and the model's build again.
#
#   bash benchmarks/gpu_run.sh smoke      # tiny SD and SDXL on CUDA + the -m gpu tests (~1-2 min): run first
#   bash benchmarks/gpu_run.sh sd15       # issue 5's table: SD 1.5 at 512 px, ours and the baselines
#   bash benchmarks/gpu_run.sh sd21       # SD 2.1 at 768 px
#   bash benchmarks/gpu_run.sh sdxl       # SDXL at 1024 px (~6-10 min estimated: alone in a call; see below)
#   bash benchmarks/gpu_run.sh savers     # what each memory saver buys (switched off one at a time)
#   bash benchmarks/gpu_run.sh options    # the options the recipes leave off: offload_idle, channels-last
#   bash benchmarks/gpu_run.sh compiled   # the compiled UNet, Imagic only (inductor compiles every stage's graphs)
#   bash benchmarks/gpu_run.sh tracked    # the live-tensor estimate beside max_memory_allocated (timings void)
#   bash benchmarks/gpu_run.sh checkpointing   # if the Imagic time ratio misses 0.5
#
# GPU_RUN_DRY=1 prints each command (one argument per line, a blank line after each) instead of running it: the
# tests parse them with the benchmarks' own parsers, so a bad option fails here, not in a device call.
set -u
steps=("$@")
[ ${#steps[@]} -gt 0 ] || {
  echo "usage: bash benchmarks/gpu_run.sh STEP [STEP ...], steps: smoke sd15 sd21 sdxl savers options compiled" \
    "tracked checkpointing" >&2
  exit 2
}
for step in "${steps[@]}"; do  # every name checked before the first step spends device time
  case $step in
    smoke | sd15 | sd21 | sdxl | savers | options | compiled | tracked | checkpointing) ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
  esac
done
out=${OUT:-benchmarks/results/gpu}
if [ "${GPU_RUN_DRY:-0}" = 1 ]; then
  run() { printf '%s\n' "$@" ""; }
  nvidia-smi() { :; }
  tee() { cat >/dev/null; }
elif [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
elif ! python3 -c "import diffusers, bitsandbytes" 2>/dev/null; then
  echo "no .whl/ and no diffusers/bitsandbytes here: run benchmarks/gpu_wheels.sh and carry [\".whl\"]" >&2
  exit 1
fi
if [ "${GPU_RUN_DRY:-0}" != 1 ]; then
  mkdir -p "$out"
  run() { python3 -m "$@" 2>&1 | tee -a "$out/$step.log"; return "${PIPESTATUS[0]}"; }
fi
export PYTHONUNBUFFERED=1
failed=0
for step in "${steps[@]}"; do
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/$step.log"
  case $step in
    smoke)
      # tiny-xl too: SDXL's path (pooled text, size conditions, fp32 VAE under fp16) meets CUDA here first, in
      # seconds, rather than in the sdxl step's minutes.
      run benchmarks.memory --model tiny --device cuda --steps 3 --warmup 1 --out "$out/tiny-cuda.json" \
        && run benchmarks.memory --model tiny-xl --device cuda --steps 3 --warmup 1 --out "$out/tiny-xl-cuda.json" \
        && run pytest -m gpu -q -p no:cacheprovider tests ;;
    sd15 | sd21 | sdxl)  # sdxl: a UNet call is 6.8 TFLOP (3.1x SD 2.1's at 768 px) and the model 7 GB (fp16) to
      # draw, save and load twice: estimated 6-10 minutes, so alone in a call; our rows are written before the
      # baselines, so a run cut off there keeps them. Its Imagic baseline's full fine-tune (fp32 weights, gradients
      # and Adam states: 41 GB before activations) may not fit: its rows then say out of memory and the run goes on.
      run benchmarks.memory --model "$step" --device cuda --out "$out/memory-$step.json" ;;
    savers)  # each variant is a whole memory run (plus the recipe's): split in two to stay inside one call
      run benchmarks.savers --model sd15 --device cuda --out "$out/savers-sd15.json" --variants "fp32 weights" \
        "no gradient checkpointing" "fp32 AdamW states" "encoders stay on the GPU" "batched VAE decode" ;;
    options)
      run benchmarks.savers --model sd15 --device cuda --out "$out/options-sd15.json" --variants \
        "idle parts off the GPU" "channels-last UNet" ;;
    compiled)  # Imagic alone: P2P's processors break the graphs into tens of compiles, past one call's 10 minutes
      run benchmarks.savers --model sd15 --device cuda --out "$out/savers-compiled-sd15.json" --methods imagic \
        --variants "compiled UNet" ;;
    tracked)
      run benchmarks.memory --model sd15 --device cuda --no-baseline --track-tensors --steps 2 --warmup 1 \
        --inner-steps 1 --out "$out/tracked-sd15.json" ;;
    checkpointing)
      run benchmarks.checkpointing --model sd15 --device cuda --steps 8 --warmup 3 \
        --out "$out/checkpointing-sd15.json" ;;
  esac || { echo "step $step failed (exit $?); see $out/$step.log" >&2; failed=1; }
done
exit $failed
