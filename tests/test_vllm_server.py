"""`vllm serve DST` with no model-specific flags (vLLM's defaults: chunked prefill, prefix caching; fp32 so
that greedy tokens can be compared exactly): OpenAI completions and chat equal offline greedy output; a
prompt longer than max_model_len is an HTTP 400 and the server keeps serving; a 500-request soak.

fp32 because with prefix caching a request's prompt is attended partly from cached context, merged by
log-sum-exp, which rounds differently from one causal pass: in bf16 that moves logits by an ulp and flips
greedy near-ties (seen here: top-2 logprobs 0.0078 apart, i.e. one bf16 step), in fp32 by ~1e-6."""

from __future__ import annotations

import time
import urllib.request

import pytest

from reference import run_vllm
from server import vllm_server

pytestmark = pytest.mark.slow
PROMPTS = ["In the beginning God created", "And the evening and the morning were"]
MAX_TOKENS = 24


CHAT = [{"role": "user", "content": "Let there be light"}]


@pytest.fixture(scope="module")
def offline(exact_converted):
    """Offline greedy answers, computed before the server takes its share of memory."""
    from transformers import AutoTokenizer

    model = exact_converted["llama-rope3"]
    tok = AutoTokenizer.from_pretrained(model)
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS] + [list(chat_ids)]
    result = run_vllm({"model": str(model), "dtype": "float32", "prompts": prompt_ids, "max_tokens": MAX_TOKENS,
                       "enforce_eager": False})
    return tok, [o["token_ids"] for o in result["outputs"]]


@pytest.fixture(scope="module")
def server(exact_converted, offline, soak_prompts, tmp_path_factory):
    model = exact_converted["llama-rope3"]
    with vllm_server(model, tmp_path_factory.mktemp("server") / "server.log") as client:
        yield client, model


def test_completions_and_chat_equal_offline(server, offline):
    client, model = server
    tok, expected = offline
    for prompt, want in zip(PROMPTS, expected):
        # token ids: the text of a random tiny model ends mid-UTF-8 character, which detokenizers treat apart
        answer = client.completions.create(model=str(model), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
        assert list(answer.choices[0].token_ids) == want
    chat = client.chat.completions.create(model=str(model), messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True, "skip_special_tokens": False,
                                                      "return_token_ids": True})
    assert list(chat.choices[0].token_ids) == expected[-1]


