#!/usr/bin/env bash
# GPU checks of the benchmarks, in at most ~8 minutes on one NVIDIA H100 / H200:
#
#   1. backbone bf16 train step at about 1B parameters (dim 2048 x 16 layers, LLaMA's 32000-row
#      text table), packed LAPA rows: MFU on real tokens, once with the cuDNN attention kernel
#      (--config.model.attention=cudnn) and once with XLA's (=xla);
#   2. flow-matching chunk latency and control rate at the same size, KV-cached prefix vs recompute;
#   3. the LAQ train step time (configs/laq.py:lapa_small, random frames: no dataset needed);
#   4. jaxvla vs transformers' LlamaForCausalLM in bf16 on the same LAPA workload (torch on CUDA;
#      skipped, saying so, when the installed torch has no CUDA).
#
#   bash scripts/device_check.sh            # from anywhere; results under $DEVICE_CHECK_OUT
#
# It installs nothing and needs no network: it expects the environment of `make` plus the `gpu`
# extra (`.venv/bin/pip install -e ".[gpu]"`: jax[cuda12]), and fails at once, saying so, when jax
# has no GPU backend. Each sub-benchmark runs under its own `timeout`; a failed or timed-out one is
# reported and the others still run; the exit status is non-zero when any failed.
#
# Environment: PYTHON (default .venv/bin/python, else python3); DEVICE_CHECK_OUT (JSON results,
# default runs/device_check); DEVICE_CHECK_ALLOW_CPU=1 runs every command line on CPU at tiny sizes
# (what the tests do to check this script without a GPU).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${DEVICE_CHECK_OUT:-runs/device_check}
ALLOW_CPU=${DEVICE_CHECK_ALLOW_CPU:-0}
mkdir -p "$OUT_DIR" || exit 2
export TF_CPP_MIN_LOG_LEVEL=3

backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null)
if [[ "$backend" != "gpu" ]]; then
  if [[ "$ALLOW_CPU" != "1" ]]; then
    echo "device_check: no GPU jax backend (jax.default_backend() = '${backend:-jax failed to import}')." >&2
    echo "  Install the gpu extra first (.venv/bin/pip install -e \".[gpu]\", jax[cuda12]) on a machine with an" >&2
    echo "  NVIDIA GPU; this script installs nothing. DEVICE_CHECK_ALLOW_CPU=1 runs it on CPU at tiny sizes." >&2
    exit 2
  fi
  echo "device_check: no GPU, DEVICE_CHECK_ALLOW_CPU=1: tiny sizes on CPU (checks the command lines only)"
  TINY=1
else
  TINY=0
  "$PYTHON" -c 'import jax; print("device_check:", jax.devices()[0].device_kind, "x", jax.device_count())'
fi

if [[ "$TINY" == "1" ]]; then
  MODEL=(--config.model.dim=64 --config.model.num_layers=1 --config.model.num_heads=4
         --config.model.num_kv_heads=4 --config.model.mlp_dim=128)
  DTYPE=(--config.compute_dtype=float32)
  BACKBONE_RUN=(--config.batch_size=4 --steps=1 --matmul_size=128)
  FLOW_RUN=(--repeats=1)
  LAQ_RUN=(--config.batch_size=2 --config.model.dim=32 --config.model.num_heads=2 --config.model.head_dim=16
           --config.model.encoder_depth=1 --config.model.temporal_depth=1 --config.model.decoder_depth=1
           --steps=1 --matmul_size=128)
  TORCH_RUN=(--dim=32 --layers=1 --heads=2 --mlp_dim=64 --examples=2 --steps=1 --nosame_shape --dtype=float32)
  TORCH_DEVICE=cpu
  T_BACKBONE=240 T_FLOW=180 T_LAQ=240 T_TORCH=240
else
  # ~1B parameters: 16 x (4 x 2048^2 + 3 x 2048 x 5632) = 822M in the layers + 131M text embedding and head.
  MODEL=(--config.model.dim=2048 --config.model.num_layers=16 --config.model.num_heads=16
         --config.model.num_kv_heads=16 --config.model.mlp_dim=5632)
  DTYPE=(--config.compute_dtype=bfloat16)
  BACKBONE_RUN=(--config.batch_size=64 --steps=8 --matmul_size=8192 --noexecuted_flops)
  FLOW_RUN=(--repeats=20)
  LAQ_RUN=(--steps=10 --matmul_size=8192)
  TORCH_RUN=(--dim=2048 --layers=16 --heads=16 --mlp_dim=5632 --examples=64 --steps=5 --nosame_shape
             --dtype=bfloat16 --attention=cudnn)
  TORCH_DEVICE=cuda
  T_BACKBONE=100 T_FLOW=70 T_LAQ=60 T_TORCH=100  # 430 s of timeouts + start-up: < 8 min
