"""`spindle-server serve MODEL_DIR ...`: one shard process (one tensor-parallel rank) behind gRPC.

RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment (read in distributed.py); every
rank listens on its own unix socket `PREFIX-RANK` and executes every call the router sends it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from spindle_server.dtype import DTYPES, resolve_dtype
from spindle_server.engine.cuda_graphs import (
    DEFAULT_CUDA_GRAPH_SIZES,
    DecodeGraphSettings,
    parse_cuda_graph_sizes,
)
from spindle_server.heap import single_malloc_arena

log = logging.getLogger("spindle_server")

MAX_MESSAGE_BYTES = 2**31 - 1
DTYPE_CHOICES = ["auto", *DTYPES]


@dataclass(frozen=True)
class ServeArgs:
    model_dir: Path
    uds_path: str
    dtype: str
    device: str  # "auto" | "cpu" | "cuda"
    kv_cache_bytes: int | None
    cuda_memory_fraction: float
    block_size: int
    otlp_endpoint: str | None
    otlp_service_name: str = "spindle"
    cuda_graphs: tuple[int, ...] = ()  # decode batch sizes captured as CUDA graphs; (): off (always on CPU)
    revision: str | None = None  # of a Hub id model_dir; None: its default branch

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spindle-server",
        description="Spindle model shard: serves one tensor-parallel rank of a model over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="load a model and serve the shard contract (proto/generate.proto)",
        description=(
            "Load MODEL_DIR (Hugging Face layout) and serve it on unix://PREFIX-RANK. Tensor parallelism: "
            "start one process per rank with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment."
        ),
    )
    serve.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="directory with config.json, "
                       "*.safetensors and tokenizer.json, or a Hub id (owner/name) in the Hugging Face cache")
    serve.add_argument("--revision", default=None, metavar="REV",
                       help="branch, tag or commit of a Hub id MODEL_DIR (default: its default branch); "
                            "an error with a local directory")
    serve.add_argument("--uds-path", required=True, metavar="PREFIX",
                       help="unix socket prefix; this rank listens on PREFIX-RANK")
    serve.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="weights, activations and KV cache dtype. auto (default): on CUDA the checkpoint's "
                            "half-precision dtype; on CPU bfloat16 where the CPU has avx512_bf16 or amx_bf16, "
                            "else float32")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: cuda:(RANK %% device count) when CUDA is available, else cpu")
    serve.add_argument("--kv-cache-bytes", type=int, default=None, metavar="N",
                       help="bytes of KV cache per rank. CPU: the cache (default min(25%% of RAM, 4 GiB)); CUDA: a cap "
                            "on what --cuda-memory-fraction leaves (default none)")
    serve.add_argument("--cuda-memory-fraction", type=float, default=0.9, metavar="F",
                       help="CUDA: share of the GPU this process may use in total; the KV cache gets "
                            "what is left after the model and a warmup forward (default 0.9)")
    serve.add_argument("--block-size", type=int, default=16,
                       help="tokens per KV block (default 16). CUDA: a multiple of 256 lets flash-attn serve attention "
                            "when it is installed (and the dtype is half precision); otherwise the Triton kernels do")
    serve.add_argument("--cuda-graphs", type=_cuda_graph_sizes, default=DEFAULT_CUDA_GRAPH_SIZES, metavar="SIZES",
                       help="CUDA: decode batch sizes captured as CUDA graphs at warmup, comma-separated; a "
                            "decode batch runs the smallest size that holds it, padded; 0 disables; never "
                            "on CPU (default " + ",".join(map(str, DEFAULT_CUDA_GRAPH_SIZES)) + ")")
    serve.add_argument("--otlp-endpoint", default=None, metavar="URL",
                       help="export one OpenTelemetry span per RPC to this OTLP/gRPC endpoint")
    serve.add_argument("--otlp-service-name", default="spindle", metavar="NAME",
                       help="service.name prefix of the exported spans; the shard adds '.shard' (default spindle)")
    return parser


def _cuda_graph_sizes(text: str) -> tuple[int, ...]:
    try:
        return parse_cuda_graph_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _pick_device(choice: str, rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but CUDA is not available")
    return torch.device("cuda", rank % torch.cuda.device_count())


def build_engine(args: ServeArgs, device: torch.device):
    """Join the group, load the model and tokenizer on `device`; returns (engine, dist)."""
    import tokenizers
    from spindle_kernels import ops_for

    from spindle_server.distributed import init_distributed
    from spindle_server.engine.shard import CacheSettings, ShardEngine
    from spindle_server.hub import resolve_model
    from spindle_server.models.registry import load_model, read_model_config

    model_dir = resolve_model(str(args.model_dir), args.revision)
    if model_dir != args.model_dir:
        at = f" @ {args.revision}" if args.revision else ""
        log.info("model %s%s resolved to %s", args.model_dir, at, model_dir)
    args = dataclasses.replace(args, model_dir=model_dir, revision=None)

    settings = CacheSettings(
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        cuda_memory_fraction=args.cuda_memory_fraction,
    )
    dist = init_distributed(device)
    config = read_model_config(args.model_dir)
    dtype_name, why = resolve_dtype(args.dtype, device, args.model_dir)
    log.info("dtype %s (%s)", dtype_name, why)
    dtype = DTYPES[dtype_name]
    # With the block size and dtype, ops_for picks flash-attn only where it serves every call (blocks of
    # 256k tokens, half precision): the attention_impl Info reports is what runs.
    ops = ops_for(device, block_size=args.block_size, dtype=dtype)
    log.info("attention: %s (block size %d)", ops.name, args.block_size)
    model = load_model(args.model_dir, dtype, device, dist, ops)
    tokenizer_path = args.model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{args.model_dir} has no tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    graphs = DecodeGraphSettings(sizes=args.cuda_graphs)
    engine = ShardEngine(model, config, tokenizer, dist, device, dtype, ops.name, settings, graphs)
    return engine, dist


async def serve(args: ServeArgs) -> None:
    import grpc
    from spindle_proto import generate_pb2_grpc
    from spindle_proto.sockets import remove_stale_socket

    from spindle_server.interceptor import ErrorInterceptor
    from spindle_server.service import ShardService, engine_thread

    rank = int(os.environ.get("RANK", "0") or 0)
    device = _pick_device(args.device, rank)
    executor = engine_thread(device)  # the model is built where it will run
    engine, dist = await asyncio.get_running_loop().run_in_executor(executor, build_engine, args, device)
    tracer_provider = None
    if args.otlp_endpoint:
        from spindle_server.tracing import setup_tracing

        tracer_provider = setup_tracing(args.otlp_endpoint, args.otlp_service_name, dist.rank)
    socket_path = f"{args.uds_path}-{dist.rank}"
    # A stale socket (its shard died) goes; a live one (another instance's shard) is a clear error: grpc would
    # silently take the path over and the other instance's router would reconnect to this shard.
    remove_stale_socket(socket_path)
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(dist.rank, tracing=bool(args.otlp_endpoint))],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(ShardService(engine, executor), server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    log.info("serving %s on unix://%s (world size %d)", args.model_dir, socket_path, dist.world_size)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.stop(grace=2.0)
    if tracer_provider is not None:
        tracer_provider.shutdown()  # flushes the spans still batched
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    if dist.world_size > 1:
        import torch.distributed as torch_dist

        torch_dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    single_malloc_arena()
    ns = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    _setup_logging(rank)
    args = ServeArgs(
        model_dir=ns.model_dir,
        uds_path=ns.uds_path,
        dtype=ns.dtype,
        device=ns.device,
        kv_cache_bytes=ns.kv_cache_bytes,
        cuda_memory_fraction=ns.cuda_memory_fraction,
        block_size=ns.block_size,
        otlp_endpoint=ns.otlp_endpoint,
        otlp_service_name=ns.otlp_service_name,
        cuda_graphs=ns.cuda_graphs,
        revision=ns.revision,
    )
    from spindle_proto.sockets import SocketInUse

    try:
        asyncio.run(serve(args))
    except (SocketInUse, FileExistsError) as e:
        log.error("%s", e)
        return 1
    except Exception:
        log.exception("shard failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
