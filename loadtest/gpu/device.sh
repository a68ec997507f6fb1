#!/usr/bin/env bash
# Runs ON the GPU machine, from the repository root (issue 28). Two verbs:
#   bash loadtest/gpu/device.sh receive N   # this call carried .gpu/parts/pN: keep it in /tmp/ortgpu
#   bash loadtest/gpu/device.sh diag        # the Python, numpy and CUDA libraries the machine has
#   bash loadtest/gpu/device.sh measure     # the last part is carried: install, then loadtest/gpu/measure.py
# Everything it prints also goes to $OUT/device.log, and measure.py writes its tables to $OUT as each section ends,
# so a failure late in the window still returns what was measured before it.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
PY=${FALCONREC_GPU_PYTHON:-python3}
verb=${1:-}
if [ "$verb" = receive ]; then
  "$PY" loadtest/gpu/unpack.py receive ".gpu/parts/p$2" 2>&1 | tee -a "$OUT/device.log"
  exit "${PIPESTATUS[0]}"
fi
if [ "$verb" = diag ]; then  # what the first call checks: the libraries the CUDA provider links, the Python
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  "$PY" -c 'import sys, numpy, site; print(sys.version, numpy.__version__, site.getsitepackages())'
  NV=$("$PY" -c 'import site; print(site.getsitepackages()[0])')/nvidia
  find "$NV" -maxdepth 4 \( -name 'libcublas*.so.*' -o -name 'libcudart.so.*' -o -name 'libcurand.so.*' \
    -o -name 'libcudnn.so.*' -o -name 'libcufft.so.*' \) | sort
  "$PY" -m pip list 2>/dev/null | grep -iE '^(onnxruntime|fastapi|pydantic|uvicorn|uvloop|faiss|grpcio|protobuf) '
  exit 0
fi
[ "$verb" = measure ] || { echo "usage: device.sh receive N | measure [measure.py args]" >&2; exit 2; }
shift
exec > >(tee -a "$OUT/device.log") 2>&1
date -u
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv || true
last=$(ls -d .gpu/parts/p* 2>/dev/null | sort -V | tail -1)
[ -n "$last" ] && "$PY" loadtest/gpu/unpack.py receive "$last"
"$PY" loadtest/gpu/unpack.py install || { echo "install failed"; exit 3; }
SITE=${FALCONREC_GPU_STORE:-/tmp/ortgpu}/site
# The CUDA provider links libcublas.so.13, libcudart.so.13, libcurand.so.10 and cuDNN: the machine's own
# nvidia-*-cu13 wheels (beside torch) have them; the dynamic loader reads LD_LIBRARY_PATH at process start.
NV=$("$PY" -c 'import site; print(site.getsitepackages()[0])')/nvidia
export LD_LIBRARY_PATH="$(find "$NV" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
"$PY" -c 'import onnxruntime as o, faiss, fastapi; print("onnxruntime", o.__version__, o.get_available_providers())'
"$PY" -m loadtest.gpu.measure --out "$OUT" --work /tmp/falconrec-gpu "$@"
rc=$?
nvidia-smi --query-gpu=memory.used,clocks.sm,temperature.gpu --format=csv || true
date -u
exit $rc
