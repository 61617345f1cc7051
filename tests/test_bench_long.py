"""benchmarks/bench_vit.py on text lengths and llama-long: argument handling and the smoke path on a
tiny Llama (a benchmark, not a timed test: only that every row is produced and consistent)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

BENCH_VIT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vit.py"


@pytest.fixture(scope="module")
def bench_vit():
    return load_script(BENCH_VIT)


def test_llama_long_defaults_and_shape_options(bench_vit):
    args = bench_vit.parse_args(["--model", "llama-long"])
    assert args.lengths == [512, 1024, 2048, 4096]
    assert args.methods == ["attnlrp", "cp_lrp", "transformer_attribution"]
    assert args.layers is None and args.lxt_python is None        # no LXT column without its python
    args = bench_vit.parse_args(["--model", "llama-long", "--layers", "1", "--lengths", "64", "--methods", "attnlrp"])
    assert (args.layers, args.lengths, args.methods) == (1, [64], ["attnlrp"])
    assert bench_vit.parse_args([]).lengths == [None]               # images: no token count


@pytest.mark.parametrize("argv, phrase", [
    (["--model", "vit-b16", "--layers", "2"], "--layers takes a positive number of layers, with --model llama-long"),
    (["--model", "llama-long", "--layers", "0"], "--layers takes a positive number"),
    (["--model", "swin-t", "--lengths", "512"], "--lengths takes token counts of at least 2, with a text model"),
    (["--model", "vit-b16", "--lxt-python", sys.executable], "--lxt-python works with --model bert-base-512 or "
                                                            "llama-long"),
    (["--model", "llama-long", "--lxt-python", "/nonexistent/python"], "no such executable"),
])
def test_bad_arguments_are_refused(bench_vit, capsys, argv, phrase):
    with pytest.raises(SystemExit) as exit_info:
        bench_vit.parse_args(argv)
    assert exit_info.value.code == 2
    assert phrase in capsys.readouterr().err


def test_llama_long_smoke_run_on_a_tiny_model(bench_vit, monkeypatch, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(layers=bench_vit.LLAMA_LAYERS):
        config = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, vocab_size=20000)
        return LlamaForCausalLM(config)

    monkeypatch.setattr(bench_vit.MODELS["llama-long"], "build", tiny)
    out = tmp_path / "long.json"
    bench_vit.main(["--model", "llama-long", "--layers", "1", "--lengths", "8", "12", "--batches", "1",
                    "--repeats", "1", "--no-memory", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["config"]["num_hidden_layers"] == 1
    rows = {(r["length"], r["method"]): r for r in results["rows"]}
    names = ["forward+backward", "forward+backward to inputs", "attnlrp", "cp_lrp", "transformer_attribution"]
    assert set(rows) == {(n, m) for n in (8, 12) for m in names}
    for (length, method), row in rows.items():
        base = rows[(length, "forward+backward")]["median_s"]
        assert row["median_s"] > 0 and row["time_ratio"] == pytest.approx(row["median_s"] / base)


def test_the_input_gradient_row_is_gradient_times_input_of_the_score(bench_vit):
    """The 'forward+backward to inputs' baseline differentiates the same score as attnlrp explains:
    on a bias-free tiny Llama in float64, CP-LRP's relevance sums to that score (LXT's conservation)."""
    import relprop
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=20000))
    model = model.to(torch.float64).eval()
    model.bench_name = "llama-long"
    bench = bench_vit.MODELS["llama-long"]
    inputs = bench.inputs(1, "cpu", 10)
    score = bench.score(model(**inputs), 1)
    relevance = relprop.Explainer(model).explain(inputs, "cp_lrp", target=bench.target(1, "cpu")).relevance
    assert relevance.sum().item() == pytest.approx(score.item(), rel=1e-6)
    bench_vit.make_runner(model, "forward+backward to inputs", 1, length=10)()     # runs; no parameter gradient
    assert all(p.grad is None for p in model.parameters())


def test_lxt_rows_come_from_the_lxt_python_and_give_relprop_over_lxt_ratios(bench_vit, monkeypatch, tmp_path):
    """--lxt-python plumbing without LXT: a stand-in 'python' answers as benchmarks/lxt_attnlrp.py
    does (one JSON line) and checks that the saved weights and inputs are there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(bench_vit.MODELS["llama-long"], "build", lambda layers=2: LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=20000)))
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in *--versions*) echo \'{"lxt": "2.1"}\'; exit 0;; esac\n'
                    'folder=$(echo "$*" | sed "s/.*--folder \\([^ ]*\\).*/\\1/")\n'
                    'test -f "$folder/config.json" && test -f "$folder/bench_inputs.pt" || exit 3\n'
                    'grep -q \'"rope_theta": 10000\' "$folder/config.json" || exit 4\n'     # where transformers 4 reads it
                    'echo \'{"median_s": 0.5, "peak_bytes": 1048576, "relevance_sum": [0.25]}\'\n')
    fake.chmod(0o755)
    out = tmp_path / "long.json"
    bench_vit.main(["--model", "llama-long", "--layers", "1", "--lengths", "8", "--batches", "1", "--repeats", "1",
                    "--methods", "attnlrp", "--no-memory", "--lxt-python", str(fake), "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["lxt"] == {"lxt": "2.1"}
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["LXT attnlrp"]["median_s"] == 0.5
    assert rows["attnlrp"]["time_vs_lxt"] == pytest.approx(rows["attnlrp"]["median_s"] / 0.5)
    agreement = results["lxt_agreement"][0]
    assert agreement["lxt_relevance_sum"] == [0.25] and len(agreement["relprop_relevance_sum"]) == 1
    table = bench_vit.markdown_table(results["rows"])
    assert "time ÷ LXT" in table and f"| {rows['attnlrp']['time_vs_lxt']:.2f} |" in table
