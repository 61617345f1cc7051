"""The runners reproduce, exactly, the per-sample records the pre-refactor runners made on a tiny
real set (``tests/eval/data/reference_records.json``, written by
``scripts/record_eval_reference.py`` with the runners of before ``runner.Benchmark``). Maps in float64,
so that the records do not depend on the CPU's summation order; floats agree to 1e-9 (relative),
everything else (steps hit, pixel counts, ranks) exactly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from relprop.eval import fashion

REFERENCE = Path(__file__).parent / "data" / "reference_records.json"
RUN_FIELDS = ("cfg", "src")
# As in scripts/record_eval_reference.py.
VISION_METHODS = ("transformer_attribution", "rollout", "lrp")
N_CANVASES, N_PAIRS, N_REVIEWS = 4, 3, 3


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's reductions
    yield
    torch.set_num_threads(previous)


def stored(path: Path, reference_records: list[dict]) -> list[dict]:
    """The records in ``path`` with the reference's fields, in the reference's order (as
    ``scripts/record_eval_reference.py`` wrote them)."""
    fields = set().union(*reference_records) - set(RUN_FIELDS)
    records = [{k: v for k, v in json.loads(line).items() if k in fields} for line in path.read_text().splitlines()]
    return sorted(records, key=lambda r: json.dumps([r["method"], r.get("mode", ""), r["id"]]))


def same_records(got, expected) -> bool:
    """Equal structure and discrete values; floats to 1e-9 relative (float64 maps on any CPU)."""
    if isinstance(expected, float) and isinstance(got, (int, float)):
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(same_records(got[k], v) for k, v in expected.items())
    if isinstance(expected, list) and isinstance(got, list):
        return len(got) == len(expected) and all(same_records(g, e) for g, e in zip(got, expected))
    return type(got) is type(expected) and got == expected


def test_vision_runners_reproduce_the_reference(reference, one_thread, tmp_path):
    import relprop
    from relprop.eval import loading
    from relprop.eval.class_specificity import ClassSpecificityBenchmark, ClassSpecificityConfig
    from relprop.eval.perturbation import PerturbationBenchmark, PerturbationConfig
    from relprop.eval.runner import run_benchmark
    from relprop.eval.segmentation import SegmentationBenchmark, SegmentationConfig

    try:
        fashion.canvas_images(1)
    except Exception as error:  # no Fashion-MNIST on this machine
        pytest.skip(str(error))
    folder = Path(relprop.__file__).parent / "assets" / "fmnist_vit"
    model = loading.load_model(str(folder))
    preprocessor = loading.read_preprocessor_config(str(folder))
    size, norm = loading.image_size(model, preprocessor), loading.normalization(preprocessor)
    cases = {
        "perturbation": (PerturbationBenchmark(model, fashion.canvas_images(N_CANVASES),
                                               PerturbationConfig(image_size=size, normalization=norm)), 3),
        "segmentation": (SegmentationBenchmark(model, fashion.canvas_segmentation(N_CANVASES),
                                               SegmentationConfig(size, norm)), 3),
        "class_specificity": (ClassSpecificityBenchmark(model, fashion.pair_samples(N_PAIRS),
                                                        ClassSpecificityConfig(size, norm)), 2),
    }
    explainer = relprop.Explainer(model, dtype=torch.float64)
    for name, (benchmark, batch_size) in cases.items():
        run_benchmark(benchmark, explainer, VISION_METHODS, tmp_path / name, batch_size=batch_size, progress=False,
                      options={"transformer_attribution": {"start_layer": 1}})
        got = stored(tmp_path / name / f"{name}.jsonl", reference[name])
        assert same_records(got, reference[name]), (name, got, reference[name])


def test_rationale_benchmark_reproduces_the_reference(reference, one_thread, tmp_path):
    import relprop
    from relprop.eval.rationale import RationaleBenchmark, zaidan_reviews
    from relprop.eval.runner import run_benchmark
    from relprop.text.pretrained import load_sentiment_model
    from relprop.text.rationales import default_data_dir

    archive = default_data_dir() / "movies" / "zaidan_rationales.tar.gz"
    if not archive.is_file():
        pytest.skip(f"no {archive}")
    # The shortest reference review (one a pass, as recorded), two methods: signed (lrp) and
    # with many ties at 0 (attn_gradcam); the suite's time budget leaves no more.
    methods = ("lrp", "attn_gradcam")
    review = min(zaidan_reviews(archive)[:N_REVIEWS], key=lambda r: len(r.tokens))
    expected = [r for r in reference["rationale"] if r["id"] == review.id and r["method"] in methods]
    model, tokenizer = load_sentiment_model()
    benchmark = RationaleBenchmark(model, tokenizer, [review])
    summary = run_benchmark(benchmark, relprop.Explainer(model, dtype=torch.float64), methods, tmp_path,
                            progress=False)
    assert len(expected) == 2 and same_records(stored(tmp_path / "rationale.jsonl", expected), expected)
    assert summary["results"]["lrp"]["n"] == 1 and (tmp_path / "rationale.md").is_file()
