"""`falconrec`: the one front door. Every command of the project is registered here; each lives beside what it
runs (offline.py: build and evaluation, online.py: serving, models.py: model versions, measuring.py: benchmarks and
load tests)."""

from __future__ import annotations

import logging
import os

import typer

from falconrec import lifecycle, measuring, models, offline, online

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.command()(offline.build)
app.command()(offline.embed)
app.command()(offline.train)
app.command()(offline.export)
app.command("eval")(offline.eval_)
app.command("cold-start")(offline.cold_start)
app.command()(offline.quantize)
app.command()(online.serve)
app.command("load-redis")(online.load_redis_cmd)
app.command()(online.ingest)
app.command("triton-local")(online.triton_local)
app.command()(measuring.loadtest)
app.command("ingest-latency")(measuring.ingest_latency)
app.command()(measuring.bench)
app.command("bench-index")(measuring.bench_index)
app.command("bench-data")(measuring.bench_data)
app.command()(measuring.swaps)
app.command()(measuring.deadline)
app.command(context_settings=measuring.PASS_THROUGH)(measuring.hardening)
models.app.command()(lifecycle.quick)
models.app.command()(lifecycle.full)
models.app.command()(lifecycle.retrain)
app.add_typer(models.app, name="models")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("falconrec").setLevel(os.environ.get("FALCONREC_LOG_LEVEL", "INFO"))
    app()


if __name__ == "__main__":
    main()
