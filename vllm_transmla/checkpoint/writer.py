"""Writing sharded safetensors checkpoints one tensor at a time (memory stays at one tensor)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from ..errors import TransMLAError
from .safetensors_dir import INDEX_NAME, SAFETENSORS_DTYPES


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, then an index.

    Memory stays at one tensor: each tensor's bytes go straight to a spill file as it arrives (the
    header, which must come first, is only known once the shard is full), and closing a shard writes
    the header and copies the spill after it in chunks. safetensors' `save_file` would need the whole
    shard in memory at once. The result is read back with safetensors in the tests.
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, dict] = {}  # name -> header entry of the open shard
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self._spill = None

    def _spill_path(self) -> Path:
        return self.directory / f"shard-{len(self.shards):05d}.spill"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TransMLAError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        if self._spill is None:
            self._spill = open(self._spill_path(), "wb")
        flat = tensor.detach().contiguous().reshape(-1)
        if nbytes:
            self._spill.write(memoryview(flat.view(torch.uint8).numpy()))
        self.pending[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.pending_bytes, self.pending_bytes + nbytes]}
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        self._spill.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.pending}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
        spill = self._spill_path()
        with open(self.directory / f"shard-{len(self.shards):05d}.tmp", "wb") as out, open(spill, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        spill.unlink()
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes, self._spill = {}, 0, None

    def finish(self) -> list[str]:
        """Name shards model-0000i-of-0000N.safetensors and write the index; returns shard names."""
        self.flush()
        n = len(self.shards)
        names, weight_map = [], {}
        for i, tensor_names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"shard-{i:05d}.tmp").rename(self.directory / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names

