"""Data: shard schema, annotators, paired transforms and the streaming datamodule."""
