"""Tensor-parallel linear layers. Each owns how its weight is cut and loads only its rank's slice.

    Column-parallel (output features split):      Row-parallel (input features split):
        W [out, in]                                   W [out, in]
        rank r holds rows   r*out/N : (r+1)*out/N     rank r holds columns r*in/N : (r+1)*in/N
        y_r = x @ W_r.T      (no communication)       y = all_reduce(sum_r x_r @ W_r.T) + b

A merged column layer stacks several column-parallel matrices (q|k|v, gate|up) so one matmul serves them;
each part is split across ranks on its own, so rank r holds [q_r | k_r | v_r] -- whether the checkpoint
stores the parts apart (Llama's q_proj, k_proj, v_proj) or stacked (Phi-3's qkv_proj: `load_fused`).

Every layer is a `ParallelLinear`: one place creates the rank's parameters, loads checkpoint slices with
shape checks, and packs weights for oneDNN; the subclasses only say which slice goes where. Whether a
model's sizes divide by the world size is checked once, from its config, before any weight is read
(`ModelConfig.check_world_size`); the layers' own checks only guard their direct use.

On CPU, `pack_linear_weights` reorders every weight once into oneDNN's blocked layout (what inductor's
`freezing` does): measured on 2 Zen 4 cores over the SmolLM2-135M shapes, float32 matmuls run 2.1x
faster at 32 rows (170 vs 81 GFLOP/s) and 2.3x at one row; bfloat16 1.4x at 32 rows.

Matmuls of up to four rows (a decode step at small batch, a lone prompt's logits) stream every weight once and
do little else: the C++ `linear_rows` kernel streams the plain [out, in] weight faster than oneDNN's small-row
kernels stream the packed one (Sapphire Rapids, SmolLM2-135M's weights at one row: float32 19.8 vs 28.1 ms,
bfloat16 9.3 vs 14.7 ms; at four rows 22.3 vs 26.5 and 11.0 vs 14.0 ms). On hosts with AMX, bf16 matmuls of up
to 32 rows (a decode step's batch) run in the C++ `linear_tiles` over the same plain weight: its rows load as AMX
tiles in place, each byte streamed once for all the rows, where oneDNN's AMX kernels stream their packed copy
slower at these row counts (Sapphire Rapids, SmolLM2-135M's shapes with its LM head at 32 rows: 14.0 vs 16.5 ms;
at 8 rows 11.8 vs 13.4). Both need the plain weight kept beside the packed copy, so `pack_linear_weights` keeps
it only where the copy is a small share of the host's memory and a kernel measures faster over the model's own
weights, and says which it chose.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from spindle_kernels import cpu as cpu_kernels

from spindle_server.distributed import Distributed
from spindle_server.weights import Weights, shard_range

log = logging.getLogger(__name__)

# The plain weights are kept for `linear_rows` / `linear_tiles` only while that copy takes at most this share of the
# host's memory (SPINDLE_CPU_ROW_KERNEL=on keeps them regardless, =off never).
ROW_COPY_MEMORY_SHARE = 1 / 8
# ... and where a kernel measures at most this fraction of oneDNN's time: noise must not decide.
ROW_KERNEL_MARGIN = 0.95
# The timing reads at most this many bytes of weights per pass (enough to stream from DRAM, as decode does).
ROW_TIMING_BYTES = 512 << 20


@dataclass
class PlainKernels:
    """Which matmuls read the plain weights kept beside the packed ones (`pack_linear_weights` decides, per
    process: a shard holds one model)."""

    rows: bool = True  # 1 .. LINEAR_ROWS rows through `linear_rows`
    tiles: bool = False  # 1 .. TILE_ROWS bf16 rows through `linear_tiles` (AMX), where `linear_rows` does not serve


PLAIN_KERNELS = PlainKernels()


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing serves float32 and bfloat16 weights on CPU, when torch is built with it."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] in oneDNN's layout for `packed_linear` (a copy; any row count may use it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # 32: the rows it is tuned for


# Fewer rows than MIN_ROWS run at MIN_ROWS; up to EXACT_ROWS exactly; above it padded (see `padded_rows`).
MIN_ROWS = 4
EXACT_ROWS = 16
BUCKETS_PER_OCTAVE = 8


def padded_rows(num_rows: int) -> int:
    """The row count a packed matmul of `num_rows` rows runs at: MIN_ROWS below it, exact up to EXACT_ROWS,
    then rounded up to one of BUCKETS_PER_OCTAVE steps per power of two (at most 12.5% padding, 4.4% on
    average):

        4 (for 1 .. 4) 5 6 .. 16 | 18 20 .. 32 | 36 40 .. 64 | 72 80 .. 128 | ... | 7168 8192 ...

    Why four: oneDNN serves one row with a kernel that streams the weights slower than its 4-row one does (2
    Zen 4 cores, SmolLM2-135M's shapes with the weights coming from DRAM, as in a decode step: a step's
    matmuls 14.8 ms at one row vs 13.1 at four in bfloat16, 26.7 vs 23.6 in float32; a batch-1 decode step
    20.9 -> 20.2 ms and 31.7 -> 29.5 ms).

    Why buckets: oneDNN builds (JIT-compiles) one primitive per (rows, weight shape), and torch keeps each one in two
    caches (ideep's LRU and oneDNN's primitive cache, 1024 entries each, ~0.5 MiB an entry). With exact row
    counts every new batch or chunk length added one, so a shard's memory grew for tens of thousands of
    requests (+435 MiB of anonymous memory over the first 16k of a soak on the 2-layer test model, still
    rising) and each miss cost a JIT compile (milliseconds); bucketed, a model's few weight shapes times ~8 row
    counts per octave are built at Warmup (`warm_packed_linears`) and never miss again.
    """
    if num_rows <= EXACT_ROWS:
        return max(num_rows, MIN_ROWS)
    step = (1 << (num_rows.bit_length() - 1)) // BUCKETS_PER_OCTAVE  # the octave's width / 8
    return -(-num_rows // step) * step


# oneDNN's bf16 kernels (AMX) vary with the row count by up to 2x and not monotonically: on a Sapphire Rapids
# host SmolLM2-135M's down projection ran at 1.4-1.5 TFLOP/s from 512 to 1280 rows and 2.9 at 1536, its o
# projection at 1.6 at 512 rows and 3.1 at 896, so 1024 rows padded to 1536 finish sooner than 1024 do. Warmup
# times every bucket (`warm_packed_linears`) and each bucket runs at the larger one, up to TUNE_MAX_PADDING x
# its rows, that took at most TUNE_MARGIN of its own time; buckets below TUNE_MIN_ROWS (microseconds, noise)
# run as themselves. (out, in, dtype, with bias) -> {bucket: rows it runs at}, for the buckets that move.
RUN_AT: dict[tuple[int, int, torch.dtype, bool], dict[int, int]] = {}
TUNE_MIN_ROWS = 64
TUNE_MAX_PADDING = 2.0
TUNE_MARGIN = 0.9

# Inputs that run padded are copied into the top of one of these (per width, dtype and device) instead of padded
# by F.pad, which allocates, zero-fills and copies (four ops, ~1 ms of a 20 ms batch-1 decode step; a mixed
# step's ~90 pads ~2 ms of 60). Rows past the input keep whatever an earlier input left there: each output row
# depends only on its own input row, and those rows are cut off. Inputs padded past PAD_BUFFER_BYTES (long
# prefills, where a pad is noise) take F.pad.
PAD_BUFFER_BYTES = 8 << 20
_PAD_BUFFERS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, in] as the first n of `rows` rows."""
    width = x.shape[1]
    if rows * width * x.element_size() > PAD_BUFFER_BYTES:
        return F.pad(x, (0, 0, 0, rows - x.shape[0]))
    key = (width, x.dtype, x.device)
    buffer = _PAD_BUFFERS.get(key)
    if buffer is None or buffer.shape[0] < rows:  # grown by doubling, up to the byte cap (rows fit under it)
        held = 0 if buffer is None else buffer.shape[0]
        size = min(max(rows, 2 * held), PAD_BUFFER_BYTES // (width * x.element_size()))
        with torch.inference_mode(False):  # a normal tensor: writable inside inference mode and out of it
            buffer = _PAD_BUFFERS[key] = x.new_zeros(size, width)
    buffer[: x.shape[0]] = x
    return buffer[:rows]


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, plain: torch.Tensor | None = None
) -> torch.Tensor:
    """x [rows, in] @ packed.T (+ bias) -> [rows, out], computed at `padded_rows(rows)` rows; with `plain`, the
    same weight unpacked, matmuls of few rows run in the C++ kernels `PLAIN_KERNELS` names instead."""
    rows = x.shape[0]
    if plain is not None:
        if rows <= cpu_kernels.LINEAR_ROWS and PLAIN_KERNELS.rows:
            return cpu_kernels.linear_rows(x, plain, bias)
        if rows <= cpu_kernels.TILE_ROWS and PLAIN_KERNELS.tiles and cpu_kernels.tiles_take(plain):
            return cpu_kernels.linear_tiles(x, plain, bias)
    padded = padded_rows(rows)
    if RUN_AT and padded >= TUNE_MIN_ROWS:
        padded = RUN_AT.get((packed.shape[0], packed.shape[1], x.dtype, bias is not None), {}).get(padded, padded)
    if padded != rows:
        x = _padded(x, padded)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")[:rows]


