"""``relprop explain`` / ``explain-text`` hardening, run as the real command in a subprocess:
exit code, the one-line message and the files."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

from relprop.cli import MANIFEST, main
from tests.conftest import assert_cli_error, hf_folder, run_relprop
from tests.test_loading import PLAIN_WORDS, gray_picture, with_vocab, write_png_bomb

METHOD = "rollout"      # float32-stable (see test_cli.py), so maps can be compared to the library's


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, vit_inputs):
    """The golden images 0..3 as lossless 8-bit PNGs."""
    folder = tmp_path_factory.mktemp("pictures")
    for i in range(4):
        Image.fromarray(vit_inputs["images_u8"][i].permute(1, 2, 0).numpy()).save(folder / f"golden{i}.png")
    return folder


@pytest.fixture(scope="module")
def library_map(vit_model, vit_inputs):
    """library_map(i, target=None): the library's rollout patch map of golden image i."""
    import relprop

    explainer = relprop.Explainer(vit_model)

    def compute(index: int, target=None) -> np.ndarray:
        pixels = vit_inputs["pixel_values"][index:index + 1]
        return explainer.explain(pixels, METHOD, target=target).as_grid()[0].numpy()
    return compute


def copy_picture(pictures, index: int, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(pictures / f"golden{index}.png") as image:
        image.save(path)         # the format follows the suffix; .png and .tif are lossless
    return path


def manifest_sources(out):
    return {name: entry["source"] for name, entry in json.loads((out / MANIFEST).read_text())["outputs"].items()}


# --- item 1: every input its own outputs, never another input's file replaced ------------------

def test_inputs_with_the_same_stem_get_their_own_outputs(tmp_path, vit_folder, pictures, library_map):
    a_png = copy_picture(pictures, 0, tmp_path / "a" / "img.png")
    b_png = copy_picture(pictures, 1, tmp_path / "b" / "img.png")
    a_tif = copy_picture(pictures, 2, tmp_path / "a" / "img.tif")
    result = run_relprop("explain", "a/img.png", "b/img.png", "a/img.tif", "./a/img.png", "--model", vit_folder,
                         "--method", METHOD, "--out", "o", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "o"
    labels = {a_png: "a_img.png", b_png: "b_img.png", a_tif: "img.tif"}
    npys = {path: sorted(out.glob(f"{label}_{METHOD}_class*.npy")) for path, label in labels.items()}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f.name for files in npys.values() for f in files] + [f.with_suffix(".png").name for files in npys.values()
                                                              for f in files] + [MANIFEST])
    for index, path in enumerate(labels):
        [npy] = npys[path]                           # one file per input: its own map, not a neighbour's
        assert np.allclose(np.load(npy), library_map(index), rtol=1e-5, atol=0), path
        assert manifest_sources(out)[npy.name] == str(path.resolve())
        assert f"{path.relative_to(tmp_path)}: LABEL_" in result.stdout and f"o/{labels[path]}_{METHOD}_class*" \
            in result.stdout
    assert "./a/img.png is the same file as a/img.png; explained once" in result.stderr
    assert "for 3 of 3 inputs" in result.stdout


