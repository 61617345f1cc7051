"""`relprop serve`'s routes through Starlette's TestClient: every route, the limits, bad files,
unknown names, the CSP header, escaping in the exported report, and two threads at once."""
from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest

pytest.importorskip("starlette", reason="relprop serve needs the serve extra (pip install 'relprop[serve]')")

from relprop.serve.views import DEFAULT_METHODS  # noqa: E402
from tests.conftest import needs_real_data  # noqa: E402
from tests.serve.conftest import EVIL_LABELS, bomb_png, png, test_image  # noqa: E402

IMAGE_MODEL, TEXT_MODEL, LM = "fmnist-vit", "minilm-sst2", "tiny-lm"


def upload(client, data: bytes, model: str = IMAGE_MODEL):
    return client.post(f"/api/{model}/upload", content=data, headers={"content-type": "application/octet-stream"})


@pytest.fixture(scope="module")
def image_id(client):
    response = upload(client, test_image(0))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def decoded(data_url: str) -> np.ndarray:
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_page_and_static_files_carry_the_csp(client):
    for path in ("/", "/static/app.js", "/static/style.css", "/api/models"):
        response = client.get(path)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "object-src 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    page = client.get("/").text
    assert "http://" not in page and "https://" not in page          # nothing from elsewhere
    script = client.get("/static/app.js").text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script


def test_models_lists_only_the_command_lines_models(client, evil_model_dir):
    info = client.get("/api/models").json()
    names = [m["name"] for m in info["models"]]
    assert names == [IMAGE_MODEL, TEXT_MODEL, LM, evil_model_dir.name]      # a folder by its last part only
    assert [m["kind"] for m in info["models"]] == ["image", "text", "generate", "image"]
    vit = info["models"][0]
    assert vit["blocks"] == 6 and vit["heads"] == 4 and vit["labels"][9] == "Ankle boot"
    import relprop
    assert info["methods"] == relprop.methods() and set(info["default_methods"]) <= set(info["methods"])


def test_unknown_model_is_404_with_a_message_and_no_path_is_loaded(client, tmp_path):
    for name in ("nope", str(tmp_path), "..%2F..%2Fetc"):
        response = client.post(f"/api/{name}/explain", json={"text": "x", "methods": ["rollout"]})
        assert response.status_code == 404
        assert "no model" in response.json()["error"] or response.json()["error"] == "not found"
    response = client.post("/api/fmnist_vi/explain", json={})
    assert response.status_code == 404 and "fmnist-vit" in response.json()["error"]       # did you mean


def test_upload_explain_and_class_switch(client, image_id):
    first = client.post(f"/api/{IMAGE_MODEL}/explain", json={"image": image_id, "methods": ["transformer_attribution"]})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["target"] == body["classes"][0]["index"]               # the prediction by default
    assert abs(sum(c["probability"] for c in body["classes"]) - 1) < 0.5
    (entry,) = body["maps"]
    grid = np.array(entry["grid"], dtype=float)
    assert grid.shape == (8, 8) and np.isfinite(grid).all() and grid.max() > grid.min()
    overlay = decoded(entry["overlay"])
    assert overlay.shape[:2] == (192, 192) and overlay.std() > 5        # a drawn map, not blank
    other = body["classes"][1]["index"]
    second = client.post(f"/api/{IMAGE_MODEL}/explain",
                         json={"image": image_id, "methods": ["transformer_attribution"], "target": other}).json()
    assert second["target"] == other
    assert not np.allclose(np.array(second["maps"][0]["grid"], dtype=float), grid)    # another class, another map


def test_methods_side_by_side_matches_the_library(client, image_id, model_set):
    import torch

    body = client.post(f"/api/{IMAGE_MODEL}/explain", json={"image": image_id, "methods": list(DEFAULT_METHODS)}).json()
    assert [m["method"] for m in body["maps"]] == list(DEFAULT_METHODS)
    served = model_set.get(IMAGE_MODEL)
    from relprop.serve.views import decode_image, prepare_image
    pixels = prepare_image(served, decode_image(test_image(0), 10**6)).pixels
    for entry in body["maps"]:
        expected = served.explainer.explain(pixels, entry["method"], target=body["target"]).as_grid()[0]
        # float32 rounding: explain alone streams transformer_attribution (A recomputed on the fused
        # SDPA path), explain_many keeps every block's A for all methods (3e-5 of the map's peak here)
        torch.testing.assert_close(torch.tensor(entry["grid"], dtype=torch.float64), expected.double(),
                                   rtol=1e-5, atol=1e-4 * float(expected.abs().max()))


