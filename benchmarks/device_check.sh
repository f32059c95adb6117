#!/usr/bin/env bash
# The device check: one GPU, under 8 minutes. Prints one table:
#   owt small at ell = 1, 2, 4 in bf16, at the largest batch of 64 / 32 / 16 / 8 x 1024 tokens
#   that fits, with XLA's attention and with cuDNN flash attention: step time, tokens/s, MFU
#   against the GPU's documented dense bf16 peak and against a measured bf16 matmul, peak memory;
# then the sampler benchmark (dense vs compacted, per precision).
#
#   bash benchmarks/device_check.sh            # needs jax with its CUDA plugin: jax[cuda12]==0.10.2
#   PY=.venv/bin/python OUT=/tmp/dc bash benchmarks/device_check.sh
#
# Synthetic batches (`--mode bench`): no data or checkpoints needed. Put the figures, with the
# device named, in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-/tmp/prime_jax_device_check}
STEPS=${STEPS:-8}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "device_check: no GPU visible to JAX ($("$PY" -c 'import jax; print(jax.devices())' 2>&1 | tail -1))." >&2
  echo "Install the CUDA plugin: pip install \"jax[cuda12]==0.10.2\"." >&2
  exit 2
fi
"$PY" -c "import jax; d = jax.devices()[0]; print(f'device: {jax.device_count()} x {d.device_kind}')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
start=$(date +%s)

bench() {  # ell attention batch -> 0 when it ran (its log in $OUT)
  timeout 240 "$PY" -m prime_jax.main --config "configs/owt.py:ell=$1" --mode bench \
    --config.model.attention="$2" --config.data.batch_size="$3" \
    --config.train.bench_steps="$STEPS" >"$OUT/bench_l$1_$2_b$3.log" 2>&1
}

for ell in 1 2 4; do
  fitted=""
  for batch in 64 32 16 8; do
    if bench "$ell" xla "$batch"; then fitted=$batch; break; fi
  done
  if [ -z "$fitted" ]; then echo "ell=$ell: no batch ran with xla attention (see $OUT)"; continue; fi
  bench "$ell" cudnn "$fitted" || echo "ell=$ell cudnn at batch $fitted failed (see $OUT)"
done

"$PY" - "$OUT" <<'EOF'
import glob, os, re, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], 'bench_*.log'))):
  text = open(path).read()
  m = re.search(r'bench_l(\d+)_(\w+)_b(\d+)\.log', path)
  step = re.search(r'step ([\d.]+) ms\s+\|\s+([\d,]+) tokens/s.*\|\s+(?:device peak|host max RSS) '
                   r'([\d.]+) GiB', text)
  mfu = re.search(r'MFU ([\d.]+)% of the documented peak.*?([\d.]+) TFLOP/s\s+\|\s+([\d.]+)% of a '
                  r'measured \w+ matmul at ([\d.]+) TFLOP/s', text)
  if m and step and mfu:
    rows.append((int(m[1]), m[2], int(m[3]), step[1], step[2], mfu[1], mfu[3], mfu[4], step[3]))
print('\n| ell | attention | batch x 1024 | step ms | tokens/s | MFU (documented peak) | '
      'MFU (measured matmul) | matmul TFLOP/s | peak GiB |')
print('|---|---|---|---|---|---|---|---|---|')
for r in sorted(rows, key=lambda r: (r[0], r[1] != 'xla')):
  print('| {} | {} | {} | {} | {} | {} % | {} % | {} | {} |'.format(*r))
EOF

echo
echo "sampler benchmark:"
timeout 240 "$PY" benchmarks/sampler_bench.py || echo "sampler benchmark failed or ran out of time"
echo "device check: $(( $(date +%s) - start )) s"
