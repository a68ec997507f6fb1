#!/usr/bin/env bash
# The README's main-job command: set up, build a first model version if there is none, then serve HTTP + gRPC.
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
# Serve in minutes, improve in the background (issue 25): the service follows the versions directory's CURRENT.
# On a fresh machine a quick first version (a few epochs, no SASRec) is built and served; the full build runs as
# its own low-priority process and its version is promoted through the gate when done (`falconrec models list`;
# log: artifacts/full-build.log). A full build already on disk (artifacts/, model_repository/) is adopted as is.
export FALCONREC_VERSIONS_DIR=${FALCONREC_VERSIONS_DIR:-versions}
if ! falconrec models current >/dev/null 2>&1; then  # the CURRENT file, or the Redis key with FALCONREC_REDIS_URL
  if vid=$(falconrec models add --config "$CONFIG" 2>/dev/null | tail -1) && [ -n "$vid" ]; then
    falconrec models promote "$vid" --force
  else
    falconrec models quick --config "$CONFIG"
    mkdir -p artifacts
    nohup nice -n 19 falconrec models full --config "$CONFIG" > artifacts/full-build.log 2>&1 &
    echo "falconrec: full build of $CONFIG running in the background (pid $!, log artifacts/full-build.log)" >&2
  fi
fi
exec falconrec serve --config "$CONFIG" "$@"