def test_bad_requests_are_json_errors(client, image_id):
    cases = [
        ({"image": image_id, "methods": ["nope"]}, "unknown method"),
        ({"image": image_id, "methods": []}, "at least one method"),
        ({"image": "stale-id", "methods": ["rollout"]}, "upload or pick it again"),
        ({"image": image_id, "methods": ["rollout"], "target": 99}, "class must be"),
        ({"image": image_id, "methods": ["rollout"], "target": "1"}, "class must be"),
    ]
    for payload, message in cases:
        response = client.post(f"/api/{IMAGE_MODEL}/explain", json=payload)
        assert response.status_code == 400 and message in response.json()["error"], (payload, response.text)
    response = client.post(f"/api/{IMAGE_MODEL}/explain", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]
    assert client.get("/api/nothing-here").status_code == 404
    assert client.get("/static/../pyproject.toml").status_code == 404


def test_upload_limits_and_bad_files(client):
    too_big = upload(client, b"\x89PNG" + b"\0" * 300_000)                  # over the 200 kB limit of this app
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    bomb = upload(client, bomb_png())
    assert bomb.status_code == 413 and "decompression bomb" in bomb.json()["error"]
    many = upload(client, png(np.zeros((1200, 1000, 3), np.uint8)))         # 1.2 MP > the 1 MP limit of this app
    assert many.status_code == 413 and "1,200,000 pixels" in many.json()["error"]
    for data in (b"", b"not an image at all", test_image(0)[:60]):
        bad = upload(client, data)
        assert bad.status_code == 400 and bad.json()["error"], data[:10]
    assert upload(client, b"text", TEXT_MODEL).status_code == 400
    assert client.get("/api/models").status_code == 200                       # still serving
    assert upload(client, test_image(1)).status_code == 200


def test_high_bit_depth_and_gray_uploads_are_read(client):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(buffer, format="PNG")
    for data in (buffer.getvalue(), png(np.full((40, 30), 128, np.uint8))):
        assert upload(client, data).status_code == 200


def test_canvases(client, monkeypatch, tmp_path):
    listing = client.get("/api/canvases").json()
    assert len(listing["canvases"]) == 12
    picked = client.post(f"/api/{IMAGE_MODEL}/canvas/3")
    assert picked.status_code == 200 and picked.json()["classes"]
    assert client.post(f"/api/{IMAGE_MODEL}/canvas/12").status_code == 400
    monkeypatch.setenv("RELPROP_FASHION_MNIST", str(tmp_path))          # no data there: the bundled copies
    bundled = client.get("/api/canvases").json()
    assert [c["label"] for c in bundled["canvases"]] == [c["label"] for c in listing["canvases"]]
    assert "bundled" in bundled["note"]
    again = client.post(f"/api/{IMAGE_MODEL}/canvas/3").json()
    if listing["note"] is None:                                           # Fashion-MNIST installed: the same canvas
        assert again["classes"] == picked.json()["classes"] and again["image"] == picked.json()["image"]


@needs_real_data
def test_bundled_canvases_are_the_test_canvases():
    from relprop.datasets import make_canvas
    from relprop.serve.export import BUNDLED_CANVASES, canvas_list
    from PIL import Image

    for index, entry in enumerate(canvas_list(12)["canvases"]):
        with Image.open(BUNDLED_CANVASES / f"{index:02d}.png") as bundled:
            assert np.array_equal(np.asarray(bundled.convert("RGB")), make_canvas("test", index)[0]), index


