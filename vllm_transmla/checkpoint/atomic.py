"""Writing a conversion atomically: a temporary directory beside DST, renamed at the very end."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path

from ..errors import TransMLAError

TMP_MARK = ".transmla-tmp-"
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
    "chat_template.json",
    "configuration_transmla.py", "modeling_transmla.py",  # a converted checkpoint's trust_remote_code route
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(dst: Path) -> list[Path]:
    """Remove temporary directories left beside DST by a conversion that was killed (SIGKILL, power
    loss); returns what was removed so the caller can say so."""
    removed = []
    for tmp in dst.parent.glob(f".{dst.name}{TMP_MARK}*"):
        pid = tmp.name.rsplit("-", 2)[-2] if tmp.name.count("-") >= 2 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def check_destination(src: Path, dst: Path, overwrite: bool) -> Path:
    """Check that `dst` can be written; returns the directory to write. A `dst` that is a link to a
    directory is replaced where it points (with --overwrite), so the link keeps pointing at the result."""
    if dst.is_symlink():
        if not dst.exists():
            raise TransMLAError(f"destination {dst} is a broken link: remove it or choose another path")
        if overwrite and dst.is_dir():
            real = dst.resolve()
            print(f"transmla: {dst} is a link to {real}: replacing {real}", file=sys.stderr)
            dst = real
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise TransMLAError(f"destination {dst} is inside the source {src}: choose a directory outside the source")
    if dst.exists() and not overwrite:
        raise TransMLAError(f"destination {dst} already exists: choose a new path or pass --overwrite")
    if dst.exists() and not dst.is_dir():
        raise TransMLAError(f"destination {dst} exists and is not a directory: remove it or choose another path")
    parent = dst.parent
    if not parent.is_dir():
        raise TransMLAError(f"the parent directory {parent} of the destination does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TransMLAError(f"cannot write to {parent}: choose a writable destination or fix its permissions")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: Path, overwrite: bool):
    """Yield a fresh temporary directory beside `dst`; on success it becomes `dst` (replacing an old
    one only after the new one is complete); on any error or interrupt it is removed."""
    for stale in clean_stale_temporaries(dst):
        print(f"transmla: removed {stale}, left by an interrupted conversion", file=sys.stderr)
    tmp = dst.parent / f".{dst.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            if not overwrite:
                raise TransMLAError(f"destination {dst} appeared during the conversion: "
                                     f"choose a new path or pass --overwrite")
            backup = dst.parent / f".{dst.name}{TMP_MARK}{os.getpid()}-old"
            dst.rename(backup)
            tmp.rename(dst)
            shutil.rmtree(backup)
        else:
            tmp.rename(dst)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
            raise TransMLAError(f"no space left on the device of {dst.parent} while writing: free space "
                                f"or choose another destination (nothing was written)") from None
        raise


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer and generation files, copied unchanged."""
    copied = []
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
