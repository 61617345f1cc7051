"""The explorer's fixtures: the bundled models loaded once per test process, a model whose label
names are HTML/script (the escaping tests), and a real server on a free port in a thread."""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest

EVIL_LABELS = {0: "<script>window.__pwned = 'label'</script>", 1: "<img src=x onerror=\"window.__pwned='img'\">",
               2: "plain"}


@pytest.fixture(scope="session")
def evil_model_dir(tmp_path_factory):
    """A tiny ViT saved with label names that would run script if put into a page as HTML."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, id2label=EVIL_LABELS,
                       label2id={v: k for k, v in EVIL_LABELS.items()})
    folder = tmp_path_factory.mktemp("evil-vit")
    ViTForImageClassification(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_set(evil_model_dir):
    from relprop.serve.models import BUNDLED, ModelSet

    return ModelSet.load(list(BUNDLED) + [str(evil_model_dir)])


@pytest.fixture(scope="session")
def client(model_set):
    from starlette.testclient import TestClient

    from relprop.serve.app import create_app

    with TestClient(create_app(model_set, max_upload_bytes=200_000, max_pixels=1_000_000)) as test_client:
        yield test_client


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image(seed: int = 0, side: int = 64) -> bytes:
    """A PNG: a bright rectangle (a seed-dependent place) on noise."""
    rng = np.random.default_rng(seed)
    image = (rng.random((side, side, 3)) * 60).astype(np.uint8)
    top, left = rng.integers(0, side // 2, size=2)
    image[top:top + side // 2, left:left + side // 3] = 230
    return png(image)


test_image.__test__ = False       # a helper, not a test


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes claiming a huge image: a 1x1 PNG with its header's size rewritten."""
    data = bytearray(png(np.zeros((1, 1, 3), np.uint8)))
    start = 8 + 8                          # signature, then the IHDR chunk's length and type
    data[start:start + 8] = struct.pack(">II", width, height)
    data[start + 13:start + 17] = struct.pack(">I", zlib.crc32(bytes(data[12:start + 13])))
    return bytes(data)


@pytest.fixture(scope="session")
def live_server(model_set):
    """The explorer on 127.0.0.1 (a free port) in a thread, as `relprop serve` runs it."""
    import uvicorn

    from relprop.serve.app import create_app
    from relprop.serve.cli import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(model_set, allowed_hosts=["127.0.0.1", "localhost"])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the explorer did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
