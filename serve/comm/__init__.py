"""Communication between shards, with no knowledge of models.

- `codecs`: quantize / compress a tensor into a payload and back (vectorised torch,
  same code on CPU and GPU).
- `frames`: a versioned, checksummed header + payload for every tensor on a gRPC
  stream, decoded with all lengths checked before anything is allocated; chunking
  of large tensors for pipelined transfer.
- `collectives`: compressed all-reduce and friends over torch.distributed.
- `linkmodel`: link probing and per-message codec choice (`--comm-codec auto`).
"""
