"""rdlm.serve: the server (`python -m rdlm.serve`, started here on a loopback port with the tiny checkpoint)
through OpenAI's own client and lm-eval's `local-completions` / `local-chat-completions`; greedy answers equal
`rdlm.generate` token for token, for requests arriving together and staggered; the fault cases (full queue,
timeout, a client gone, bad fields, SIGTERM) each answered as OpenAI clients expect, none hanging the server."""

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import openai  # noqa: E402
pytest.importorskip("fastapi", reason="rdlm.serve is the `serve` extra (requirements.txt installs it)")

import jax  # noqa: E402

import rdlm  # noqa: E402
from conftest import REPO  # noqa: E402
from rdlm.inference import load_checkpoint  # noqa: E402
from rdlm.serve.engine import Draining, Engine, Event, Options, Plan, Request  # noqa: E402
from rdlm.serve.text import TextStream  # noqa: E402
from rdlm.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
SLOTS, QUEUE, MAX_STEPS = 4, 2, 16
FLAGS = ["--slots", str(SLOTS), "--max-queue", str(QUEUE), "--num-steps", "4", "--max-steps", str(MAX_STEPS),
         "--chunk", "16", "--init-scale", "0", "--served-model-name", "tiny"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkpoint, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m rdlm.serve` from another folder, with the checkpoint's path relative to it; (process, base url)
    once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rdlm.serve", "--checkpoint",
                             os.path.relpath(checkpoint, checkpoint.parent.parent), "--port", str(port), *flags],
                            cwd=checkpoint.parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server did not become healthy in 240 s")


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.stdout.read()


@pytest.fixture(scope="module")
def served(chat_checkpoint):
    proc, base = start(chat_checkpoint, *FLAGS)
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    config, params = load_checkpoint(chat_checkpoint)
    return config.model, params, load_tokenizer(chat_checkpoint, model_vocab_size=config.model.vocab_size)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0, timeout=120)


def post(base: str, path: str, body: dict, timeout: float = 120) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST, errors included."""
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(rdlm_\S+) (\S+)$", text, re.M)}


def expected(model, prompt_ids, n, **kw) -> list[int]:
    """rdlm.generate's greedy answer for one prompt alone, cut after a stop id as the server ends there."""
    cfg, params, tok = model
    out = rdlm.generate(params, [np.asarray(prompt_ids)], cfg, max_new_tokens=n, stop_ids=tok.stop_ids, **kw)
    return out.tokens[0, :out.lengths[0]].tolist()


# ---- the OpenAI client ------------------------------------------------------------------------------


def test_completions_plain_and_streamed_equal_generate(client, model):
    cfg, params, tok = model
    ids = tok.encode("Once upon a time").tolist()
    want = expected(model, ids, 12, num_steps=4, init_scale=0.0)
    plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert choice.token_ids == want and choice.recurrence_steps == [4] * len(want)
    assert choice.finish_reason == ("stop" if want[-1] in tok.stop_ids else "length")
    assert plain.usage.prompt_tokens == len(ids) and plain.usage.completion_tokens == len(want)
    parts = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == choice.text
    assert [t for p in parts for t in p.choices[0].token_ids] == want
    assert parts[-1].choices[0].finish_reason == choice.finish_reason
    assert choice.text == tok.decode([t for t in want if t not in tok.stop_ids])


def test_chat_plain_and_streamed_equal_generate(client, model):
    cfg, params, tok = model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    ids = tok.encode_chat(messages).tolist()
    want = expected(model, ids, 10, num_steps=6, init_scale=1.0, rng=jax.random.key(5))
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, seed=5,
                                           extra_body={"num_steps": 6, "init_scale": 1.0})
    assert plain.choices[0].token_ids == want and plain.choices[0].message.role == "assistant"
    parts = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                seed=5, stream=True, stream_options={"include_usage": True},
                                                extra_body={"num_steps": 6, "init_scale": 1.0}))
    assert parts[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == plain.choices[0].message.content
    assert parts[-1].usage.completion_tokens == len(want) and not parts[-1].choices


def test_together_and_staggered_requests_equal_generate_alone(served, model):
    """Mixed lengths (two over a prefill chunk), depths, exit criteria, noise and seeds: each answer is the
    one rdlm.generate gives for that prompt alone (prompts at full depth), whether the requests arrive
    together or one by one."""
    cfg, params, tok = model
    rng = np.random.default_rng(0)
    cases = [(rng.integers(5, 200, n).tolist(), dict(num_steps=s, exit_criterion=c, init_scale=i, seed=seed))
             for n, s, c, i, seed in [(5, 4, "none", 0.0, 0), (23, 8, "kl", 1.0, 3), (12, 16, "latent-diff", 1.0, 1),
                                      (3, 2, "none", 1.0, 7), (40, 6, "entropy-diff", 0.0, 0), (9, 3, "cosine", 1.0, 2)]]
    wants = [expected(model, ids, 10, num_steps=kw["num_steps"], init_scale=kw["init_scale"],
                      exit_criterion=None if kw["exit_criterion"] == "none" else kw["exit_criterion"],
                      exit_in_prefill=False, rng=jax.random.key(kw["seed"])) for ids, kw in cases]

    def ask(case, delay=0.0):
        time.sleep(delay)
        ids, kw = case
        status, body, _ = post(served, "/v1/completions", dict(prompt=ids, max_tokens=10, temperature=0, **kw))
        assert status == 200, body
        return body["choices"][0]["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:  # 6 requests: 4 slots + 2 queued
        together = list(pool.map(ask, cases))
        staggered = list(pool.map(ask, cases, [0.05 * i for i in range(len(cases))]))
    assert together == wants and staggered == wants


def test_sampling_is_seeded_like_generate(client, model):
    cfg, params, tok = model
    ids = tok.encode("The sea").tolist()
    want = rdlm.generate(params, [np.asarray(ids)], cfg, max_new_tokens=8, num_steps=4, init_scale=0.0,
                         temperature=0.9, top_k=50, top_p=0.95, rng=jax.random.key(11), stop_ids=tok.stop_ids)
    out = client.completions.create(model="tiny", prompt="The sea", max_tokens=8, temperature=0.9, top_p=0.95,
                                    seed=11, extra_body={"top_k": 50})
    assert out.choices[0].token_ids == want.tokens[0, :want.lengths[0]].tolist()


def test_echo_logprobs_score_the_prompt_as_forward(served, model):
    cfg, params, tok = model
    from test_harness import forward_logprobs
    ids = np.random.default_rng(2).integers(5, 200, 37).tolist()  # three prefill chunks
    status, body, _ = post(served, "/v1/completions", dict(prompt=ids, max_tokens=1, temperature=0, echo=True,
                                                           logprobs=2))
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
    direct = forward_logprobs(params, cfg, ids, num_steps=4, init_scale=0.0)[0]
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], direct, rtol=1e-4, atol=1e-5)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])


def test_models_health_metrics_and_no_compile_per_request(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(served + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    m = metrics(served)
    assert m["rdlm_slots"] == SLOTS and m["rdlm_generated_tokens_total"] > 0
    assert m["rdlm_step_compiles_since_warmup"] == 0  # every request above reused the warm-up program
    for name in ("rdlm_queue_depth", "rdlm_tokens_per_second", "rdlm_mean_recurrence_steps",
                 "rdlm_cache_use_ratio", "rdlm_request_latency_seconds_count", "rdlm_recurrence_steps_total"):
        assert name in m


# ---- lm-eval -----------------------------------------------------------------------------------------


def test_lm_eval_local_completions_and_chat(served, model, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_harness import GEN, TASKS, forward_logprobs
    cfg, params, tok = model
    for name in ("rdlm_mc", "rdlm_gen"):
        rows, spec = TASKS[name]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / name}.jsonl\n"
            f"  cache_dir: {tmp_path / 'hf_cache'}\ntest_split: test\n" + spec)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model="local-completions", model_args={
        "base_url": served + "/v1/completions", "model": "tiny", "tokenizer_backend": "remote",
        "max_length": 64}, tasks=["rdlm_mc", "rdlm_gen"], task_manager=tasks, log_samples=True)
    first = next(s for s in out["samples"]["rdlm_mc"] if s["doc_id"] == 0)
    context, continuation = first["arguments"][0]  # lm-eval tokenizes each through /tokenize, without bos
    ctx, cont = (tok.encode(t, bos=False).tolist() for t in (context, continuation))
    direct = forward_logprobs(params, cfg, ctx + cont, num_steps=4, init_scale=0.0)[0][-len(cont):].sum()
    np.testing.assert_allclose(first["resps"][0][0][0], direct, rtol=1e-4)
    assert 0 <= out["results"]["rdlm_mc"]["acc,none"] <= 1
    gen = next(s for s in out["samples"]["rdlm_gen"] if s["doc_id"] == 0)
    want = expected(model, tok.encode(GEN[0]["question"]).tolist(), 8, num_steps=4, init_scale=0.0)
    text = tok.decode([t for t in want if t not in tok.stop_ids])
    assert gen["resps"][0][0] == re.split(r"\n|\.", text)[0]

    chat = lm_eval.simple_evaluate(model="local-chat-completions", model_args={
        "base_url": served + "/v1/chat/completions", "model": "tiny", "tokenizer_backend": "none"},
        tasks=["rdlm_gen"], task_manager=tasks, apply_chat_template=True, log_samples=True)
    sample = next(s for s in chat["samples"]["rdlm_gen"] if s["doc_id"] == 1)
    ids = tok.encode_chat([{"role": "user", "content": GEN[1]["question"]}]).tolist()
    want = expected(model, ids, 8, num_steps=4, init_scale=0.0)
    assert sample["resps"][0][0] == re.split(r"\n|\.", tok.decode([t for t in want if t not in tok.stop_ids]))[0]
    assert 0 <= chat["results"]["rdlm_gen"]["exact_match,none"] <= 1


# ---- faults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param, needle", [
    (dict(prompt="a", temperature=-1), "temperature", "greater than or equal to 0"),
    (dict(prompt="a", num_steps=MAX_STEPS + 1), "num_steps", f"valid range is [1, {MAX_STEPS}]"),
    (dict(prompt="a", exit_criterion="entropy"), "exit_criterion", "valid: entropy-diff"),
    (dict(prompt="a", exit_criterion="kl", exit_threshold=-1), "exit_threshold", "greater than 0"),
    (dict(prompt="a", exit_threshold=0.1), "exit_criterion", "without an exit_criterion"),
    (dict(prompt="a", cache_strategy="latest-m4"), "cache_strategy", "laid out for 'full'"),
    (dict(prompt="a", max_tokens=100), "max_tokens", "exceeds the context of 64"),
    (dict(prompt=[1, 2, 99999]), "prompt", "outside [0, vocab_size=256)"),
    (dict(prompt=[]), "prompt", "the prompt list is empty"),
    (dict(prompt="a", n=2), "n", "less than or equal to 1"),
    (dict(prompt="a", num_step=3), "num_step", "unknown field 'num_step'"),
    (dict(prompt="a", logprobs=9), "logprobs", "less than or equal to 5"),
    (dict(prompt="a", stop=[""]), "stop", "a stop string is empty"),
    (dict(prompt="a", model="gpt-4"), "model", "not served here"),
    (dict(prompt="a", timeout=10**6), "timeout", "server's --request-timeout"),
    (dict(max_tokens=3), "prompt", "Field required"),
])
def test_bad_requests_are_named_in_openais_error_format(served, body, param, needle):
    status, answer, _ = post(served, "/v1/completions", body)
    assert status == (404 if param == "model" else 400), answer
    assert answer["error"]["param"] == param and needle in answer["error"]["message"], answer
    assert answer["error"]["type"] in ("invalid_request_error",)


def test_bad_json_and_chat_fields(served):
    req = urllib.request.Request(served + "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    status, answer, _ = post(served, "/v1/chat/completions", dict(messages=[{"role": "robot", "content": "x"}]))
    assert status == 400 and answer["error"]["param"] == "messages[0].role"
    status, answer, _ = post(served, "/v1/chat/completions", dict(messages=[]))
    assert status == 400 and answer["error"]["param"] == "messages"


def test_full_queue_answers_429_and_loses_nothing(served):
    """More concurrent requests than slots + queue: the excess is refused with a retry hint; all others finish."""
    body = dict(prompt=[1, 2, 3], max_tokens=50, temperature=0, num_steps=MAX_STEPS)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post(served, "/v1/completions", body), range(16)))
    refused = [a for a in answers if a[0] == 429]
    assert refused and all(a[0] in (200, 429) for a in answers)
    assert all(a[1]["choices"][0]["finish_reason"] == "length" for a in answers if a[0] == 200)
    assert refused[0][2]["retry-after"] == "1" and refused[0][1]["error"]["type"] == "rate_limit_error"
    assert metrics(served)["rdlm_queue_depth"] == 0


def test_timeout_answers_504(served):
    status, answer, _ = post(served, "/v1/completions", dict(prompt=[1, 2], max_tokens=50, timeout=1e-4))
    assert status == 504 and answer["error"]["code"] == "timeout"


def test_client_gone_frees_its_slot(served):
    """Requests whose clients disconnect while they wait (a plain and a streamed one) are cancelled."""
    before = metrics(served).get('rdlm_requests_total{outcome="cancelled"}', 0)
    host, port = served.removeprefix("http://").split(":")
    long = json.dumps(dict(prompt=[1, 2, 3], max_tokens=55, num_steps=MAX_STEPS, stream=True))
    connections, streams = [], []
    for _ in range(SLOTS):  # every slot busy
        connections.append(http.client.HTTPConnection(host, int(port), timeout=60))
        connections[-1].request("POST", "/v1/completions", long, {"Content-Type": "application/json"})
        streams.append(connections[-1].getresponse())
    assert all(s.readline().startswith(b"data: ") for s in streams)
    victims = []
    for stream in (False, True):  # a plain and a streamed request, both long, both waiting for a slot
        victims.append(socket.create_connection((host, int(port))))
        body = json.dumps(dict(prompt=[4, 5], max_tokens=55, num_steps=MAX_STEPS, stream=stream)).encode()
        victims[-1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while metrics(served)["rdlm_queue_depth"] < 2:
        assert time.monotonic() < deadline
    for v in victims:
        v.close()
    for s in streams:
        assert s.read().rstrip().endswith(b"data: [DONE]")
    deadline = time.monotonic() + 30
    # one of the two may have reached a slot and finished first (the occupiers can end early at a stop id)
    def settled(m):
        return (m.get('rdlm_requests_total{outcome="cancelled"}', 0) >= before + 1 and m["rdlm_slots_busy"] == 0
                and m["rdlm_queue_depth"] == 0)
    while not settled(m := metrics(served)):
        assert time.monotonic() < deadline, f"the gone clients' requests were not cancelled: {m}"
        time.sleep(0.2)


def test_sigterm_finishes_requests_in_flight_then_exits(chat_checkpoint):
    proc, base = start(chat_checkpoint, *FLAGS)
    try:
        body = dict(prompt=[1, 2, 3], max_tokens=40, temperature=0, num_steps=MAX_STEPS)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, base, "/v1/completions", body) for _ in range(3)]
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [a[0] for a in answers] == [200] * 3
        assert all(len(a[1]["choices"][0]["token_ids"]) == 40 for a in answers)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        with pytest.raises(OSError):
            urllib.request.urlopen(base + "/health", timeout=5)
    finally:
        log = stop(proc)
    assert "Application shutdown complete" in log and "Traceback" not in log, log


def test_bad_flags_exit_with_one_line(chat_checkpoint, tmp_path):
    for flags, needle in [(["--checkpoint", str(tmp_path / "missing")], "does not exist"),
                          (["--checkpoint", str(chat_checkpoint), "--slots", "0"], "--slots=0 is out of range"),
                          (["--checkpoint", str(chat_checkpoint), "--cache-strategy", "compress-s3"],
                           "multiple of the core depth 4")]:
        run = subprocess.run([sys.executable, "-m", "rdlm.serve", *flags], capture_output=True, text=True,
                             cwd=REPO)
        assert run.returncode == 1 and needle in run.stderr and "Traceback" not in run.stderr, run.stderr


# ---- the engine and the text stream, in process -----------------------------------------------------------


def test_engine_deadline_and_cancel_free_slots(model):
    cfg, params, tok = model
    engine = Engine(params, cfg, tok, Plan(slots=1, context=64, chunk=16, max_steps=4, strategy="full"), max_queue=4)
    engine.warm_up()
    engine.start()
    ends = {}

    def ender(name):
        def emit(e: Event):
            if e.finish:
                ends[name] = e.finish
        return emit
    running = Request([1, 2, 3], Options(max_tokens=60, num_steps=4), ender("running"))
    expired = Request([1, 2], Options(max_tokens=5), ender("expired"), deadline=time.monotonic() - 1)
    engine.submit(running)
    engine.submit(expired)
    engine.cancel(running)
    deadline = time.monotonic() + 30
    while len(ends) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop()
    assert ends == {"running": "cancelled", "expired": "timeout"} and engine.busy == 0
    with pytest.raises(Draining, match="shutting down"):
        engine.submit(Request([1], Options(), ender("late")))


def test_decode_buckets_and_their_prefill_rows():
    """Programs compute 1, 4, 16, ... slots up to all (0): a lone request prefills and decodes one row."""
    plan = Plan(slots=16, context=64, chunk=16, max_steps=4, strategy="full", prefills=4)
    assert plan.buckets == (1, 4, 0)
    assert [p.prefill_rows for p in plan.programs()] == [1, 4, 4] * 2 and len({*plan.programs()}) == 6
    assert [Plan(slots=n, context=64, chunk=16, max_steps=4, strategy="full").buckets for n in (1, 2, 4, 5)] == [
        (0,), (1, 0), (1, 0), (1, 4, 0)]


def test_a_failed_engine_refuses_requests_instead_of_queueing_them(model):
    cfg, params, tok = model
    engine = Engine(params, cfg, tok, Plan(slots=1, context=64, chunk=16, max_steps=4, strategy="full"))
    engine.error = "RuntimeError: boom"
    with pytest.raises(Draining, match=r"the engine failed \(RuntimeError: boom\)"):
        engine.submit(Request([1], Options(), lambda e: None))


def test_text_stream_holds_back_a_stop_string_split_over_tokens(model):
    cfg, params, tok = model
    ids = tok.encode("hello world. more", bos=False).tolist()
    stream = TextStream(tok, tok.encode("x").tolist(), ("d. m",))
    sent, stopped = "", False
    for t in ids:
        delta, stopped = stream.push(t)
        sent += delta
        if stopped:
            break
    assert stopped and sent == "hello worl" and stream.flush() == ""
