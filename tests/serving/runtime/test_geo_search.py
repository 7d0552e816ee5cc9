"""Search by place and time over HTTP: a STAC catalog of real UCM images and a GeoTIFF scene, indexed and
served; filtered answers against brute force, item listing, STAC output validated by pystac, thumbnails, and
the STAC API driven by pystac-client (the documents and parameters alone: test_stac_api.py)."""
from __future__ import annotations

import base64
import io
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pystac = pytest.importorskip("pystac")
pytest.importorskip("rasterio")
pytest.importorskip("onnxruntime")
pytest.importorskip("ray.serve")

from serving.ingest.build import add_images, build_indexes  # noqa: E402
from serving.model.versions import find_spec  # noqa: E402
from serving.ingest.items import dataset_items  # noqa: E402
from serving.model.codes import hamming_matrix  # noqa: E402
from serving.model.encoders import load_encoder  # noqa: E402
from serving.index.releases import load_index  # noqa: E402
from serving.index.items import ItemFilter  # noqa: E402
from serving.ingest.stac import catalog_items  # noqa: E402
from tests.serving.conftest import running_app  # noqa: E402
from tests.serving.test_app import call, multipart, post_json  # noqa: E402
from tests.serving.ingest.test_geo import PIXEL, from_origin, write_geotiff  # noqa: E402

N_PHOTOS = 24
STEP = 0.01  # degrees between neighbouring photos' footprints


