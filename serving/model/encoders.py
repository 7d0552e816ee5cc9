"""Query encoders for serving: ONNX image and text students, preprocessing read from their specs.

Only numpy, PIL, onnxruntime and ``tokenizers`` are used: serving never imports torch.
``encode`` returns continuous codes (B, bits); ``encode_packed`` the packed binary codes
(B, bits // 8) in the spec's bit order (serving/model/codes.py: MSB-first, bit 1 where the output >= 0).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .codes import pack_signs
from .spec import ModelSpec, SpecError, open_model, open_model_bytes


class InputError(ValueError):
    """A query that cannot be encoded (a client error, not a server one)."""


class InvalidImageError(InputError):
    """Image bytes that do not decode to an image."""


class EmptyTextError(InputError):
    """A text query that is empty or only whitespace."""


class _Encoder:
    kind = ""

    def __init__(self, spec_path: str | Path, threads: int = 0):
        self._start(*open_model(spec_path, threads))

    @classmethod
    def from_memory(cls, spec: ModelSpec, model: bytes, files: dict[str, bytes], threads: int = 0):
        """The encoder of a parsed spec whose files are held in memory (an edge bundle's members): ``model``
        the ONNX file's bytes, ``files`` the spec's other files by the names it gives (the tokenizer)."""
        encoder = cls.__new__(cls)
        encoder._start(*open_model_bytes(spec, model, threads), files=files)
        return encoder

    def _start(self, spec: ModelSpec, session, files: dict[str, bytes] | None = None) -> None:
        """Keep the checked spec and session; ``files``: the spec's other files in memory (None: beside it)."""
        if spec.kind != self.kind:
            raise SpecError(f"{spec.path}: a {spec.kind} model spec, not a {self.kind} one")
        self.spec, self.session = spec, session

    @property
    def bits(self) -> int:
        return self.spec.bits

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.spec.output_name], feeds)[0]  # (B, bits)

    def encode_packed(self, queries) -> np.ndarray:
        """Packed binary codes (B, bits // 8), uint8, in the layout of serving/model/codes.py (the spec's bit_order)."""
        return pack_signs(self.encode(queries))


class ImageEncoder(_Encoder):
    """Images (encoded bytes, file paths, PIL images or RGB uint8 arrays) -> codes (B, bits)."""

    kind = "image"

    def preprocess(self, images) -> np.ndarray:
        """The model input: float32 (B, 3, S, S), resized and standardised as the spec says."""
        image = self.spec.image
        return preprocess_images(images, image["size"], image["mean"], image["std"])

    def encode(self, images) -> np.ndarray:
        return self._run({self.spec.input_names[0]: self.preprocess(images)})


def preprocess_images(images, size: int, mean, std) -> np.ndarray:
    """Images -> float32 (B, 3, size, size): decoded, resized, scaled to [0, 1], standardised."""
    if len(images) == 0:
        raise InputError("no images to encode")
    pixels = np.stack([decode_and_resize(x, size) for x in images]).astype(np.float32) / 255.0  # (B, S, S, 3)
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(0, 3, 1, 2))  # (B, 3, S, S)


def decode_and_resize(image, size: int) -> np.ndarray:
    """One image -> RGB uint8 (size, size, 3): the spec's resize rule (PIL, bicubic, no crop)."""
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(image)) as decoded:
                return _resize(decoded, size)
        if isinstance(image, (str, Path)):
            with Image.open(image) as decoded:
                return _resize(decoded, size)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL raises these for bad data
        raise InvalidImageError(f"cannot decode the image: {err}") from None
    if isinstance(image, Image.Image):
        return _resize(image, size)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return _resize(Image.fromarray(image), size)
    raise InputError(f"an image must be bytes, a path, a PIL image or an RGB uint8 array, got {type(image).__name__}")


def _resize(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGB")  # decodes fully: truncated data fails here, inside the caller's try
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)  # (size, size, 3)


class TextEncoder(_Encoder):
    """Texts -> codes (B, bits), tokenized by the spec's tokenizer.json (truncated at max_length)."""

    kind = "text"

    def _start(self, spec: ModelSpec, session, files: dict[str, bytes] | None = None) -> None:
        super()._start(spec, session)
        from tokenizers import Tokenizer

        text = self.spec.text
        file = self.spec.path.parent / text["tokenizer_file"]
        if files is not None and text["tokenizer_file"] in files:
            self.tokenizer = Tokenizer.from_str(files[text["tokenizer_file"]].decode("utf-8"))
        elif files is None and file.is_file():
            self.tokenizer = Tokenizer.from_file(str(file))
        else:
            raise SpecError(f"{self.spec.path}: its tokenizer file {text['tokenizer_file']} is missing")
        self.tokenizer.enable_truncation(max_length=text["max_length"])
        # Pad to the longest text of the batch: padded positions are masked, so codes do not
        # depend on the padding, and short queries stay cheap.
        self.tokenizer.enable_padding(pad_id=text["pad_id"], pad_token=text["pad_token"])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            raise InputError("texts must be a list of strings, not one string")
        if len(texts) == 0:
            raise InputError("no texts to encode")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise EmptyTextError(f"text {i} is empty")
        batch = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in batch], dtype=np.int64)  # (B, T)
        mask = np.asarray([e.attention_mask for e in batch], dtype=np.int64)  # (B, T)
        ids_name, mask_name = self.spec.input_names  # the spec lists token ids, then the attention mask
        return {ids_name: ids, mask_name: mask}

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._run(self.tokenize(texts))


def load_encoder(spec_path: str | Path, threads: int = 0) -> ImageEncoder | TextEncoder:
    """The encoder for a spec file, by the spec's kind."""
    from .spec import load_spec

    spec: ModelSpec = load_spec(spec_path)
    return (ImageEncoder if spec.kind == "image" else TextEncoder)(spec_path, threads)
