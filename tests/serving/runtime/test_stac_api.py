"""The STAC API's documents, parameters and pages without a server (serving/runtime/stac_api.py); the live
API, driven by pystac-client, is tested with the geo index in tests/serving/runtime/test_geo_search.py."""
from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from serving.index.items import extent, metadata_columns
from serving.runtime.api import ApiError
from serving.runtime.stac_api import (COLLECTION, FREE_TEXT, ITEMS_FIELDS, collection_document, landing_page,
                                      merge_extents, one_item, page, parse_search)

CONFIG = {"default_k": 10, "max_k": 50, "max_query_chars": 200}
BASE = "http://example.test/app"


def _error(values, fields=None) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        parse_search(values, CONFIG, *(fields,) if fields else ())
    return caught.value.status, caught.value.code


def _error_post(values) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        parse_search(values, CONFIG, get=False)
    return caught.value.status, caught.value.code


def test_get_and_post_parameters_read_alike_with_defaults_and_a_capped_limit():
    get = parse_search({"bbox": "-117.3,33.8,-116.9,34.1", "datetime": "2024-06-01T00:00:00Z/..", "ids": "a,b",
                        "collections": COLLECTION, "limit": "7"}, CONFIG)
    post = parse_search({"bbox": [-117.3, 33.8, -116.9, 34.1], "datetime": "2024-06-01T00:00:00Z/..",
                         "ids": ["a", "b"], "collections": [COLLECTION], "limit": 7}, CONFIG, get=False)
    assert get == post and get.limit == 7 and get.ids == ("a", "b") and get.where.bbox == (-117.3, 33.8, -116.9, 34.1)
    assert parse_search({}, CONFIG).limit == 50 and parse_search({"q": "a beach"}, CONFIG).limit == 10
    assert parse_search({"limit": 100_000}, CONFIG).limit == 50  # above max_k: max_k, as OGC API Features asks
    assert parse_search({"bbox": [1, 2, 0, 3, 4, 100]}, CONFIG).where.bbox == (1, 2, 3, 4)  # 3D: its 2D part
    assert parse_search({"q": ["beach", "sand"]}, CONFIG).q == "beach, sand"  # the extension's POST array


@pytest.mark.parametrize("values, code", [
    ({"bbox": "1,2,3"}, "invalid_bbox"), ({"bbox": [0, 50, 1, 40]}, "invalid_bbox"),
    ({"datetime": "June"}, "invalid_datetime"), ({"datetime": "2024-06-01T10:00:00"}, "invalid_datetime"),
    ({"datetime": "2024-06-01"}, "invalid_datetime"), ({"datetime": "1937-01-01T12:00:27.87+0100"}, "invalid_datetime"),
    ({"datetime": "1985-04-12T23:20:50,52Z"}, "invalid_datetime"), ({"datetime": "../.."}, "invalid_datetime"),
    ({"limit": "0"}, "invalid_limit"), ({"limit": "ten"}, "invalid_limit"), ({"limit": True}, "invalid_limit"),
    ({"ids": [1, 2]}, "invalid_ids"), ({"ids": [str(i) for i in range(51)]}, "invalid_ids"),
    ({"collections": ""}, None), ({"q": "  "}, "invalid_q"), ({"q": "x" * 201}, "invalid_q"), ({"q": 5}, "invalid_q"),
    ({"token": 3}, "invalid_token"), ({"sortby": "id"}, "unknown_parameter"),
    ({"intersects": {"type": "Point"}}, "invalid_intersects"), ({"intersects": "POINT (1 2)"}, "invalid_intersects"),
    ({"intersects": '{"type": "Point", "coordinates": [1, 95]}'}, "invalid_intersects"),
    ({"intersects": '{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}'}, "invalid_intersects"),
    ({"intersects": '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}'}, "invalid_intersects"),
    ({"intersects": '{"type": "Point", "coordinates": [1, 2]}', "bbox": "0,0,3,3"}, "invalid_intersects"),
    ({"datetime": 5}, "invalid_datetime"),
    ([1, 2], "invalid_json"),
])
def test_bad_parameters_are_a_400_naming_the_field(values, code):
    if code is None:  # an empty GET parameter is no parameter
        assert parse_search(values, CONFIG).collections is None
        return
    assert _error(values) == (400, code)


POLYGON = {"type": "Polygon", "coordinates": [[[-117.2, 33.9], [-117.1, 33.9], [-117.2, 34.0], [-117.2, 33.9]]]}


def test_intersects_reads_a_geometry_from_get_json_text_or_a_post_object():
    get = parse_search({"intersects": json.dumps(POLYGON), "datetime": "2024-06-01T00:00:00Z/..", "limit": "5"}, CONFIG)
    post = parse_search({"intersects": POLYGON, "datetime": "2024-06-01T00:00:00Z/..", "limit": 5}, CONFIG, get=False)
    assert get == post and get.where.geometry is not None and get.where.bbox == (-117.2, 33.9, -117.1, 34.0)
    assert get.filters() == {"bbox": None, "intersects": POLYGON, "datetime": "2024-06-01T00:00:00Z/.."}
    assert _error_post({"intersects": json.dumps(POLYGON)}) == (400, "invalid_intersects")  # POST: an object
    assert _error({"intersects": json.dumps(POLYGON)}, ITEMS_FIELDS) == (400, "unknown_parameter")
    answer = {"results": [_hit("a.jpg")], "arm": "default"}
    following = next(link for link in page(answer, BASE, "/v1/search", get, "GET", "a.jpg")["links"]
                     if link["rel"] == "next")
    again = {k: v[0] for k, v in parse_qs(urlsplit(following["href"]).query).items()}
    assert json.loads(again["intersects"]) == POLYGON and parse_search(again, CONFIG).where == get.where
    following = next(link for link in page(answer, BASE, "/v1/search", post, "POST", "a.jpg")["links"]
                     if link["rel"] == "next")
    assert following["body"]["intersects"] == POLYGON
    assert parse_search(following["body"], CONFIG, get=False).where == post.where


