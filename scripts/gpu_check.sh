#!/usr/bin/env bash
# The TensorRT path checked in one go, on a machine with an NVIDIA GPU and TensorRT.
#
#   scripts/gpu_check.sh [WORK_DIR]          (from a source checkout)
#
# Needs: the project installed with its dev extras (torch for the export, onnxruntime for the
# fp32 reference), tensorrt and polygraphy; cuda-python is optional (CUDA-graph checks):
#
#   pip install -e '.[dev,trt]' tensorrt-cu12 ['cuda-python>=12.4,<13']     (CUDA 12 driver)
#   pip install -e '.[dev,trt]' tensorrt-cu13 ['cuda-python>=13,<14']       (CUDA 13 driver)
#
# It exports the tiny preset, builds its plans (then again: all up to date), checks every plan
# against ONNX Runtime fp32 (cosine >= 0.999) and the whole upscale against the ort fp32
# reference (PSNR >= 35 dB), runs `deedsr upscale --backend trt`, prints per-step and per-image
# latency, builds static-tile plans and runs them with CUDA graphs, shows the refusal of a plan
# from another TensorRT version, and runs the `gpu` tests (tests/test_engines.py).
# Environment: PYTHON (default python), STEPS (default 20). Exit code: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
STEPS="${STEPS:-20}"
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/deedsr-gpu-check.XXXXXX")}"
mkdir -p "$WORK"
FAILED=()

step() {  # step "title" command...: run, time, and remember a failure
    local title="$1"; shift
    printf '\n=== %s\n$ %s\n' "$title" "$*"
    local start=$SECONDS
    if "$@"; then
        printf -- '--- ok (%ss)\n' "$((SECONDS - start))"
    else
        printf -- '--- FAILED (exit %s)\n' "$?"
        FAILED+=("$title")
    fi
}

printf '=== environment (work folder %s)\n' "$WORK"
if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
    echo "error: nvidia-smi failed: this check needs an NVIDIA GPU and its driver"
    exit 2
fi
"$PY" - <<'EOF' || exit 2
import importlib.util, sys
missing = [m for m in ("tensorrt", "polygraphy", "onnxruntime", "torch") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("error: missing Python packages: " + ", ".join(missing) + " (pip install -e '.[dev,trt]' tensorrt-cu12)")
import tensorrt, polygraphy
from deedsr.runtime.backends.cuda import gpu_identity
print(f"TensorRT {tensorrt.__version__}, polygraphy {polygraphy.__version__}, GPU {gpu_identity().describe()}")
from deedsr.runtime.backends.cuda import cudart_graphs
print("cuda-python:", "yes" if cudart_graphs() is not None else "no runtime module (the CUDA-graph step is skipped)")
EOF

TINY="$WORK/tiny"
STATIC="$WORK/tiny-static"
step "1. export the tiny preset (fp32 + fp16 graphs, fused denoiser, latent tile 16)" \
    deedsr-export --preset tiny --out "$TINY" --tile 16 --max-size 128 --fuse-denoiser --force
step "2. build TensorRT plans (dynamic shapes; time per graph)" \
    deedsr-export build-engines "$TINY"
step "2b. build again: every plan is up to date" \
    deedsr-export build-engines "$TINY"
step "3. every plan vs ONNX Runtime fp32, end to end vs the ort fp32 reference, latency" \
    "$PY" -m deedsr.engines.check "$TINY" --steps "$STEPS"
step "4. deedsr upscale --backend trt (end to end, timed)" \
    bash -c "time deedsr -v upscale '$(pwd)/runtime/assets/astronaut_lr.png' -o '$WORK/out' --engines '$TINY' \
             --backend trt --steps $STEPS --overwrite"

rm -rf "$STATIC"
cp -r "$TINY" "$STATIC"
step "5. static-tile plans (--static; needed for CUDA graphs)" \
    deedsr-export build-engines "$STATIC" --static --force
if "$PY" -c "import sys; from deedsr.runtime.backends.cuda import cudart_graphs; sys.exit(cudart_graphs() is None)"; then
    step "5b. static plans with CUDA graphs: end to end and latency" \
        env DEEDSR_TRT_CUDA_GRAPHS=1 "$PY" -m deedsr.engines.check "$STATIC" --steps "$STEPS" --skip-compare
else
    echo "(5b skipped: pip install 'cuda-python>=12.4,<13' (CUDA 12 driver) or 'cuda-python>=13' (CUDA 13) for CUDA graphs)"
fi

refusal() {  # a plan record from another TensorRT version must be refused with one line
    local other="$WORK/tiny-other-version"
    rm -rf "$other" && cp -r "$TINY" "$other"
    "$PY" - "$other" <<'EOF' || return 1
import json, sys
path = f"{sys.argv[1]}/manifest.json"
data = json.load(open(path))
for record in data["trt"]["plans"].values():
    record["tensorrt"] = "9.0.0.0"
json.dump(data, open(path, "w"))
EOF
    local out
    out=$(deedsr upscale runtime/assets/astronaut_lr.png -o "$WORK/out-other" --engines "$other" --backend trt 2>&1)
    local rc=$?
    echo "exit $rc: $out"
    [ "$rc" -eq 2 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] && [[ "$out" == *"build-engines"* ]]
}
step "6. a plan from another TensorRT version is refused (one line, exit 2, says how to rebuild)" refusal

step "7. pytest -m gpu (tests/test_engines.py)" \
    env DEEDSR_TRT_TEST_DIR="$TINY" "$PY" -m pytest -m gpu tests/test_engines.py -q -rs -p no:cacheprovider

printf '\n=== summary: %s failed\n' "${#FAILED[@]}"
for title in "${FAILED[@]}"; do printf '  FAILED: %s\n' "$title"; done
exit "${#FAILED[@]}"
