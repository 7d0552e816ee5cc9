"""API keys, policy rules, coarsening, token buckets and the query log, as plain code (no Ray)."""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from serving.governance.chain import ZERO_SHA256, seal
from serving.governance.keys import KeyFile, KeyFileError, KeyRing
from serving.governance.policy import check_policy, coarsen, load_policy
from serving.governance.query_log import AuditError, QueryLog, parse_time
from serving.governance.ratelimit import Buckets

SHIPPED_POLICY = os.path.join(os.path.dirname(__file__), "..", "..", "..", "serving", "policy.yaml")


def test_keys_are_stored_only_as_salted_hashes_and_revoked_keys_stop_working(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    ana, bo = keys.create("ana", "reader"), keys.create("bo", "restricted", rate=2, burst=3)
    stored = (tmp_path / "keys.json").read_text()
    assert ana not in stored and ana.split("_", 2)[2] not in stored  # neither the key nor its secret
    assert oct((tmp_path / "keys.json").stat().st_mode)[-3:] == "600"
    records = json.loads(stored)["keys"]
    assert records[0]["salt"] != records[1]["salt"] and all(len(r["sha256"]) == 64 for r in records)
    ring = KeyRing(keys.read())
    assert (ring.identify(ana).name, ring.identify(ana).role) == ("ana", "reader")
    assert (ring.identify(bo).rate, ring.identify(bo).burst) == (2, 3)
    assert ring.identify(ana[:-1] + ("A" if ana[-1] != "A" else "B")) is None  # one character off
    assert ring.identify("thk_00000000_" + "x" * 43) is None and ring.identify("") is None
    assert all("sha256" not in k and "salt" not in k for k in keys.list())
    with pytest.raises(KeyFileError, match="exists"):
        keys.create("ana", "admin")
    with pytest.raises(KeyFileError, match="role"):
        keys.create("cy", "root")
    assert keys.revoke("ana") == 1
    assert KeyRing(keys.read()).identify(ana) is None and KeyRing(keys.read()).identify(bo) is not None
    with pytest.raises(KeyFileError, match="no live key"):
        keys.revoke("ana")
    assert keys.create("ana", "admin")  # the name is free again


def test_keys_on_s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    keys = KeyFile("s3://terrahash-test/auth-test/keys.json")
    assert keys.list() == []
    key = keys.create("svc", "operator")
    assert KeyRing(KeyFile("s3://terrahash-test/auth-test/keys.json").read()).identify(key).role == "operator"


POLICY = {"coarsening": {"distance_step": 4, "max_k": 3, "location_step_deg": 0.5},
          "roles": {"restricted": {"default": "allow", "rules": [
              {"id": "ok-farms", "effect": "allow", "words": ["farm"]},
              {"id": "no-bases", "effect": "deny", "endpoints": ["text"], "words": ["Base", "barracks"]},
              {"id": "no-coords", "effect": "deny", "pattern": r"\d+\.\d+\s*,\s*\d+\.\d+"},
              {"id": "small-k", "effect": "deny", "endpoints": ["image"], "k_over": 2}]},
              "reader": {"default": "deny", "rules": [{"id": "text-only", "effect": "allow", "endpoints": ["text"]}]}}}


@pytest.mark.parametrize("role, endpoint, text, k, denied_by", [
    ("restricted", "text", "an army base by a river", 5, "no-bases"),
    ("restricted", "text", "BASE", 5, "no-bases"),  # case-insensitive
    ("restricted", "text", "a baseball field", 5, None),  # whole words only
    ("restricted", "text", "a farm next to the barracks", 5, None),  # the first matching rule decides
    ("restricted", "text", "fields at 48.85, 2.35", 5, "no-coords"),
    ("restricted", "image", None, 3, "small-k"),
    ("restricted", "image", None, 2, None),
    ("restricted", "similar", None, 9, None),  # small-k names only the image endpoint
    ("reader", "text", "an army base", 50, None),
    ("reader", "image", None, 1, "default"),  # the role's default
    ("operator", "text", "an army base", 5, None),  # no rules for the role
])
def test_policy_rules_decide_in_order(role, endpoint, text, k, denied_by):
    assert check_policy(POLICY).decide(role, endpoint, text, k) == denied_by


def test_a_bad_policy_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="roles.restricted.rules.0.pattern"):
        check_policy({"roles": {"restricted": {"rules": [{"id": "x", "effect": "deny", "pattern": "("}]}}})
    with pytest.raises(ValueError, match="unknown role"):
        check_policy({"roles": {"guest": {}}})
    with pytest.raises(ValueError, match="endpoints"):
        check_policy({"roles": {"reader": {"rules": [{"id": "x", "effect": "deny", "endpoints": ["keys"]}]}}})
    assert load_policy(SHIPPED_POLICY)["roles"]["restricted"]["rules"]


def test_coarsened_answers_keep_only_ids_classes_and_coarse_places():
    hit = {"id": "farm_1", "row": 7, "distance": 13, "score": 0.797, "image_id": "farm_1", "image": "/data/farm_1.tif",
           "thumbnail": "/v1/items/farm_1/thumbnail", "code": "ff00", "text": "a caption", "asymmetric_distance": 12.5,
           "bbox": [2.34, 48.81, 2.36, 48.83], "properties": {"class": "farm", "scene": "S2A_1", "source": "s3://x"}}
    answer = {"query": {"query": "farms"}, "k": 1, "results": [hit], "arm": "a", "model_version": "m",
              "index_version": {"images": "v1"}, "timings_ms": {"search": 1}}
    out = coarsen(answer, check_policy(POLICY).coarsening)
    assert out["results"] == [{"id": "farm_1", "class": "farm", "distance": 12, "bbox": [2.0, 48.5, 2.5, 49.0],
                               "scene": "S2A_1"}]
    assert set(out) == {"query", "k", "results", "coarsened"}


