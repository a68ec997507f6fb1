"""The request path behind the API: the cascade (recommender.py), budgets (deadline.py), FAISS retrieval
(retrieval.py), the catalog (catalog.py) and the caches (embedding_cache.py, lru.py)."""
