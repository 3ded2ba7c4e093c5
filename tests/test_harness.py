"""lm-eval harness: `rdlm.scoring` against `rdlm.forward`, and the `rdlm` lm-eval model on local tasks (a
multiple-choice, a generation and a perplexity task on jsonl files) through `lm_eval.simple_evaluate` and
`python -m rdlm.harness`, offline."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported: set before lm_eval
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the `eval` extra (requirements.txt installs it)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

import rdlm  # noqa: E402
from conftest import REPO  # noqa: E402
from rdlm.errors import RdlmError  # noqa: E402
from rdlm.harness import HarnessError, RdlmLM, cut_at_stops  # noqa: E402
from rdlm.inference import load_checkpoint  # noqa: E402
from rdlm.scoring import _score_rows, loglikelihoods, rolling_loglikelihood, rolling_windows  # noqa: E402
from rdlm.tokenizer import load_tokenizer  # noqa: E402

from conftest import CHAT_BLOCK as BLOCK  # noqa: E402
MC = [{"question": "Question: counting on the fingers of one hand, what is two plus two?\nAnswer:",
       "choices": ["four", "five"], "answer": 0},
      {"question": "Question: on a clear summer day at noon, what colour is the sky?\nAnswer:",
       "choices": ["blue", "green"], "answer": 0}]  # > 32 tokens: the 64-token programs serve every test
GEN = [{"question": "Say hi:", "answer": "hi"}, {"question": "Count: one two", "answer": "three"},
       {"question": "A longer prompt, to pad the others?", "answer": "ok"}]
PPL = [{"text": "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
                "and arrows of outrageous fortune."}, {"text": "Short text."}]
GEN_KWARGS = {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False}
TASKS = {
    "rdlm_mc": (MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                    "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "rdlm_gen": (GEN, 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                      f"generation_kwargs: {json.dumps(GEN_KWARGS)}\nmetric_list:\n  - metric: exact_match\n"),
    "rdlm_ppl": (PPL, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                      "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
}


@pytest.fixture(scope="module")
def checkpoint(chat_checkpoint) -> Path:
    return chat_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint):
    config, params = load_checkpoint(checkpoint)
    assert config.model.block_size == BLOCK
    return config.model, params, load_tokenizer(checkpoint, model_vocab_size=config.model.vocab_size)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """lm-eval task configs over jsonl files written here (`json` builder: no download), caching under here."""
    d = tmp_path_factory.mktemp("tasks")
    for name, (rows, spec) in TASKS.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / name}.jsonl\n"
            f"  cache_dir: {d / 'hf_cache'}\ntest_split: test\n" + spec)
    return d


def forward_logprobs(params, cfg, ids, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(log p(ids[t+1] | ids[..t]) for each t, the log-probs after ids[:64]) by one `rdlm.forward` of the sequence
    alone (right-padded to the context: causal, so the same numbers, and a single compile)."""
    n = min(len(ids), BLOCK)
    inputs = np.zeros((1, BLOCK), np.int32)
    inputs[0, :n] = ids[:n]
    logp = np.asarray(jax.nn.log_softmax(rdlm.forward(params, inputs, cfg, **kwargs)[0, :n], -1))
    return logp[np.arange(len(ids) - 1), np.asarray(ids[1:])], logp[-1]


def continuation_logprob(params, cfg, tok, context, continuation, **kwargs) -> float:
    """lm-eval's split of a (context, continuation) pair (trailing whitespace moves to the continuation, the
    context keeps what fits the window), scored with `forward_logprobs`."""
    bos = not context.startswith("<|begin_text|>")  # else a chat template wrote it
    whole, ctx = tok.encode(context + continuation, bos=bos), tok.encode(context.rstrip(), bos=bos)
    return float(forward_logprobs(params, cfg, whole[-(BLOCK + 1):], **kwargs)[0][-(len(whole) - len(ctx)):].sum())


# ---- rdlm.scoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 16, 17, 30])
def test_rolling_windows_are_lm_evals(n):
    tokens = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, 8, 1)]
    assert rolling_windows(tokens, 1, 8) == [(list(a), list(b)) for a, b in theirs]


