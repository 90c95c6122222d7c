"""shardwire client SDK and command line (no torch import)."""
