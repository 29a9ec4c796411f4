#!/usr/bin/env bash
# One prepared GPU check, run from the repository root as is (under 8 minutes on one H100/H200):
#   bash tests/gpu/run.sh [OUT_DIR]
# 1. the attention paths' exactness tests on CPU (always);
# 2. on CUDA: every attention path against the fp32 reference (fp32 and bf16), the tiled path's gate noise
#    CUDA == CPU, and bf16 training runs of every micro architecture (pytest -m gpu tests/test_gpu.py);
# 3. on CUDA: bench_attention, GPT-2 small shape, batch 1, T = 1024 and 4096: step time and peak memory of the
#    gated step (tiled path) against sdpa and against sdpa held to FlashAttention;
# 4. on CUDA: 200 steps of `spartan sparsify shakespeare` (bf16 autocast), tokens/s from its summary.
# Needs nothing from the network: the package runs from this checkout (PYTHONPATH), the built-in model and its
# tokens are in it. Without CUDA the CUDA parts are skipped with one line each. Logs and JSON go to OUT_DIR
# (default: $OUT when set, else ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR="${1:-${OUT:-gpu-out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
step() { echo; echo "== $*"; }

step "environment"
"$PY" - <<'EOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.cuda.is_available()}"
      + (f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

step "attention paths against the reference, CPU"
"$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py -k "path or tiled or bf16" 2>&1 | tail -3 || status=1

if [ "$CUDA" != "1" ]; then
    echo; echo "CUDA not available: skipping the CUDA parity tests, the CUDA benchmark and the CUDA sparsify run"
    exit $status
fi

step "CUDA parity and bf16 training (pytest -m gpu)"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT_DIR/test_gpu.log" | tail -5 || status=1

step "bench_attention on CUDA: batch 1, T = 1024, 4096 (tiled above chunk_mb 64), gated vs sdpa vs flash"
timeout 240 "$PY" tests/benchmarks/bench_attention.py --device cuda --skip-point --sweep 1024,4096 --sweep-batch 1 \
    --sweep-repeats 3 --impls spartan,sdpa,flash --json "$OUT_DIR/bench_attention.json" 2>&1 \
    | tee "$OUT_DIR/bench_attention.log" | grep -v "^  \.\.\." || status=1

step "spartan sparsify shakespeare, 200 steps on CUDA"
rm -rf "$OUT_DIR/shakespeare"
timeout 240 "$PY" -m spartan_cli sparsify shakespeare --steps 200 --eval-every 0 --checkpoint-every 0 \
    --out "$OUT_DIR/shakespeare" --json --quiet > "$OUT_DIR/sparsify.json" 2> "$OUT_DIR/sparsify.err" || status=1
"$PY" - "$OUT_DIR/sparsify.json" <<'EOF' || status=1
import json, sys
s = json.load(open(sys.argv[1]))
print(f"steps {s['steps']}, {s['tokens_per_s']:,.0f} tokens/s, density {s['density']:.2%}, "
      f"held-out CE {s['ce']:.4f} vs target {s['target_loss']:.4f}, {s['elapsed_s']:.0f} s")
EOF
rm -f "$OUT_DIR/shakespeare/model.safetensors"  # 40 MB: too big to bring back, and not needed
exit $status