def test_loglikelihoods_equal_forward_row_by_row(model):
    """Rows of different lengths in one batch (a context cut to fit, a greedy one) score as `rdlm.forward` on
    each alone, initial noise included; other depths reuse the compiled program."""
    cfg, params, _ = model
    ids = np.random.default_rng(0).integers(5, cfg.vocab_size, size=BLOCK + 10).tolist()
    short = forward_logprobs(params, cfg, ids[:20], num_steps=3)[0]
    after_15 = forward_logprobs(params, cfg, ids[:15], num_steps=3)[1]
    cut = forward_logprobs(params, cfg, ids[-(BLOCK + 1):], num_steps=3)[0]
    greedy = int(np.argmax(after_15))
    requests = [(ids[:15], ids[15:20]), (ids[:9], ids[9:12]), (ids[:-4], ids[-4:]), (ids[:15], [greedy])]
    logprobs, is_greedy = loglikelihoods(params, cfg, requests, num_steps=3, batch_size=4)
    expected = [short[14:19].sum(), short[8:11].sum(), cut[-4:].sum(), after_15[greedy]]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-4, atol=1e-4)
    assert is_greedy.tolist() == [False, False, False, True]
    compiled = _score_rows._cache_size()
    deeper, _ = loglikelihoods(params, cfg, requests, num_steps=5, batch_size=4)
    assert _score_rows._cache_size() == compiled and deeper[0] != logprobs[0]
    with pytest.raises(ValueError, match="continuation of 65 tokens; valid range is 1..block_size=64"):
        loglikelihoods(params, cfg, [([1], ids[:65])], num_steps=1)


def test_rolling_loglikelihood_equals_forward_over_lm_eval_windows(model):
    cfg, params, _ = model
    docs = [np.random.default_rng(1).integers(5, cfg.vocab_size, size=n).tolist() for n in (150, 20)]
    expected = []
    for doc in docs:
        total = 0.0
        for inputs, preds in get_rolling_token_windows(doc, 0, BLOCK, 1):
            total += forward_logprobs(params, cfg, inputs + preds[-1:], num_steps=2)[0][-len(preds):].sum()
        expected.append(total)
    got = rolling_loglikelihood(params, cfg, docs + [[]], 0, num_steps=2, batch_size=4)  # 3 + 1 + 0 windows
    np.testing.assert_allclose(got, expected + [0.0], rtol=1e-4)
    assert rolling_loglikelihood(params, cfg, [], 0, num_steps=2).shape == (0,)


# ---- the lm-eval model ----------------------------------------------------------------------------


def evaluate(checkpoint, tasks, names, **kwargs):
    return lm_eval.simple_evaluate(
        model="rdlm", model_args={"checkpoint": str(checkpoint), "num_steps": 2, "batch_size": 4, "init_scale": 0},
        tasks=names, task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
        **kwargs)


def test_simple_evaluate_matches_direct_computation(checkpoint, tasks, model):
    """All three request types through lm-eval; one answer of each recomputed with rdlm.forward / rdlm.generate."""
    cfg, params, tok = model
    out = evaluate(checkpoint, tasks, list(TASKS))
    res = out["results"]
    assert 0 <= res["rdlm_mc"]["acc,none"] <= 1 and 0 <= res["rdlm_gen"]["exact_match,none"] <= 1
    assert math.isfinite(res["rdlm_ppl"]["word_perplexity,none"]) and res["rdlm_ppl"]["bits_per_byte,none"] > 0

    first = next(s for s in out["samples"]["rdlm_mc"] if s["doc_id"] == 0)
    assert first["arguments"][0] == (MC[0]["question"], " four")
    direct = continuation_logprob(params, cfg, tok, *first["arguments"][0], num_steps=2, init_scale=0)
    np.testing.assert_allclose(first["resps"][0][0][0], direct, rtol=1e-4)

    short = next(s for s in out["samples"]["rdlm_ppl"] if s["doc_id"] == 1)
    doc = tok.encode(PPL[1]["text"])  # bos + the text: the window conditioned on bos
    np.testing.assert_allclose(short["resps"][0][0], forward_logprobs(params, cfg, doc, num_steps=2,
                                                                      init_scale=0)[0].sum(), rtol=1e-4)

    prompts = [tok.encode(g["question"]) for g in GEN]
    gen = rdlm.generate(params, prompts[::-1] + prompts[:1], cfg, max_new_tokens=8, num_steps=2, init_scale=0,
                        stop_ids=tok.stop_ids)  # another order: each request gets its own answer back
    for sample in out["samples"]["rdlm_gen"]:
        row = len(GEN) - 1 - sample["doc_id"]
        ids = [t for t in gen.tokens[row, :gen.lengths[row]] if t not in tok.stop_ids]
        assert sample["resps"][0][0] == cut_at_stops(tok.decode(ids, skip_special=True), ["\n", "."])
        assert "\n" not in sample["resps"][0][0] and "." not in sample["resps"][0][0]


