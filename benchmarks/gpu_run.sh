#!/bin/bash
# One step of the GPU measurements, sized for one device-tool call (10 minutes at most); run from the repo root on
# the GPU machine, with the wheels from /work/shared/gpu/wheels.sh carried in .whl/. Every step writes its results and
# its log under $OUT (or benchmarks/results/gpu/ without one) as it goes, so a step cut off by the time limit still
# returns what it finished.
#
#   bash benchmarks/gpu_run.sh smoke      # tiny model on CUDA + the -m gpu tests (~1-2 min): run first
#   bash benchmarks/gpu_run.sh sd15       # issue 5's table: SD 1.5 at 512 px, ours and the baselines
#   bash benchmarks/gpu_run.sh sd21       # SD 2.1 at 768 px
#   bash benchmarks/gpu_run.sh savers     # what each memory saver buys (switched off one at a time)
#   bash benchmarks/gpu_run.sh options    # the options the recipes leave off: offload_idle, channels-last
#   bash benchmarks/gpu_run.sh compiled   # the compiled-UNet variant alone (inductor compiles every stage)
#   bash benchmarks/gpu_run.sh tracked    # the live-tensor estimate beside max_memory_allocated (timings void)
#   bash benchmarks/gpu_run.sh checkpointing   # if the Imagic time ratio misses 0.5
set -u
step=${1:?"usage: bash benchmarks/gpu_run.sh smoke|sd15|sd21|savers|options|compiled|tracked|checkpointing"}
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
run() { python3 -m "$@" 2>&1 | tee -a "$out/$step.log"; return "${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/$step.log"
case $step in
  smoke)
    run benchmarks.memory --model tiny --device cuda --steps 3 --warmup 1 --out "$out/tiny-cuda.json" \
      && run pytest -m gpu -q -p no:cacheprovider tests ;;
  sd15 | sd21)
    run benchmarks.memory --model "$step" --device cuda --out "$out/memory-$step.json" ;;
  savers)  # each variant is a whole memory run (plus the recipe's): split in two to stay inside one call
    run benchmarks.savers --model sd15 --device cuda --out "$out/savers-sd15.json" --variants "fp32 weights" \
      "no gradient checkpointing" "fp32 AdamW states" "encoders stay on the GPU" "batched VAE decode" ;;
  options)
    run benchmarks.savers --model sd15 --device cuda --out "$out/options-sd15.json" --variants \
      "idle parts off the GPU" "channels-last UNet" ;;
  compiled)
    run benchmarks.savers --model sd15 --device cuda --out "$out/savers-compiled-sd15.json" --variants "compiled UNet" ;;
  tracked)
    run benchmarks.memory --model sd15 --device cuda --no-baseline --track-tensors --steps 2 --warmup 1 \
      --inner-steps 1 --out "$out/tracked-sd15.json" ;;
  checkpointing)
    run benchmarks.checkpointing --model sd15 --device cuda --steps 8 --warmup 3 --out "$out/checkpointing-sd15.json" ;;
  *)
    echo "unknown step: $step" >&2
    exit 2 ;;
esac
