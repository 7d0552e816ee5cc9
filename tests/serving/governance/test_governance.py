"""Governance on the live app over real HTTPS: API keys and roles, template rules and their hot reload,
coarsened answers, a rate limit shared by two router replicas, the audit trail of every request, TLS with
a self-signed certificate, and an index encrypted at rest answering as the plain one."""
from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import shutil
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from serving.governance.keys import KeyFile  # noqa: E402
from serving.governance.query_log import QueryLog  # noqa: E402
from tests.serving.runtime.test_traffic import replicas, wait_until  # noqa: E402

APP = "guarded"
POLICY = Path(__file__).resolve().parents[3] / "serving" / "policy.yaml"
ROLES = ("restricted", "reader", "operator", "admin")
LIMITED_BURST = 6
TLS: dict = {}  # the module's SSL context and certificate, set by the fixture


def self_signed(folder: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "terrahash test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def request(url: str, key: str | None = None, payload=None, method: str | None = None, headers: dict | None = None,
            raw: bytes | None = None, content_type: str | None = None) -> tuple[int, dict, object]:
    """(status, headers, JSON body or bytes) of one HTTP request with ``key`` as its bearer token."""
    data = json.dumps(payload).encode() if payload is not None else raw
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if payload is not None or content_type:
        req.add_header("Content-Type", content_type or "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=30, context=TLS.get("context")) as answer:
            status, body, got = answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as err:
        status, body, got = err.code, err.read(), dict(err.headers)
    kind = got.get("content-type", got.get("Content-Type", ""))
    return status, got, (json.loads(body) if "json" in kind else body)


@pytest.fixture(scope="module")
def guarded(local_ray, model_dir, ucm_many, reference, tmp_path_factory):
    """The app with auth on: a key per role, a revoked key, a key with a tight rate, the shipped policy,
    an audit log, two router replicas; served over HTTPS, from an encrypted copy of ``built_index``."""
    from ray import serve

    from evaluation.model_card import write_card
    from serving.app import check_arms
    from serving.ingest.build import build_indexes
    from serving.lifecycle.control import apply_config
    from serving.index.crypto import write_key_file
    from serving.runtime.serve_config import serve_config
    from serving.runtime.settings import ServeSettings
    from tests.conftest import free_port
    from tests.conftest import SHARDS
    from serving.ingest.dataset import load_dataset

    folder = tmp_path_factory.mktemp("governance")
    certfile, keyfile = self_signed(folder)
    TLS.update(context=ssl.create_default_context(cafile=certfile), cert=certfile)
    index_key = folder / "secrets" / "index.key"
    index_key.parent.mkdir()
    write_key_file(index_key)
    root = tmp_path_factory.mktemp("encrypted_index")
    model = folder / "model"  # the students with a model card, as a registered version carries one
    shutil.copytree(model_dir, model)
    write_card(model, {}, load_dataset(ucm_many), "tiny-students", "1")
    build_indexes(model, ucm_many, SHARDS, str(root), batch_size=32, encrypt=True, key_file=str(index_key))
    keys = KeyFile(folder / "keys.json")
    issued = {role: keys.create(role, role) for role in ROLES}
    issued["revoked"] = keys.create("gone", "reader")
    keys.revoke("gone")
    issued["limited"] = keys.create("limited", "reader", rate=0.01, burst=LIMITED_BURST)
    settings = ServeSettings.from_dict({
        "index": str(root), "index_key_file": str(index_key), "tls": {"certfile": certfile, "keyfile": keyfile},
        "app_name": APP, "route_prefix": f"/{APP}", "router_replicas": 2,
        "shard_replicas": 1, "spread_shards": False, "shards_per_replica": 3, "shard_num_cpus": 0.05,
        "encoder_num_cpus": 0.05, "router_num_cpus": 0.05, "max_k": 50,
        "shard_cache_dir": str(tmp_path_factory.mktemp("guarded_shards")),
        "auth": {"enabled": True, "keys": str(folder / "keys.json"), "policy": str(POLICY), "keys_reload_s": 0.5},
        "rate_limit": {"rate": 1000, "burst": 1000}, "audit": {"log": str(folder / "queries.jsonl")},
        "canary": {"enabled": False}})
    check_arms(settings)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, **settings.tls.http_options()})
    apply_config(serve_config(settings, port=port))
    url = f"https://127.0.0.1:{port}/{APP}"
    wait_until(lambda: request(f"{url}/v1/readyz")[0] == 200, 300, "the guarded app is ready")
    items = reference["items"]
    yield {"url": url, "keys": issued, "key_file": keys, "log": QueryLog(folder / "queries.jsonl"),
           "image_id": items.image_ids[0], "image": Path(items.image_paths[0]).read_bytes(),
           "image_path": items.image_paths[0], "root": root}
    serve.shutdown()
    TLS.clear()