def test_inside_view(client, image_id):
    def inside(**given):
        payload = {"image": image_id, "method": "transformer_attribution", "block": 5, "head": "mean", "row": 0}
        return client.post(f"/api/{IMAGE_MODEL}/inside", json={**payload, **given})

    body = inside().json()
    assert body["blocks"] == 6 and body["heads"] == 4 and body["tokens"] == 65 and body["grid"] == [8, 8]
    assert [p["name"] for p in body["panels"]] == ["A", "∇A", "R_A", "Ā"]
    for panel in body["panels"]:
        assert len(panel["row"]) == 65 and decoded(panel["overlay"]).std() > 1 and decoded(panel["matrix"]).size
    attention = np.array(body["panels"][0]["row"])
    assert attention.min() >= 0 and abs(attention.sum() - 1) < 1e-5          # a row of softmax probabilities
    lower = inside(block=2).json()
    assert lower["panels"][0]["row"] != body["panels"][0]["row"]
    head = inside(head=1, row=10).json()
    assert head["row"] == 10 and head["panels"][0]["row"] != body["panels"][0]["row"]
    framed = decoded(head["panels"][0]["overlay"])          # token 10 = patch 9 = grid cell (1, 1), 24 px each
    assert (framed[24:48, 24] == 255).all() and (framed[24, 24:48] == 255).all()
    assert not (decoded(body["panels"][0]["overlay"])[24:48, 24] == 255).all()        # the [CLS] row: no frame
    rollout = inside(method="rollout").json()              # rollout reads A only
    assert "missing" in rollout["panels"][1] and "missing" in rollout["panels"][3]
    gradient = inside(method="attnlrp").json()             # no per-block tensors: the paper's method's shown
    assert gradient["method"] == "transformer_attribution" and "attnlrp" in gradient["note"]
    for bad in ({"block": 6}, {"block": -1}, {"head": 4}, {"head": "all"}, {"row": 65}, {"block": True}):
        response = inside(**bad)
        assert response.status_code == 400, bad


def test_whatif(client, image_id):
    def whatif(**given):
        payload = {"image": image_id, "method": "transformer_attribution", "percent": 30, "mode": "top"}
        return client.post(f"/api/{IMAGE_MODEL}/whatif", json={**payload, **given})

    top = whatif().json()
    assert [p["percent"] for p in top["curve"]] == [0, 5, 10, 15, 20, 25, 30]
    assert decoded(top["image"]).shape[:2] == (192, 192)
    clean = top["curve"][0]
    assert clean["percent"] == 0 and clean["predicted"] == top["target"]
    nothing = whatif(percent=0).json()
    assert len(nothing["curve"]) == 1 and nothing["curve"][0] == clean
    bottom = whatif(mode="bottom").json()
    assert bottom["curve"][-1]["target_probability"] != top["curve"][-1]["target_probability"]
    for bad in ({"percent": 100}, {"percent": 12.5}, {"mode": "middle"}):
        assert whatif(**bad).status_code == 400, bad


def test_whatif_removes_what_the_library_ranks_first(client, image_id, model_set):
    """The 30 % step equals the paper's perturbation test on this image, computed with relprop.eval."""
    import torch

    from relprop.eval.images import Normalization
    from relprop.eval.perturbation import PerturbationConfig, ranking_scores, removal_masks
    from relprop.serve.views import decode_image, prepare_image

    served = model_set.get(IMAGE_MODEL)
    stored = prepare_image(served, decode_image(test_image(0), 10**6))
    body = client.post(f"/api/{IMAGE_MODEL}/whatif", json={"image": image_id, "method": "rollout", "percent": 30,
                                                           "mode": "top"}).json()
    config = PerturbationConfig(image_size=(64, 64), rank="patch", patch_size=8)
    result = served.explainer.explain(stored.pixels, "rollout", target=body["target"])
    mask = removal_masks(ranking_scores(result, config), [0.3], False, (64, 64))[0, 0]
    assert int(mask.sum()) == int(64 * 0.3) * 64                   # 19 of 64 patches
    perturbed = torch.where(mask, torch.zeros(()), stored.unit)
    probs = served.explainer.logits(Normalization()(perturbed)).double().softmax(-1)[0]
    assert body["curve"][-1]["target_probability"] == pytest.approx(float(probs[body["target"]]), rel=1e-6)


