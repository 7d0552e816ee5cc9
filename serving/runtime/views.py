"""The router's views that are not searches: readiness, traffic status, keys, model cards, explanations,
item listings and thumbnails. A mixin of serving.runtime.router.Router, which routes the HTTP paths to them and
owns what they use (``arms``, ``traffic``, ``gate``, ``config``, ``decoder``, ``thumbnails``, ``_dispatch``
and ``pipeline``, the serving.runtime.search.SearchPipeline that calls the other deployments)."""

import asyncio
import json

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serving.governance.query_log import sha256_of
from serving.governance.roles import READY_DETAILS, allows
from serving.model.codes import unpack_signs
from serving.runtime.api import Explain, ItemsSearch, parse_body, read_json
from serving.runtime.checks import ApiError, base64_limit, check_filterable, check_query, decode_base64, parse_filter
from serving.runtime.arms import Arm
from serving.runtime.calls import Call, all_or_none
from serving.runtime.ranking import item_image, public_hit
from serving.runtime.thumbnails import make_thumbnail, thumbnail_path

COLLECTIONS = ("images", "captions")


def public_item(item: dict, refs) -> dict:
    """A shard group's item (row, id, image_id, metadata) as answers show it: its image and thumbnail."""
    return public_hit({**item, "image": item_image(item, refs), "thumbnail": thumbnail_path(item["image_id"])})