def photo_bbox(i: int) -> list[float]:
    west, south = -117.2 + (i % 6) * STEP, 33.9 + (i // 6) * STEP
    return [west, south, west + 0.008, south + 0.008]


def _photos(ucm_many) -> list[Path]:
    return [Path(p) for p in dataset_items(ucm_many).image_paths[::9][:N_PHOTOS]]


@pytest.fixture(scope="module")
def archive(ucm_many, tmp_path_factory) -> dict:
    """A plain folder: the first half of the photos and a GeoTIFF scene of four of them, and a CSV sidecar giving
    the photos' classes, footprints and times (the scene's chips get theirs from the file)."""
    import csv
    import shutil

    from PIL import Image

    folder = tmp_path_factory.mktemp("archive")
    (folder / "photos").mkdir()
    rows = []
    for i, path in enumerate(_photos(ucm_many)[:N_PHOTOS // 2]):
        shutil.copyfile(path, folder / "photos" / path.name)
        rows.append({"id": f"photos/{path.name}", "class": path.parent.name,
                     "bbox": ",".join(map(str, photo_bbox(i))), "datetime": f"2024-06-{1 + i % 12:02d}T12:00:00Z"})
    # The folder's first four photos again, as one georeferenced 2 x 2 scene: each 256-pixel chip is one of them.
    tiles = [np.asarray(Image.open(p).convert("RGB").resize((256, 256))) for p in _photos(ucm_many)[:4]]
    mosaic = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
    write_geotiff(folder / "scene.tif", np.ascontiguousarray(mosaic.transpose(2, 0, 1)), "EPSG:4326",
                  from_origin(-117.0, 34.0, PIXEL, PIXEL), when="2024:07:01 09:00:00")
    sidecar = folder.parent / f"{folder.name}.csv"
    with open(sidecar, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"folder": folder, "sidecar": sidecar}


@pytest.fixture(scope="module")
def catalog(ucm_many, tmp_path_factory) -> Path:
    """A self-contained STAC catalog: a collection of the second half of the photos (bbox, datetime, class),
    plus an item whose only asset is a thumbnail (which the build must skip and report)."""
    from datetime import datetime, timezone

    folder = tmp_path_factory.mktemp("stac")
    collection = pystac.Collection("survey", "aerial survey", pystac.Extent(
        pystac.SpatialExtent([[-117.3, 33.8, -116.9, 34.1]]),
        pystac.TemporalExtent([[datetime(2024, 6, 1, tzinfo=timezone.utc), None]])))
    for i, path in enumerate(_photos(ucm_many)):
        if i < N_PHOTOS // 2:
            continue
        west, south, east, north = photo_bbox(i)
        item = pystac.Item(f"photo-{i:02d}", {"type": "Polygon", "coordinates": [[[west, south], [east, south],
                           [east, north], [west, north], [west, south]]]}, photo_bbox(i),
                           datetime(2024, 6, 1 + i % 12, 12, tzinfo=timezone.utc),
                           {"class": path.parent.name, "gsd": 0.3})
        item.add_asset("visual", pystac.Asset(str(path.resolve()), media_type="image/jpeg", roles=["visual"]))
        collection.add_item(item)
    lonely = pystac.Item("no-image", None, None, datetime(2024, 6, 1, tzinfo=timezone.utc), {})
    lonely.add_asset("thumbnail", pystac.Asset("thumb.png", media_type="image/png", roles=["thumbnail"]))
    collection.add_item(lonely)
    root = pystac.Catalog("archive", "a test archive")
    root.add_child(collection)
    root.normalize_and_save(str(folder / "catalog"), pystac.CatalogType.SELF_CONTAINED)
    root.validate_all()  # what we index is valid STAC
    return folder / "catalog" / "catalog.json"


@pytest.fixture(scope="module")
def geo_index(local_ray, model_dir, archive, catalog, tmp_path_factory) -> dict:
    """The folder (with its sidecar) built into an index, the catalog added to it: one release serves both."""
    root = tmp_path_factory.mktemp("geo_index")
    built = build_indexes(model_dir, None, 2, str(root), images=str(archive["folder"]), sidecar=archive["sidecar"],
                          batch_size=16)
    added = add_images(None, str(root), stac=str(catalog), batch_size=16)
    return {"root": root, "built": built, "images": added["images"]}


@pytest.fixture(scope="module")
def geo_app(local_ray, geo_index, tmp_path_factory):
    yield from running_app(geo_index["root"], tmp_path_factory.mktemp("geo_cache"))


@pytest.fixture(scope="module")
def everything(geo_index, model_dir) -> dict:
    """Every stored image code in row order with its id and metadata columns, and the encoders."""
    index = load_index(geo_index["root"], geo_index["images"]["version"])
    rows = np.concatenate([s.rows for s in index.shards])
    order = np.argsort(rows)
    columns = {name: np.concatenate([s.meta[name] for s in index.shards])[order] for name in index.shards[0].meta}
    return {"codes": np.concatenate([s.codes for s in index.shards])[order], "rows": rows[order],
            "ids": np.concatenate([s.ids for s in index.shards])[order], "columns": columns,
            "text": load_encoder(find_spec(model_dir, "text")), "image": load_encoder(find_spec(model_dir, "image"))}


def brute_force(everything, packed, k, where=None, drop=None) -> list[tuple[int, str]]:
    """(distance, id) of the top-k among the items passing ``where``, ordered by (distance, row)."""
    n = len(everything["ids"])
    keep = np.ones(n, bool) if where is None else where.mask(everything["columns"], n)
    if drop is not None:
        keep &= everything["ids"] != drop
    distances = hamming_matrix(packed, everything["codes"][keep])[0]
    order = np.lexsort((everything["rows"][keep], distances))[:k]
    return [(int(distances[j]), str(everything["ids"][keep][j])) for j in order]


def got(body) -> list[tuple[int, str]]:
    return [(hit["distance"], hit["id"]) for hit in body["results"]]


FILTERS = [{"bbox": [-117.2, 33.9, -117.165, 33.925]},  # a corner of the photos' grid
           {"datetime": "2024-06-03/2024-06-06"},
           {"bbox": "-117.01,33.9,-116.9,34.1", "datetime": "2024-07-01"},  # the scene's chips only
           {"bbox": [-117.3, 33.8, -116.9, 34.1], "datetime": "2024-06-10T00:00:00Z/.."}]


def test_a_folder_and_a_stac_catalog_are_indexed_with_their_places_times_and_properties(geo_index, catalog):
    items = catalog_items(catalog)
    assert items.image_ids == [f"photo-{i:02d}" for i in range(N_PHOTOS // 2, N_PHOTOS)]
    assert len(items.skipped) == 1 and "no-image" in items.skipped[0][0] and "no image asset" in items.skipped[0][1]
    photo = items.metadata[items.image_ids.index("photo-17")]
    assert photo["bbox"] == pytest.approx(photo_bbox(17)) and photo["datetime"].startswith("2024-06-06T12:00:00")
    assert photo["collection"] == "survey" and photo["gsd"] == 0.3 and photo["source"].endswith(".jpg")
    assert items.labels[0] and "class" not in photo
    built = geo_index["built"]["images"]
    assert built["rows"] == N_PHOTOS // 2 + 4 and built["filterable"] == {"bbox": built["rows"], "datetime": built["rows"]}
    assert geo_index["images"]["filterable"] == {"bbox": N_PHOTOS + 4, "datetime": N_PHOTOS + 4}
    assert geo_index["images"]["extra"]["skipped_images"] == 1  # the catalog's item without an image


def test_filtered_searches_over_http_are_the_exact_top_k_among_what_passes(geo_app, everything, ucm_many):
    text = everything["text"].encode_packed(["many buildings and green trees"])
    photo = _photos(ucm_many)[0]
    data = photo.read_bytes()
    image = everything["image"].encode_packed([str(photo)])
    similar = str(everything["ids"][3])
    stored = everything["codes"][everything["ids"] == similar]
    for params in FILTERS:
        where = ItemFilter.parse(**params)
        want = brute_force(everything, text, 10, where)
        assert want, params  # every filter here passes something
        status, body = post_json(f"{geo_app}/v1/search/text", {"query": "many buildings and green trees", "k": 10,
                                                               **params})
        assert status == 200 and got(body) == want, (params, body)
        assert all(hit["bbox"] and hit["properties"] for hit in body["results"])
        form = {"k": 10, **{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in params.items()}}
        status, body = call(f"{geo_app}/v1/search/image", *multipart(form, data))
        assert status == 200 and got(body) == brute_force(everything, image, 10, where), params
        query = urllib.parse.urlencode({**form, "k": 5})
        status, body = call(f"{geo_app}/v1/search/similar/{urllib.parse.quote(similar)}?{query}")
        assert status == 200 and got(body) == brute_force(everything, stored, 5, where, drop=similar)


def test_items_in_a_box_and_interval_are_listed_a_page_at_a_time(geo_app, everything):
    params = {"bbox": [-117.3, 33.8, -117.175, 34.1], "datetime": "2024-06-01/2024-06-08"}
    passing = sorted(everything["ids"][ItemFilter.parse(**params).mask(everything["columns"], len(everything["ids"]))])
    assert 5 < len(passing) < N_PHOTOS
    seen, token, pages = [], None, 0
    while True:
        status, body = post_json(f"{geo_app}/v1/search/items", {**params, "limit": 4, **({"token": token} if token else {})})
        assert status == 200 and body["matched"] == len(passing)
        seen += [hit["id"] for hit in body["results"]]
        pages, token = pages + 1, body["next"]
        if token is None:
            break
    assert seen == passing and pages == -(-len(passing) // 4)
    status, page = post_json(f"{geo_app}/v1/search/items", {**params, "limit": 4, "format": "stac"})
    collection = pystac.ItemCollection.from_dict(page)
    assert [item.id for item in collection] == passing[:4] and page["numberMatched"] == len(passing)
    follow = next(link for link in page["links"] if link["rel"] == "next")
    status, second = post_json(follow["href"], follow["body"])
    assert [hit["id"] for hit in second["features"]] == passing[4:8]


def test_search_results_as_a_stac_item_collection_validate(geo_app):
    status, body = post_json(f"{geo_app}/v1/search/text", {"query": "a green field", "k": 8, "format": "stac"})
    assert status == 200 and body["type"] == "FeatureCollection" and body["numberReturned"] == 8
    collection = pystac.ItemCollection.from_dict(body, preserve_dict=False)
    for rank, item in enumerate(collection, start=1):
        item.validate()  # STAC 1.1.0 item schema, bundled with pystac
        assert item.properties["terrahash:rank"] == rank and 0 <= item.properties["terrahash:score"] <= 1
        west, south, east, north = item.bbox
        assert item.geometry["coordinates"][0][0] == [west, south]
        assert item.assets["thumbnail"].href.startswith(geo_app) and item.assets["image"].href
    chip = next((item for item in collection if "?window=" in item.id), None)
    if chip is not None:  # a chip's image asset is its scene, the window a property
        assert chip.assets["image"].href.endswith("scene.tif") and len(chip.properties["window"]) == 4
    request = urllib.request.Request(f"{geo_app}/v1/search/similar/photo-13?k=3",
                                     headers={"Accept": "application/geo+json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["type"] == "FeatureCollection"


def test_thumbnails_are_served_small_and_cached(geo_app, geo_index):
    from PIL import Image

    from serving.runtime.thumbnails import make_thumbnail

    status, body = post_json(f"{geo_app}/v1/search/items", {"limit": 50})
    hits = {hit["id"]: hit for hit in body["results"]}
    folder_photo = next(i for i in hits if i.startswith("photos/"))
    for item_id in ("photo-14", folder_photo, "scene.tif?window=0,0,256,256"):
        hit = hits[item_id]
        for _ in range(2):  # made on the first request, then from the cache: the same bytes
            with urllib.request.urlopen(geo_app + hit["thumbnail"], timeout=30) as answer:
                assert answer.headers["content-type"] == "image/jpeg"
                data = answer.read()
            thumb = Image.open(io.BytesIO(data))
            assert thumb.format == "JPEG" and max(thumb.size) == 128
        assert data == make_thumbnail(*_source(geo_index, item_id))
    status, body = call(f"{geo_app}/v1/items/nothing-here/thumbnail")
    assert status == 404 and body["error"]["code"] == "unknown_id"


def _source(geo_index, item_id: str) -> tuple[str, dict]:
    """Where the server reads an item's image from (answers name it by id only), and its properties."""
    from serving.index.items import describe
    from serving.index.refs import ImageRefs
    from serving.runtime.ranking import item_image

    index = load_index(geo_index["root"], geo_index["images"]["version"])
    for shard in index.shards:
        found = np.nonzero(shard.ids == item_id)[0]
        if len(found):
            p = int(found[0])
            item = {"row": int(shard.rows[p]), "image_id": str(shard.image_ids[p]), **describe(shard.meta, p)}
            return item_image(item, ImageRefs(index.manifest)), item["properties"]
    raise KeyError(item_id)


def test_bad_filters_get_a_clear_422(geo_app):
    for payload, code in [({"bbox": [1, 2, 3]}, "invalid_bbox"), ({"bbox": [0, 50, 1, 40]}, "invalid_bbox"),
                          ({"datetime": "June"}, "invalid_datetime"), ({"datetime": "2024-06-01T10:00:00"},
                                                                       "invalid_datetime")]:
        status, body = post_json(f"{geo_app}/v1/search/text", {"query": "a beach", **payload})
        assert status == 422 and body["error"]["code"] == code, (payload, body)
    status, body = call(f"{geo_app}/v1/search/similar/photo-13?bbox=a,b,c,d")
    assert status == 422 and body["error"]["code"] == "invalid_bbox"
    status, body = post_json(f"{geo_app}/v1/search/items", {"limit": 0})
    assert status == 422 and body["error"]["code"] == "limit_out_of_range"
    status, body = post_json(f"{geo_app}/v1/search/image", {"image_base64": base64.b64encode(b"x").decode(),
                                                            "datetime": 5})
    assert status == 422 and body["error"]["code"] == "invalid_datetime"


# --- the STAC API (serving/runtime/stac_api.py), driven by pystac-client as users' tools drive it ---

QUERY = "many buildings and green trees"
EVERYWHERE = {"bbox": [-117.3, 33.8, -116.9, 34.1], "datetime": "2024-06-01T00:00:00Z/.."}  # every item passes


def stac_client(url: str, q: str | None = None):
    """pystac-client on the app; ``q`` added to its POST searches (0.9.1's Client.search takes no ``q``:
    only its collection search does), through the request modifier it offers for such additions."""
    pystac_client = pytest.importorskip("pystac_client")

    def with_q(request):
        if q is not None and request.method == "POST" and request.url.endswith("/v1/search"):
            request.json = {**request.json, "q": q}
        return request
    return pystac_client.Client.open(f"{url}/v1", request_modifier=with_q)


JUNE_3_TO_6 = {"datetime": "2024-06-03T00:00:00Z/2024-06-06T23:59:59Z"}  # STAC API: date-times only


@pytest.mark.parametrize("filters, k, limit", [(EVERYWHERE, 20, 6), (JUNE_3_TO_6, 5, 2), ({}, 12, 12)])
def test_a_stac_client_free_text_search_ranks_as_search_text(geo_app, filters, k, limit):
    status, body = post_json(f"{geo_app}/v1/search/text", {"query": QUERY, "k": k, **filters})
    assert status == 200 and len(body["results"]) == k
    search = stac_client(geo_app, QUERY).search(max_items=k, limit=limit, **filters)
    items = list(search.items())  # pages of `limit`, the client following each next link
    assert [item.id for item in items] == [hit["id"] for hit in body["results"]]
    assert [item.properties["terrahash:rank"] for item in items] == list(range(1, k + 1))
    assert all(item.collection_id == "images" for item in items)
    query = urllib.parse.urlencode({"q": QUERY, "limit": limit, **{k: ",".join(map(str, v)) if isinstance(v, list)
                                                                    else v for k, v in filters.items()}})
    seen, url = [], f"{geo_app}/v1/search?{query}"
    while url and len(seen) < k:  # GET: next links carry the token in the query string
        status, page = call(url)
        assert status == 200 and page["type"] == "FeatureCollection"
        seen += [f["id"] for f in page["features"]]
        url = next((link["href"] for link in page["links"] if link["rel"] == "next"), None)
    assert seen[:k] == [hit["id"] for hit in body["results"]]


def test_a_stac_client_opens_the_catalogue_collections_and_items(geo_app, everything):
    validation = pytest.importorskip("pystac.validation")
    client = stac_client(geo_app)
    assert client.conforms_to("ITEM_SEARCH") and client.conforms_to("COLLECTIONS") and client.conforms_to("FEATURES")
    validation.validate_dict(client.to_dict())
    assert [c.id for c in client.get_collections()] == ["images"] and client.get_collection("nothing") is None
    collection = client.get_collection("images")
    validation.validate_dict(collection.to_dict())
    columns = everything["columns"]
    want = [columns["west"].min(), columns["south"].min(), columns["east"].max(), columns["north"].max()]
    assert collection.extent.spatial.bboxes[0] == pytest.approx(want)
    start, end = collection.extent.temporal.intervals[0]
    assert (start.timestamp(), end.timestamp()) == (columns["start"].min(), columns["end"].max())
    item = collection.get_item("photo-13")
    validation.validate_dict(item.to_dict())
    assert item.id == "photo-13" and item.bbox == pytest.approx(photo_bbox(13)) and item.assets["image"].href
    chip_id = "scene.tif?window=0,0,256,256"
    # a chip's id holds commas, which GET's comma-separated ids cannot carry: POST's array can
    status, page = post_json(f"{geo_app}/v1/search", {"ids": [chip_id, "photo-13", "nothing"]})
    assert status == 200 and [f["id"] for f in page["features"]] == ["photo-13", chip_id]  # by id
    status, chip = call(page["features"][1]["links"][0]["href"])  # the item's own link, its id escaped
    assert status == 200 and chip["id"] == chip_id and chip["collection"] == "images"


def test_stac_listings_page_through_every_matching_item_once(geo_app, everything):
    params = {"bbox": [-117.3, 33.8, -117.175, 34.1], "datetime": "2024-06-01T00:00:00Z/2024-06-08T23:59:59Z"}
    passing = sorted(everything["ids"][ItemFilter.parse(**params).mask(everything["columns"], len(everything["ids"]))])
    client = stac_client(geo_app)
    for method in ("POST", "GET"):
        search = client.search(method=method, limit=3, **params)
        assert [item.id for item in search.items()] == passing and search.matched() == len(passing)
    everyone = sorted(everything["ids"])
    assert [item.id for item in client.get_collection("images").get_items()] == everyone
    status, page = call(f"{geo_app}/v1/collections/images/items?limit=10")
    seen = [f["id"] for f in page["features"]]
    while any(link["rel"] == "next" for link in page["links"]):
        status, page = call(next(link["href"] for link in page["links"] if link["rel"] == "next"))
        seen += [f["id"] for f in page["features"]]
    assert seen == everyone and page["numberMatched"] == len(everyone)
    named = [passing[0], passing[-1], "photo-00", "nothing"]  # photo-00 is no catalog item: its id is photos/...
    assert [item.id for item in client.search(ids=named, **params).items()] == [passing[0], passing[-1]]
    assert list(client.search(collections=["other"], **params).items()) == []


# A triangle over the photos' grid: its legs run along the grid's west and south sides, its hypotenuse is the
# line x + y = -83.245 (-117.14 + 33.895), so its own box holds every photo but it meets only some of them.
TRIANGLE = {"type": "Polygon", "coordinates": [[[-117.205, 33.895], [-117.14, 33.895], [-117.205, 33.96],
                                                [-117.205, 33.895]]]}


def test_a_stac_client_searches_by_a_geometry_and_pages_through_exactly_what_it_meets(geo_app, everything):
    columns, ids = everything["columns"], everything["ids"]
    # by hand: a footprint meets the triangle when it meets the triangle's box and its south-west corner lies
    # on the near side of the hypotenuse (grid corners are 0.01 degrees apart: none lies on it)
    in_box = ((columns["west"] <= -117.14) & (columns["east"] >= -117.205) & (columns["south"] <= 33.96)
              & (columns["north"] >= 33.895))
    meeting = sorted(ids[in_box & (columns["west"] + columns["south"] <= -83.245)])
    assert 4 < len(meeting) < in_box.sum()  # the geometry's box alone would answer more
    client = stac_client(geo_app)
    for method in ("POST", "GET"):  # GET: pystac-client sends the geometry as JSON text
        search = client.search(method=method, intersects=TRIANGLE, limit=4)  # pages of 4: none short
        assert [item.id for item in search.items()] == meeting and search.matched() == len(meeting), method
    june = {"datetime": "2024-06-01T00:00:00Z/2024-06-05T23:59:59Z"}
    timed = [item.id for item in client.search(intersects=TRIANGLE, limit=3, **june).items()]
    by_june_5 = set(ids[columns["end"] <= 1717631999.0].tolist())  # every photo was taken from June 1 on
    assert timed == [i for i in meeting if i in by_june_5] and 0 < len(timed) < len(meeting)
    # ranked by free text: /v1/search/text's ranking over the geometry's box, less what the geometry misses
    status, body = post_json(f"{geo_app}/v1/search/text", {"query": QUERY, "k": int(in_box.sum()),
                                                           "bbox": [-117.205, 33.895, -117.14, 33.96]})
    assert status == 200 and len(body["results"]) == in_box.sum()
    ranked = [hit["id"] for hit in body["results"] if hit["id"] in set(meeting)]
    items = list(stac_client(geo_app, QUERY).search(intersects=TRIANGLE, limit=5, max_items=len(meeting)).items())
    assert [item.id for item in items] == ranked
    assert [item.properties["terrahash:rank"] for item in items] == list(range(1, len(meeting) + 1))


def test_stac_errors_are_json_with_the_right_status(geo_app):
    for path, status, code in [
        ("/v1/search?bbox=1,2,3", 400, "invalid_bbox"), ("/v1/search?datetime=June", 400, "invalid_datetime"),
        ("/v1/search?limit=0", 400, "invalid_limit"), ("/v1/search?limit=ten", 400, "invalid_limit"),
        ("/v1/search?intersects=x", 400, "invalid_intersects"), ("/v1/search?sortby=id", 400, "unknown_parameter"),
        ("/v1/search?bbox=0,0,1,1&intersects=" + urllib.parse.quote(json.dumps(TRIANGLE)), 400, "invalid_intersects"),
        ("/v1/search?q=a%20beach&token=x", 400, "invalid_token"),
        ("/v1/collections/images/items?q=beach", 400, "unknown_parameter"),
        ("/v1/collections/other", 404, "unknown_collection"), ("/v1/collections/other/items", 404, "unknown_collection"),
        ("/v1/collections/images/items/nothing-here", 404, "unknown_id"),
    ]:
        got_status, body = call(geo_app + path)
        assert (got_status, body["error"]["code"]) == (status, code), (path, body)
    got_status, body = post_json(f"{geo_app}/v1/search", {"q": 5})
    assert (got_status, body["error"]["code"]) == (400, "invalid_q")
    unclosed = {"type": "Polygon", "coordinates": [TRIANGLE["coordinates"][0][:-1] + [[-117.1, 33.9]]]}
    for geometry in (unclosed, {"type": "Point", "coordinates": [-200, 0]}, {"type": "Curve"}, "POINT (1 2)"):
        got_status, body = post_json(f"{geo_app}/v1/search", {"intersects": geometry})
        assert (got_status, body["error"]["code"]) == (400, "invalid_intersects"), geometry
    request = urllib.request.Request(f"{geo_app}/v1/conformance")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["content-type"] == "application/json"
    with urllib.request.urlopen(f"{geo_app}/v1/search?limit=1", timeout=30) as answer:
        assert answer.headers["content-type"] == "application/geo+json"
    pystac_client = pytest.importorskip("pystac_client")
    with pytest.raises(pystac_client.exceptions.APIError):
        list(stac_client(geo_app).search(bbox=[0, 50, 1, 40]).items())  # south above north
