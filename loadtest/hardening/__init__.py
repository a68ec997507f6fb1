"""Hardening measurements against a real `falconrec serve` subprocess (not a test: it prints numbers).

    falconrec hardening --config ml1m [--artifacts artifacts] [--repo model_repository] [--out DIR] [--parts ...]
    python -m loadtest.hardening ...   (the same)

It starts a private redis-server on a free loopback port, loads it with `falconrec load-redis`, starts `falconrec
serve` on it (with a write key of its own) and runs the chosen parts in turn, most of them beside a fixed-rate
Poisson stream of POST /v1/recommend for known users (the build's `user_raw_ids`, Zipf-skewed like
loadtest/locustfile.py):

1. outage: Redis SIGKILLed for --outage-s, restarted and reloaded; answers per phase by status;
2. grpc: a wide ScoreBatch under a client deadline, then one cancelled by its client, and the server's CPU after it;
3. overload: open-loop arrivals well above capacity: shares, latencies, degraded share;
4. slowbody: sockets that send a head and no body: what normal requests and the slow sockets get;
5. hugeids: one-item POST /v1/items with ids 2^21 - 1 ... 2^26 - 1 and a burst: server RSS and event loop stalls;
6. freeze: events POSTed with Redis frozen, retried as the 503 says: how many times each is stored;
7. workerkill: the ingestion worker SIGKILLed after a POST: how many items become servable, when, what /readyz says.

Layout: options.py (every knob), stack.py (the processes), traffic.py (what is sent), stats.py (counting and the
markdown), one module per part, runner.py (the order and the report). The markdown goes to stdout and
OUT/hardening.md, the raw numbers to OUT/hardening.json, the server's and the loader's output to OUT/server.log and
OUT/load-redis.log. Every process it starts is stopped on exit. The process plumbing is loadtest/procs.py's.
"""

from loadtest.hardening.options import PART_NAMES, Options, parse_args
from loadtest.hardening.runner import Report, main, run

__all__ = ["PART_NAMES", "Options", "Report", "main", "parse_args", "run"]