def _endpoints(guarded) -> dict:
    """name -> (path, payload, extra request options) of one request to each endpoint."""
    image_id = guarded["image_id"]
    return {
        "text": ("/v1/search/text", {"query": "a farm with green fields", "k": 5}, {}),
        "image": ("/v1/search/image?k=3", None, {"raw": guarded["image"], "content_type": "image/tiff"}),
        "similar": (f"/v1/search/similar/{image_id}?k=3", None, {}),
        "captions": ("/v1/captions", {"image_id": image_id, "k": 3}, {}),
        "items": ("/v1/search/items", {"limit": 5}, {}),
        "thumbnail": (f"/v1/items/{image_id}/thumbnail", None, {}),
        "traffic": ("/v1/traffic", None, {}),
        "keys": ("/v1/keys", None, {}),
        "arm": ("/v1/search/text", {"query": "a farm", "k": 5}, {"headers": {"X-TerraHash-Arm": "default"}}),
        "explain": ("/v1/explain", {"query": "a farm", "result_id": image_id, "grid": 2}, {}),
        "card": ("/v1/models/default/card", None, {}),
        "stac_landing": ("/v1", None, {}),
        "stac_collections": ("/v1/collections/images", None, {}),
        "stac_search": ("/v1/search", {"q": "a farm with green fields", "limit": 3}, {}),
    }


# Expected status per caller and endpoint (restricted: items is denied by the shipped policy's rule; the
# STAC API's catalogue is open to it, its items, which link the images, are not).
UNAUTHENTICATED = dict(text=401, image=401, similar=401, captions=401, items=401, thumbnail=401, traffic=401, keys=401,
                       arm=401, explain=401, card=401, stac_landing=401, stac_collections=401, stac_search=401)
STAC_OK = dict(stac_landing=200, stac_collections=200, stac_search=200)
TABLE = {
    None: UNAUTHENTICATED, "bogus": UNAUTHENTICATED, "revoked": UNAUTHENTICATED,
    "restricted": dict(text=200, image=200, similar=200, captions=200, items=403, thumbnail=403, traffic=403, keys=403, arm=403,
                       explain=403, card=200, stac_landing=200, stac_collections=200, stac_search=403),
    "reader":     dict(text=200, image=200, similar=200, captions=200, items=200, thumbnail=200, traffic=403, keys=403, arm=403,
                       explain=200, card=200, **STAC_OK),
    "operator":   dict(text=200, image=200, similar=200, captions=200, items=200, thumbnail=200, traffic=200, keys=403, arm=200,
                       explain=200, card=200, **STAC_OK),
    "admin":      dict(text=200, image=200, similar=200, captions=200, items=200, thumbnail=200, traffic=200, keys=200, arm=200,
                       explain=200, card=200, **STAC_OK),
}


