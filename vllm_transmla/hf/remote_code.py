"""Two small files written beside every converted checkpoint, named by config.json's `auto_map`, so tools that
load checkpoints with transformers but never import vllm_transmla (`lm_eval --model hf`, plain scripts) can
pass `trust_remote_code=True`: the files only import the installed package's classes.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_MODULE, MODEL_MODULE = "configuration_transmla", "modeling_transmla"
FILES = (f"{CONFIG_MODULE}.py", f"{MODEL_MODULE}.py")
_HEADER = ('"""Loads this checkpoint with the installed vllm-transmla package (`pip install vllm-transmla`); '
           'written by `transmla convert`\nfor transformers\' trust_remote_code=True."""\n')


def auto_map(config_class: str, model_class: str) -> dict[str, str]:
    return {"AutoConfig": f"{CONFIG_MODULE}.{config_class}", "AutoModelForCausalLM": f"{MODEL_MODULE}.{model_class}"}


def write_remote_code(directory: Path, config_class: str, model_class: str) -> None:
    (Path(directory) / FILES[0]).write_text(
        f"{_HEADER}from vllm_transmla.hf.configuration import {config_class}  # noqa: F401\n")
    (Path(directory) / FILES[1]).write_text(
        f"{_HEADER}from vllm_transmla.hf.modeling import {model_class}  # noqa: F401\n")