def test_text_routes(client, model_set):
    from relprop.text.explain import explain_text

    text = "A gorgeous, witty and deeply moving film <script>alert(1)</script>."
    body = client.post(f"/api/{TEXT_MODEL}/explain", json={"text": text, "methods": ["transformer_attribution", "attnlrp"]})
    assert body.status_code == 200, body.text
    body = body.json()
    assert body["text"] == text and body["label"] in ("positive", "negative")
    words = body["maps"][0]["words"]
    assert [text[w["start"]:w["end"]] for w in words] == [w["text"] for w in words]
    served = model_set.get(TEXT_MODEL)
    for entry in body["maps"]:                     # as the library's explain_text scores them
        (library,) = explain_text(served.explainer, served.tokenizer, text, entry["method"], target=body["target"])
        assert [(w["text"], w["start"]) for w in entry["words"]] == [(w.text, w.start) for w in library.words]
        np.testing.assert_allclose([w["relevance"] for w in entry["words"]], [w.relevance for w in library.words],
                                   rtol=1e-6, atol=1e-9)
    assert "gorgeous" in [w["text"] for w in words]
    negative = client.post(f"/api/{TEXT_MODEL}/explain", json={"text": text, "methods": ["transformer_attribution"],
                                                             "target": 1 - body["target"]}).json()
    assert negative["maps"][0]["words"] != words
    inside = client.post(f"/api/{TEXT_MODEL}/inside", json={"text": text, "method": "transformer_attribution",
                                                          "block": 3, "head": 2, "row": 1}).json()
    assert inside["token_names"][0] == "[CLS]" and len(inside["panels"][0]["row"]) == inside["tokens"]
    assert "overlay" not in inside["panels"][0]
    whatif = client.post(f"/api/{TEXT_MODEL}/whatif", json={"text": text, "method": "transformer_attribution",
                                                          "percent": 50, "mode": "top"}).json()
    assert whatif["curve"][0]["percent"] == 0 and whatif["curve"][-1]["percent"] == 50
    assert "gorgeous" not in whatif["kept_text"] and len(whatif["kept_text"]) < len(text)
    for payload in ({"text": "", "methods": ["rollout"]}, {"text": "x" * 6000, "methods": ["rollout"]},
                    {"text": 3, "methods": ["rollout"]}):
        assert client.post(f"/api/{TEXT_MODEL}/explain", json=payload).status_code in (400, 413)