def test_outputs_of_another_input_are_refused_unless_overwrite(tmp_path, vit_folder, pictures, library_map,
                                                               capsys):
    first = copy_picture(pictures, 0, tmp_path / "x" / "pic.png")
    second = copy_picture(pictures, 1, tmp_path / "y" / "pic.png")
    stranger = copy_picture(pictures, 2, tmp_path / "z" / "notes.png")
    good = copy_picture(pictures, 3, tmp_path / "z" / "good.png")
    out = tmp_path / "o"
    common = ["--model", str(vit_folder), "--method", METHOD, "--target", "9", "--out", str(out)]
    assert main(["explain", str(first), *common]) == 0                        # setup: x/pic.png's map
    pic_npy = out / f"pic_{METHOD}_class9_LABEL_9.npy"
    own_map = np.load(pic_npy)
    foreign = out / f"notes_{METHOD}_class9_LABEL_9.png"
    foreign.write_bytes(b"the user's own file")

    # rerunning the same command replaces its own outputs (here: a damaged copy)
    np.save(pic_npy, np.zeros_like(own_map))
    assert main(["explain", str(first), *common]) == 0
    assert np.array_equal(np.load(pic_npy), own_map)

    # another input with the same name, a file relprop did not write: refused; the rest is done
    result = run_relprop("explain", second, stranger, good, *common)
    stderr = assert_cli_error(result, 1, "2 of 3 inputs failed", "--overwrite")
    assert f"{pic_npy} already exists and holds the output for {first.resolve()}" in stderr
    assert f"{foreign} already exists and was not written by relprop" in stderr
    assert np.array_equal(np.load(pic_npy), own_map) and foreign.read_bytes() == b"the user's own file"
    assert np.allclose(np.load(out / f"good_{METHOD}_class9_LABEL_9.npy"),
                       library_map(3, 9), rtol=1e-5)

    # --overwrite replaces them, and the manifest records the new owners
    assert main(["explain", str(second), str(stranger), *common, "--overwrite"]) == 0
    assert np.allclose(np.load(pic_npy), library_map(1, 9), rtol=1e-5)
    assert foreign.read_bytes()[:4] == b"\x89PNG"
    sources = manifest_sources(out)
    assert sources[pic_npy.name] == str(second.resolve()) and sources[foreign.name] == str(stranger.resolve())


# --- item 2: 16-bit and float images reach the model as they look ------------------------------

def test_16bit_png_and_float_tiff_give_the_8bit_map(tmp_path, vit_folder, vit_inputs):
    gray = gray_picture(vit_inputs)
    Image.fromarray(gray).save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")            # mode I;16
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "gfloat.tif")        # mode F, in [0, 1]
    Image.fromarray(gray.astype(np.float32) * 4 - 100).save(tmp_path / "gwide.tif")     # mode F, beyond
    result = run_relprop("explain", "g8.png", "g16.png", "gfloat.tif", "gwide.tif", "--model", vit_folder,
                         "--method", METHOD, "--target", "3", "--out", "o", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    maps = {stem: np.load(tmp_path / "o" / f"{stem}_{METHOD}_class3_LABEL_3.npy")
            for stem in ("g8", "g16", "gfloat", "gwide")}
    assert np.allclose(maps["g16"], maps["g8"], rtol=1e-6, atol=0)
    assert np.allclose(maps["gfloat"], maps["g8"], rtol=1e-6, atol=0)
    span = f"[{int(gray.min()) * 4 - 100}, {int(gray.max()) * 4 - 100}]"
    assert f"gwide.tif: float pixels span {span}, not [0, 1]; scaled min-max" in result.stderr
    assert "g16.png" not in result.stderr and "gfloat.tif" not in result.stderr


# --- item 3: configuration that cannot be used is refused, defaults are announced --------------

def test_a_corrupt_preprocessor_config_is_refused(tmp_path_factory, tmp_path, pictures):
    # (an unknown image_processor_type: test_loading.py, in process)
    model = hf_folder(tmp_path_factory, "vit_small")
    (model / "preprocessor_config.json").write_text('{"image_processor_type": "ViTImageProcessor", "image_mean": [0.5')
    result = run_relprop("explain", pictures / "golden0.png", "--model", model, "--out", tmp_path / "o")
    assert_cli_error(result, 2, f"{model / 'preprocessor_config.json'} is not valid JSON",
                     "delete it to use the ViT defaults")
    assert not (tmp_path / "o").exists()


def test_a_folder_without_preprocessor_config_says_it_uses_defaults(tmp_path_factory, tmp_path, pictures,
                                                                    library_map):
    model = hf_folder(tmp_path_factory, "vit_small")
    result = run_relprop("explain", pictures / "golden0.png", "--model", model, "--method", METHOD,
                         "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {model} has no preprocessor_config.json; using the ViT defaults (resize to the "
                     "model's input size, scale to [0, 1], mean = std = 0.5)"]
    [npy] = (tmp_path / "o").glob("*.npy")
    assert np.allclose(np.load(npy), library_map(0), rtol=1e-5)        # the defaults are the golden ones


def test_explain_text_refuses_a_model_folder_without_tokenizer(bert_folder):
    # transformers 5 builds a tokenizer of special tokens only: every word [UNK], relevance 0, exit 0.
    # (A foreign tokenizer -- ids beyond the embedding, or plain words all unknown: test_loading.py.)
    result = run_relprop("explain-text", "a good film", "--model", bert_folder)
    assert_cli_error(result, 2, f"no tokenizer in '{bert_folder}'", "tokenizer.save_pretrained")
    assert result.stdout == ""


# --- item 5: one line instead of a traceback ---------------------------------------------------

def test_explain_on_a_text_classifier_names_explain_text(bert_folder, pictures, tmp_path):
    result = run_relprop("explain", pictures / "golden0.png", "--model", bert_folder, "--out", tmp_path / "o")
    assert_cli_error(result, 2, "is a text classifier (model type 'bert')",
                     f"relprop explain-text TEXT --model {bert_folder}")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_explain_text_on_an_image_classifier_names_explain(vit_folder):
    result = run_relprop("explain-text", "a good film", "--model", vit_folder)
    assert_cli_error(result, 2, "is an image classifier (model type 'vit')",
                     f"relprop explain IMAGE --model {vit_folder}")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["explain", "explain-text"])