def test_a_token_bucket_per_key_refills_at_its_rate():
    now = [0.0]
    buckets = Buckets(clock=lambda: now[0])
    assert [buckets.take("a", 1.0, 3) for _ in range(3)] == [0.0] * 3
    assert buckets.take("a", 1.0, 3) == pytest.approx(1.0)
    assert buckets.take("b", 1.0, 3) == 0.0  # another key, another bucket
    now[0] = 0.5
    assert buckets.take("a", 1.0, 3) == pytest.approx(0.5)
    now[0] = 1.0
    assert buckets.take("a", 1.0, 3) == 0.0 and buckets.take("a", 1.0, 3) > 0
    now[0] = 100.0  # refills only up to the burst
    assert [buckets.take("a", 1.0, 3) for _ in range(4)][-1] > 0


def _log(tmp_path, count: int = 5) -> QueryLog:
    log = QueryLog(tmp_path / "queries.jsonl")
    seq, sha = log.tail()
    assert (seq, sha) == (0, ZERO_SHA256)
    entries = []
    for i in range(count):
        entry = seal({"time": f"2026-01-01T12:00:0{i}+00:00", "key": "ana" if i % 2 else "bo", "decision": "allowed"},
                     seq + 1, sha)
        seq, sha = entry["seq"], entry["sha256"]
        entries.append(entry)
    log.write(entries[:3])
    log.write(entries[3:])
    return log


def test_the_query_log_chains_and_catches_edits_deletions_and_cuts(tmp_path):
    log = _log(tmp_path)
    assert log.verify() == ([], 5) and log.tail()[0] == 5
    lines = log.path.read_text().splitlines()
    assert [e["seq"] for e in log.query(key="ana")] == [2, 4]
    assert [e["seq"] for e in log.query(since=parse_time("2026-01-01T12:00:03Z"))] == [4, 5]

    def broken(new_lines: list[str]) -> list[str]:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        (copy / "queries.jsonl").write_text("\n".join(new_lines) + "\n")
        shutil.copy(log.head_path, copy / "queries.jsonl.head")
        return QueryLog(copy / "queries.jsonl").verify()[0]

    edited = json.loads(lines[1]) | {"decision": "denied:x"}
    assert any(":2: edited" in p for p in broken([lines[0], json.dumps(edited), *lines[2:]]))
    assert any("gap in the log, entry 000003 is missing" in p for p in broken(lines[:2] + lines[3:]))
    assert any("broken link" in p for p in broken(lines[:2] + lines[3:]))
    assert any("cut off the end" in p for p in broken(lines[:4]))
    assert any("unparseable" in p for p in broken([lines[0], lines[1][:-5], *lines[2:]]))
    (tmp_path / "queries.jsonl").write_text("\n".join(lines + ['{"torn'] ) + "\n")
    with pytest.raises(AuditError, match="last line"):
        log.tail()


def test_times_of_audit_queries():
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_time("2026-01-01").tzinfo is not None
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday")


def test_the_cli_prints_a_new_key_alone_on_stdout_and_verifies_a_log(tmp_path, capsys):
    from cluster.cli.main import main

    keys = str(tmp_path / "keys.json")
    assert main(["keys", "create", "ana", "--role", "reader", "--keys", keys]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and KeyRing(KeyFile(keys).read()).identify(out.strip()).name == "ana"
    assert "shown only this once" in err
    assert main(["keys", "list", "--keys", keys, "--json"]) == 0
    assert [k["name"] for k in json.loads(capsys.readouterr().out)] == ["ana"]
    assert main(["keys", "revoke", "ana", "--keys", keys]) == 0
    log = _log(tmp_path)
    assert main(["audit", "verify", str(log.path)]) == 0 and "5 entries, chain intact" in capsys.readouterr().out
    assert main(["audit", "query", str(log.path), "--key", "bo", "--json"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [1, 3, 5]
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert main(["audit", "verify", str(log.path)]) == 1 and "broken link" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "none.jsonl")]) == 2


def test_the_readme_governance_commands_run(tmp_path, monkeypatch, capsys):
    """`terrahash keys|audit|policy check|index keygen` as docs/security.md writes them (only
    the placeholders FILE and LOG made real files); `policy apply` is tested on a live app."""
    import re
    from pathlib import Path

    from cluster.cli.main import main

    repo = Path(__file__).resolve().parents[3]
    section = (repo / "docs" / "security.md").read_text()
    spans = [s for s in re.findall(r"`(terrahash (?:keys|audit|policy check|index keygen)\b[^`]*)`", section)
             if len(s.split()) > 2]
    assert len(spans) >= 6, spans
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TERRAHASH_KEYS", str(tmp_path / "keys.json"))
    log = _log(tmp_path)
    places = {"FILE": str(repo / "serving" / "policy.yaml"), "LOG": str(log.path)}
    for span in spans:
        argv = [places.get(word, word) for word in span.split()[1:]]
        if argv[:2] == ["index", "keygen"]:
            argv[2] = str(tmp_path / "index.key")
        assert main(argv) == 0, (span, capsys.readouterr())