def test_generation_view(client):
    response = client.post(f"/api/{LM}/explain", json={"text": "the movie is", "method": "attnlrp", "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    generated = len(body["generated_tokens"])
    assert 1 <= generated <= 4 and len(body["matrix"]) == generated
    prompt = len(body["prompt_tokens"])
    assert all(row[prompt + t] is None if prompt + t < len(row) else True for t, row in enumerate(body["matrix"]))
    assert client.post(f"/api/{LM}/explain", json={"text": "x", "max_new_tokens": 500}).status_code == 400
    assert client.post(f"/api/{LM}/inside", json={"text": "x"}).status_code == 400
    assert upload(client, test_image(0), LM).status_code == 400


def test_exports(client, image_id):
    payload = {"image": image_id, "method": "rollout", "methods": ["rollout", "lrp"], "target": 2,
               "inside": {"method": "rollout", "block": 1, "head": 0, "row": 3},
               "whatif": {"method": "rollout", "percent": 20, "mode": "bottom"}}
    got = {}
    for kind in ("png", "npy", "json", "html"):
        response = client.post(f"/api/{IMAGE_MODEL}/export/{kind}", json=payload)
        assert response.status_code == 200, (kind, response.text)
        assert "attachment" in response.headers["content-disposition"]
        got[kind] = response.content
    assert got["png"].startswith(b"\x89PNG")
    array = np.load(io.BytesIO(got["npy"]))
    record = json.loads(got["json"])
    assert array.shape == (8, 8) and record["method"] == "rollout" and record["target"] == 2
    np.testing.assert_allclose(array, np.array(record["grid"], dtype=float))
    report = got["html"].decode()
    assert report.startswith("<!DOCTYPE html>") and "<script" not in report.lower()
    assert "rollout" in report and "lrp" in report and "what-if" in report and "inside" in report
    assert "src=\"http" not in report                                       # self-contained
    text = client.post(f"/api/{TEXT_MODEL}/export/json", json={"text": "fine film", "method": "rollout"}).json()
    assert [w["text"] for w in text["words"]] == ["fine", "film"]
    assert client.post(f"/api/{TEXT_MODEL}/export/png", json={"text": "fine", "method": "rollout"}).status_code == 400
    assert client.post(f"/api/{IMAGE_MODEL}/export/exe", json=payload).status_code == 400


def test_label_names_are_escaped_in_the_report(client, evil_model_dir):
    route = f"/api/{evil_model_dir.name}"
    uploaded = client.post(route + "/upload", content=test_image(2, side=16))
    assert uploaded.status_code == 200, uploaded.text
    labels = {c["label"] for c in uploaded.json()["classes"]}
    assert labels == set(EVIL_LABELS.values())                     # JSON carries them as data
    html = client.post(route + "/export/html", json={"image": uploaded.json()["id"], "methods": ["rollout"],
                                                     "target": 0}).text
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__pwned" in html


def test_text_is_escaped_in_the_report(client):
    html = client.post(f"/api/{TEXT_MODEL}/export/html",
                       json={"text": "good <script>alert(1)</script> <img src=x onerror=alert(2)>",
                             "methods": ["rollout"], "whatif": {"method": "rollout", "percent": 10}}).text
    assert "<script" not in html.lower() and "<img" not in html and "&lt;" in html


def test_two_threads_get_their_own_results(client):
    """Two 'tabs' explaining different images and classes at once each get their own map."""
    ids = [upload(client, test_image(seed)).json()["id"] for seed in (3, 4)]
    requests = [({"image": ids[0], "methods": ["transformer_attribution"], "target": 1}, IMAGE_MODEL),
                ({"image": ids[1], "methods": ["transformer_attribution"], "target": 7}, IMAGE_MODEL),
                ({"text": "a dull, lifeless film", "methods": ["transformer_attribution"]}, TEXT_MODEL)]
    def explained(payload, model):
        body = client.post(f"/api/{model}/explain", json=payload).json()
        del body["seconds"]                        # timing: the only field that may differ
        return body

    expected = [explained(payload, model) for payload, model in requests]
    assert expected[0]["maps"][0]["grid"] != expected[1]["maps"][0]["grid"]
    results: dict[int, list] = {0: [], 1: [], 2: []}

    def tab(index: int) -> None:
        payload, model = requests[index]
        for _ in range(2):
            results[index].append(explained(payload, model))

    threads = [threading.Thread(target=tab, args=(i,)) for i in (0, 1, 2, 0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, answers in results.items():
        assert answers and all(answer == expected[index] for answer in answers), index


def test_host_header_is_checked_on_loopback(model_set):
    from starlette.testclient import TestClient

    from relprop.serve.app import create_app

    with TestClient(create_app(model_set, allowed_hosts=["127.0.0.1", "localhost"]),
                    base_url="http://127.0.0.1:8000") as local:
        assert local.get("/api/models").status_code == 200
        assert local.get("/api/models", headers={"host": "evil.example:8000"}).status_code == 400


def test_cli(monkeypatch, capsys, tmp_path):
    import uvicorn

    from relprop.cli import main
    from relprop.serve.cli import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "neither a bundled model" in capsys.readouterr().err
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: started.append(sockets[0].getsockname()))
    assert main(["serve", "--model", "fmnist_vit", "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and f"http://0.0.0.0:{started[0][1]}/" in err
    assert main(["serve", "--model", "fmnist-vit", "--port", "0"]) == 0
    assert "warning" not in capsys.readouterr().err and started[1][0] == "127.0.0.1"


def test_block_and_head_counts_for_the_page():
    import transformers as tf

    from relprop.serve.models import _blocks_and_heads

    assert _blocks_and_heads(tf.SwinConfig(depths=[2, 2, 6], num_heads=[2, 4, 8])) == (10, 8)   # stages of blocks
    assert _blocks_and_heads(tf.ViTConfig(num_hidden_layers=3, num_attention_heads=6)) == (3, 6)
    assert _blocks_and_heads(tf.GPT2Config(n_layer=2, n_head=4)) == (2, 4)
