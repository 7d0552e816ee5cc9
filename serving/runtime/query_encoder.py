"""The query encoder deployment: a model version's ONNX image and text students, batched across requests."""
import asyncio

import numpy as np
from ray import serve

from serving.runtime.local import described, model_card


DEFAULT_MODEL_CACHE = "/tmp/terrahash/models"


def load_model(model: str | None, index: str | None, release: str | None, variant: str,
               tracking_uri: str | None = None, cache_dir: str = DEFAULT_MODEL_CACHE) -> dict:
    """Fetch a model version onto this node and find its specs: ``model`` (models:/NAME/VERSION,
    models:/NAME@ALIAS or a folder), or with None the one the index release was built with.
    Returns {"model", "folder", "image_spec", "text_spec", "model_version", "code_space", "bits", "image_size"}."""
    from serving.model.versions import find_spec, model_code_space, model_version_label, served_model
    from serving.model.registry import fetch_model, parse_model_uri, resolve_model
    from serving.model.spec import load_spec

    if model is None:
        from serving.index.releases import resolve_release

        if not index:
            raise ValueError("no model given, and no index whose release names one")
        model = served_model(resolve_release(index, release), index)
        if not model:
            raise ValueError(f"release {release or 'latest'} of {index} records no model; give one")
    registered = None
    if parse_model_uri(model) is not None:  # pin an alias to the version it names now
        ref = resolve_model(model, tracking_uri)
        registered = {"name": ref.name, "version": str(ref.version)}
        model = ref
    folder = fetch_model(model, cache_dir=cache_dir, tracking_uri=tracking_uri)
    image_spec, text_spec = find_spec(folder, "image", variant), find_spec(folder, "text", variant)
    spec = load_spec(image_spec)
    return {"model": registered and f"models:/{registered['name']}/{registered['version']}" or str(model),
            "registered": registered, "variant": variant, "folder": str(folder), "image_spec": str(image_spec), "text_spec": str(text_spec),
            "model_version": model_version_label(folder, image_spec),
            "code_space": model_code_space(folder, image_spec), "bits": spec.bits, "image_size": spec.image["size"]}


@serve.deployment(max_ongoing_requests=64)
class QueryEncoder:
    """The text and image students of one model version, batched across concurrent requests."""

    def __init__(self, config: dict):
        """``config``: model, index, release, variant, threads, load_text (off when the router encodes
        text itself), tracking_uri, cache_dir."""
        from serving.model.encoders import ImageEncoder, TextEncoder

        self.loaded = load_model(config.get("model"), config.get("index"), config.get("release"),
                                 config.get("variant", "fp32"), config.get("tracking_uri"),
                                 config.get("cache_dir", "/tmp/terrahash/models"))
        threads = int(config.get("threads", 1))
        self.image = ImageEncoder(self.loaded["image_spec"], threads)
        self.text = TextEncoder(self.loaded["text_spec"], threads) if config.get("load_text") else None

    def reconfigure(self, config: dict) -> None:
        """Hot batching settings (serving.runtime.settings.EncoderConfig: "batch_max_size", "batch_wait_s")."""
        from serving.runtime.settings import check_encoder_settings

        config = check_encoder_settings(config)
        for method in (self.encode_text, self.encode_image):
            method.set_max_batch_size(int(config["batch_max_size"]))
            method.set_batch_wait_timeout_s(float(config["batch_wait_s"]))

    async def describe(self) -> dict:
        """What this encoder serves (model, its version label, code space, bits, image size)."""
        return described(self.loaded)

    async def card(self) -> dict | None:
        """The model version's card (evaluation/model_card.py): {"json", "markdown"}, None without one."""
        return model_card(self.loaded["folder"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_text(self, texts: list[str]) -> list[np.ndarray]:
        """Texts -> continuous codes, one (bits,) float32 array per text (validated by the router)."""
        if self.text is None:
            raise RuntimeError("this encoder was started without its text student (the router encodes text)")
        return list(await asyncio.to_thread(self.text.encode, texts))  # off the event loop

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_image(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded RGB uint8 (S, S, 3) images -> continuous codes (bits,) each."""
        return list(await asyncio.to_thread(self.image.encode, pixels))
