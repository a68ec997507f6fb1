from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HistoryEvent(_message.Message):
    __slots__ = ("item_id", "ts", "item_key")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEY_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    ts: int
    item_key: str
    def __init__(self, item_id: _Optional[int] = ..., ts: _Optional[int] = ..., item_key: _Optional[str] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "history", "k", "exclude_seen", "num_candidates", "budget_ms", "query_ts", "user_key")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TS_FIELD_NUMBER: _ClassVar[int]
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    history: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    k: int
    exclude_seen: bool
    num_candidates: int
    budget_ms: float
    query_ts: int
    user_key: str
    def __init__(self, user_id: _Optional[int] = ..., history: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., num_candidates: _Optional[int] = ..., budget_ms: _Optional[float] = ..., query_ts: _Optional[int] = ..., user_key: _Optional[str] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "title", "item_key")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEY_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    title: str
    item_key: str
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ..., title: _Optional[str] = ..., item_key: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_version", "degraded", "degraded_reasons", "timings_ms", "candidates_recalled", "candidates_ranked")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_RECALLED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_RANKED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    degraded: bool
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    timings_ms: _containers.ScalarMap[str, float]
    candidates_recalled: int
    candidates_ranked: int
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., degraded_reasons: _Optional[_Iterable[str]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., candidates_recalled: _Optional[int] = ..., candidates_ranked: _Optional[int] = ...) -> None: ...

class ScoreUser(_message.Message):
    __slots__ = ("request_id", "user_id", "history", "item_ids", "query_ts", "user_key", "item_keys")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TS_FIELD_NUMBER: _ClassVar[int]
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEYS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: int
    history: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    query_ts: int
    user_key: str
    item_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[int] = ..., history: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ..., item_ids: _Optional[_Iterable[int]] = ..., query_ts: _Optional[int] = ..., user_key: _Optional[str] = ..., item_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("users", "budget_ms")
    USERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[ScoreUser]
    budget_ms: float
    def __init__(self, users: _Optional[_Iterable[_Union[ScoreUser, _Mapping]]] = ..., budget_ms: _Optional[float] = ...) -> None: ...

class UserScores(_message.Message):
    __slots__ = ("request_id", "scores", "degraded", "error", "error_code")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    degraded: bool
    error: str
    error_code: str
    def __init__(self, request_id: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ..., degraded: _Optional[bool] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "ts", "event_id", "user_key", "item_key")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEY_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    item_id: int
    ts: int
    event_id: str
    user_key: str
    item_key: str
    def __init__(self, user_id: _Optional[int] = ..., item_id: _Optional[int] = ..., ts: _Optional[int] = ..., event_id: _Optional[str] = ..., user_key: _Optional[str] = ..., item_key: _Optional[str] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("written", "duplicates", "users")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    written: int
    duplicates: int
    users: int
    def __init__(self, written: _Optional[int] = ..., duplicates: _Optional[int] = ..., users: _Optional[int] = ...) -> None: ...

class NewItem(_message.Message):
    __slots__ = ("item_id", "text", "metadata", "item_key")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ITEM_KEY_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    text: str
    metadata: _containers.ScalarMap[str, str]
    item_key: str
    def __init__(self, item_id: _Optional[int] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., item_key: _Optional[str] = ...) -> None: ...

class AddItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[NewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[NewItem, _Mapping]]] = ...) -> None: ...

class AddItemsResponse(_message.Message):
    __slots__ = ("accepted", "status", "accepted_keys")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_KEYS_FIELD_NUMBER: _ClassVar[int]
    accepted: _containers.RepeatedScalarFieldContainer[int]
    status: str
    accepted_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[_Iterable[int]] = ..., status: _Optional[str] = ..., accepted_keys: _Optional[_Iterable[str]] = ...) -> None: ...
