"""Model, tokenizer, preprocessing and image loading (in process; the command-line behaviour
is in test_cli_explain.py)."""
from __future__ import annotations

import json
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relprop.cli import main, output_labels, positive_int
from relprop.errors import InputError, ModelLoadError
from relprop.loading import ImagePreprocessor, load_image_classifier, load_text_classifier, read_image
from relprop.eval.loading import read_preprocessor_config
from tests.conftest import assert_cli_error, hf_folder, run_relprop_many

PLAIN_WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] the a movie film was good bad and i liked it , . : / 1 0 10".split()


def gray_picture(vit_inputs) -> np.ndarray:
    """An 8-bit grey picture with a full range of values (golden image 0)."""
    rgb = vit_inputs["images_u8"][0].permute(1, 2, 0).numpy()
    return np.asarray(Image.fromarray(rgb).convert("L"))


def write_pgm(path: Path, values: np.ndarray, maxval: int) -> Path:
    path.write_bytes(f"P5 {values.shape[1]} {values.shape[0]} {maxval}\n".encode() + values.astype(">u2").tobytes())
    return path


def write_png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of side x side pixels (400 M for 20000, over Pillow's bomb limit) in ~50 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + side // 8)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# --- images beyond 8 bits (item 2) -------------------------------------------------------------

def test_high_bit_depth_and_float_images_read_as_the_8bit_picture(tmp_path, vit_inputs):
    gray = gray_picture(vit_inputs)
    expected = np.asarray(Image.fromarray(gray).convert("RGB"))
    wide = gray.astype(np.uint16) * 257                                   # 8 -> 16 bit, exactly
    files = {"I;16": tmp_path / "g16.png", "I;16B": tmp_path / "g16b.tif", "F": tmp_path / "gf.tif"}
    Image.fromarray(wide).save(files["I;16"])
    Image.fromarray(wide.astype(">u2")).save(files["I;16B"])
    Image.fromarray(gray.astype(np.float32) / 255).save(files["F"])
    files["I"] = write_pgm(tmp_path / "g16.pgm", wide, 65535)            # Pillow: mode I
    files["I (12-bit PGM)"] = write_pgm(tmp_path / "g12.pgm", np.round(gray / 255 * 4095), 4095)
    notes = []
    for mode, path in files.items():
        with Image.open(path) as raw:
            assert raw.mode == mode.split(" ")[0], (mode, raw.mode)
            clipped = np.asarray(raw.convert("RGB"))                          # what relprop used to feed
        image = read_image(path, note=notes.append)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected), mode
        assert not np.array_equal(clipped, expected), mode                      # the bug this replaces
    assert notes == []


@pytest.mark.parametrize("mode", ["F", "I"])
def test_out_of_range_images_are_min_max_scaled_with_a_note(tmp_path, vit_inputs, mode):
    gray = gray_picture(vit_inputs).astype(np.float64)
    values = gray * 1000 - 5000 if mode == "F" else gray * 65536 * 4          # beyond [0, 1] / 16 bits
    path = tmp_path / "wide.tif"
    Image.fromarray(values.astype(np.float32 if mode == "F" else np.int32)).save(path)
    notes = []
    image = np.asarray(read_image(path, note=notes.append))[..., 0].astype(float)
    scaled = (gray - gray.min()) / (gray.max() - gray.min()) * 255
    assert np.abs(image - scaled).max() <= 0.5 + 1e-9
    assert len(notes) == 1 and "min-max" in notes[0] and "wide.tif" in notes[0]


def test_unreadable_images_are_input_errors(tmp_path):
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(nan)
    with pytest.raises(InputError, match="NaN"):
        read_image(nan)
    with pytest.raises(InputError, match="decompression bomb"):
        read_image(write_png_bomb(tmp_path / "bomb.png"))
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read image"):
        read_image(tmp_path / "junk.png")


# --- output names (item 1) ---------------------------------------------------------------------

def test_output_labels_are_stems_when_unique_then_longer_as_needed():
    root = Path("/data")
    assert output_labels([root / "a/img0.png", root / "a/img1.png"]) == ["img0", "img1"]
    paths = [root / "a/img.png", root / "b/img.png", root / "a/img.jpg", root / "c/Img.JPG", root / "c/x.png"]
    assert output_labels(paths) == ["a_img.png", "b_img.png", "a_img.jpg", "c_Img.JPG", "x"]
    # the same set in another order gets the same labels
    assert output_labels(paths[::-1]) == ["x", "c_Img.JPG", "a_img.jpg", "b_img.png", "a_img.png"]
    # names equal up to case at every level (distinct on Linux, one file on macOS): numbered
    assert output_labels([Path("/A/img.png"), Path("/a/img.png")]) == ["A_img.png-1", "a_img.png-2"]


# --- arguments (item 4) ------------------------------------------------------------------------

