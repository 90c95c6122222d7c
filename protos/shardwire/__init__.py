"""shardwire protobuf messages and gRPC stubs (generated; see serve/protogen.py)."""
