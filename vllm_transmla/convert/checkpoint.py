"""Reading and writing sharded safetensors checkpoints, one tensor at a time.

The source is only ever opened for reading. Shards are checked up front (header parses, data
length matches the header) so a truncated or corrupt download fails before anything is written.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from ..errors import TransMLAError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file holds all the data it lists."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise TransMLAError(f"shard {path.name} is truncated ({size} bytes): re-download or re-save it")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise TransMLAError(
                f"shard {path.name} is corrupt or truncated (header of {header_len} bytes in a "
                f"{size}-byte file): re-download or re-save it"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TransMLAError(f"shard {path.name} is corrupt (unreadable header: {err}): re-download it") from None
    if not isinstance(header, dict):
        raise TransMLAError(f"shard {path.name} is corrupt (header is not a table): re-download it")
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end != size:
        raise TransMLAError(
            f"shard {path.name} is truncated or corrupt: its header lists {data_end} bytes of tensors "
            f"but the file holds {size - 8 - header_len}; re-download or re-save it"
        )
    return header


class SourceCheckpoint:
    """Name -> tensor access over a directory of safetensors shards (read-only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.weight_map = self._weight_map()  # tensor name -> shard file name
        self.headers = {}
        for shard in sorted(set(self.weight_map.values())):
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise TransMLAError(
                    f"missing shard {shard} (listed in {INDEX_NAME}) in {self.path}: download the complete checkpoint"
                )
            self.headers[shard] = read_safetensors_header(shard_path)
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard]:
                raise TransMLAError(
                    f"{INDEX_NAME} says tensor {name} is in {shard} but it is not there: the index and "
                    f"the shards are from different downloads; download the checkpoint again"
                )

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise TransMLAError(f"{index} is corrupt ({err}): download it again") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = (f" (found {', '.join(found[:3])}: re-save it with save_pretrained(..., safe_serialization=True))"
                    if found else "")
            raise TransMLAError(f"no safetensors weights in {self.path}{hint}")
        weight_map = {}
        for f in files:
            for name in read_safetensors_header(f):
                if name != "__metadata__":
                    weight_map[name] = f.name
        return weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][name]["shape"])

    def release(self) -> None:
        """Nothing is kept open or mapped between reads (see `get`); kept as the per-layer hook."""

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file reads at the offsets of the (already validated) header.
        safetensors' own reader maps the whole shard, and every page it touches stays in this process's
        resident memory while the shard is open; reading keeps resident memory at the tensors held."""
        shard = self.weight_map[name]
        info = self.headers[shard][name]
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise TransMLAError(f"tensor {name} in {shard} has dtype {info['dtype']}, which vllm-transmla does not "
                                f"read: convert the checkpoint to bfloat16, float16 or float32 first")
        path = self.path / shard
        start, end = info["data_offsets"]
        data_start = path.stat().st_size - max(v["data_offsets"][1] for k, v in self.headers[shard].items()
                                               if k != "__metadata__")
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        buffer = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(data_start + start)
            read = f.readinto(buffer)
        if read != end - start:
            raise TransMLAError(f"cannot read tensor {name} from {shard} (got {read} of {end - start} bytes): "
                                f"re-download the shard")
        try:
            return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])
        except RuntimeError as err:
            raise TransMLAError(f"tensor {name} in {shard} does not match its header ({err}): "
                                f"re-download the shard") from None


# torch dtype -> safetensors dtype name
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}


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

TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
