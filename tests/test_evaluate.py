"""`python -m rdlm.evaluate`: perplexity, multiple choice, exact match and adaptive exit at several depths,
each checked against a direct computation with rdlm.forward / rdlm.generate."""

import json

import jax
import numpy as np
import pytest

import rdlm
from rdlm.evaluate import EvaluationError, encode_pair, main, read_items
from rdlm.inference import load_checkpoint
from rdlm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    config, params = load_checkpoint(chat_checkpoint)
    return config, params, load_tokenizer(chat_checkpoint, model_vocab_size=config.model.vocab_size)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def choice_logprob(params, cfg, tok, context, choice, num_steps):
    """log p(choice | context) from one rdlm.forward of the pair's ids."""
    ctx, cont = encode_pair(tok, context, choice)
    ids = np.concatenate([ctx, cont])[None]
    logp = jax.nn.log_softmax(rdlm.forward(params, ids[:, :-1], cfg, num_steps=num_steps)[0], -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_encode_pair_moves_trailing_space_to_the_continuation(model):
    _, _, tok = model
    ctx, cont = encode_pair(tok, "The answer is ", "four")
    assert list(np.concatenate([ctx, cont])) == list(tok.encode("The answer is four"))
    assert list(ctx) == list(tok.encode("The answer is"))


def test_cli_scores_equal_direct_computation(chat_checkpoint, model, tmp_path):
    config, params, tok = model
    cfg = config.model
    choices = [{"context": "Two plus two is", "choices": ["four", "five", "banana"], "answer": 0},
               {"context": "The sky is", "choices": ["blue", "loud"], "answer": 1}]
    prompts = ["Say hi:", "Count: one two"]
    greedy = rdlm.generate(params, [tok.encode(p) for p in prompts], cfg, max_new_tokens=4, num_steps=2,
                           stop_ids=tok.stop_ids)
    first = tok.decode([int(t) for t in greedy.tokens[0, :greedy.lengths[0]] if int(t) not in tok.stop_ids])
    answers = [{"prompt": prompts[0], "answer": first.split("\n")[0]},  # what the model says at r=2: a match
               {"prompt": prompts[1], "answer": "certainly not this"}]
    text = tmp_path / "heldout.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    out = tmp_path / "out" / "results.json"
    code = main(["--checkpoint", str(chat_checkpoint), "--recurrence", "1,2", "--text", str(text), "--batches", "2",
                 "--choices", write_jsonl(tmp_path / "mc.jsonl", choices),
                 "--answers", write_jsonl(tmp_path / "qa.jsonl", answers), "--criteria", "entropy-diff",
                 "--max-new-tokens", "4", "--out", str(out), "--plot", str(tmp_path / "plot.png")])
    assert code == 0 and (tmp_path / "plot.png").stat().st_size > 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"perplexity", "mc", "qa"}
    assert results["perplexity"]["1"]["loss"] > 0 and results["perplexity"]["2"]["tokens"] > 0
    for r in (1, 2):
        expected = []
        for item in choices:
            ll = [choice_logprob(params, cfg, tok, item["context"], " " + c, r) for c in item["choices"]]
            expected.append(int(np.argmax(ll)) == item["answer"])
        assert results["mc"][str(r)]["acc"] == pytest.approx(np.mean(expected))
    assert results["qa"]["r=2"]["exact_match"] == 0.5 and results["qa"]["r=2"]["steps_per_token"] == 2
    adaptive = results["qa"]["entropy-diff"]
    assert adaptive["num_steps"] == 2 and 1 <= adaptive["steps_per_token"] <= 2


def test_bad_items_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    with pytest.raises(EvaluationError, match=r"bad.jsonl:2: field 'answer' is missing or not a str"):
        read_items(bad, {"prompt": str, "answer": str})
    bad.write_text('{"prompt": "1+1=", "answer": true}\n')
    with pytest.raises(EvaluationError, match=r"bad.jsonl:1: field 'answer' is missing or not a str"):
        read_items(bad, {"prompt": str, "answer": str})
    bad.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(EvaluationError, match=r"bad.jsonl is not UTF-8 text"):
        read_items(bad, {"prompt": str, "answer": str})
    bad.write_text("not json\n")
    with pytest.raises(EvaluationError, match=r"bad.jsonl:1: not JSON"):
        read_items(bad, {"prompt": str, "answer": str})


@pytest.mark.parametrize("args, needle", [
    (["--recurrence", "0,4"], "--recurrence '0,4'"),
    (["--criteria", "bogus", "--answers", "x.jsonl"], "unknown exit criterion 'bogus'"),
    (["--criteria", "kl"], "--criteria needs --answers"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--stop", ""], "--stop '' is empty"),
    (["--answers", "a/qa.jsonl", "--answers", "b/qa.jsonl"], "task name 'qa'"),
    ([], "is not a training run, so it has no held-out split"),
])
def test_bad_flags_are_named(chat_checkpoint, args, needle, capsys):
    assert main(["--checkpoint", str(chat_checkpoint), *args]) == 1
    assert needle in capsys.readouterr().err


def test_answer_out_of_range_is_refused(chat_checkpoint, tmp_path, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"context": "a", "choices": ["b", "c"], "answer": 2}])
    assert main(["--checkpoint", str(chat_checkpoint), "--no-perplexity", "--choices", mc]) == 1
    assert "line 1: answer 2 is not an index of its 2 choices" in capsys.readouterr().err

