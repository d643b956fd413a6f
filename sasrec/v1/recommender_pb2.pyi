from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendRequest(_message.Message):
    __slots__ = ("history", "k", "exclude_seen", "exclude_item_ids", "user_id", "explain", "explain_items", "timestamps")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude_seen: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    user_id: str
    explain: bool
    explain_items: int
    timestamps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., user_id: _Optional[str] = ..., explain: _Optional[bool] = ..., explain_items: _Optional[int] = ..., timestamps: _Optional[_Iterable[int]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("item_id", "weight")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    weight: float
    def __init__(self, item_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "explanation")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    explanation: _containers.RepeatedCompositeFieldContainer[Contribution]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., explanation: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_name", "model_version", "unknown_history_ids", "cold_start", "explain_method")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_HISTORY_IDS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_METHOD_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_name: str
    model_version: int
    unknown_history_ids: int
    cold_start: bool
    explain_method: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., unknown_history_ids: _Optional[int] = ..., cold_start: _Optional[bool] = ..., explain_method: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "model_version", "maxlen", "max_k", "num_items", "exported_at", "source_run", "model_card_json")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAXLEN_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RUN_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    maxlen: int
    max_k: int
    num_items: int
    exported_at: str
    source_run: str
    model_card_json: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., maxlen: _Optional[int] = ..., max_k: _Optional[int] = ..., num_items: _Optional[int] = ..., exported_at: _Optional[str] = ..., source_run: _Optional[str] = ..., model_card_json: _Optional[str] = ...) -> None: ...

class AppendEventsRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "timestamps", "idempotency_key")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    timestamps: _containers.RepeatedScalarFieldContainer[int]
    idempotency_key: str
    def __init__(self, user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., timestamps: _Optional[_Iterable[int]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AppendEventsResponse(_message.Message):
    __slots__ = ("appended", "duplicate", "dropped")
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    appended: int
    duplicate: bool
    dropped: int
    def __init__(self, appended: _Optional[int] = ..., duplicate: _Optional[bool] = ..., dropped: _Optional[int] = ...) -> None: ...

class RecommendForUserRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_seen", "exclude_item_ids", "item_ids", "timestamps", "idempotency_key", "explain", "explain_items")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_seen: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    timestamps: _containers.RepeatedScalarFieldContainer[int]
    idempotency_key: str
    explain: bool
    explain_items: int
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., item_ids: _Optional[_Iterable[str]] = ..., timestamps: _Optional[_Iterable[int]] = ..., idempotency_key: _Optional[str] = ..., explain: _Optional[bool] = ..., explain_items: _Optional[int] = ...) -> None: ...

class RecommendForUserResponse(_message.Message):
    __slots__ = ("recommendation", "append", "history_length")
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    recommendation: RecommendResponse
    append: AppendEventsResponse
    history_length: int
    def __init__(self, recommendation: _Optional[_Union[RecommendResponse, _Mapping]] = ..., append: _Optional[_Union[AppendEventsResponse, _Mapping]] = ..., history_length: _Optional[int] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("item_id", "timestamp")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    timestamp: int
    def __init__(self, item_id: _Optional[str] = ..., timestamp: _Optional[int] = ...) -> None: ...

class GetHistoryResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
