"""shardwire.v1 API: inference_pb2 (public) and shard_pb2 (internal)."""
