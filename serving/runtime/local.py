"""The co-located layout's in-process backends: query encoders and shard groups inside the router replica,
called like deployment handles but without a hop.

``LocalHandle(obj)`` answers ``handle.method.remote(*args)`` as a Serve handle does (an awaitable that can
be cancelled), so the search pipeline (serving/runtime/search.py) and the views use a local backend and a
remote one alike. A coroutine method runs on the event loop; a plain one, in the router's bounded thread
pool (onnxruntime and faiss release the GIL), never on the event loop.

``Batcher`` turns concurrent calls into one: calls that arrive while a batch is running wait and go
together in the next one, so a lone query is not delayed, and under load the encoder encodes a batch of
queries at once and every shard group searches a matrix of queries (faiss takes one).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import json
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from serving.runtime.calls import finite

MAX_BATCH = 32


class Batcher:
    """``await batcher(item)``: ``fn(items) -> results`` (one per item) runs in ``pool``, one batch at a time;
    a call that finds no batch running runs at once, alone; calls that arrive while a batch runs are
    gathered into the next (at most ``max_size``)."""

    def __init__(self, fn, pool: Executor, max_size: int = MAX_BATCH):
        self.fn, self.pool, self.max_size = fn, pool, max_size
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.busy = False
        self.drainer: asyncio.Task | None = None
        self.batches = self.items = 0  # how many batches ran, with how many items (for the benchmark)

    async def __call__(self, item):
        loop = asyncio.get_running_loop()
        if self.busy:
            future = loop.create_future()
            self.waiting.append((item, future))
            return await future
        self.busy = True
        self.batches, self.items = self.batches + 1, self.items + 1
        try:
            return (await loop.run_in_executor(self.pool, self.fn, [item]))[0]
        finally:
            if self.waiting:
                self.drainer = loop.create_task(self._drain())  # stays busy until what queued meanwhile ran
            else:
                self.busy = False

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:self.max_size], self.waiting[self.max_size:]
                batch = [(item, future) for item, future in batch if not future.done()]  # cancelled: skip
                if not batch:
                    continue
                self.batches, self.items = self.batches + 1, self.items + len(batch)
                try:
                    results = await loop.run_in_executor(self.pool, self.fn, [item for item, _ in batch])
                except Exception as err:  # noqa: BLE001 - every caller of the batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self.busy = False


class LocalHandle:
    """An object in this process, called through the same ``handle.method.remote(*args)`` as a deployment."""

    def __init__(self, target, pool: Executor, name: str):
        self.target, self.pool, self.deployment_name = target, pool, name

    def __getattr__(self, method: str) -> "_LocalMethod":
        if method.startswith("_"):
            raise AttributeError(method)
        return _LocalMethod(getattr(self.target, method), self.pool)


class _LocalMethod:
    def __init__(self, fn, pool: Executor):
        self.fn, self.pool = fn, pool

    def remote(self, *args) -> asyncio.Future:
        if inspect.iscoroutinefunction(self.fn):
            return asyncio.ensure_future(self.fn(*args))
        return asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(self.fn, *args))


class LocalEncoder:
    """A model version's text and image students in the router (serving.runtime.query_encoder.load_model's
    description ``loaded``), each batched across concurrent requests."""

    def __init__(self, loaded: dict, threads: int, pool: Executor, load_image: bool = True):
        from serving.model.encoders import ImageEncoder, TextEncoder

        self.loaded = loaded
        self.text = TextEncoder(loaded["text_spec"], threads)
        self.image = ImageEncoder(loaded["image_spec"], threads) if load_image else None
        self.texts = Batcher(lambda texts: list(self.text.encode(texts)), pool)
        self.images = Batcher(lambda pixels: list(self.image.encode(pixels)), pool)

    async def encode_text(self, text: str) -> np.ndarray:
        return finite(await self.texts(text))

    async def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if self.image is None:
            raise RuntimeError("this encoder was loaded without its image student")
        return finite(await self.images(pixels))

    async def describe(self) -> dict:
        return described(self.loaded)

    async def card(self) -> dict | None:
        return model_card(self.loaded["folder"])


class LocalShards:
    """A shard group (serving.runtime.replicas.ShardServer's logic) in the router: unfiltered searches of
    concurrent requests go to faiss as one matrix of queries; everything else runs as it comes."""

    def __init__(self, group, pool: Executor):
        self.group = group
        self.batchers: dict[tuple[int, bool], Batcher] = {}
        self.pool = pool

    async def search(self, queries: np.ndarray, k: int, with_codes: bool = False, where=None) -> dict:
        if where is not None or len(queries) != 1:
            return await asyncio.get_running_loop().run_in_executor(
                self.pool, functools.partial(self.group.search, queries, k, with_codes, where))
        key = (k, with_codes)
        if key not in self.batchers:
            self.batchers[key] = Batcher(functools.partial(self._search_rows, k, with_codes), self.pool)
        return await self.batchers[key](queries)

    def _search_rows(self, k: int, with_codes: bool, queries: list[np.ndarray]) -> list[dict]:
        found = self.group.search(np.concatenate(queries), k, with_codes)
        return [{name: value[i:i + 1] for name, value in found.items()} for i in range(len(queries))]

    def list_items(self, where, after, limit):
        return self.group.list_items(where, after, limit)

    def item(self, item_id: str):
        return self.group.item(item_id)

    def extent(self):
        return self.group.extent()

    def code_of(self, item_id: str):
        return self.group.code_of(item_id)


def described(loaded: dict) -> dict:
    """What an encoder serves (model, its version label, code space, bits, image size), without local paths."""
    return {k: v for k, v in loaded.items() if k not in ("folder", "image_spec", "text_spec")}


def model_card(folder: str) -> dict | None:
    """The model version's card (evaluation/model_card.py): {"json", "markdown"}, None without one."""
    folder = Path(folder)
    if not (folder / "model_card.json").exists():
        return None
    markdown = folder / "model_card.md"
    return {"json": json.loads((folder / "model_card.json").read_text()),
            "markdown": markdown.read_text() if markdown.exists() else None}
