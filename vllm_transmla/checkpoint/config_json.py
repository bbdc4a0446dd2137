"""Reading a checkpoint directory's config.json as a dict, with errors that say what the directory is."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TransMLAError


def read_raw_config(path: Path, what: str = "source", expected: str = "a Hugging Face checkpoint directory",
                    fix: str = "fix or re-download it") -> dict:
    """config.json of the checkpoint directory `path` as a dict; errors name `what` the directory is, what
    was `expected` there and how to `fix` a broken file."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.exists():
        raise TransMLAError(f"{what} {path} does not exist: pass a checkpoint directory (config.json + *.safetensors)")
    if not path.is_dir():
        raise TransMLAError(f"{what} {path} is not a directory: "
                            f"pass a checkpoint directory (config.json + *.safetensors)")
    if not cfg_path.is_file():
        raise TransMLAError(f"no config.json in {what} {path}: pass {expected}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransMLAError(f"{cfg_path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(raw, dict):
        raise TransMLAError(f"{cfg_path} is not a JSON object: {fix}")
    return raw
