"""Data: the feature store, the embedded benchmark, partitioning, client shards."""
