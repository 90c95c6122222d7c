"""shardwire load tests: the locust suite, its gRPC user and the report."""
