"""Offline tools that turn an image corpus into WebDataset shards and check them.

`python -m data_tools.shard` writes the shards, `python -m data_tools.verify` re-reads them.
The training side (`vitscale.data`) only ever reads what these tools wrote.
"""
