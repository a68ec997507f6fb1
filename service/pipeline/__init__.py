"""The request path behind the API: the cascade (recommender.py), who runs it (admission.py), per-user stages and
their caches (user_state.py), the models and stores it reads (serving.py), budgets (deadline.py), FAISS retrieval
(retrieval.py), cross-request candidate batching (batching.py) and the ranker's item tokens (item_tokens.py)."""
