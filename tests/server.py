"""`vllm serve` in a subprocess for the server tests: started with the flags a user would pass on this CPU,
waited for until it answers, stopped (the whole process group) afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from vllm_transmla.testing.processes import free_port, stop_process_group



@contextlib.contextmanager
def vllm_server(model: Path, log: Path, *extra: str, timeout: float = 400):
    """Yields an OpenAI client of a `vllm serve MODEL` on a free local port (fp32, half of RAM)."""
    import openai

    port = free_port()
    vllm_cli = Path(sys.executable).with_name("vllm")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(vllm_cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "--gpu-memory-utilization", "0.5", "--dtype", "float32", *extra],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.time() + timeout
    try:
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, f"server exited:\n{log.read_text()[-5000:]}"
                assert time.time() < deadline, f"server did not start:\n{log.read_text()[-5000:]}"
                time.sleep(2)
        yield client
    finally:
        stop_process_group(proc)
