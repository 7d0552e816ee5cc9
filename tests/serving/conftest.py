"""Fixtures for the Serve app tests: artifact roots, a model whose codes rank by class, a running app.
The tiny exported students and the real-image index are the whole run's (tests/conftest.py)."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import free_port

@pytest.fixture(scope="module")
def one_faiss_thread():
    """Tiny searches gain nothing from OpenMP, and its spinning threads crawl on a busy 2-core machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture
def local_root(tmp_path):
    """An empty artifact root in a folder."""
    from serving.storage import open_root

    return open_root(tmp_path / "artifacts")


@pytest.fixture
def s3_root(s3_endpoint):
    """An empty artifact root under a fresh prefix of the loopback S3 endpoint."""
    import uuid

    from serving.storage import open_root

    return open_root(f"s3://terrahash-test/{uuid.uuid4().hex}", endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def ranking_model_dir(tmp_path_factory, tiny_text_encoder, ucm_many):
    """A model version folder whose image codes rank by class: the packaged ImageNet EfficientNet-Lite0
    (128 px) with a PCA hashing head fitted on ``ucm_many``'s train images (probe mAP@10 of val images
    about 0.7 where the random students sit at chance), and the tiny text student. For checks that need
    a model better than garbage, such as a rollback on probe mAP."""
    pytest.importorskip("onnxruntime")
    import torch

    from serving.model.encoders import preprocess_images
    from tests.training.test_export import tiny_students
    from serving.ingest.dataset import load_dataset
    from training.export import export_image_student, export_text_student
    from training.students import ImageStudent, ImageStudentConfig

    bits = 32
    config = ImageStudentConfig(backbone="tf_efficientnet_lite0", image_size=128, pool_levels=(), head_hidden=(),
                                dropout=0.0)
    image = ImageStudent(config, bits).eval()
    train = [str(r.path) for r in load_dataset(ucm_many).split("train")]
    pixels = torch.as_tensor(preprocess_images(train, config.image_size, config.mean, config.std))
    with torch.no_grad():
        features = image.encoder(pixels).double()  # (N, D)
        mean = features.mean(dim=0)
        components = torch.linalg.svd(features - mean, full_matrices=False).Vh[:bits]  # (bits, D)
        image.head.mlp[-1].weight.copy_(components.float())
        image.head.mlp[-1].bias.copy_(-(components @ mean).float())
    _, text, tokenizer = tiny_students(tiny_text_encoder, bits=bits)
    out = tmp_path_factory.mktemp("ranking_model") / "onnx"
    export_image_student(image, out, pixels[:4].numpy())
    export_text_student(text, tokenizer, out)
    return out


def wait_http(url: str, timeout: float = 60.0, status: int = 200) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == status:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer {status} within {timeout} s")
        time.sleep(0.2)


def running_app(index_root, cache_dir, jscc_model=None, code_link_model=None):
    """Start the app over ``index_root`` on the session's local Ray, over HTTP on a free loopback port
    (decoding radio-link symbols with the exported pixel link ``jscc_model`` and the learned code links
    ``code_link_model`` when given); yields its base URL, then shuts Serve down."""
    from ray import serve

    from serving.app import ServeSettings, run_apps

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(index=str(index_root), shard_replicas=1, spread_shards=False, shards_per_replica=3,
                             shard_num_cpus=0.05, encoder_num_cpus=0.1, router_num_cpus=0.05,
                             max_upload_bytes=200_000, max_image_pixels=1_000_000, max_query_chars=200, max_k=50,
                             shard_cache_dir=str(cache_dir), jscc_model=str(jscc_model) if jscc_model else None,
                             code_link_model=str(code_link_model) if code_link_model else None)
    run_apps(settings)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/readyz")
    yield url
    serve.shutdown()


@pytest.fixture(scope="session")
def jscc_link(tmp_path_factory):
    """A tiny random 2-hop DeepJSCC link (32 px, SNR-conditioned) exported as the query path reads it."""
    import torch

    from training.jscc import DecodeForward
    from training.jscc_export import export_link

    torch.manual_seed(0)
    link = DecodeForward(hops=2, c_out=4, width=8, snr_conditioning=True).eval()
    record = {"config": {"image_size": 32, "c_out": 4, "snr_conditioning": True, "snr_train_db": [-15.0, -5.0]},
              "model": "aligned", "snr_db": None}
    folder = tmp_path_factory.mktemp("jscc_link")
    export_link(link, record, folder)
    return {"folder": folder, "link": link}


@pytest.fixture(scope="session")
def code_links(model_dir, tmp_path_factory):
    """Tiny random learned code links (8 and 32 channel uses) for ``model_dir``'s codes, exported as
    `terrahash jscc train` writes them (OUT/code/n<uses>/), with that student's code space."""
    import torch

    from serving.model.field import student_code_space, student_spec
    from training.code_link import CodeLink, CodeLinkConfig, export_codec

    spec = student_spec(model_dir)
    bits = json.loads(spec.read_text())["bits"]
    folder = tmp_path_factory.mktemp("code_links")
    torch.manual_seed(0)
    for n in (8, 32):
        export_codec(CodeLink(bits, n, hidden=16).eval(), CodeLinkConfig(uses=(8, 32)), folder / f"n{n}",
                     {"code_space": student_code_space(spec)})
    return folder


@pytest.fixture(scope="module")
def serve_app(local_ray, built_index, jscc_link, code_links, tmp_path_factory):
    """The app over ``built_index``, decoding radio-link symbols with ``jscc_link`` and ``code_links``;
    yields its base URL."""
    yield from running_app(built_index["root"], tmp_path_factory.mktemp("shard_cache"), jscc_link["folder"],
                           code_links)
