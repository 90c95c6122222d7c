"""The public gRPC frontend: validation, prompts, routing and detokenizing (no torch)."""
