"""The query encoder deployment: a model version's ONNX image and text students, batched across requests."""
import numpy as np
from ray import serve


@serve.deployment(max_ongoing_requests=64)
class QueryEncoder:
    """The text and image students of one model version, batched across concurrent requests."""

    def __init__(self, image_spec: str, text_spec: str | None, threads: int = 1):
        """``text_spec`` None: text is encoded by the router (router_encodes_text), so not loaded here."""
        from serving.encoders import ImageEncoder, TextEncoder

        self.image = ImageEncoder(image_spec, threads)
        self.text = TextEncoder(text_spec, threads) if text_spec is not None else None

    def reconfigure(self, config: dict) -> None:
        """Hot batching settings (serving.settings.EncoderConfig: "batch_max_size", "batch_wait_s")."""
        from serving.settings import check_encoder_settings

        config = check_encoder_settings(config)
        for method in (self.encode_text, self.encode_image):
            method.set_max_batch_size(int(config["batch_max_size"]))
            method.set_batch_wait_timeout_s(float(config["batch_wait_s"]))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_text(self, texts: list[str]) -> list[np.ndarray]:
        """Texts -> continuous codes, one (bits,) float32 array per text (validated by the router)."""
        return list(self.text.encode(texts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_image(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded RGB uint8 (S, S, 3) images -> continuous codes (bits,) each."""
        return list(self.image.encode(pixels))
