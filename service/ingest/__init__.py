"""The live data path: events and new items (live.py, in the API process), the feed between the API and the
ingestion worker (feed.py), and the worker itself (worker.py, its own process: the API never imports it)."""
