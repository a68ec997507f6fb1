"""One validation for HTTP and gRPC.

Both transports turn a request into the pydantic models of service.api.schemas (static bounds: types, int64
ranges, positivity, no NaN) and then call the checks here (limits from settings). HTTP answers 422 and gRPC
INVALID_ARGUMENT with the same messages. `document_limits` writes the same settings limits into the OpenAPI
document, so what is documented is what is enforced.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from service.api.schemas import INT64_MAX, EventsRequest, ItemsRequest, RecommendRequest, ScoreRequest, UserInput
from service.catalog import Catalog
from service.ids import Id, IdError
from service.pipeline.deadline import Deadline
from service.settings import Settings
from service.stores.base import Event


class InvalidInput(ValueError):
    """A request the service refuses as given (HTTP 422, gRPC INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str, where: str = "body"):
        super().__init__(message)
        self.field = field
        self.where = where  # "body", or "header" (gRPC: metadata)

    def as_error(self) -> dict:
        # "events.3.item_id" -> ["body", "events", 3, "item_id"]: the offending entry, as pydantic names it
        loc = [int(p) if p.isdigit() else p for p in self.field.split(".")]
        return {"loc": [self.where, *loc], "msg": str(self), "type": "value_error"}


def field_errors(exc: ValidationError) -> list[dict]:
    """pydantic's errors without `input`/`ctx`/`url` (they echo payloads and link to docs)."""
    return [{"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]


def describe_errors(errors: list[dict]) -> str:
    """One line for gRPC details: `history.0.ts: Input should be ...; k: ...`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors)


def parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = field_errors(e)
        first = errors[0]["loc"][0] if errors and errors[0]["loc"] else "body"
        raise InvalidInput(str(first), describe_errors(errors)) from e


def to_raw(convert: Callable[[Id], int], value: Id, field: str) -> int:
    """A client's id as a raw id (service/ids.py); a 422 naming the field when this catalog cannot take it."""
    try:
        return convert(value)
    except IdError as e:
        raise InvalidInput(field, str(e)) from None


@dataclass(frozen=True)
class RawUserInput:
    """A request's user and history in raw ids, as the pipeline takes them."""

    user_id: int | None
    history: list[tuple[int, int]] | None


def raw_user_input(body: UserInput, catalog: Catalog) -> RawUserInput:
    user = None if body.user_id is None else to_raw(catalog.user_raw, body.user_id, "user_id")
    if not body.history:
        return RawUserInput(user, None)
    hist = [(to_raw(catalog.item_raw, h.item_id, f"history.{i}.item_id"), h.ts) for i, h in enumerate(body.history)]
    _known_items(catalog, [h.item_id for h in body.history], [r for r, _ in hist], "history", "in history: ")
    return RawUserInput(user, hist)


def raw_item_ids(body: ScoreRequest, catalog: Catalog) -> list[int]:
    raw = [to_raw(catalog.item_raw, v, f"item_ids.{i}") for i, v in enumerate(body.item_ids)]
    _known_items(catalog, body.item_ids, raw, "item_ids")
    return raw


def _known_items(catalog: Catalog, given: list[Id], raw: list[int], field: str, where: str = "") -> None:
    """422 naming the unknown items as the client gave them (a string's raw id would mean nothing to it)."""
    unknown = [g for g, r in zip(given, raw, strict=True) if r not in catalog.index_of]
    if unknown:
        more = " ..." if len(unknown) > 10 else ""
        raise InvalidInput(field, f"unknown item ids {where}{unknown[:10]}{more}")


def check_user_input(body: UserInput, s: Settings, start: float) -> Deadline:
    if body.history is not None and len(body.history) > s.max_history:
        raise InvalidInput("history", f"history has {len(body.history)} items; the limit is {s.max_history}")
    if body.history is not None and len(body.history) == 0 and body.user_id is None:
        raise InvalidInput("history", "history is empty and no user_id was given")
    if body.user_id is None and body.history is None:
        raise InvalidInput("user_id", "give a user_id or a history")
    budget = body.budget_ms if body.budget_ms is not None else s.budget_ms
    if budget > s.max_budget_ms:
        raise InvalidInput("budget_ms", f"budget_ms {budget:g} is over the cap of {s.max_budget_ms:g}")
    if budget < s.min_budget_ms:
        # Smaller budgets (down to 5e-324) cannot run even the required stages; retrying would not help.
        raise InvalidInput("budget_ms", f"budget_ms {budget:g} is under the minimum of {s.min_budget_ms:g}")
    return Deadline(budget / 1000.0, start=start)


def check_recommend(body: RecommendRequest, s: Settings, start: float) -> Deadline:
    deadline = check_user_input(body, s, start)
    if body.k > s.max_k:
        raise InvalidInput("k", f"k={body.k} is over the limit of {s.max_k}")
    if body.num_candidates is not None and body.num_candidates > s.max_candidates:
        raise InvalidInput("num_candidates", f"num_candidates={body.num_candidates} is over {s.max_candidates}")
    return deadline


def check_score(body: ScoreRequest, s: Settings, start: float) -> Deadline:
    deadline = check_user_input(body, s, start)
    if len(body.item_ids) > s.max_score_items:
        raise InvalidInput("item_ids", f"{len(body.item_ids)} item ids; the limit is {s.max_score_items}")
    return deadline


MAX_METADATA_BYTES = 4096


IDEMPOTENCY_HEADER = "idempotency-key"  # HTTP header and gRPC metadata key
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")


def check_idempotency_key(value: str | None) -> str | None:
    if value is not None and not _IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidInput(IDEMPOTENCY_HEADER, "Idempotency-Key must be 1 to 128 visible ASCII characters", "header")
    return value


def derived_event_id(key: str, index: int, user_id: int, item_id: int, ts: int) -> str:
    """The event_id of a batch's entry that has none: from the batch's Idempotency-Key and the entry's index, so a
    retried batch is deduplicated, and from its content, so a key reused for another batch drops nothing."""
    raw = f"{key}\0{index}\0{user_id}\0{item_id}\0{ts}".encode()
    return "idem:" + hashlib.blake2b(raw, digest_size=12).hexdigest()


def check_events(
    body: EventsRequest,
    s: Settings,
    known: Callable[[int], bool],
    now: float,
    idempotency_key: str | None = None,
    catalog: Catalog | None = None,
) -> list[Event]:
    """The whole batch is checked before anything is written: one bad entry refuses all of them, and the
    error names it (`events.3.item_id`). With an Idempotency-Key every entry without an event_id gets one.
    Ids become raw ids through `catalog` (service/ids.py); without one they must be integers already."""
    if len(body.events) > s.max_event_batch:
        raise InvalidInput("events", f"{len(body.events)} events in one request; the limit is {s.max_event_batch}")
    latest = now + s.event_future_tolerance_s
    user_raw = catalog.user_raw if catalog is not None else _as_int
    item_raw = catalog.item_raw if catalog is not None else _as_int
    raw: list[tuple[int, int]] = []
    for i, e in enumerate(body.events):
        item = to_raw(item_raw, e.item_id, f"events.{i}.item_id")
        raw.append((to_raw(user_raw, e.user_id, f"events.{i}.user_id"), item))
        if not known(item):
            raise InvalidInput(f"events.{i}.item_id", f"unknown item {e.item_id!r} (event {i}); nothing was written")
        if e.ts > latest:
            raise InvalidInput(
                f"events.{i}.ts",
                f"ts {e.ts} is over {s.event_future_tolerance_s:g} s in the future (event {i}); nothing was written",
            )
    key = check_idempotency_key(idempotency_key)
    return [
        Event(u, item, e.ts, e.event_id or (derived_event_id(key, i, u, item, e.ts) if key else None))
        for i, (e, (u, item)) in enumerate(zip(body.events, raw, strict=True))
    ]


def _as_int(value: Id) -> int:
    if isinstance(value, str):
        raise IdError("ids are integers here, got a string")
    return value


@dataclass(frozen=True)
class ValidItem:
    """A new item as the live path takes it: its raw id, and its own id when the catalog's ids are strings."""

    item_id: int
    key: str | None
    text: str
    metadata: Mapping[str, object] | None


def check_items(body: ItemsRequest, s: Settings, catalog: Catalog) -> list[ValidItem]:
    """Limits of a POST /v1/items (known ids are the caller's conflict: service.ingest.live checks them)."""
    if len(body.items) > s.max_item_batch:
        raise InvalidInput("items", f"{len(body.items)} items in one request; the limit is {s.max_item_batch}")
    out: list[ValidItem] = []
    seen: set[int] = set()
    for i, it in enumerate(body.items):
        field = f"items.{i}.item_id"
        own = to_raw(catalog.item_key, it.item_id, field)
        raw = to_raw(catalog.item_raw, it.item_id, field)
        if raw in seen:
            raise InvalidInput(field, f"item {it.item_id!r} appears twice in the request")
        seen.add(raw)
        out.append(ValidItem(raw, own if isinstance(own, str) else None, it.text, it.metadata))
    _check_item_fields(body, s)
    return out


def _check_item_fields(body: ItemsRequest, s: Settings) -> None:
    for i, it in enumerate(body.items):
        if len(it.text) > s.max_item_text_chars:
            limit = s.max_item_text_chars
            raise InvalidInput(f"items.{i}.text", f"text of {len(it.text)} characters; the limit is {limit}")
        if not it.text.strip():
            raise InvalidInput(f"items.{i}.text", "text is blank")
        if it.metadata is not None and len(json.dumps(it.metadata)) > MAX_METADATA_BYTES:
            raise InvalidInput(f"items.{i}.metadata", f"metadata over {MAX_METADATA_BYTES} bytes as JSON")
        title = (it.metadata or {}).get("title")
        if title is not None and not isinstance(title, str):
            raise InvalidInput(f"items.{i}.metadata.title", "title must be a string")


# (schema, property, JSON-schema keyword, settings attribute)
_LIMITS = [
    ("RecommendRequest", "k", "maximum", "max_k"),
    ("RecommendRequest", "num_candidates", "maximum", "max_candidates"),
    ("RecommendRequest", "history", "maxItems", "max_history"),
    ("ScoreRequest", "history", "maxItems", "max_history"),
    ("ScoreRequest", "item_ids", "maxItems", "max_score_items"),
    ("RecommendRequest", "budget_ms", "maximum", "max_budget_ms"),
    ("ScoreRequest", "budget_ms", "maximum", "max_budget_ms"),
    ("RecommendRequest", "budget_ms", "minimum", "min_budget_ms"),
    ("ScoreRequest", "budget_ms", "minimum", "min_budget_ms"),
    ("EventsRequest", "events", "maxItems", "max_event_batch"),
    ("ItemsRequest", "items", "maxItems", "max_item_batch"),
    ("ItemIn", "text", "maxLength", "max_item_text_chars"),
]


def document_limits(openapi: dict, s: Settings) -> dict:
    """Write the settings limits into the request schemas of an OpenAPI document (in place)."""
    _exact_integer_bounds(openapi)
    schemas = openapi.get("components", {}).get("schemas", {})
    for schema, prop, keyword, attr in _LIMITS:
        spec = schemas.get(schema, {}).get("properties", {}).get(prop)
        if spec is None:
            continue
        # Optional fields are `anyOf: [{type: X, ...}, {type: null}]`: the bound goes on the non-null branch.
        target = next((b for b in spec.get("anyOf", []) if b.get("type") != "null"), spec)
        target[keyword] = getattr(s, attr)
    return openapi


def _exact_integer_bounds(node: Any) -> None:
    # FastAPI's OpenAPI model stores bounds as floats: 2**63 - 1 became 9.223372036854776e18, which is 2**63,
    # a value the API refuses. Integer schemas get integer bounds back (clamped to int64).
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("maximum", "minimum"):
                if isinstance(node.get(key), float):
                    node[key] = max(min(int(node[key]), INT64_MAX), -INT64_MAX - 1)
        for v in node.values():
            _exact_integer_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _exact_integer_bounds(v)
