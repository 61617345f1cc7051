"""The benchmark runner itself: the registry behind ``relprop eval NAME``, method options passed
straight through (and into the run's identity), baseline rows, and --option parsing."""
from __future__ import annotations

import argparse
import json

import pytest

from relprop.cli import main
from relprop.errors import OptionError, UsageError
from relprop.eval import cli, datasets
from relprop.eval.perturbation import PerturbationBenchmark, PerturbationConfig
from relprop.eval.runner import BENCHMARKS, run_benchmark

from eval_fakes import IMAGE_SIZE, FakeExplainer


class OptionsExplainer(FakeExplainer):
    """FakeExplainer that records each call's options (the maps do not depend on them)."""

    def __init__(self, model):
        super().__init__(model)
        self.options: list[tuple[str, dict]] = []

    def explain(self, pixel_values, method, target=None, **options):
        self.options.append((method, options))
        return super().explain(pixel_values, method, target)


class WithBaseline(PerturbationBenchmark):
    """A perturbation test with a "centre" row that needs no explainer."""

    name = "perturbation"  # same files; not registered
    baselines = ("centre",)

    def baseline_records(self, name, batch, needs, failures):
        return self.records(lambda x, target=None: FakeExplainer(self.model).explain(x, "bright", target),
                            name, batch, needs, failures)


def test_registry_names_every_benchmark_and_builds_the_subcommands():
    found = cli.benchmarks()
    assert {"perturbation", "segmentation", "class-specificity", "rationale"} <= set(found)
    assert found == dict(sorted(BENCHMARKS.items()))
    parser = argparse.ArgumentParser(prog="relprop")
    cli.register(parser.add_subparsers(dest="command"))
    for name in found:
        args = parser.parse_args(["eval", name, "--out", "x", "--option", "lrp:foo=1", *(
            ["--model", "m", "--data", "d"] if name != "rationale" else [])])
        assert args.benchmark is found[name] and args.option == ["lrp:foo=1"]


def test_unknown_benchmark_is_one_line_naming_the_registered_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["eval", "nonsense", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    for phrase in ("invalid choice: 'nonsense'", "class-specificity", "perturbation", "rationale", "segmentation"):
        assert phrase in err


def test_options_pass_straight_through_and_into_the_identity(tiny_vit, image_folder, tmp_path):
    explainer = OptionsExplainer(tiny_vit)
    benchmark = PerturbationBenchmark(tiny_vit, datasets.image_folder(image_folder),
                                      PerturbationConfig(image_size=(IMAGE_SIZE, IMAGE_SIZE)))
    options = {"bright": {"start_layer": 1, "alpha": "x"}, "unused": {"k": 2}}
    summary = run_benchmark(benchmark, explainer, ["bright", "lrp"], tmp_path, options=options, batch_size=4,
                            progress=False)
    assert {m: o for m, o in explainer.options} == {"bright": {"start_layer": 1, "alpha": "x"}, "lrp": {}}
    assert summary["settings"]["method_options"] == {"bright": {"start_layer": 1, "alpha": "x"}}
    with pytest.raises(Exception, match="settings differ"):  # other options: other maps, refused
        run_benchmark(benchmark, explainer, ["bright"], tmp_path, options={"bright": {"start_layer": 2}},
                      progress=False)


def test_baseline_rows_need_no_explainer(tiny_vit, image_folder, tmp_path):
    explainer = OptionsExplainer(tiny_vit)
    benchmark = WithBaseline(tiny_vit, datasets.image_folder(image_folder),
                             PerturbationConfig(image_size=(IMAGE_SIZE, IMAGE_SIZE)))
    summary = run_benchmark(benchmark, explainer, ["bright"], tmp_path, progress=False)
    assert set(summary["results"]) == {"bright", "centre"}
    assert summary["results"]["centre"] == summary["results"]["bright"]
    assert {m for m, _ in explainer.options} == {"bright"}
    records = [json.loads(line) for line in (tmp_path / "perturbation.jsonl").read_text().splitlines()]
    assert sum(r["method"] == "centre" for r in records) == 12


def test_option_parsing():
    methods = ["transformer_attribution", "lrp"]
    assert cli.parse_options(["lrp:rules=plain", "transformer_attribution:start_layer=2"], None, methods) == {
        "lrp": {"rules": "plain"}, "transformer_attribution": {"start_layer": 2}}
    # --start-layer sets the two methods that have it, among those that run
    assert cli.parse_options([], 1, methods) == {"transformer_attribution": {"start_layer": 1}}
    with pytest.raises(UsageError, match="expected METHOD:NAME=VALUE"):
        cli.parse_options(["lrp=1"], None, methods)
    with pytest.raises(UsageError, match="not among --methods"):
        cli.parse_options(["rollout:start_layer=1", "attnlrp:x=1"], None, methods)
    with pytest.raises(OptionError, match="method 'lrp' has no option 'start_layr'"):
        cli.parse_options(["lrp:start_layr=1"], None, methods)