class ParallelLinear(torch.nn.Module):
    """The base of every tensor-parallel linear layer: it creates this rank's parameters, loads checkpoint
    slices into them with shape checks, and computes y = x @ W.T (+ b), from a oneDNN-packed copy once
    `pack` has run (CPU). Subclasses say which slice of which tensor goes where (`load`) and what follows
    the matmul (`forward`).

    weight [out_rows, in_cols] (this rank's share); bias [bias_size] or None.
    """

    packed: torch.Tensor | None = None
    plain_rows: torch.Tensor | None = None  # the plain weight, kept beside `packed` for the row kernel
    bias_in_matmul = True  # whether `forward` hands its bias to the matmul (oneDNN keys primitives by it)

    def __init__(
        self,
        dist: Distributed,
        out_rows: int,
        in_cols: int,
        bias_size: int | None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.weight = torch.nn.Parameter(
            torch.empty(out_rows, in_cols, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            torch.nn.Parameter(torch.empty(bias_size, dtype=dtype, device=device), requires_grad=False)
            if bias_size is not None
            else None
        )

    def _load_slice(
        self,
        weights: Weights,
        name: str,
        full_shape: tuple[int, ...],
        dim: int,
        start: int,
        stop: int,
        into: torch.Tensor,
    ) -> None:
        """Check that checkpoint tensor `name` has `full_shape`, then copy its [start:stop] along `dim` into
        `into` (a view of one of this layer's parameters), checking that the shapes agree."""
        _check_shape(weights, name, full_shape)
        _copy_checked(into, weights.get_rows(name, dim, start, stop), name)

    def pack(self, keep_plain: bool = False) -> None:
        """Swap `weight` for its oneDNN-packed copy (CPU float32/bfloat16 only), freeing the plain one unless
        `keep_plain` (then matmuls of up to `LINEAR_ROWS` rows read it through the C++ row kernel, until
        `drop_plain`)."""
        if self.packed is None and can_pack(self.weight):
            self.packed = pack_weight(self.weight)
            if keep_plain:
                self.plain_rows = self.weight.detach()
            else:
                self.weight.data = self.weight.data.new_empty(0)  # the packed copy is the weight from now on

    def row_copy_bytes(self) -> int:
        """What keeping the plain weight beside the packed copy costs."""
        return self.weight.numel() * self.weight.element_size()

    def drop_plain(self) -> None:
        """Every matmul from the packed copy; the plain weight freed."""
        if self.plain_rows is not None:
            self.plain_rows = None
            self.weight.data = self.weight.data.new_empty(0)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, bias, self.plain_rows)
        return F.linear(x, self.weight, bias)


def pack_linear_weights(model: torch.nn.Module, row_kernel: str | None = None) -> int:
    """Pack every packable weight of `model` (after loading); returns how many were packed.

    row_kernel (default: $SPINDLE_CPU_ROW_KERNEL, else "auto"): whether matmuls of few rows read a plain copy of
    each weight through the C++ kernels (`linear_rows` up to 4 rows; with AMX, bf16 `linear_tiles` up to 32).
    "auto": where that copy takes at most ROW_COPY_MEMORY_SHARE of the host's memory, each kernel where it
    measures faster on the model's own weights (logged); "on": wherever the kernels take the dtype; "off": never.
    Sets PLAIN_KERNELS.
    """
    mode = row_kernel or os.environ.get("SPINDLE_CPU_ROW_KERNEL", "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"SPINDLE_CPU_ROW_KERNEL must be auto, on or off, got {mode!r}")
    modules = [m for m in model.modules() if callable(getattr(m, "pack", None))]
    keep = mode != "off" and _may_keep_plain(modules, mode)
    count = 0
    for module in modules:
        if hasattr(module, "drop_plain"):
            module.pack(keep_plain=keep)
        else:
            module.pack()
        count += getattr(module, "packed", None) is not None
    kept = [m for m in modules if getattr(m, "plain_rows", None) is not None]
    tiles = bool(kept) and cpu_kernels.has_linear_tiles(kept[0].plain_rows.dtype)
    PLAIN_KERNELS.rows, PLAIN_KERNELS.tiles = bool(kept), tiles
    if kept and mode == "auto":
        PLAIN_KERNELS.rows, PLAIN_KERNELS.tiles = _plain_kernels_pay(kept, tiles)
        if not (PLAIN_KERNELS.rows or PLAIN_KERNELS.tiles):
            for module in kept:
                module.drop_plain()
    return count


def _may_keep_plain(modules: list[torch.nn.Module], mode: str) -> bool:
    """Whether the row kernel takes these weights, and (under "auto") their plain copies fit the memory share."""
    rowable = [m for m in modules if hasattr(m, "drop_plain")]
    weights = [p for m in rowable for p in m.parameters() if can_pack(p)]
    if not weights or not cpu_kernels.has_linear_rows(weights[0].dtype):
        return False
    if mode == "on":
        return True
    copy = sum(m.row_copy_bytes() for m in rowable)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if copy > ROW_COPY_MEMORY_SHARE * memory:
        log.info("few-row matmuls stay on oneDNN: a plain copy of the weights (%d MiB) would take more than "
                 "%.0f%% of this host's memory", copy >> 20, 100 * ROW_COPY_MEMORY_SHARE)
        return False
    return True


def _plain_kernels_pay(kept: list[torch.nn.Module], tiles: bool) -> tuple[bool, bool]:
    """Times one-row matmuls over the model's weights (up to ROW_TIMING_BYTES per pass) in the row kernel and in
    oneDNN, and, where `tiles`, TILE_ROWS-row ones in the tile kernel and in oneDNN, alternating, best of three;
    logs the choice. Returns whether each kernel pays (rows, tiles)."""
    cases: list[tuple[torch.Tensor, torch.Tensor]] = []  # (plain, packed)
    streamed = 0
    for module in kept:
        cases.append((module.plain_rows, module.packed))
        streamed += module.plain_rows.numel() * module.plain_rows.element_size()
        if streamed >= ROW_TIMING_BYTES:
            break

    def one_pass(kernel: Callable[..., torch.Tensor] | None, inputs: list[torch.Tensor]) -> None:  # None: oneDNN
        for x, (plain, packed) in zip(inputs, cases):
            if kernel is None or (kernel is cpu_kernels.linear_tiles and not cpu_kernels.tiles_take(plain)):
                packed_linear(x, packed)
            else:
                kernel(x, plain)

    def timed(kernel: Callable[..., torch.Tensor], rows: int) -> tuple[float, float]:
        inputs = [plain.new_zeros(rows, plain.shape[1]) for plain, _ in cases]
        one_pass(kernel, inputs), one_pass(None, inputs)  # warm: oneDNN builds its primitives, the pages are touched
        pairs = [(_seconds(one_pass, kernel, inputs), _seconds(one_pass, None, inputs)) for _ in range(3)]
        return min(k for k, _ in pairs), min(o for _, o in pairs)

    with torch.inference_mode():
        rows_s, rows_onednn_s = timed(cpu_kernels.linear_rows, 1)
        tiles_s, tiles_onednn_s = timed(cpu_kernels.linear_tiles, cpu_kernels.TILE_ROWS) if tiles else (0.0, 0.0)
    rows_pay = rows_s < ROW_KERNEL_MARGIN * rows_onednn_s
    tiles_pay = tiles and tiles_s < ROW_KERNEL_MARGIN * tiles_onednn_s
    copy = sum(m.row_copy_bytes() for m in kept)
    chosen = [name for name, pays in (("the C++ row kernel", rows_pay), ("the AMX tile kernel", tiles_pay)) if pays]
    timings = f"1 row: the C++ row kernel {1e3 * rows_s:.1f} ms, oneDNN {1e3 * rows_onednn_s:.1f} ms"
    if tiles:
        timings += (f"; {cpu_kernels.TILE_ROWS} rows: the AMX tile kernel {1e3 * tiles_s:.1f} ms, "
                    f"oneDNN {1e3 * tiles_onednn_s:.1f} ms")
    log.info("few-row matmuls over %d MiB of weights, %s: %s", streamed >> 20, timings,
             f"{' and '.join(chosen)}, keeping the plain weights ({copy >> 20} MiB more)" if chosen else "oneDNN")
    return rows_pay, tiles_pay


def warm_packed_linears(model: torch.nn.Module, max_rows: int, tune: bool = True) -> int:
    """Run every packed matmul shape of `model` once at every row bucket up to `max_rows` (the most rows one
    forward may carry), so oneDNN has built the primitives serving uses before serving starts: memory is flat
    from warm-up on and no request pays a JIT compile. Layers with equal shapes share primitives, so this costs
    about 24 x max_rows rows through one layer's matmuls (24/num_layers of a max_rows forward's); a module may
    cap its own rows with a `max_warm_rows` attribute (the LM head does). With `tune`, each bfloat16 bucket of
    at least TUNE_MIN_ROWS rows is then timed (best of two) and set to run at a larger bucket that was faster
    (RUN_AT); float32 buckets, whose rate was flat over the row counts, are not timed.
    Returns how many primitives it ran.

    What a shard holds then is bounded: (row buckets up to max_rows) x (distinct packed shapes) primitives,
    ~0.5 MiB each plus scratch that grows with the rows (~170 MiB for the 2-layer test model's 400 at 4096
    rows); a row count above a module's cap builds its bucket's primitive on first use, once.
    """
    matmuls: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, int]] = {}  # oneDNN's key less the rows -> cap
    for module in model.modules():
        packed = getattr(module, "packed", None)
        bias = module.bias if isinstance(module, ParallelLinear) and module.bias_in_matmul else None
        cap = min(max_rows, getattr(module, "max_warm_rows", max_rows))
        for weight in [w for pair in packed for w in pair] if isinstance(packed, list) else [packed]:  # MoE: pairs
            if isinstance(weight, torch.Tensor):
                key = (tuple(weight.shape), weight.dtype, None if bias is None else tuple(bias.shape))
                prior_cap = matmuls[key][2] if key in matmuls else 0  # a shape shared: the larger cap
                matmuls[key] = (weight, bias, max(cap, prior_cap))
    count, moved = 0, {}
    with torch.inference_mode():
        for weight, bias, cap in matmuls.values():
            key = (weight.shape[0], weight.shape[1], weight.dtype, bias is not None)
            RUN_AT.pop(key, None)  # time every bucket as itself
            timed = tune and weight.dtype != torch.float32  # float32 (MKL-like kernels) measured flat: not timed
            seconds = {}
            for rows in sorted({padded_rows(n) for n in range(1, cap + 1)}):
                x = torch.zeros(rows, weight.shape[1], dtype=weight.dtype)
                packed_linear(x, weight, bias)  # builds the primitive
                count += 1
                if timed and rows >= TUNE_MIN_ROWS:
                    seconds[rows] = min(_seconds(packed_linear, x, weight, bias) for _ in range(2))
            if runs := faster_buckets(seconds):
                RUN_AT[key] = moved[key] = runs
    if moved:
        log.info("oneDNN: row buckets that run padded to a larger one that timed faster (weight [out, in]: rows -> "
                 "rows run): %s", "; ".join(f"{n}x{k}: " + ", ".join(f"{a}->{b}" for a, b in runs.items())
                                           for (n, k, _, _), runs in moved.items()))
    return count


