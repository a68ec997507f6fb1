"""Feature stores: the interface and shared helpers (base.py), in-process (memory.py) and Redis (redis.py)."""
