"""`vllm serve DST` with no model-specific flags: OpenAI completions and chat equal offline greedy
output; a prompt longer than max_model_len is an HTTP 400 and the server keeps serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reference import run_vllm

pytestmark = pytest.mark.slow
PROMPTS = ["In the beginning God created", "And the evening and the morning were"]
MAX_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHAT = [{"role": "user", "content": "Let there be light"}]


@pytest.fixture(scope="module")
def offline(exact_converted):
    """Offline greedy answers, computed before the server takes its share of memory."""
    from transformers import AutoTokenizer

    model = exact_converted["llama-rope3"]
    tok = AutoTokenizer.from_pretrained(model)
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS] + [list(chat_ids)]
    result = run_vllm({"model": str(model), "dtype": "auto", "prompts": prompt_ids, "max_tokens": MAX_TOKENS,
                       "enforce_eager": False})
    return tok, [tok.decode(o["token_ids"]) for o in result["outputs"]]


@pytest.fixture(scope="module")
def server(exact_converted, offline, tmp_path_factory):
    model = exact_converted["llama-rope3"]
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    vllm_cli = Path(sys.executable).with_name("vllm")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(vllm_cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "--gpu-memory-utilization", "0.5"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.time() + 400
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            assert proc.poll() is None, f"server exited:\n{log.read_text()[-5000:]}"
            assert time.time() < deadline, f"server did not start:\n{log.read_text()[-5000:]}"
            time.sleep(2)
    yield client, model
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_completions_and_chat_equal_offline(server, offline):
    client, model = server
    tok, expected = offline
    for prompt, want in zip(PROMPTS, expected):
        answer = client.completions.create(model=str(model), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == want
    chat = client.chat.completions.create(model=str(model), messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert chat.choices[0].message.content == expected[-1]


def test_too_long_prompt_is_400_and_server_keeps_serving(server):
    import openai

    client, model = server
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=str(model), prompt=[5] * 300, max_tokens=4)
    assert err.value.status_code == 400
    answer = client.completions.create(model=str(model), prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")