def test_chat_template_and_system_instruction(checkpoint, tasks, model):
    cfg, params, tok = model
    out = evaluate(checkpoint, tasks, ["rdlm_mc"], apply_chat_template=True, system_instruction="Be brief.")
    sample = next(s for s in out["samples"]["rdlm_mc"] if s["doc_id"] == 0)
    context, continuation = sample["arguments"][0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MC[0]["question"]}]
    assert context == tok.apply_chat_template(messages) and context.startswith("<|begin_text|>")
    direct = continuation_logprob(params, cfg, tok, context, continuation, num_steps=2, init_scale=0)
    np.testing.assert_allclose(sample["resps"][0][0][0], direct, rtol=1e-4)  # the context is cut to fit
    lm = RdlmLM(str(checkpoint))
    assert lm.tok_encode(context) == tok.encode(context, bos=False).tolist()  # one bos: the template's
    assert lm.tok_encode("hi") == tok.encode("hi").tolist()
    assert lm.tokenizer_name.endswith("tokenizer.json") and lm.chat_template(True) == tok.chat_template


def test_exit_criterion_in_generation_only(checkpoint, model, caplog):
    """With a threshold every token meets at once, each generated token runs one recurrence, not num_steps."""
    cfg, params, tok = model
    lm = RdlmLM(str(checkpoint), num_steps=4, exit_criterion="kl", exit_threshold=1e6, init_scale=0)
    with caplog.at_level("INFO", logger="rdlm.harness"):
        [text] = lm.generate_until([Instance("generate_until", {}, ("Say hi:", {"max_gen_toks": 6}), 0)])
    assert "1.00 recurrence steps per token" in caplog.text
    gen = rdlm.generate(params, [tok.encode("Say hi:")], cfg, max_new_tokens=6, num_steps=4, init_scale=0,
                        exit_criterion="kl", exit_threshold=1e6, stop_ids=tok.stop_ids)
    ids = [t for t in gen.tokens[0, :gen.lengths[0]] if t not in tok.stop_ids]
    assert text == tok.decode(ids, skip_special=True)
    with pytest.raises(HarnessError, match="loglikelihood requests with exit_criterion=kl.*fixed depth"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("a", " b"), 0)])


@pytest.mark.parametrize("args, needle", [
    (dict(batch_size="auto"), "batch_size='auto' must be a positive integer"),
    (dict(exit_criterion="entropy"), "unknown exit_criterion='entropy'; valid: "),
    (dict(exit_threshold=0.1), "exit_threshold was given without an exit_criterion"),
    (dict(num_steps=0), "num_steps=0 is out of range"),
    (dict(dtype="float16"), "float16"),
    (dict(pretrained="gpt2"), "unknown model args ['pretrained']; valid: batch_size, checkpoint, dtype, "),
])
def test_bad_model_args_are_named(checkpoint, args, needle):
    with pytest.raises(RdlmError, match=re.escape(needle)):
        RdlmLM.create_from_arg_obj({"checkpoint": str(checkpoint), **args}, {"batch_size": 1, "device": "cuda:0"})


def test_model_args_win_over_lm_eval_defaults_and_gen_kwargs_are_checked(checkpoint):
    lm = RdlmLM.create_from_arg_string(f"checkpoint={checkpoint},batch_size=3", {"batch_size": 1, "device": "cuda"})
    assert lm.batch_size == 3 and lm.num_steps == 8  # default depth: the checkpoint's mean_recurrence
    with pytest.raises(HarnessError, match=r"gen_kwargs \['repetition_penalty'\] are not supported"):
        lm.generate_until([Instance("generate_until", {}, ("hi", {"repetition_penalty": 1.1}), 0)])


@pytest.mark.slow
def test_command_line(checkpoint, tasks, tmp_path):
    """`python -m rdlm.harness` takes lm-eval's own arguments, `--model rdlm` among them."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "rdlm.harness", "run", "--model", "rdlm", "--model_args",
           f"checkpoint={checkpoint},num_steps=2,init_scale=0", "--tasks", "rdlm_mc", "--include_path", str(tasks),
           "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [results] = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["rdlm_mc"]["acc,none"]
    assert acc in (0.0, 0.5, 1.0) and "rdlm_mc" in run.stdout
