"""Reading a directory of (sharded) safetensors files, one tensor at a time.

The directory is only ever opened for reading. Shards are checked up front (header parses, data
length matches the header) so a truncated or corrupt download fails before anything is written, and
an index may only name plain files inside the directory (a downloaded checkpoint must not make the
tools read, and copy into a checkpoint the user may publish, arbitrary local files).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import TransMLAError

INDEX_NAME = "model.safetensors.index.json"


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


FLOAT_DTYPES = ("F32", "F16", "BF16")


def check_shard_name(directory: Path, shard, where: str) -> None:
    """A shard named by an index must be a plain file name inside `directory` (it may be a symlink, as in the
    Hugging Face cache, which links snapshot files to blobs)."""
    if not isinstance(shard, str) or not shard or shard in (".", "..") or Path(shard).name != shard or "\\" in shard:
        raise TransMLAError(f"{where} names shard {shard!r}, which is not a file name inside {directory}: the index "
                            f"may only list files of the checkpoint directory; fix or re-download the index")


class SafetensorsCheckpoint:
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
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
                raise TransMLAError(f"{index} is corrupt ({err}): download it again") from None
            for shard in weight_map.values():
                check_shard_name(self.path, shard, str(index))
            return weight_map
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

    def non_float_tensor(self) -> tuple[str, str, str] | None:
        """(name, dtype, shard) of the first tensor that is not float32/16 or bfloat16, or None."""
        for shard, header in self.headers.items():
            for name, info in header.items():
                if name != "__metadata__" and info["dtype"] not in FLOAT_DTYPES:
                    return name, info["dtype"], shard
        return None

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


TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
