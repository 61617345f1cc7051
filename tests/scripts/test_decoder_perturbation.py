"""The decoder perturbation benchmark's core (benchmarks/decoder_perturbation.py) on constructed
scorers and a tiny random Llama."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decoder_perturbation.py"
UNK = 0


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def additive_scorer(weights: torch.Tensor):
    """target logit = sum of a weight per token id; probability = sigmoid of it (any monotone map)."""
    def score(ids: torch.Tensor) -> torch.Tensor:
        logit = weights[ids].sum(-1).double()
        return torch.stack([logit, logit.sigmoid()], dim=1)
    return score


def test_removal_order_ranks_removable_tokens_and_breaks_ties_by_key(bench):
    relevance = np.array([9.0, 1.0, 3.0, 3.0, -2.0])
    removable = np.array([False, True, True, True, True])    # position 0 (<bos>) is never removed
    assert bench.removal_order(relevance, removable, np.array([0, 0, 1, 0, 0])).tolist() == [3, 2, 1, 4]
    assert bench.removal_order(relevance, removable, np.array([0, 0, 0, 1, 0])).tolist() == [2, 3, 1, 4]
    with pytest.raises(ValueError, match="non-finite"):
        bench.removal_order(np.array([0.0, np.nan, 1.0]), np.ones(3, bool), np.arange(3))


def test_perturbed_sequences_replace_most_and_least_relevant_first(bench):
    ids = torch.tensor([5, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    order = np.arange(10, 0, -1)   # position 10 most relevant, position 1 least; 10 removable tokens
    out = bench.perturbed_sequences(ids, order, UNK)
    assert out.shape == (2, 11, 11)
    assert torch.equal(out[0, 0], ids) and torch.equal(out[1, 0], ids)
    assert torch.equal(out[0, -1], torch.tensor([5] + [UNK] * 10))
    assert torch.equal(out[1, -1], out[0, -1])
    assert torch.equal(out[0, 3], torch.tensor([5, 11, 12, 13, 14, 15, 16, 17, UNK, UNK, UNK]))   # 30 %: top 3
    assert torch.equal(out[1, 3], torch.tensor([5, UNK, UNK, UNK, 14, 15, 16, 17, 18, 19, 20]))   # bottom 3


def test_curve_endpoints_and_area_sign_on_an_additive_model(bench):
    torch.manual_seed(0)
    weights = torch.zeros(32)
    weights[1:] = torch.randn(31)    # <unk> (id 0) contributes nothing: removal is exact
    ids = torch.tensor([31, *torch.randperm(30)[:15].add(1).tolist()])
    contributions = weights[ids].numpy()
    removable = np.arange(len(ids)) >= 1
    tie_key = np.arange(len(ids))
    orders = {"exact": bench.removal_order(contributions, removable, tie_key),
              "reversed": bench.removal_order(-contributions, removable, tie_key)}
    result = bench.curves(additive_scorer(weights), ids, orders, UNK)
    full, emptied = float(weights[ids].sum()), float(weights[ids[0]])
    for curve in result.values():
        assert curve.shape == (2, 11, 2)
        np.testing.assert_allclose(curve[:, 0, 0], full, rtol=1e-12)      # nothing removed: the model's logit
        np.testing.assert_allclose(curve[:, -1, 0], emptied, rtol=1e-12)  # all removed: only <bos> is left
    exact = bench.area_between(result["exact"][0, :, 0], result["exact"][1, :, 0])
    reverse = bench.area_between(result["reversed"][0, :, 0], result["reversed"][1, :, 0])
    assert exact > 0.5
    assert reverse == pytest.approx(-exact, abs=1e-12)   # the reversed ranking swaps MoRF and LeRF
    # the exact contributions are the best ranking: no permutation's area is larger
    rng = np.random.default_rng(0)
    for _ in range(20):
        shuffled = {"r": bench.removal_order(rng.random(len(ids)), removable, tie_key)}
        curve = bench.curves(additive_scorer(weights), ids, shuffled, UNK)["r"]
        assert bench.area_between(curve[0, :, 0], curve[1, :, 0]) <= exact + 1e-12


def test_area_between_is_the_trapezoid_of_lerf_minus_morf(bench):
    x = bench.FRACTIONS
    assert bench.area_between(1 - x, np.ones_like(x)) == pytest.approx(0.5)
    assert bench.area_between(np.ones_like(x), 1 - x) == pytest.approx(-0.5)
    assert bench.area_between(x ** 2, x ** 2) == 0.0


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_run_on_a_tiny_llama_explains_the_greedy_token_and_starts_at_its_logit(bench, tiny_llama):
    tokenizer = SimpleNamespace(bos_token_id=1, pad_token_id=2)
    prompts = [{"source": "a", "ids": [1, 7, 8, 9, 10, 11]}, {"source": "b", "ids": [1, 20, 21, 22, 23, 24, 25, 26, 27]},
               {"source": "c", "ids": [1, 30, 31, 32, 33, 34, 35]}]
    result = bench.run(tiny_llama, tokenizer, prompts, ["attnlrp", "rollout"], UNK, seed=0, batch_size=2,
                       log=lambda *_: None)
    for prompt, target in zip(prompts, result["targets"]):
        with torch.no_grad():
            logits = tiny_llama(input_ids=torch.tensor([prompt["ids"]])).logits[0, -1]
        assert target == int(logits.argmax())
    assert set(result["areas"]) == {"attnlrp", "rollout", "random", "recency"}
    assert all(len(a["logit"]) == 3 and len(a["probability"]) == 3 for a in result["areas"].values())
    with torch.no_grad():
        mean_start = np.mean([float(tiny_llama(input_ids=torch.tensor([p["ids"]])).logits[0, -1, t])
                              for p, t in zip(prompts, result["targets"])])
    for curve in result["mean_curves"].values():
        curve = np.asarray(curve)
        assert curve[0, 0, 0] == pytest.approx(mean_start, rel=1e-5)   # 0 % removed: the targets' mean logit
        assert curve[0, -1, 0] == pytest.approx(curve[1, -1, 0], rel=1e-9)
    summary = bench.summarise(result["areas"])
    means = [row["logit"]["mean"] for row in summary.values()]
    assert means == sorted(means, reverse=True) and "beats_random" not in summary["random"]
    assert 0 <= summary["attnlrp"]["beats_recency"] <= 1 and "beats_recency" not in summary["recency"]
    winner = next(iter(summary))
    assert summary[winner]["behind_best"]["mean"] == 0
    assert all(row["behind_best"]["mean"] >= -1e-12 for row in summary.values())
    table = bench.markdown(summary, {"prompts": 3, "model": "tiny", "replacement": "<unk>"})
    assert table.count("\n| ") == 1 + len(summary) and f"| 1 | {winner} |" in table


def test_bad_options_are_refused_with_a_message(bench, capsys):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(["--methods", "attnlrp", "shap"])
    assert error.value.code == 2 and "unknown method(s) ['shap']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        bench.parse_args(["--max-tokens", "4"])
    assert error.value.code == 2 and "--max-tokens at least 12" in capsys.readouterr().err


def test_keep_last_never_removes_the_last_prompt_token(bench, tiny_llama):
    tokenizer = SimpleNamespace(bos_token_id=1, pad_token_id=2)
    prompts = [{"source": "a", "ids": [1, 7, 8, 9, 10, 11]}, {"source": "b", "ids": [1, 20, 21, 22, 23, 24, 25]}]
    kept = bench.run(tiny_llama, tokenizer, prompts, ["rollout"], UNK, seed=0, batch_size=2, keep_last=True,
                     log=lambda *_: None)
    emptied = [[1, UNK, UNK, UNK, UNK, 11], [1, UNK, UNK, UNK, UNK, UNK, 25]]
    with torch.no_grad():
        expected = np.mean([float(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1, t])
                            for ids, t in zip(emptied, kept["targets"])])
    for curve in kept["mean_curves"].values():
        np.testing.assert_allclose(np.asarray(curve)[:, -1, 0], expected, rtol=1e-6)
