"""Spindle model shard: one tensor-parallel slice of a model behind the gRPC contract (proto/generate.proto).

`cli.py` starts the process, `service.py` translates gRPC to the engine (`engine/`), which owns the
batches, the paged KV cache (`kv_cache.py`) and one forward + sample step (`engine/runner.py`).
"""
