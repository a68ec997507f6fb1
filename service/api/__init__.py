"""The entrypoints: the HTTP app (app.py, http_guard.py) and gRPC (grpc_server.py), with what both share: API keys
(auth.py), request models (schemas.py), validation (validation.py) and the failure -> answer mapping (errors.py)."""
