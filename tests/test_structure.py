"""The code's shape, kept: small modules and functions, a CLI that starts at once, an import that loads
nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_transmla"


def test_no_module_over_400_lines_and_no_function_over_60():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > 400:
            long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def _seconds(argv: list[str]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def test_cli_help_starts_at_once():
    """`transmla --help` against `python -c pass` in the same run (a shared machine): under 2 s, and the
    package import loads neither torch nor transformers."""
    help_s = _seconds([str(Path(sys.executable).with_name("transmla")), "--help"])
    bare_s = _seconds([sys.executable, "-c", "pass"])
    assert help_s < 2.0 and help_s < bare_s + 1.5, (help_s, bare_s)
    probe = subprocess.run([sys.executable, "-c", "import sys, vllm_transmla, vllm_transmla.cli; "
                            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"],
                           check=True, capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout


def test_import_then_transformers_registers_our_classes():
    probe = subprocess.run([sys.executable, "-c", "import vllm_transmla; from transformers import AutoConfig; "
                            "print(type(AutoConfig.for_model('llama_mla')).__name__)"],
                           check=True, capture_output=True, text=True)
    assert probe.stdout.strip() == "LlamaMLAConfig"
