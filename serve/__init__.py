"""shardwire server: gateway, replica shards, engine and model code."""

__version__ = "0.1.0"
