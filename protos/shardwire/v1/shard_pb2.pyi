from shardwire.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardGenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "stop_token_ids", "handoff_target", "kv_codec", "prefix_source")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_TARGET_FIELD_NUMBER: _ClassVar[int]
    KV_CODEC_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SOURCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    handoff_target: str
    kv_codec: str
    prefix_source: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., handoff_target: _Optional[str] = ..., kv_codec: _Optional[str] = ..., prefix_source: _Optional[str] = ...) -> None: ...

class ShardGenerateChunk(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "prompt_tokens", "cached_prompt_tokens", "queue_s", "migrated", "num_output_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _inference_pb2.FinishReason
    prompt_tokens: int
    cached_prompt_tokens: int
    queue_s: float
    migrated: bool
    num_output_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_inference_pb2.FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., migrated: _Optional[bool] = ..., num_output_tokens: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model", "tp_size", "kv_blocks_free", "kv_blocks_total", "num_running", "num_waiting", "max_model_len", "vocab_size", "eos_token_ids", "block_size", "prefix_cache_hit_tokens", "prefix_cache_query_tokens", "dtype", "num_preemptions", "role", "draining", "kv_geometry")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KV_GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    model: str
    tp_size: int
    kv_blocks_free: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    block_size: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    dtype: str
    num_preemptions: int
    role: str
    draining: bool
    kv_geometry: KvGeometry
    def __init__(self, model: _Optional[str] = ..., tp_size: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., block_size: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., prefix_cache_query_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., num_preemptions: _Optional[int] = ..., role: _Optional[str] = ..., draining: _Optional[bool] = ..., kv_geometry: _Optional[_Union[KvGeometry, _Mapping]] = ...) -> None: ...

class KvGeometry(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class RequestState(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "sampling", "stop_token_ids", "seed", "num_cached_prompt_tokens", "queue_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    num_cached_prompt_tokens: int
    queue_s: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., num_cached_prompt_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ...) -> None: ...

class KvHeader(_message.Message):
    __slots__ = ("request_id", "geometry", "codec", "end_token", "state", "commit", "prefix", "sequential")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    END_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    geometry: KvGeometry
    codec: str
    end_token: int
    state: RequestState
    commit: bool
    prefix: bool
    sequential: bool
    def __init__(self, request_id: _Optional[str] = ..., geometry: _Optional[_Union[KvGeometry, _Mapping]] = ..., codec: _Optional[str] = ..., end_token: _Optional[int] = ..., state: _Optional[_Union[RequestState, _Mapping]] = ..., commit: _Optional[bool] = ..., prefix: _Optional[bool] = ..., sequential: _Optional[bool] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("header", "layer", "start_token", "num_tokens", "key_frame", "value_frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEY_FRAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FRAME_FIELD_NUMBER: _ClassVar[int]
    header: KvHeader
    layer: int
    start_token: int
    num_tokens: int
    key_frame: bytes
    value_frame: bytes
    def __init__(self, header: _Optional[_Union[KvHeader, _Mapping]] = ..., layer: _Optional[int] = ..., start_token: _Optional[int] = ..., num_tokens: _Optional[int] = ..., key_frame: _Optional[bytes] = ..., value_frame: _Optional[bytes] = ...) -> None: ...

class ImportKvResponse(_message.Message):
    __slots__ = ("num_tokens", "wire_bytes", "receive_s", "decode_s", "cached_tokens", "cpu_s")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    wire_bytes: int
    receive_s: float
    decode_s: float
    cached_tokens: int
    cpu_s: float
    def __init__(self, num_tokens: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., receive_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., cached_tokens: _Optional[int] = ..., cpu_s: _Optional[float] = ...) -> None: ...

class ExportKvRequest(_message.Message):
    __slots__ = ("request_id", "prefix_token_ids", "codec", "start_token", "sequential", "probe_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    PROBE_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    start_token: int
    sequential: bool
    probe_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., start_token: _Optional[int] = ..., sequential: _Optional[bool] = ..., probe_bytes: _Optional[int] = ...) -> None: ...

class MoveKvRequest(_message.Message):
    __slots__ = ("request_id", "target", "codec", "start_token", "final", "at_output_token", "prefix_token_ids", "sequential")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    AT_OUTPUT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    target: str
    codec: str
    start_token: int
    final: bool
    at_output_token: int
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sequential: bool
    def __init__(self, request_id: _Optional[str] = ..., target: _Optional[str] = ..., codec: _Optional[str] = ..., start_token: _Optional[int] = ..., final: _Optional[bool] = ..., at_output_token: _Optional[int] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ..., sequential: _Optional[bool] = ...) -> None: ...

class MoveKvResponse(_message.Message):
    __slots__ = ("num_tokens", "wire_bytes", "raw_bytes", "total_s", "encode_s", "receive_s", "decode_s", "num_output_tokens", "moved", "source_cpu_s", "target_cpu_s")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CPU_S_FIELD_NUMBER: _ClassVar[int]
    TARGET_CPU_S_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    wire_bytes: int
    raw_bytes: int
    total_s: float
    encode_s: float
    receive_s: float
    decode_s: float
    num_output_tokens: int
    moved: bool
    source_cpu_s: float
    target_cpu_s: float
    def __init__(self, num_tokens: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., raw_bytes: _Optional[int] = ..., total_s: _Optional[float] = ..., encode_s: _Optional[float] = ..., receive_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., num_output_tokens: _Optional[int] = ..., moved: _Optional[bool] = ..., source_cpu_s: _Optional[float] = ..., target_cpu_s: _Optional[float] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("replica", "uncordon", "kv_codec")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    UNCORDON_FIELD_NUMBER: _ClassVar[int]
    KV_CODEC_FIELD_NUMBER: _ClassVar[int]
    replica: str
    uncordon: bool
    kv_codec: str
    def __init__(self, replica: _Optional[str] = ..., uncordon: _Optional[bool] = ..., kv_codec: _Optional[str] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("num_migrated", "num_failed")
    NUM_MIGRATED_FIELD_NUMBER: _ClassVar[int]
    NUM_FAILED_FIELD_NUMBER: _ClassVar[int]
    num_migrated: int
    num_failed: int
    def __init__(self, num_migrated: _Optional[int] = ..., num_failed: _Optional[int] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "target", "kv_codec", "at_output_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KV_CODEC_FIELD_NUMBER: _ClassVar[int]
    AT_OUTPUT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    target: str
    kv_codec: str
    at_output_token: int
    def __init__(self, request_id: _Optional[str] = ..., target: _Optional[str] = ..., kv_codec: _Optional[str] = ..., at_output_token: _Optional[int] = ...) -> None: ...

class MigrateResponse(_message.Message):
    __slots__ = ("source", "target", "num_output_tokens", "wire_bytes", "pause_s")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    num_output_tokens: int
    wire_bytes: int
    pause_s: float
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., num_output_tokens: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., pause_s: _Optional[float] = ...) -> None: ...