def test_collection_items_take_only_their_parameters_and_ranked_tokens_are_checked():
    assert _error_post({"bbox": "1,2,3,4"}) == (400, "invalid_bbox")  # POST: an array, as STAC API asks
    assert _error({"q": "a beach"}, ITEMS_FIELDS) == (400, "unknown_parameter")
    search = parse_search({"q": "a beach", "token": "20"}, CONFIG)
    assert search.offset(CONFIG["max_k"]) == 20
    for token in ("50", "-1", "abc", "2e1"):
        with pytest.raises(ApiError) as caught:
            parse_search({"q": "a beach", "token": token}, CONFIG).offset(CONFIG["max_k"])
        assert caught.value.status == 400 and caught.value.code == "invalid_token"


def _hit(item_id: str) -> dict:
    return {"id": item_id, "image": item_id, "image_id": item_id, "bbox": [1.0, 2.0, 3.0, 4.0],
            "datetime": "2024-06-01T12:00:00Z", "properties": {"class": "beach"}, "distance": 3,
            "thumbnail": f"/v1/items/{item_id}/thumbnail"}


def test_pages_link_the_next_page_by_get_url_or_post_body():
    search = parse_search({"bbox": "1,2,3,4", "q": "a beach", "limit": "2", "token": "2"}, CONFIG)
    answer = {"results": [_hit("b/1.jpg"), _hit("scene.tif?window=0,0,256,256")], "arm": "default", "next": "x"}
    body = page(answer, BASE, "/v1/search", search, "GET", "4", first_rank=3)
    links = {link["rel"]: link for link in body["links"]}
    assert links["root"]["href"] == f"{BASE}/v1" and links["next"]["method"] == "GET"
    following = parse_qs(urlsplit(links["next"]["href"]).query)
    assert following == {"bbox": ["1.0,2.0,3.0,4.0"], "q": ["a beach"], "limit": ["2"], "token": ["4"]}
    assert parse_qs(urlsplit(links["self"]["href"]).query)["token"] == ["2"]
    assert [f["properties"]["terrahash:rank"] for f in body["features"]] == [3, 4] and "next" not in body
    chip = body["features"][1]
    assert chip["collection"] == COLLECTION and chip["links"][0]["href"].endswith(
        "/items/scene.tif%3Fwindow%3D0,0,256,256")
    post = page(answer, BASE, "/v1/search", search, "POST", "4")
    following = next(link for link in post["links"] if link["rel"] == "next")
    assert following["method"] == "POST" and following["href"] == f"{BASE}/v1/search" and not following["merge"]
    assert following["body"] == {"bbox": [1.0, 2.0, 3.0, 4.0], "q": "a beach", "limit": 2, "token": "4"}
    last = page(answer, BASE, "/v1/search", search, "POST", None)
    assert [link["rel"] for link in last["links"]] == ["root", "self"]


def test_documents_validate_against_the_bundled_stac_schemas():
    validation = pytest.importorskip("pystac.validation")
    pytest.importorskip("jsonschema")
    landing = landing_page(BASE, "TerraHash")
    assert FREE_TEXT in landing["conformsTo"] and FREE_TEXT == "https://api.stacspec.org/v1.0.0-rc.1/item-search#free-text"
    rels = [(link["rel"], link.get("method")) for link in landing["links"]]
    assert {("conformance", None), ("data", None), ("search", "GET"), ("search", "POST"), ("service-desc", None)} <= set(rels)
    served = {"model": "models:/terrahash-students/3", "release": "r0002", "model_version": "onnx@1"}
    known = collection_document(BASE, {"bbox": [1.0, 2.0, 3.0, 4.0], "interval": [0.0, 86400.0]}, served)
    unknown = collection_document(BASE, merge_extents([]), served)
    assert known["extent"]["temporal"]["interval"] == [["1970-01-01T00:00:00Z", "1970-01-02T00:00:00Z"]]
    assert unknown["extent"] == {"spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]}, "temporal": {"interval": [[None, None]]}}
    for document in (landing, known, unknown, one_item(_hit("photos/a.jpg"), BASE)):
        assert validation.validate_dict(document)  # offline: pystac bundles the STAC 1.1 schemas


def test_extent_of_items_footprints_and_times():
    columns = metadata_columns([{"bbox": [10, -5, 12, -4], "datetime": "2024-06-01T00:00:00Z"},
                                {"bbox": [-3, 40, -2, 41], "start_datetime": "2023-01-01T00:00:00Z",
                                 "end_datetime": "2023-01-02T00:00:00Z"}, {}])
    found = extent(columns)
    assert found["bbox"] == [-3, -5, 12, 41] and found["interval"][0] == pytest.approx(1672531200.0)
    assert extent(metadata_columns([{}])) == {"bbox": None, "interval": None} == extent(None)
    across = extent(metadata_columns([{"bbox": [170, 0, -170, 1]}]))
    assert across["bbox"] == [-180.0, 0.0, 180.0, 1.0]  # across the antimeridian: every longitude
    merged = merge_extents([found, {"bbox": [20, 50, 21, 60], "interval": [1.0, 2.0]}, extent(None)])
    assert merged["bbox"] == [-3, -5, 21, 60] and merged["interval"][0] == 1.0 and merged["interval"][1] == found["interval"][1]
