#!/usr/bin/env bash
# The README's main-job command: set up, build artifacts if missing, then serve HTTP + gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
source service/setup_env.sh
CONFIG=${FALCONREC_CONFIG:-ml1m}
if [ "$CONFIG" = ml1m ] || [ "$CONFIG" = ml1m-large ]; then
  # MovieLens-1M from FALCONREC_DATA_DIR, ../shared/data/ml-1m, or artifacts/download/ml-1m; when none has it,
  # fetch the official GroupLens zip (SHA-256 checked) into artifacts/download/ (FALCONREC_ML1M_URL overrides
  # the address, e.g. a mirror or a file:// copy of the same zip).
  python - <<'PY' || exit 2
import os, sys
from training.data import ML1M_URL, DatasetError, default_ml1m_dir, download_ml1m
d = default_ml1m_dir()
if (d / "ratings.dat").is_file():
    sys.exit(0)
url = os.environ.get("FALCONREC_ML1M_URL", ML1M_URL)
print(f"MovieLens-1M not found in {d}; downloading {url} ...", file=sys.stderr)
try:
    download_ml1m(d, url)
except DatasetError as e:
    sys.exit(
        f"{e}\nSet FALCONREC_DATA_DIR to a directory holding ratings.dat and movies.dat, FALCONREC_ML1M_URL to "
        "another copy of ml-1m.zip, or FALCONREC_CONFIG=tiny to serve a synthetic catalog."
    )
print(f"MovieLens-1M ready in {d}", file=sys.stderr)
PY
fi
exec falconrec serve --config "$CONFIG" --build-if-missing "$@"