def test_out_naming_a_file_is_a_usage_error(tmp_path_factory, tmp_path, vit_folder, pictures, command):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    if command == "explain":
        args = ["explain", pictures / "golden0.png", "--model", vit_folder]
    else:
        args = ["explain-text", "the movie was good", "--model", with_vocab(tmp_path_factory, PLAIN_WORDS)]
    result = run_relprop(*args, "--out", taken)
    assert_cli_error(result, 2, f"--out '{taken}' is a file, not a folder")
    assert taken.read_text() == "keep me"


def test_a_decompression_bomb_among_good_images(tmp_path, vit_folder, pictures):
    bomb = write_png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    result = run_relprop("explain", pictures / "golden0.png", bomb, pictures / "golden1.png", "--model", vit_folder,
                         "--out", tmp_path / "o")
    stderr = assert_cli_error(result, 1, f"cannot read image '{bomb}': refused as a possible decompression bomb",
                              "1 of 3 inputs failed")
    assert len([line for line in stderr.splitlines() if "bomb" in line]) == 2     # its error + the summary
    assert {p.name.split("_")[0] for p in (tmp_path / "o").glob("*.png")} == {"golden0", "golden1"}


# --- item 6: a Hub id offline fails at once -----------------------------------------------------

class _RefusingHub:
    """A loopback port that resets each connection at once, counting them: a network error that
    huggingface_hub retries (like a refused connection), so the retries can be counted."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
            connection.close()

    def close(self):
        self.server.close()
        self.thread.join(5)


def test_an_unreachable_hub_fails_at_once(tmp_path, pictures):
    hub = _RefusingHub()
    no_proxy = {name: "" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                      "all_proxy")}
    env = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "*", **no_proxy}
    try:
        started = time.monotonic()
        result = run_relprop("explain", pictures / "golden0.png", "--model", "someone/vit-model",
                             "--out", tmp_path / "o", env=env)
        seconds = time.monotonic() - started
    finally:
        hub.close()
    assert_cli_error(result, 2, "cannot load 'someone/vit-model'", f"the Hub at {hub.url} could not be reached",
                     "Offline? Pass a folder")
    assert hub.connections == 1, hub.connections        # transformers alone: 9 tries over ~25 s
    assert seconds < 20, seconds


def test_explain_batches_equal_one_by_one(tmp_path, vit_folder, pictures, library_map):
    # batches of 2 over 4 images: every map is still its own image's
    assert main(["explain", *[str(pictures / f"golden{i}.png") for i in range(4)], "--model", str(vit_folder),
                 "--method", METHOD, "--batch-size", "2", "--out", str(tmp_path / "o")]) == 0
    for i in range(4):
        [npy] = (tmp_path / "o").glob(f"golden{i}_*.npy")
        assert np.allclose(np.load(npy), library_map(i), rtol=1e-5)
