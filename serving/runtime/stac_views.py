"""The router's STAC API handlers (serving/runtime/stac_api.py holds the documents, parameters and pages).

A mixin of serving.runtime.router.Router, which routes ``/v1``, ``/v1/conformance``, ``/v1/collections...``
and ``/v1/search`` to it and owns what it uses: ``config``, ``gate``, ``pipeline``, ``arms``, ``traffic``,
``_dispatch``, ``_ranked_text`` (what ``/v1/search/text`` answers) and ``_listed_items`` (``/v1/search/items``).
Searches and listings run on the request's arm as those endpoints do, every page of one search on the same
arm (the search itself is the sticky key when the client sends no ``X-Client-Id``); collection documents
and single items come from the primary arm. Roles with coarsened answers get the catalogue but no items.
"""
import json

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from serving.governance.query_log import sha256_of
from serving.index.items import metadata_columns
from serving.runtime.api import read_json
from serving.runtime.checks import ApiError
from serving.runtime.arms import Arm
from serving.runtime.calls import Call, all_or_none
from serving.runtime.stac_api import (COLLECTION, GEOJSON, ITEMS_FIELDS, StacSearch, check_collection, collection_document,
                                      collections_document, conformance, landing_page, merge_extents, one_item, page,
                                      parse_search)
from serving.runtime.views import public_item

BODY_LIMIT = 64 * 1024


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


