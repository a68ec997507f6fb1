"""How a pipeline exception is answered, the same way over HTTP and gRPC.

Messages are our own text (or a validation message about the caller's input): no exception class name,
address or credential reaches a client.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.api.validation import InvalidInput
from service.auth import AuthError
from service.backends.base import BackendUnavailable
from service.errors import BadRequest, Conflict, Overloaded, Unavailable, UnknownUser


@dataclass(frozen=True)
class Refusal:
    http_status: int
    grpc_code: str  # a grpc.StatusCode name
    message: str
    field: str | None = None  # for 422 / INVALID_ARGUMENT
    where: str = "body"  # where the field is: the body, or a header (gRPC: metadata)
    shed: bool = False  # counted in falconrec_shed_total: load or time made us refuse
    retry: bool = False  # 503 with Retry-After: trying again shortly can succeed

    @property
    def grpc_details(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def refusal(e: BaseException) -> Refusal | None:
    """The answer for an expected failure; None for a bug (answered 500 / INTERNAL, logged)."""
    if isinstance(e, InvalidInput):
        return Refusal(422, "INVALID_ARGUMENT", str(e), field=e.field, where=e.where)
    if isinstance(e, BadRequest):
        return Refusal(422, "INVALID_ARGUMENT", str(e), field=e.field)
    if isinstance(e, AuthError):
        return Refusal(e.status, "UNAUTHENTICATED" if e.status == 401 else "PERMISSION_DENIED", str(e))
    if isinstance(e, Conflict):
        return Refusal(409, "ALREADY_EXISTS", str(e), field=e.field)
    if isinstance(e, UnknownUser):
        return Refusal(404, "NOT_FOUND", str(e))
    if isinstance(e, Overloaded):
        return Refusal(503, "RESOURCE_EXHAUSTED", str(e), shed=True, retry=True)
    if isinstance(e, Unavailable):
        return Refusal(503, "UNAVAILABLE", str(e), retry=True)
    if isinstance(e, TimeoutError):
        return Refusal(503, "UNAVAILABLE", "not answered within the budget, retry shortly", shed=True, retry=True)
    if isinstance(e, BackendUnavailable):
        return Refusal(503, "UNAVAILABLE", "models unavailable, retry shortly", retry=True)
    return None
