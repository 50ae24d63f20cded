"""Scheduling bookkeeping: pure Python, no I/O, no torch, no grpc (except loop.py, which drives the shards)."""