fi

failed=()
run() {  # run NAME SECONDS command...: the command under its own timeout, its status reported
  local name=$1 seconds=$2
  shift 2
  echo
  echo "=== $name (timeout ${seconds}s) ==="
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@"
  local status=$?
  if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "--- $name: TIMED OUT after ${seconds}s"
    failed+=("$name (timeout)")
  elif [[ $status -ne 0 ]]; then
    echo "--- $name: FAILED (exit $status)"
    failed+=("$name (exit $status)")
  else
    echo "--- $name: ok in $((SECONDS - start))s"
  fi
}

BACKBONE=(--config=configs/pretrain.py:lapa_small --config.model.latent_source=synthetic "${MODEL[@]}" "${DTYPE[@]}")
for kernel in cudnn xla; do
  if [[ "$TINY" == "1" ]]; then attention=(); else attention=(--config.model.attention=$kernel); fi
  run "backbone train step, attention=$kernel" "$T_BACKBONE" "$PYTHON" scripts/bench_train_step.py \
    "${BACKBONE[@]}" ${attention[@]+"${attention[@]}"} "${BACKBONE_RUN[@]}" --json="$OUT_DIR/backbone_$kernel.json"
done

run "flow chunk latency (KV cache)" "$T_FLOW" "$PYTHON" scripts/bench_flow_inference.py \
  --config=configs/finetune.py:flow_small "${MODEL[@]}" "${DTYPE[@]}" "${FLOW_RUN[@]}" --json="$OUT_DIR/flow.json"

run "LAQ train step" "$T_LAQ" "$PYTHON" scripts/bench_train_step.py --config=configs/laq.py:lapa_small \
  --synthetic_frames "${DTYPE[@]}" "${LAQ_RUN[@]}" --json="$OUT_DIR/laq.json"

if [[ "$TORCH_DEVICE" == "cuda" ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo
  echo "=== jaxvla vs transformers: SKIPPED: the installed torch has no CUDA (the lock installs the CPU wheel) ==="
  failed+=("jaxvla vs transformers (no CUDA torch)")
else
  run "jaxvla vs transformers" "$T_TORCH" "$PYTHON" scripts/bench_vs_torch.py "${TORCH_RUN[@]}" \
    --torch_device="$TORCH_DEVICE" --json="$OUT_DIR/vs_torch.json"
fi

echo
echo "=== summary ($OUT_DIR) ==="
"$PYTHON" - "$OUT_DIR" <<'EOF'
import json, os, sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


for kernel in ("cudnn", "xla"):
    r = load(f"backbone_{kernel}.json")
    if r:
        print(f"backbone {r['num_params'] / 1e9:.2f}B params, attention={kernel}: {r['step_s'] * 1e3:.1f} ms/step, "
              f"{r['real_tokens_per_s']:,.0f} real tokens/s, padding {r['padding_fraction']:.3f}, "
              f"peak {r['peak_gflops'] / 1e3:.0f} TFLOP/s ({r['peak_dtype']}), MFU (real tokens) {r['mfu']:.3f}")
r = load("flow.json")
if r:
    print(f"flow chunk: cached {r['cached_ms']:.1f} ms ({r['cached_hz']:.0f} Hz executing {r['execute_steps']} of "
          f"{r['chunk']}), recompute {r['recompute_ms']:.1f} ms, speed-up {r['speedup']:.2f}x")
r = load("laq.json")
if r:
    print(f"LAQ step: {r['step_s'] * 1e3:.1f} ms (batch {r['batch_size']}), MFU {r['mfu']:.3f}")
r = load("vs_torch.json")
if r:
    print(f"jaxvla vs transformers ({r['model']['dtype']}, LAPA workload): torch {r['ms']['torch_lapa']:.1f} ms, "
          f"jaxvla {r['ms']['jaxvla_lapa']:.1f} ms, speed-up {r['speedup']:.2f}x")
EOF

if ((${#failed[@]})); then
  echo "device_check: ${#failed[@]} sub-benchmark(s) did not complete: ${failed[*]}"
  exit 1
fi
echo "device_check: all sub-benchmarks completed"
