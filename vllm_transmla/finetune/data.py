"""Training text: plain-text or JSON-lines files tokenized once and packed into equal windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import TransMLAError


def read_documents(files: list[str | Path]) -> list[str]:
    """One document per .txt file, one per line (its "text" field) of a .jsonl file."""
    docs = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise TransMLAError(f"training text {path} does not exist: pass existing .txt or .jsonl files to --data")
        if path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    docs.append(record["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise TransMLAError(f"{path} line {i + 1} is not a JSON object with a \"text\" field: "
                                        f"fix the line or pass the text as a .txt file") from None
        else:
            try:
                docs.append(path.read_text())
            except UnicodeDecodeError:
                raise TransMLAError(f"{path} is not UTF-8 text: pass plain text or JSON lines") from None
    return [d for d in docs if d.strip()]


def pack_tokens(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents' token ids [N], joined with the EOS token where the tokenizer has one."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None and len(docs) > 1:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


class PackedText(Dataset):
    """Non-overlapping windows of `seq_len` tokens; each item {"input_ids": [seq_len], "labels": [seq_len]}
    (labels are the inputs; the loss shifts them)."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        self.windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def packed_dataset(tokenizer, docs: list[str], seq_len: int) -> PackedText:
    """`docs` (from read_documents) tokenized and packed into windows of `seq_len`."""
    ids = pack_tokens(tokenizer, docs)
    dataset = PackedText(ids, seq_len)
    if len(dataset) == 0:
        raise TransMLAError(f"the training text has {ids.numel()} tokens, fewer than one window of --seq-len "
                            f"{seq_len}: pass more text or a smaller --seq-len")
    return dataset
