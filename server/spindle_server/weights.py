"""Reading a Hugging Face safetensors checkpoint, one rank's slice at a time.

A layer asks for a tensor, or for its rank's slice along one dimension; only that slice is read from disk
(`safe_open(...).get_slice`), so a rank never materialises a tensor it would cut. Single-file
(`model.safetensors`) and sharded (`model.safetensors.index.json` + shards) layouts are both read.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

log = logging.getLogger("spindle_server.weights")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class MissingWeightError(KeyError):
    """The checkpoint has no tensor of the requested name."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous share of `size` rows; `size` must divide evenly."""
    if size % world_size:
        raise ValueError(f"dimension of size {size} cannot be split evenly over {world_size} ranks")
    per_rank = size // world_size
    return rank * per_rank, (rank + 1) * per_rank


class Weights:
    """The tensors of one checkpoint directory, converted to `dtype` on `device` as they are read."""

    def __init__(
        self, model_dir: str | Path, dtype: torch.dtype, device: torch.device, progress_every: int = 50
    ) -> None:
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = device
        self._file_of = self._index(self.model_dir)
        self._handles: dict[str, Any] = {}
        self._progress_every = progress_every
        self._num_read = 0
        self._bytes_read = 0
        self._started = time.monotonic()
        num_files = len(set(self._file_of.values()))
        log.info("checkpoint %s: %d tensors in %d file(s)", self.model_dir, len(self._file_of), num_files)

    @staticmethod
    def _index(model_dir: Path) -> dict[str, str]:
        """tensor name -> file name."""
        index_path = model_dir / INDEX_FILE
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no weight_map")
            missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index_path} names shard files that do not exist: {missing}")
            return dict(weight_map)
        single = model_dir / SINGLE_FILE
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        raise FileNotFoundError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str) -> Any:
        file_name = self._file_of.get(name)
        if file_name is None:
            raise MissingWeightError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        handle = self._handles.get(file_name)
        if handle is None:
            log.info("opening %s", file_name)
            handle = safe_open(str(self.model_dir / file_name), framework="pt", device="cpu")
            self._handles[file_name] = handle
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (for replicated weights: norms, biases of row-parallel layers)."""
        return self._finish(name, self._handle(name).get_tensor(name))

    def get_rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """tensor[start:stop] along `dim` (0 or 1), reading only that slice."""
        sl = self._handle(name).get_slice(name)
        shape = sl.get_shape()
        if not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"slice [{start}:{stop}] of {name!r} dim {dim} is out of its shape {shape}")
        if dim == 0:
            part = sl[start:stop]
        elif dim == 1:
            part = sl[:, start:stop]
        else:
            raise ValueError(f"can only slice dim 0 or 1, got {dim}")
        return self._finish(name, part)

    def get_shard(self, name: str, dim: int, rank: int, world_size: int) -> torch.Tensor:
        """`rank`'s even share of `name` along `dim`."""
        start, stop = shard_range(self.shape(name)[dim], rank, world_size)
        return self.get_rows(name, dim, start, stop)

    def _finish(self, name: str, t: torch.Tensor) -> torch.Tensor:
        self._num_read += 1
        self._bytes_read += t.numel() * t.element_size()
        if self._num_read % self._progress_every == 0:
            self.log_progress()
        return t.to(device=self.device, dtype=self.dtype)

    @property
    def bytes_read(self) -> int:
        """Bytes read from the checkpoint so far (only this rank's slices)."""
        return self._bytes_read

    def log_progress(self) -> None:
        log.info(
            "read %d/%d tensors (%.1f MiB for this rank) in %.1fs",
            self._num_read,
            len(self._file_of),
            self._bytes_read / 2**20,
            time.monotonic() - self._started,
        )

    def close(self) -> None:
        self.log_progress()
        self._handles.clear()
