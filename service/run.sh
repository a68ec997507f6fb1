#!/usr/bin/env bash
# The README's main-job command: set up, build artifacts if missing, then serve HTTP + gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
source service/setup_env.sh
CONFIG=${FALCONREC_CONFIG:-ml1m}
if [ "$CONFIG" = ml1m ] || [ "$CONFIG" = ml1m-large ]; then
  python - <<'PY' || { echo "MovieLens-1M not found: set FALCONREC_DATA_DIR, or FALCONREC_CONFIG=tiny" >&2; exit 2; }
from training.data import default_ml1m_dir
import sys
sys.exit(0 if (default_ml1m_dir() / "ratings.dat").is_file() else 1)
PY
fi
exec falconrec serve --config "$CONFIG" --build-if-missing "$@"
