#!/usr/bin/env bash
# The README's test command: set up the environment, make sure a Redis answers, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source service/setup_env.sh
# The real tritonserver (pytriton's binary) lives in its own venv; its tests skip if this fails.
bash tests/setup_triton.sh || echo "warning: tritonserver environment not installed; Triton tests will skip" >&2

if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi

set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # pytest's "no tests collected" (e.g. a -k/-m filter that matches nothing) is not a failure.
  echo "pytest collected no tests (exit 5)" >&2
  exit 0
fi
exit "$rc"