def faster_buckets(seconds: dict[int, float]) -> dict[int, int]:
    """{bucket: the larger bucket it should run at} from each bucket's time: the fastest bucket of at most
    TUNE_MAX_PADDING x its rows, where that takes at most TUNE_MARGIN of its own time."""
    runs = {}
    for rows, own in seconds.items():
        candidates = [r for r in seconds if rows < r <= TUNE_MAX_PADDING * rows]
        best = min(candidates, key=seconds.__getitem__, default=None)
        if best is not None and seconds[best] <= TUNE_MARGIN * own:
            runs[rows] = best
    return runs


def _seconds(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _check_divisible(what: str, size: int, world_size: int) -> int:
    if size % world_size:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel world size {world_size}")
    return size // world_size


def _copy_checked(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"weight {name!r}: expected shape {tuple(param.shape)}, checkpoint gives {tuple(value.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)


class MergedColumnParallelLinear(ParallelLinear):
    """Several column-parallel linears sharing one input, computed as one matmul.

    Output on rank r: [part_0 slice r | part_1 slice r | ...], widths `output_sizes_per_rank`.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        self.in_features = in_features
        self.output_sizes = tuple(output_sizes)
        self.output_sizes_per_rank = tuple(
            _check_divisible(f"output part {i} size", size, dist.world_size)
            for i, size in enumerate(output_sizes)
        )
        out_per_rank = sum(self.output_sizes_per_rank)
        super().__init__(dist, out_per_rank, in_features, out_per_rank if bias else None, dtype, device)

    def load(self, weights: Weights, names: Sequence[str]) -> None:
        """names: one checkpoint prefix per part, e.g. ["...q_proj", "...k_proj", "...v_proj"]."""
        if len(names) != len(self.output_sizes):
            raise ValueError(f"expected {len(self.output_sizes)} weight names, got {list(names)}")
        for part, name in enumerate(names):
            self._load_part(weights, name, part, (self.output_sizes[part],), 0)

    def load_fused(self, weights: Weights, name: str) -> None:
        """name: one checkpoint prefix whose tensor stacks every part, e.g. Phi-3's "...qkv_proj" [q; k; v].

        Each part is cut for this rank on its own, as if it were stored apart.
        """
        for part in range(len(self.output_sizes)):
            self._load_part(weights, name, part, (sum(self.output_sizes),), sum(self.output_sizes[:part]))

    def _load_part(self, weights: Weights, name: str, part: int, rows_in_tensor: tuple[int], first_row: int) -> None:
        """This rank's rows of part `part`, which starts at `first_row` of checkpoint tensor `name`."""
        start, stop = shard_range(self.output_sizes[part], self.dist.rank, self.dist.world_size)
        offset = sum(self.output_sizes_per_rank[:part])
        rows = slice(offset, offset + self.output_sizes_per_rank[part])
        start, stop = first_row + start, first_row + stop
        w_shape = (*rows_in_tensor, self.in_features)
        self._load_slice(weights, f"{name}.weight", w_shape, 0, start, stop, self.weight[rows])
        if self.bias is not None:
            self._load_slice(weights, f"{name}.bias", rows_in_tensor, 0, start, stop, self.bias[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


class ColumnParallelLinear(MergedColumnParallelLinear):
    """One column-parallel linear: output features split across ranks, no communication."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(in_features, [out_features], dist, bias=bias, dtype=dtype, device=device)

    def load(self, weights: Weights, name: str) -> None:  # type: ignore[override]
        super().load(weights, [name])


class QKVParallelLinear(MergedColumnParallelLinear):
    """q|k|v projections; rank r gets heads r*H/N:(r+1)*H/N of q and the matching KV heads."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        # Split whole heads: checked on head counts so the error names heads, not feature sizes.
        _check_divisible("num_heads", num_heads, dist.world_size)
        _check_divisible("num_kv_heads", num_kv_heads, dist.world_size)
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, dist, bias=bias, dtype=dtype, device=device)


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks; partial products are summed with an all-reduce.

    The bias is replicated and added once, after the reduction.
    """

    bias_in_matmul = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.in_features_per_rank = _check_divisible("in_features", in_features, dist.world_size)
        super().__init__(
            dist, out_features, self.in_features_per_rank, out_features if bias else None, dtype, device
        )

    def load(self, weights: Weights, name: str) -> None:
        start, stop = shard_range(self.in_features, self.dist.rank, self.dist.world_size)
        w_shape = (self.out_features, self.in_features)
        self._load_slice(weights, f"{name}.weight", w_shape, 1, start, stop, self.weight)
        if self.bias is not None:  # replicated: every rank reads it whole
            self._load_slice(weights, f"{name}.bias", (self.out_features,), 0, 0, self.out_features, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in_features / N] (this rank's slice) -> [T, out_features], identical on every rank."""
        y = self.dist.all_reduce(self._linear(x, None))
        if self.bias is not None:
            y = y + self.bias
        return y


def _check_shape(weights: Weights, name: str, expected: tuple[int, ...]) -> None:
    shape = weights.shape(name)
    if shape != expected:
        raise ValueError(f"weight {name!r} has shape {shape}, the model config expects {expected}")