def test_too_long_prompt_is_400_and_server_keeps_serving(server):
    import openai

    client, model = server
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=str(model), prompt=[5] * 300, max_tokens=4)
    assert err.value.status_code == 400
    answer = client.completions.create(model=str(model), prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")


SOAK_REQUESTS, SOAK_CONCURRENCY, SOAK_TOKENS, SOAK_WARMUP = 500, 32, 16, 200
LEAK_BYTES_PER_REQUEST = 2**20


@pytest.fixture(scope="module")
def soak_prompts(exact_converted):
    """40 token-id prompts of 1 to 230 tokens and their offline greedy answers (same engine settings as the
    server: fp32, CUDA-graph-free CPU default)."""
    from transformers import AutoTokenizer

    from vllm_transmla.testing.tiny import sample_text

    model = exact_converted["llama-rope3"]
    ids = AutoTokenizer.from_pretrained(model)(sample_text(), add_special_tokens=False).input_ids
    prompts = [ids[i * 37:i * 37 + 1 + (i * 53) % 230] for i in range(40)]
    result = run_vllm({"model": str(model), "dtype": "float32", "prompts": prompts, "max_tokens": SOAK_TOKENS,
                       "enforce_eager": False})
    return prompts, [o["token_ids"] for o in result["outputs"]]


def _server_rss(port: int) -> int:
    """Resident bytes of the process listening on `port` and all its children (API server + engine core)."""
    import psutil

    owner = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                 and c.status == psutil.CONN_LISTEN)
    proc = psutil.Process(owner)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_soak_500_requests_at_concurrency_32(server, soak_prompts):
    """Mixed lengths, streaming and not, some cancelled mid-stream, some invalid: every valid request
    succeeds with the offline greedy tokens, every invalid one gets a 4xx, and the server does not leak
    per request: its memory grows by under LEAK_BYTES_PER_REQUEST per request after the first 200.

    Stock vLLM's own server grows too (allocator caches, decelerating): serving the original model of this
    pair, the worker grew 126 MB over requests 200-1500 (ours 171 MB), and a CI run saw ours grow 141 MB
    over requests 100-500. So the bound is per request, well above that drift and far below a leak of
    anything request-sized (a 1 MB bound is 300 MB over the 300 measured requests)."""
    import asyncio

    import openai

    client, model = server
    port = int(str(client.base_url).split(":")[-1].split("/")[0])
    prompts, expected = soak_prompts
    invalid = [dict(prompt=[5] * 300, max_tokens=4), dict(prompt=[5, 6], max_tokens=4, temperature=-1.0),
               dict(prompt=[5, 6], max_tokens=-3), dict(prompt=[5, 6], max_tokens=4, top_p=1.5)]
    aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0, timeout=300)
    stats = {"ok": 0, "rejected": 0, "cancelled": 0, "wrong": [], "failed": []}
    rss = {}

    async def one(i: int, gate: asyncio.Semaphore):
        kind = ("invalid" if i % 10 == 3 else "cancel" if i % 10 == 7 else "stream" if i % 2 else "plain")
        p = i % len(prompts)
        args = dict(model=str(model), prompt=prompts[p], max_tokens=SOAK_TOKENS, temperature=0.0,
                    extra_body={"ignore_eos": True, "return_token_ids": True})
        async with gate:
            try:
                if kind == "invalid":
                    bad = invalid[(i // 10) % len(invalid)]
                    try:
                        await aclient.completions.create(model=str(model), **bad)
                        stats["failed"].append((i, "invalid request accepted"))
                    except openai.APIStatusError as err:
                        if 400 <= err.status_code < 500:
                            stats["rejected"] += 1
                        else:
                            stats["failed"].append((i, err.status_code))
                    return
                if kind == "plain":
                    answer = await aclient.completions.create(**args)
                    tokens = list(answer.choices[0].token_ids)
                else:
                    stream = await aclient.completions.create(**args, stream=True)
                    tokens, chunks = [], 0
                    async for chunk in stream:
                        tokens += list(getattr(chunk.choices[0], "token_ids", None) or [])
                        chunks += 1
                        if kind == "cancel" and chunks == 2:
                            await stream.close()  # the client goes away mid-stream
                            stats["cancelled"] += 1
                            return
                if tokens != expected[p]:
                    stats["wrong"].append(i)
                stats["ok"] += 1
            except Exception as err:  # noqa: BLE001  (any failure of a valid request is counted)
                stats["failed"].append((i, repr(err)[:200]))

    async def run():
        gate = asyncio.Semaphore(SOAK_CONCURRENCY)
        await asyncio.gather(*(one(i, gate) for i in range(100)))
        rss["warm"] = _server_rss(port)
        await asyncio.gather(*(one(i, gate) for i in range(100, SOAK_REQUESTS)))
        rss["end"] = _server_rss(port)

    start = time.time()
    asyncio.run(run())
    elapsed = time.time() - start
    assert not stats["failed"], stats["failed"][:5]
    assert not stats["wrong"], f"{len(stats['wrong'])} answers differ from offline greedy: {stats['wrong'][:10]}"
    assert stats["rejected"] == SOAK_REQUESTS // 10 and stats["cancelled"] == SOAK_REQUESTS // 10
    assert stats["ok"] == SOAK_REQUESTS - stats["rejected"] - stats["cancelled"]
    assert rss["end"] - rss["warm"] < LEAK_BYTES_PER_REQUEST * (SOAK_REQUESTS - SOAK_WARMUP), rss
    # repeated prompts were served from vLLM's prefix cache (our context attention), not recomputed
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    hits = sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))
    assert hits > 0, "no prefix-cache hits"
    print(f"soak: {SOAK_REQUESTS} requests in {elapsed:.1f} s, rss {rss}, prefix-cache hits {hits:.0f} tokens")
    answer = client.completions.create(model=str(model), prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")  # still serving