class StacViews:
    """STAC API: landing page, conformance, collections, items and item search, for the Router."""

    async def _stac_landing(self, request: Request, call: Call) -> JSONResponse:
        return JSONResponse(landing_page(_base(request), self.options.get("app_name") or "TerraHash"))

    async def _stac_conformance(self, request: Request, call: Call) -> JSONResponse:
        return JSONResponse(conformance())

    async def _stac_collections(self, request: Request, call: Call, collection_id: str | None = None) -> JSONResponse:
        """Every collection (``collection_id`` None), or that one (404 when it is not served)."""
        if collection_id is not None:
            check_collection(collection_id)
        arm = await self._stac_primary(call)
        key = (arm.name, json.dumps(arm.backend.index.get("index_version"), sort_keys=True))
        extents = self.stac_extents  # per arm and index version (an index version's items never change)
        if key not in extents:
            with call.timer("extent"):
                parts = await all_or_none([self.pipeline.remote(h, "extent", call) for h in arm.backend.shards["images"]])
            extents[key] = merge_extents([shard for group in parts for shard in group])
        document = collection_document(_base(request), extents[key], arm.versions())
        return JSONResponse(document if collection_id else collections_document(_base(request), [document]))

    async def _stac_item(self, collection_id: str, item_id: str, request: Request, call: Call) -> JSONResponse:
        check_collection(collection_id)
        self._stac_items_allowed(call)
        arm = await self._stac_primary(call)
        call.query_sha256 = sha256_of(item_id)
        item = await self.pipeline.ask_holder(arm, "item", item_id, call)
        return JSONResponse(one_item(public_item(item, arm.backend.index["refs"]["images"]), _base(request)),
                            media_type=GEOJSON)

    async def _stac_items(self, collection_id: str, request: Request, call: Call) -> JSONResponse:
        """``GET /v1/collections/{id}/items``: the collection's items in a box and interval, by id, paged."""
        check_collection(collection_id)
        search = parse_search(dict(request.query_params), self.config, ITEMS_FIELDS)
        return await self._stac_answer(request, call, search, f"/v1/collections/{collection_id}/items")

    async def _stac_search(self, request: Request, call: Call) -> JSONResponse:
        """``GET`` / ``POST /v1/search``."""
        get = request.method == "GET"
        values = dict(request.query_params) if get else await read_json(request, BODY_LIMIT)
        return await self._stac_answer(request, call, parse_search(values, self.config, get=get), "/v1/search")

    async def _stac_answer(self, request: Request, call: Call, search: StacSearch, path: str) -> JSONResponse:
        self._stac_items_allowed(call)
        # intersects travels in search.filters() (and search.where) into the very ItemFilter the shards mask
        # their items with: its bounding box as the bbox filter, then the exact geometry test on what passed
        # it, inside the mask. So the listing's limit + 1, its next token and matched count, the ranked
        # search's top k and the ids' check all see exactly the matching items: no page is cut before the
        # refinement (a page never comes back short while more match), and no refill round trips are needed.
        sticky = "stac:" + sha256_of(json.dumps([search.q, search.given], default=str))
        first, matched = 1, None
        if search.collections is not None and COLLECTION not in search.collections:
            answer, token, matched = {"results": []}, None, 0
        elif search.q is not None:
            answer, token, first = await self._stac_ranked(request, call, search, sticky)
        elif search.ids is not None:
            answer, token, matched = await self._stac_named(request, call, search, sticky)
        else:
            params = {**search.filters(), "limit": search.limit, "token": search.token}
            answer = await self._listed_items(request, call, params, sticky)
            token = answer.get("next")
        body = page(answer, _base(request), path, search, request.method, token, first)
        if matched is not None:
            body["numberMatched"] = matched
        call.answered = {"results": len(body["features"]),
                         **{k: answer.get(k) for k in ("arm", "model_version", "index_version")}}
        headers = {"X-TerraHash-Arm": answer["arm"]} if answer.get("arm") else {}
        return JSONResponse(body, media_type=GEOJSON, headers=headers)

    async def _stac_ranked(self, request: Request, call: Call, search: StacSearch, sticky: str):
        """``q``: a page of /v1/search/text's ranking (its top k, k one past the page, at most max_k; with
        ``ids``, the top max_k, of which the named items). Returns the answer, the next token, the first rank."""
        max_k = self.config["max_k"]
        offset = search.offset(max_k)
        k = max_k if search.ids is not None else min(offset + search.limit + 1, max_k)
        params = {"query": search.q, "k": k, **search.filters()}
        answer = await self._ranked_text(request, call, params, sticky)
        hits = answer["results"]
        if search.ids is not None:
            hits = [hit for hit in hits if hit["id"] in set(search.ids)]
        end = offset + search.limit
        answer["results"] = hits[offset:end]
        return answer, str(end) if len(hits) > end else None, offset + 1

    async def _stac_named(self, request: Request, call: Call, search: StacSearch, sticky: str):
        """``ids``: those of the named items that exist and pass the filters, by id, paged by the last id.
        Returns the answer, the next token and how many match in all."""
        call.query_sha256 = sha256_of(json.dumps(search.given, default=str))
        self._admit(call, "items", search.limit)

        async def run(arm: Arm, call: Call) -> dict:
            async def lookup(item_id: str):
                try:
                    return await self.pipeline.ask_holder(arm, "item", item_id, call)
                except ApiError as err:
                    if err.code == "unknown_id":
                        return None
                    raise
            found = [item for item in await all_or_none([lookup(i) for i in sorted(set(search.ids))]) if item]
            if search.where is not None and found:
                keep = search.where.mask(metadata_columns(found), len(found))
                found = [item for item, ok in zip(found, np.asarray(keep).tolist()) if ok]
            refs = arm.backend.index["refs"]["images"]
            return {"matched": len(found), "results": [public_item(item, refs) for item in found]}

        answer = await self._dispatch(request, call, run, sticky)
        after = [hit for hit in answer["results"] if search.token is None or hit["id"] > search.token]
        answer["results"] = after[:search.limit]
        token = answer["results"][-1]["id"] if len(after) > search.limit else None
        return answer, token, answer.pop("matched")

    async def _stac_primary(self, call: Call) -> Arm:
        arm = self.arms[self.traffic.primary]
        if not await arm.backend.wait_ready(call.remaining() - 0.05):
            raise ApiError(503, "arm_not_ready", f"arm {arm.name}: {arm.backend.problem}")
        return arm

    def _stac_items_allowed(self, call: Call) -> None:
        """403 for a role with coarsened answers: STAC items link the images."""
        if call.who is not None and self.gate.coarsened(call.who):
            raise ApiError(403, "forbidden", f"role {call.who.role!r} gets coarsened JSON answers; STAC items, "
                                             "which link the images, are not available to it", decision="forbidden")

