#!/usr/bin/env bash
# GPU readiness in under 5 minutes: bfloat16 training (MFU against the device's bf16 peak,
# images/s, memory) of CIFAR-10-size U-Nets, then the sampler benchmark, on the default JAX GPU.
#
#   bash benchmarks/gpu.sh            # from the repository root, jax with CUDA installed
#
# Writes the "training (GPU, bfloat16)" and "samplers" sections of benchmarks/RESULTS.md and logs
# to $OUT (or /tmp) as gpu_training.log and gpu_samplers.log. Exits non-zero without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # report the memory the step needs, not a 75% pool

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
backend=$(python -c "import jax; print(jax.default_backend())")
if [ "$backend" != "gpu" ]; then
  echo "gpu.sh: JAX sees no GPU (default backend: $backend); install jax with CUDA." >&2
  exit 2
fi
python -c "import jax; print(jax.__version__, jax.devices())"

start=$SECONDS
# ~2-3 min: three U-Nets (35.7M parameters at 128 channels), compile included
timeout 210 python benchmarks/training.py --gpu --quick --dtype bfloat16 2>&1 | tee "$out/gpu_training.log"
# the rest of the 5 minutes for the sampler benchmark (NFE 10 and 20)
timeout $((290 - (SECONDS - start))) python benchmarks/samplers.py --quick 2>&1 \
  | tee "$out/gpu_samplers.log" || echo "gpu.sh: sampler benchmark stopped at the time limit" >&2
echo "gpu.sh: done in $((SECONDS - start)) s"
