"""Generation parity with the official code: tokens and per-token recurrence steps from
`tests/fixtures/tiny_fp32/generate.npz` (made by the official generate methods; see tests/fixtures/README.md).
Both prompts run as one ragged batch: every row must equal the official batch-1 run."""

import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm.inference import CRITERIA, generate
from conftest import FIXTURES

EXPECTED = dict(np.load(FIXTURES / "tiny_fp32" / "generate.npz"))
STEPS, NEW = int(EXPECTED["num_steps"]), int(EXPECTED["max_new_tokens"])
PROMPTS = [EXPECTED["prompt0"], EXPECTED["prompt1"]]


@pytest.fixture(scope="module")
def tiny():
    return rdlm.load_hf_checkpoint(FIXTURES / "tiny_fp32", dtype=jnp.float32)


def run(tiny, **kw):
    cfg, params = tiny
    out = generate(params, PROMPTS, cfg, max_new_tokens=NEW, num_steps=STEPS, init_scale=float(EXPECTED["init_scale"]),
                   **kw)
    assert (out.lengths == NEW).all()
    return out


def check_exit_values(out, key):
    """The criterion's value after every recurrence step, NaN after the exit (as recorded from the official)."""
    for p in range(2):
        np.testing.assert_allclose(out.exit_values[p], EXPECTED[f"p{p}_{key}_exitvals"], rtol=1e-4, atol=2e-6,
                                   equal_nan=True)


def threshold(criterion):
    return None if criterion == "none" else float(EXPECTED[f"thr_{criterion}"])


def test_plain_greedy_matches_official(tiny):
    out = run(tiny)
    for p in range(2):
        np.testing.assert_array_equal(out.tokens[p], EXPECTED[f"p{p}_plain"])


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_adaptive_exit_matches_official(tiny, criterion):
    out = run(tiny, exit_criterion=None if criterion == "none" else criterion, exit_threshold=threshold(criterion))
    for p in range(2):
        np.testing.assert_array_equal(out.tokens[p], EXPECTED[f"p{p}_{criterion}_full_tokens"])
        np.testing.assert_array_equal(out.steps[p], EXPECTED[f"p{p}_{criterion}_full_steps"])
    if criterion != "none":  # the official records 0 for `none`; we record nothing (NaN)
        check_exit_values(out, f"{criterion}_full")


@pytest.mark.parametrize("strategy", ["skip", "latest-m4", "available-m4", "always-last-m4"])
def test_cache_strategies_match_official(tiny, strategy):
    """entropy-diff exits at 2..6 of 8 steps here, so later tokens do look up missing entries."""
    out = run(tiny, exit_criterion="entropy-diff", exit_threshold=threshold("entropy-diff"), cache_strategy=strategy)
    for p in range(2):
        np.testing.assert_array_equal(out.tokens[p], EXPECTED[f"p{p}_entropy-diff_{strategy}_tokens"])
        np.testing.assert_array_equal(out.steps[p], EXPECTED[f"p{p}_entropy-diff_{strategy}_steps"])
    check_exit_values(out, f"entropy-diff_{strategy}")  # tells always-last-m4 from latest-m4 (same tokens)


@pytest.mark.parametrize("criterion", ["none", "entropy-diff"])
def test_continuous_thought_matches_official_adaptive_path(tiny, criterion):
    """The warm start is the previous token's raw final state, as in the official adaptive generate."""
    out = run(tiny, continuous=True, exit_criterion=None if criterion == "none" else criterion,
              exit_threshold=threshold(criterion))
    for p in range(2):
        np.testing.assert_array_equal(out.tokens[p], EXPECTED[f"p{p}_continuous_{criterion}_tokens"])
        np.testing.assert_array_equal(out.steps[p], EXPECTED[f"p{p}_continuous_{criterion}_steps"])
    if criterion != "none":
        check_exit_values(out, f"continuous_{criterion}")


@pytest.mark.parametrize("draft_steps,key", [(2, "speculative"), (4, "speculative_d4")])
def test_speculative_matches_official(tiny, draft_steps, key):
    """The official may return more than max_new_tokens after a fully accepted draft; we stop at the bound."""
    out = run(tiny, draft_steps=draft_steps, lookahead=4)
    for p in range(2):
        np.testing.assert_array_equal(out.tokens[p], EXPECTED[f"p{p}_{key}"][:NEW])
        np.testing.assert_array_equal(out.tokens[p], EXPECTED[f"p{p}_plain"])
