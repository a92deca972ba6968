"""Training and evaluation input pipelines over WebDataset shards written by data_tools.shard.

`build_train_loader` (infinite, resampled, exactly resumable) and `build_eval_loader` (finite,
every sample once) are the contract the engine uses; see docs/data.md.
"""
from vitscale.data.checks import ShardList, ShardListError, check_train_shards, check_val_shards
from vitscale.data.config import DataConfig, parse_data_config
from vitscale.data.evaluation import EvalLoader, build_eval_loader
from vitscale.data.stream import BadShardsError, TrainLoader, build_train_loader

__all__ = ["BadShardsError", "DataConfig", "EvalLoader", "ShardList", "ShardListError", "TrainLoader",
           "build_eval_loader", "build_train_loader", "check_train_shards", "check_val_shards", "parse_data_config"]
