#!/usr/bin/env bash
# A separate environment for the real tritonserver (the nvidia-pytriton wheel pins numpy < 2, which
# the project's own environment does not accept). Used only to run the server in tests.
set -euo pipefail
VENV=${FALCONREC_TRITON_VENV:-.venv-triton}
STAMP="$VENV/.falconrec-installed"
want="nvidia-pytriton==0.7.0 onnxruntime==1.32.0"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q $want
  echo "$want" > "$STAMP"
fi