class OperatorViews:
    """Readiness, traffic, keys, cards, explain, item listings and thumbnails, for serving.runtime.router.Router."""

    async def _explain(self, request: Request, call: Call) -> dict:
        import base64

        from serving.runtime.explain import attribution, leave_one_out, masked_copies, occlusion_with_overlay

        params = parse_body(Explain, await read_json(request, base64_limit(self.config["max_upload_bytes"]))).model_dump()
        given = [name for name in ("query", "image_base64", "image_id") if params[name] is not None]
        if len(given) != 1:
            raise ApiError(422, "invalid_query", "give exactly one of query, image_base64 and image_id")
        text = check_query(params["query"], self.config) if params["query"] is not None else None
        data = (decode_base64(params["image_base64"], self.config["max_upload_bytes"])
                if params["image_base64"] is not None else None)
        call.query_sha256 = sha256_of(text if text is not None else data if data is not None else params["image_id"])

        async def run(arm: Arm, call: Call) -> dict:
            encode = self._image_encoder(arm, call)
            if text is not None:
                query_code = await self.pipeline.text_code(arm, text, call)
            elif data is not None:
                query_code = await self.pipeline.encode_image(arm, data, call)
            else:  # an indexed image: its stored binary code, as +-1
                packed = await self.pipeline.indexed_code(arm, params["image_id"], call)
                query_code = unpack_signs(packed[None], arm.backend.index["bits"])[0].astype(np.float32)
            item = await self.pipeline.ask_holder(arm, "item", params["result_id"], call)
            pixels = await self._item_pixels(arm, item, params["result_id"])
            with call.timer("explain"):
                codes = await encode([pixels, *masked_copies(pixels, params["grid"])])
                found = occlusion_with_overlay(query_code, pixels, codes, params["grid"])
            png = found.pop("png")
            answer = {"query": {k: params[k] for k in ("query", "image_id") if params[k] is not None} or
                      {"image": "upload"}, "result_id": params["result_id"], "occlusion": found,
                      "overlay_png_base64": base64.b64encode(png).decode()}
            if text is not None:
                words, variants = leave_one_out(text)
                codes = np.stack([await self.pipeline.text_code(arm, t, call) for t in [text, *variants]])
                answer["words"] = attribution(words, codes)
            return answer
        return await self._dispatch(request, call, run)

    def _image_encoder(self, arm: Arm, call: Call):
        """Decoded images -> codes through the arm's encoder deployment (batched there), for explain."""
        async def encode(images: list) -> np.ndarray:
            return np.stack(await all_or_none([self.pipeline.remote(arm.backend.encoder, "encode_image", call, p)
                                                for p in images]))
        return encode

    async def _item_pixels(self, arm: Arm, item: dict, item_id: str) -> np.ndarray:
        """An indexed item's image, read from the archive and resized as the model reads it."""
        from serving.model.encoders import decode_and_resize
        from serving.runtime.thumbnails import item_image_pil

        source = item_image(item, arm.backend.index["refs"]["images"])

        def read():
            return decode_and_resize(item_image_pil(source, item.get("properties", {})).convert("RGB"),
                                     arm.backend.model["image_size"])
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decoder, read)
        except (OSError, ValueError) as err:
            raise ApiError(502, "source_unreadable", f"the image of {item_id!r} cannot be read from the "
                                                     f"archive: {err}") from None

    async def _card(self, version: str, request: Request, call: Call) -> Response:
        wanted = version.removeprefix("models:/")
        for arm in self.arms.values():
            model = arm.backend.model
            names = {arm.name, model.get("model_version"), str(model.get("model") or "").removeprefix("models:/")}
            if arm.ready and wanted in names:
                card = await self.pipeline.remote(arm.backend.encoder, "card", call)
                if card is None:
                    raise ApiError(404, "no_model_card", f"model version {version!r} has no model card "
                                                         f"(`terrahash card NAME VERSION` writes one)")
                if "text/markdown" in request.headers.get("accept", "") and card["markdown"]:
                    return Response(card["markdown"], media_type="text/markdown; charset=utf-8")
                return JSONResponse(card["json"])
        served = sorted({a.backend.model.get("model_version") for a in self.arms.values() if a.ready} - {None})
        raise ApiError(404, "unknown_model_version", f"no arm serves model version {version!r}; served: {served}")

    async def _keys(self) -> JSONResponse:
        from serving.governance.keys import KeyFile

        if not self.gate.config.keys:
            raise ApiError(404, "no_keys", "this deployment has no key file (auth is off)")
        return JSONResponse({"keys": await asyncio.to_thread(KeyFile(self.gate.config.keys).list)})

    async def _search_items(self, request: Request, call: Call) -> dict:
        params = parse_body(ItemsSearch, await read_json(request, 64 * 1024)).model_dump()
        answer = await self._listed_items(request, call, params)
        next_body = None
        if answer.get("next"):
            next_body = {k: v for k, v in params.items() if v is not None and k != "token"} | {"token": answer["next"]}
        return self._formatted(request, params, answer, next_body, call)

    async def _listed_items(self, request: Request, call: Call, params: dict, sticky: str | None = None) -> dict:
        """The answer of /v1/search/items to ``params`` (bbox, datetime, limit, token) on the request's arm."""
        where = parse_filter(params)
        limit = params["limit"] or min(10 * self.config["default_k"], self.config["max_k"])
        if limit > self.config["max_k"]:
            raise ApiError(422, "limit_out_of_range", f"limit must be from 1 to {self.config['max_k']}, got {limit}")
        call.query_sha256 = sha256_of(json.dumps(params, sort_keys=True, default=str))
        limit = self._admit(call, "items", limit)
        token = params["token"]

        async def run(arm: Arm, call: Call) -> dict:
            check_filterable(arm.backend.index, where)
            with call.timer("list"):
                pages = await all_or_none([self.pipeline.remote(h, "list_items", call, where, token, limit + 1)
                                            for h in arm.backend.shards["images"]])
            found = sorted((item for page in pages for item in page["items"]), key=lambda item: item["id"])
            results = [public_item(item, arm.backend.index["refs"]["images"]) for item in found[:limit]]
            more = len(found) > limit  # each group was asked for limit + 1: more exist exactly when this holds
            return {"query": {"bbox": params["bbox"], "datetime": params["datetime"]}, "limit": limit,
                    "matched": sum(page["matched"] for page in pages), "results": results,
                    "next": results[-1]["id"] if more else None}
        return await self._dispatch(request, call, run, sticky)

    async def _thumbnail(self, item_id: str, call: Call) -> Response:
        """The thumbnail of an indexed image, from the primary arm's index (cached per index release)."""
        arm = self.arms[self.traffic.primary]
        if not await arm.backend.wait_ready(call.remaining() - 0.05):
            raise ApiError(503, "arm_not_ready", f"arm {arm.name}: {arm.backend.problem}")
        index = arm.backend.index
        key = (index.get("release"), item_id)
        data = self.thumbnails.get(key)
        if data is None:
            item = await self.pipeline.ask_holder(arm, "item", item_id, call)
            source = item_image(item, index["refs"]["images"])
            try:
                data = await asyncio.get_running_loop().run_in_executor(self.decoder, make_thumbnail, source,
                                                                        item.get("properties", {}))
            except (OSError, ValueError) as err:
                raise ApiError(502, "source_unreadable", f"the image of {item_id!r} cannot be read from the "
                                                         f"archive: {err}") from None
            self.thumbnails.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    async def _readiness(self, call: Call) -> JSONResponse:
        traffic = self.traffic
        arms = {name: {"ready": arm.ready, "problem": arm.backend.problem, "weight": arm.route.weight,
                       "shadow": arm.route.shadow, **arm.versions()} for name, arm in self.arms.items()}
        required = [a for a in self.arms.values()
                    if not a.route.shadow and (a.route.weight > 0 or a.name == traffic.primary)]
        body = {"ready": True, "degraded": False, "shards": [], "replicas": [], "replaced": []}
        problems, seen = [], set()
        for arm in required:
            if not arm.ready:
                body["ready"] = False
                problems.append(f"arm {arm.name}: {arm.backend.problem}")
                continue
            if arm.backend.index_app in seen:
                continue
            seen.add(arm.backend.index_app)
            index = await self._index_readiness(arm, call)
            if index.get("problem"):
                problems.append(f"arm {arm.name}: {index['problem']}")
            for key in ("shards", "replicas", "replaced"):
                body[key] += index.get(key, [])
            body["ready"] = body["ready"] and index["ready"]
            body["degraded"] = body["degraded"] or index.get("degraded", False)
        primary = self.arms[traffic.primary].versions()
        body.update(arms=arms, primary=traffic.primary, model_version=primary["model_version"],
                    index_version=primary["index_version"])
        if problems:
            body["problem"] = "; ".join(problems)
        if not allows(call.who.role, READY_DETAILS):
            body = {"ready": body["ready"]}  # storage URIs, checksums and versions are for operators
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def _index_readiness(self, arm: Arm, call: Call) -> dict:
        """One index's readiness from its shard replicas' own reports."""
        if arm.backend.reports is None:
            return {"ready": False, "problem": "the index application has no readiness reports"}
        try:
            snapshot = await self.pipeline.remote(arm.backend.reports, "snapshot", call)
        except ApiError as err:
            return {"ready": False, "problem": f"no readiness reports: {err.message}"}
        labels = arm.backend.index["shards"]
        per_shard: dict[str, list[dict]] = {label: [] for c in COLLECTIONS for label in labels.get(c, [])}
        for replica in snapshot["replicas"]:
            for shard in replica["shards"]:
                if shard["shard"] in per_shard:
                    per_shard[shard["shard"]].append({**shard, "replica": replica["replica"]})
        shards = []
        for label, held in per_shard.items():
            ready = [r for r in held if r["ready"]]
            problems = [f"replica {r['replica']}: {r['problem']}" for r in held if not r["ready"]]
            shards.append({"shard": label, "ready": bool(ready), "replicas": len(held), "ready_replicas": len(ready),
                           "rows": ready[0]["rows"] if ready else 0,
                           "problem": "; ".join(problems) or (None if held else "no replica has reported")})
        mine = set(per_shard)
        replicas = [r for r in snapshot["replicas"] if any(s["shard"] in mine for s in r["shards"])]
        replaced = [r for r in snapshot["replaced"] if any(s["shard"] in mine for s in r["shards"])]
        return {"ready": all(s["ready"] for s in shards),
                "degraded": any(not s["ready"] for r in replicas for s in r["shards"]),
                "shards": shards, "replicas": replicas, "replaced": replaced}

    async def _traffic_status(self, call: Call) -> JSONResponse:
        """The canary controller's figures per arm, with this router's view of each arm."""
        try:
            status = await self.pipeline.remote(self.canary, "status", call)
        except ApiError as err:
            status = {"problem": f"the canary controller did not answer: {err.message}", "arms": {}}
        for name, arm in self.arms.items():
            status.setdefault("arms", {}).setdefault(name, {}).update(
                ready=arm.ready, problem=arm.backend.problem, weight=arm.route.weight, shadow=arm.route.shadow,
                **arm.versions())
        status.update(primary=self.traffic.primary, salt=self.traffic.salt)
        return JSONResponse(status)