@pytest.mark.parametrize("caller", list(TABLE))
def test_each_role_against_each_endpoint(guarded, caller):
    key = {"bogus": "thk_00000000_" + "x" * 43}.get(caller, guarded["keys"].get(caller))
    wrong = []
    for name, (path, payload, options) in _endpoints(guarded).items():
        status, headers, body = request(guarded["url"] + path, key, payload, **options)
        if status != TABLE[caller][name]:
            wrong.append(f"{name}: {status} {str(body)[:200]}")
            continue
        if status != 200:
            assert set(body["error"]) >= {"code", "message"}, body  # every refusal is the JSON error shape
            if status == 401:
                assert headers.get("www-authenticate", headers.get("WWW-Authenticate", "")).startswith("Bearer")
            continue
        if name.startswith("stac_"):  # behind the route prefix, every link keeps it
            assert all(link["href"].startswith(guarded["url"] + "/") for link in body["links"]), body["links"]
            assert name != "stac_search" or len(body["features"]) == 3
            continue
        if name in ("thumbnail", "traffic", "keys", "explain", "card"):
            if name == "keys":
                assert {k["name"] for k in body["keys"]} >= set(ROLES) and "sha256" not in json.dumps(body)
            continue
        text = json.dumps(body)
        if caller == "restricted":
            assert body["coarsened"] and body["results"], body
            for hit in body["results"]:
                assert set(hit) <= {"id", "class", "distance", "bbox", "scene"}, hit
                assert hit["distance"] % 8 == 0 and ("class" in hit or name == "captions")  # captions have none
            assert not {"arm", "model_version", "index_version", "timings_ms"} & set(body)
            assert str(Path(guarded["image_path"]).parent) not in text  # no image reference anywhere
        else:
            assert "coarsened" not in body and all("image" in h or "text" in h for h in body["results"]), body
    assert wrong == [], wrong
    # Health and the readiness status are open; readiness details are for operators.
    assert request(guarded["url"] + "/v1/healthz", key)[0] == 200
    deadline = time.monotonic() + 15  # a shard report held up by a busy machine: readiness comes back
    while True:
        status, _, body = request(guarded["url"] + "/v1/readyz", key)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200 and body["ready"], body
    assert ("shards" in body) == (caller in ("operator", "admin")), body


