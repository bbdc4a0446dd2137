"""Reading the text files users pass (calibration, training and evaluation text): plain UTF-8 text, or
JSON lines with a "text" field, refused with a clear error when they are anything else (a directory, a
device, binary data, another encoding), and read lazily so that only what is used is read.
"""

from __future__ import annotations

import codecs
import json
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import TransMLAError

PIECE_CHARS = 1 << 18  # plain text is handed out in pieces of about this many characters, cut at line ends


def check_text_file(path: Path, what: str, flag: str) -> Path:
    """`path` must be an existing regular file; `what` names it in errors ("calibration file"), `flag`
    is the option that passed it."""
    path = Path(path)
    if not path.exists():
        raise TransMLAError(f"{what} {path} does not exist: pass {flag} an existing text or jsonl file")
    if not stat.S_ISREG(path.stat().st_mode):
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise TransMLAError(f"{what} {path} is {kind}: pass a text or jsonl file to {flag}")
    return path


def _lines(path: Path, what: str) -> Iterator[str]:
    """The file's lines (with their line ends), decoded strictly as UTF-8 as they are read."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, tail = 0, ""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            nul = block.find(b"\0")
            if nul >= 0:
                raise TransMLAError(f"{what} {path} holds NUL bytes at byte {offset + nul}: it is "
                                    f"binary, not text; pass a plain-text or jsonl file")
            try:
                text = tail + decoder.decode(block)
            except UnicodeDecodeError as err:
                raise TransMLAError(f"{what} {path} is not UTF-8 text (byte {offset + err.start} cannot be decoded): "
                                    f"re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            offset += len(block)
            lines = text.splitlines(keepends=True)
            tail = lines.pop() if lines and not lines[-1].endswith(("\n", "\r")) else ""
            yield from lines
            while len(tail) > PIECE_CHARS:  # one enormous line: hand it out in pieces
                cut = tail.rfind(" ", 0, PIECE_CHARS) + 1 or PIECE_CHARS
                yield tail[:cut]
                tail = tail[cut:]
    try:
        tail += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise TransMLAError(f"{what} {path} is not UTF-8 text (it ends inside a character): re-encode it as "
                            f"UTF-8") from None
    if tail:
        yield tail


def _pieces(path: Path, what: str) -> Iterator[str]:
    piece, size = [], 0
    for line in _lines(path, what):
        piece.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def _jsonl_texts(path: Path, what: str) -> Iterator[str]:
    for number, line in enumerate(_lines(path, what), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TransMLAError(f"{what} {path} line {number} is not JSON ({err.msg}): fix the line or pass the text "
                                f"as a .txt file") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TransMLAError(f"{what} {path} line {number} has no \"text\" string field: fix the line or pass the "
                                f"text as a .txt file")
        yield text


def iter_documents(files, what: str, flag: str) -> Iterator[str]:
    """Text from `files` in order: a .jsonl file gives one document per line (its "text" field); a plain
    file gives its text in pieces of about PIECE_CHARS characters (cut after a line end). Files are
    checked when reached and read only as far as the caller iterates."""
    paths = [check_text_file(Path(name), what, flag) for name in files]  # every file checked before any is read
    for path in paths:
        yield from (_jsonl_texts if path.suffix == ".jsonl" else _pieces)(path, what)


def read_text(path, what: str, flag: str) -> str:
    """A whole plain-text file, checked as `iter_documents` checks it."""
    return "".join(_pieces(check_text_file(Path(path), what, flag), what))
