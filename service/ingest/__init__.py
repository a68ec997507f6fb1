"""The live data path: events and new items (live.py, in the API process), the feed between the API and the
ingestion worker (feed.py) and its supervision (supervisor.py). The worker itself is training/ingest_worker.py
(`falconrec ingest`, its own process with torch: the API never imports it)."""