def test_restricted_answers_are_capped_and_never_name_an_image(guarded):
    status, _, body = request(guarded["url"] + "/v1/search/text", guarded["keys"]["restricted"],
                              {"query": "a farm with green fields", "k": 40})
    assert status == 200 and body["k"] == 10 and len(body["results"]) == 10  # the policy's max_k
    status, _, full = request(guarded["url"] + "/v1/search/text", guarded["keys"]["reader"],
                              {"query": "a farm with green fields", "k": 10})
    assert [h["id"] for h in body["results"]] == [h["id"] for h in full["results"]]
    assert [h["distance"] for h in body["results"]] == [h["distance"] // 8 * 8 for h in full["results"]]
    # no location: neither the image reference (for a local archive, its id: then the id alone) nor a thumbnail
    assert not any(key in h for h in body["results"] for key in ("image", "thumbnail"))
    assert not any(h["image"] in json.dumps(body) for h in full["results"] if h["image"] != h["id"])
    status, _, body = request(guarded["url"] + "/v1/search/text", guarded["keys"]["restricted"],
                              {"query": "a farm", "format": "stac"})
    assert status == 403 and body["error"]["code"] == "forbidden"


def test_template_rules_deny_by_id_and_a_hot_reload_changes_the_decision(guarded):
    from serving.lifecycle.control import update_access

    url, key = guarded["url"], guarded["keys"]["restricted"]
    status, _, body = request(f"{url}/v1/search/text", key, {"query": "an army barracks near a river"})
    assert status == 403 and body["error"]["code"] == "denied_by_policy" and "no-defence-sites" in body["error"]["message"]
    assert "barracks" not in body["error"]["message"] and "military" not in body["error"]["message"]  # not the rule's text
    status, _, body = request(f"{url}/v1/search/text", key, {"query": "fields at 48.8566, 2.3522"})
    assert status == 403 and "no-coordinates" in body["error"]["message"]
    image = guarded["image"]
    status, _, body = request(f"{url}/v1/search/image?k=8", key, raw=image, content_type="image/tiff")
    assert status == 403 and "few-image-results" in body["error"]["message"]
    assert request(f"{url}/v1/search/image?k=5", key, raw=image, content_type="image/tiff")[0] == 200
    assert request(f"{url}/v1/search/text", guarded["keys"]["reader"], {"query": "an army barracks"})[0] == 200
    before = replicas(APP)
    policy = json.loads(json.dumps(_current_policy()))
    relaxed = {**policy, "roles": {"restricted": {**policy["roles"]["restricted"], "rules": [
        r for r in policy["roles"]["restricted"]["rules"] if r["id"] != "no-defence-sites"] + [
        {"id": "no-rivers", "effect": "deny", "endpoints": ["text"], "words": ["river"]}]}}}
    try:
        update_access(APP, lambda access: {**access, "policy": relaxed})
        wait_until(lambda: request(f"{url}/v1/search/text", key, {"query": "an army barracks"})[0] == 200
                   and request(f"{url}/v1/search/text", key, {"query": "an army barracks"})[0] == 200, 60,
                   "both router replicas have the new policy")
        status, _, body = request(f"{url}/v1/search/text", key, {"query": "a river"})
        assert status == 403 and "no-rivers" in body["error"]["message"]
        # reconfigured in place: no replica restarted (Serve updates one replica at a time, so wait for the last)
        wait_until(lambda: replicas(APP) == before, 30, "the same replicas running, none restarted")
    finally:
        update_access(APP, lambda access: {**access, "policy": policy})


def _current_policy() -> dict:
    from serving.lifecycle.control import current_config, router_app_config

    app = router_app_config(current_config(), APP)
    [router] = [d for d in app["deployments"] if d["name"] == "Router"]
    return router["user_config"]["access"]["policy"]


def test_a_rate_limit_holds_across_both_router_replicas(guarded):
    url, key, log = guarded["url"], guarded["keys"]["limited"], guarded["log"]
    answers = []
    while len(answers) < 80:
        answers.append(request(f"{url}/v1/search/text", key, {"query": "a harbour", "k": 3}))
        if len(answers) > LIMITED_BURST and len(_replicas_seen(log, "limited", len(answers))) >= 2:
            break
    statuses = [a[0] for a in answers]
    assert statuses[:LIMITED_BURST] == [200] * LIMITED_BURST and set(statuses[LIMITED_BURST:]) == {429}, statuses
    assert len(_replicas_seen(log, "limited", len(answers))) == 2  # both replicas answered, and took from one bucket
    status, headers, body = answers[-1]
    assert body["error"]["code"] == "rate_limited" and int(headers.get("retry-after", headers.get("Retry-After"))) >= 1
    assert request(f"{url}/v1/search/text", guarded["keys"]["reader"], {"query": "a harbour"})[0] == 200  # its own bucket


def _replicas_seen(log: QueryLog, key: str, sent: int) -> set[str]:
    """The router replicas that answered ``key``, once the writer has flushed the entries of all ``sent``."""
    entries = wait_until(lambda: (lambda found: len(found) >= sent and found)(log.query(key=key)), 30,
                         f"the audit entries of {sent} requests of {key}")
    return {e["replica"] for e in entries}


def test_the_audit_chain_holds_every_request_of_1000_mixed_ones(guarded, tmp_path):
    from cluster.cli.main import main

    url, keys = guarded["url"], guarded["keys"]
    image = guarded["image"]
    mixed = [("reader", "/v1/search/text", {"query": "a parking lot"}, {}),
             ("restricted", "/v1/search/text", {"query": "a military airfield"}, {}),  # denied by a rule
             (None, "/v1/search/text", {"query": "a beach"}, {}),  # no key
             ("operator", "/v1/search/image?k=2", None, {"raw": image, "content_type": "image/tiff"}),
             ("restricted", "/v1/traffic", None, {}),  # forbidden
             ("admin", "/v1/search/text", {"query": ""}, {})]  # rejected: empty

    def send(i: int):
        caller, path, payload, options = mixed[i % len(mixed)]
        status, headers, _ = request(url + path, keys.get(caller), payload, **options)
        return status, headers.get("x-request-id", headers.get("X-Request-Id", headers.get("X-Request-ID")))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sent = list(pool.map(send, range(1000)))
    assert {s for s, _ in sent} == {200, 401, 403, 422}
    wanted = {rid for _, rid in sent}
    wait_until(lambda: wanted <= {e["request_id"] for e in guarded["log"].query()}, 30, "every request's entry flushed")
    problems, count = guarded["log"].verify()
    assert problems == [] and count >= 1000
    by_request = {e["request_id"]: e for e in guarded["log"].query()}
    missing = [rid for _, rid in sent if rid not in by_request]
    assert missing == []  # every request, denied ones included
    decisions = [by_request[rid]["decision"] for _, rid in sent]
    assert {"allowed", "denied:no-defence-sites", "unauthenticated", "forbidden", "rejected"} <= set(decisions)
    entry = next(by_request[rid] for status, rid in sent if by_request[rid]["endpoint"] == "image")
    assert entry["key"] == "operator" and entry["results"] == 2 and entry["arm"] == "default"
    assert entry["query_sha256"] == hashlib.sha256(image).hexdigest() and entry["model_version"]
    # The CLI verifies it, reads it by key, and catches an edited or deleted line in a copy.
    assert main(["audit", "verify", str(guarded["log"].path)]) == 0
    assert main(["audit", "query", str(guarded["log"].path), "--key", "operator", "--since", "10m", "--json"]) == 0
    copy = tmp_path / "queries.jsonl"
    lines = guarded["log"].path.read_text().splitlines()
    edited = json.loads(lines[10]) | {"results": 0}
    copy.write_text("\n".join(lines[:10] + [json.dumps(edited)] + lines[11:]) + "\n")
    assert main(["audit", "verify", str(copy)]) == 1
    copy.write_text("\n".join(lines[:10] + lines[11:]) + "\n")
    assert main(["audit", "verify", str(copy)]) == 1


def test_a_revoked_key_stops_working_without_a_restart(guarded):
    url = guarded["url"]
    key = guarded["key_file"].create("temp", "reader")
    wait_until(lambda: request(f"{url}/v1/search/text", key, {"query": "a road"})[0] == 200, 30, "the new key works")
    guarded["key_file"].revoke("temp")
    wait_until(lambda: request(f"{url}/v1/search/text", key, {"query": "a road"})[0] == 401
               and request(f"{url}/v1/search/text", key, {"query": "a road"})[0] == 401, 30, "the key is refused")


def test_losing_the_audit_writer_fails_closed_and_the_chain_survives(guarded):
    """The log's path made unwritable: requests get 503 (closed), or answers with ``on_failure: open``;
    once it is back, Serve's new writer continues the chain from the file."""
    from serving.lifecycle.control import update_access

    url, key, log = guarded["url"], guarded["keys"]["reader"], guarded["log"]
    moved = log.path.with_name("moved.jsonl")
    shutil.move(log.path, moved)
    log.path.mkdir()  # the next flush fails: the writer is lost
    try:
        wait_until(lambda: request(f"{url}/v1/search/text", key, {"query": "a road"})[0] == 503, 30,
                   "requests are refused while nothing records them")
        status, _, body = request(f"{url}/v1/search/text", key, {"query": "a road"})
        assert status == 503 and body["error"]["code"] == "audit_unavailable"
        update_access(APP, lambda access: {**access, "on_failure": "open"})
        wait_until(lambda: request(f"{url}/v1/search/text", key, {"query": "a road"})[0] == 200
                   and request(f"{url}/v1/search/text", key, {"query": "a road"})[0] == 200, 30, "fail open")
    finally:
        update_access(APP, lambda access: {**access, "on_failure": "closed"})
        log.path.rmdir()
        shutil.move(moved, log.path)
    # A 200 alone could come from a router not yet told "closed" again; only a longer chain shows a new writer.
    wait_until(lambda: _recorded(url, key, log), 120, "a new writer records requests again")
    assert log.verify()[0] == []


def _recorded(url: str, key: str, log: QueryLog) -> bool:
    """Whether a request is answered and, within two flushes (polled), its entry is in the log."""
    before = log.tail()[0]
    if request(f"{url}/v1/search/text", key, {"query": "a road"})[0] != 200:
        return False
    deadline = time.monotonic() + 2.5
    while log.tail()[0] <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_fuzzing_with_auth_on_with_and_without_a_key(guarded, reference):
    from tests.serving.runtime.test_fuzz import fuzz_app

    fuzz_app(guarded["url"], reference, examples=25, key=guarded["keys"]["admin"], tls=TLS)
    fuzz_app(guarded["url"], reference, examples=10, expect_unauthorised=True, tls=TLS)


def test_tls_with_a_self_signed_certificate_and_plain_http_refused(guarded):
    assert request(guarded["url"] + "/v1/healthz")[0] == 200  # the client trusts the certificate
    plain = guarded["url"].replace("https://", "http://")
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(plain + "/v1/healthz", timeout=10).read()
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(guarded["url"] + "/v1/healthz", timeout=10)  # a client that does not trust it


def test_the_encrypted_index_answers_as_the_plain_one(guarded, reference):
    from serving.model.codes import pack_signs
    from tests.serving.test_app import expected, got

    stored = list((Path(guarded["root"]) / "index" / "images").rglob("*.npy"))
    assert stored and all(b"NUMPY" not in path.read_bytes() for path in stored)
    for query in reference["items"].captions[::97]:
        status, _, body = request(guarded["url"] + "/v1/search/text", guarded["keys"]["reader"], {"query": query, "k": 20})
        assert status == 200
        assert got(body) == expected(reference, pack_signs(reference["text"].encode([query])), 20)


def test_explanations_over_http(guarded):
    from PIL import Image

    url, key, image_id = guarded["url"], guarded["keys"]["reader"], guarded["image_id"]
    status, _, body = request(f"{url}/v1/explain", key, {"query": "a farm with green fields", "result_id": image_id})
    assert status == 200, body
    occlusion = body["occlusion"]
    assert len(occlusion["hamming_change"]) == 4 and len(occlusion["hamming_change"][0]) == 4  # the default grid
    assert 0 <= occlusion["strongest_cell"][0] < 4 and body["arm"] == "default"
    overlay = Image.open(__import__("io").BytesIO(__import__("base64").b64decode(body["overlay_png_base64"])))
    assert overlay.format == "PNG"
    assert [w["word"] for w in body["words"]] == "a farm with green fields".split()
    assert all(0 <= w["bits_flipped"] <= 16 for w in body["words"])
    status, _, body = request(f"{url}/v1/explain", key, {"image_id": image_id, "result_id": image_id, "grid": 3})
    assert status == 200 and body["occlusion"]["hamming_distance"] == 0 and "words" not in body
    for bad, code in (({"query": "a", "image_id": image_id, "result_id": image_id}, 422),
                      ({"query": "a farm", "result_id": "no/such.jpg"}, 404),
                      ({"query": "a farm", "result_id": image_id, "grid": 40}, 422)):
        status, _, body = request(f"{url}/v1/explain", key, bad)
        assert status == code and "error" in body, (bad, body)


def test_model_cards_over_http(guarded):
    url, key = guarded["url"], guarded["keys"]["restricted"]
    status, _, card = request(f"{url}/v1/models/default/card", key)
    assert status == 200 and card["model"]["uri"] == "models:/tiny-students/1" and card["data"]["dataset"] == "ucm_subset"
    version = request(f"{url}/v1/search/text", guarded["keys"]["reader"], {"query": "a farm"})[2]["model_version"]
    assert request(f"{url}/v1/models/{version}/card", key)[2] == card  # by the version answers name
    status, headers, markdown = request(f"{url}/v1/models/default/card", key, headers={"Accept": "text/markdown"})
    assert status == 200 and markdown.decode().startswith("# Model card: tiny-students version 1")
    status, _, body = request(f"{url}/v1/models/nope/card", key)
    assert status == 404 and body["error"]["code"] == "unknown_model_version"
