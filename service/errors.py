"""The failures the request path expects, below every folder that raises them: the API maps each to one
answer (service/api/errors.py), the same over HTTP and gRPC. Messages are safe to show."""

from __future__ import annotations


class UnknownUser(LookupError):
    pass


class Overloaded(RuntimeError):
    """No pipeline slot freed up within the request's budget; the API answers 503 with Retry-After."""


class Unavailable(RuntimeError):
    """A dependency (the feature store) is down and nothing local can stand in: 503 with Retry-After, never
    404 (the user is not unknown, the store is unreachable). The message is safe to show."""


class BadRequest(ValueError):
    """Input the models cannot use (e.g. unknown item ids); the API answers 422 with this message."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Conflict(ValueError):
    """The item already exists (or is being ingested): 409. Ids are immutable under one store version, which is
    what lets the ranker's K/V cache key on raw ids."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
