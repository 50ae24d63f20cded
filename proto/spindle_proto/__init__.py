"""Generated gRPC stubs for the spindle.v1 shard contract (proto/generate.proto)."""

from spindle_proto import generate_pb2, generate_pb2_grpc

__all__ = ["generate_pb2", "generate_pb2_grpc"]
