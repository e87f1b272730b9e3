from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    EMBEDDING: _ClassVar[Source]
    FOF: _ClassVar[Source]
    BLEND: _ClassVar[Source]
SOURCE_UNSPECIFIED: Source
EMBEDDING: Source
FOF: Source
BLEND: Source

class UserFeatures(_message.Message):
    __slots__ = ("profile", "sparse_ids", "friend_ids")
    class ProfileEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_IDS_FIELD_NUMBER: _ClassVar[int]
    FRIEND_IDS_FIELD_NUMBER: _ClassVar[int]
    profile: _containers.ScalarMap[str, float]
    sparse_ids: _containers.RepeatedScalarFieldContainer[int]
    friend_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, profile: _Optional[_Mapping[str, float]] = ..., sparse_ids: _Optional[_Iterable[int]] = ..., friend_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_user_ids", "request_features", "source")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    k: int
    exclude_user_ids: _containers.RepeatedScalarFieldContainer[int]
    request_features: UserFeatures
    source: Source
    def __init__(self, user_id: _Optional[int] = ..., k: _Optional[int] = ..., exclude_user_ids: _Optional[_Iterable[int]] = ..., request_features: _Optional[_Union[UserFeatures, _Mapping]] = ..., source: _Optional[_Union[Source, str]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("user_id", "score", "source", "embedding_score", "fof_score")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SCORE_FIELD_NUMBER: _ClassVar[int]
    FOF_SCORE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    score: float
    source: Source
    embedding_score: float
    fof_score: float
    def __init__(self, user_id: _Optional[int] = ..., score: _Optional[float] = ..., source: _Optional[_Union[Source, str]] = ..., embedding_score: _Optional[float] = ..., fof_score: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("user_id", "candidates", "model_version", "known_user", "used_request_features")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_USER_FIELD_NUMBER: _ClassVar[int]
    USED_REQUEST_FEATURES_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    model_version: int
    known_user: bool
    used_request_features: bool
    def __init__(self, user_id: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., model_version: _Optional[int] = ..., known_user: _Optional[bool] = ..., used_request_features: _Optional[bool] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("responses", "model_version")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RecommendResponse]
    model_version: int
    def __init__(self, responses: _Optional[_Iterable[_Union[RecommendResponse, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...