def test_counts_below_one_are_one_line_usage_errors(tmp_path):
    cases = [("--top-k", "0"), ("--top-k", "-2"), ("--batch-size", "-1"), ("--batch-size", "0"),
             ("--batch-size", "two")]
    results = run_relprop_many([["explain", "x.png", "--model", "m", option, value, "--out", tmp_path / "o"]
                                for option, value in cases])
    for (option, value), result in zip(cases, results):
        err = assert_cli_error(result, 2, f"argument {option}: expected a positive integer, got '{value}'",
                               "--help")
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_positive_int_accepts_counts():
    assert positive_int("1") == 1 and positive_int("12") == 12


def test_replacement_value_is_a_unit_number_or_blur():
    import argparse

    from relprop.cli import replacement_value

    assert replacement_value("blur") == "blur" and replacement_value("0") == 0.0 and replacement_value("1") == 1.0
    assert replacement_value("0.5") == 0.5
    for value in ("nan", "inf", "-0.1", "1.5", "Blur", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"or 'blur', got {value!r}"):
            replacement_value(value)


# --- models of the wrong kind, tokenizers (items 3 and 5) -------------------------------------

def test_a_model_type_of_neither_kind_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(ModelLoadError, match="model type 'wav2vec2', which is not an image classifier"):
        load_image_classifier(str(tmp_path))
    with pytest.raises(ModelLoadError, match="model type 'wav2vec2', which is not a text classifier"):
        load_text_classifier(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_image_classifier(str(tmp_path))


def with_vocab(tmp_path_factory, words) -> Path:
    folder = hf_folder(tmp_path_factory, "bert_small")
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused(tmp_path_factory):
    extra = [f"word{i}" for i in range(250)]                                  # the model has 200 rows
    with pytest.raises(ModelLoadError, match=r"ids up to 2\d\d, but the model's embedding has 200 rows"):
        load_text_classifier(str(with_vocab(tmp_path_factory, PLAIN_WORDS + extra)))


def test_a_tokenizer_that_knows_no_plain_word_is_refused(tmp_path_factory):
    folder = with_vocab(tmp_path_factory, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zzq", "qxj"])
    with pytest.raises(ModelLoadError, match=r"maps plain words, digits and punctuation all to \[UNK\]"):
        load_text_classifier(str(folder))


def test_a_matching_tokenizer_loads_and_knows_plain_words(tmp_path_factory):
    model, tokenizer = load_text_classifier(str(with_vocab(tmp_path_factory, PLAIN_WORDS)))
    ids = tokenizer("the movie was good", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and not model.training


def test_an_unknown_image_processor_type_is_refused(tmp_path_factory, vit_model):
    folder = hf_folder(tmp_path_factory, "vit_small")
    file = folder / "preprocessor_config.json"
    file.write_text('{"image_processor_type": "ViTImageProcesor", "image_mean": [0.1, 0.1, 0.1]}')
    with pytest.raises(ModelLoadError, match=f"cannot use {re.escape(str(file))}: unknown image_processor_type "
                                             "'ViTImageProcesor'"):
        ImagePreprocessor.for_model(str(folder), vit_model)
    with pytest.raises(ModelLoadError, match="unknown image_processor_type 'ViTImageProcesor'"):
        read_preprocessor_config(str(folder))       # the benchmarks read it through the same check
    file.write_text('{"image_processor_type": "ViTImageProcessor", "image_mean": [0.1, 0.1, 0.1]}')
    assert ImagePreprocessor.for_model(str(folder), vit_model).mean == [0.1, 0.1, 0.1]
    assert read_preprocessor_config(str(folder))["image_mean"] == [0.1, 0.1, 0.1]


# --- optional sub-commands (item 7) ------------------------------------------------------------

def test_a_missing_optional_package_hides_its_command_and_help_says_so(tmp_path, monkeypatch, capsys):
    import relprop.cli

    (tmp_path / "relprop_test_optional_ext.py").write_text("import relprop_test_missing_package\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(relprop.cli, "EXTENSIONS", relprop.cli.EXTENSIONS + ("relprop_test_optional_ext",))
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "explain-text" in out
    assert "relprop_test_optional_ext" in out and "'relprop_test_missing_package'" in out


def test_an_import_error_inside_relprop_is_not_hidden(tmp_path, monkeypatch, capsys):
    import relprop.cli

    (tmp_path / "relprop_test_broken_ext.py").write_text("from relprop import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(relprop.cli, "EXTENSIONS", relprop.cli.EXTENSIONS + ("relprop_test_broken_ext",))
    monkeypatch.delenv("RELPROP_DEBUG", raising=False)
    monkeypatch.delitem(sys.modules, "relprop_test_broken_ext", raising=False)
    assert main(["explain-text", "x"]) == 1
    err = capsys.readouterr().err
    assert "internal error: ImportError" in err and "no_such_name" in err
