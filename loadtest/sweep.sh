#!/usr/bin/env bash
# Load-test one server at several rates, one report (CSV, PNG, summary.md) per rate, then stop it.
#
#   loadtest/sweep.sh OUT_DIR "50 100 150" [DURATION_S] -- SERVER COMMAND ...
#
# The server command must listen on FALCONREC_PORT (default 8000). Each rate runs against the same warm server
# (started once); a 10 s warm-up at the lowest rate comes first and is not reported. Extra `falconrec
# loadtest` flags go in SWEEP_LOADTEST_ARGS (e.g. "--request-budget-ms 17"). Used for the issue-11 numbers:
#   loadtest/sweep.sh /tmp/after "50 100 150" 120 -- falconrec serve --config ml1m --grpc-port 0
set -euo pipefail
out=$1 rates=$2 duration=${3:-120}
shift 3
[ "${1:-}" = "--" ] && shift
port=${FALCONREC_PORT:-8000}
mkdir -p "$out"
"$@" > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 240); do
  curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
  kill -0 $server 2>/dev/null || { echo "server exited; see $out/server.log" >&2; exit 1; }
  sleep 0.5
done
first=${rates%% *}
# shellcheck disable=SC2086
falconrec loadtest --host "http://127.0.0.1:$port" --rate "$first" --duration 10 --out "$out/warmup" \
  ${SWEEP_LOADTEST_ARGS:-} > /dev/null 2>&1 || true
for r in $rates; do
  # shellcheck disable=SC2086
  falconrec loadtest --host "http://127.0.0.1:$port" --rate "$r" --duration "$duration" --out "$out/rate-$r" \
    ${SWEEP_LOADTEST_ARGS:-} > "$out/rate-$r.txt" 2>&1 || true  # exit 1 = SLO missed: still a result
  tail -n 20 "$out/rate-$r.txt"
done
