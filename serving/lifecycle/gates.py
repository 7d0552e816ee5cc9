"""Promotion gates: what a registered model version must show before an alias moves to it, and the records
they read (val figures, canary records), each gate's result written to the version's tags by the promotion.

Gates, in order (figures from the model version's tags, written by ``terrahash distill`` from the val
split, queries val against a train database: never from the test split):

* ``spec``: the version's image and text specs (fp32 and int8) load, and agree on bits, bit order and
  code space; and match the bits and code space of the index release the ``index`` gate found.
* ``index``: an index release built with this version exists (its ``terrahash.index_releases`` tag)
  and ``serving.index.releases.verify_release`` passes on it (every manifest and shard checksum).
* ``val``: val image-to-image and text-to-image mAP@all and mR of the fp32 students are not worse
  than those of the alias's current holder by more than ``max_val_drop_map`` / ``max_val_drop_mr``.
* ``parity``: on val, the bit agreement of the ONNX students with the torch students (fp32, int8;
  thresholds PARITY_TARGETS), of the fp32 ONNX students with the teacher (did the
  distillation take?), and the students' mAP@all relative to the teacher's are at least the thresholds.
* ``canary`` (the champion alias only): the version holds or held the challenger alias (the audit log,
  or the registry now) and carries a healthy canary record (``canary.*`` tags, written by the serving
  controller through ``write_canary_record``) with at least ``min_canary_requests`` requests.

"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.governance.audit import AuditLog
from serving.model.registry import ModelRef, client, fetch_model, index_releases, resolve_model

GATES = ("spec", "index", "val", "parity", "canary")
SHIPPED_CONFIG = Path(__file__).parents[1] / "promotion.yaml"
CANARY_STATUSES = ("healthy", "failing", "no_data", "rolled_back")
CANARY_FIELDS = ("status", "requests", "error_rate", "p99_ms", "probe_map", "updated")
# What distillation must reach, the parity gate's default thresholds: the bit agreement of the ONNX students
# with the torch students (fp32, int8), and their mAP@all relative to the teacher's (training.parity reports them).
PARITY_TARGETS = {"fp32": 0.999, "int8": 0.99, "map_ratio": 0.98}
# The val figures a version carries (training.parity.version_figures names them, distill sets them).
VAL_FIGURES = {"image_to_image map": "val/fp32/image_to_image/map_all",
               "text_to_image map": "val/fp32/text_to_image/map_all",
               "mR": "val/fp32/mr"}


class GateConfig(BaseModel):
    """The gates' thresholds (serving/promotion.yaml documents each key). Strict: unknown keys and
    strings for numbers are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_val_drop_map: float = Field(0.01, ge=0)  # val mAP@all (i2i, t2i) may be at most this much below the holder's
    max_val_drop_mr: float = Field(1.0, ge=0)  # val mR (percent) may be at most this much below the holder's
    min_bit_agreement_fp32: float = Field(PARITY_TARGETS["fp32"], ge=0, le=1)
    min_bit_agreement_int8: float = Field(PARITY_TARGETS["int8"], ge=0, le=1)
    min_map_ratio: float = Field(PARITY_TARGETS["map_ratio"], ge=0)  # student mAP@all / teacher's, fp32 and int8
    min_teacher_agreement: float = Field(0.9, ge=0, le=1)  # bits of the fp32 students equal to the teacher's
    # the encoder variants that will serve (serving's encoder_variant): only theirs must meet parity
    variants: list[Literal["fp32", "int8"]] = Field(default_factory=lambda: ["fp32"], min_length=1)
    min_canary_requests: int = Field(50, ge=0)
    max_canary_age_h: float = Field(24.0, ge=0)  # an older canary record does not count; 0: any age
    champion_alias: str = "champion"  # the alias the canary gate guards
    challenger_alias: str = "challenger"  # the alias a champion must have served as


def load_gate_config(path: str | Path | None = None) -> GateConfig:
    """Gate thresholds from a YAML mapping (default: the shipped serving/promotion.yaml); ValueError
    naming each bad or unknown key and the file."""
    import yaml

    path = Path(path) if path is not None else SHIPPED_CONFIG
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"gate config {path} not found") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of gate settings")
    try:
        return GateConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError("\n".join(
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
            f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}" for e in err.errors())) from None


@dataclass
class Gate:
    """One gate's verdict: ``detail`` is one line for people, with the figures it was decided on."""

    name: str
    passed: bool
    detail: str
    figures: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name:<7} {self.detail}"


def check_gates(name: str, version, alias: str, *, root=None, tracking_uri: str | None = None,
                config: GateConfig | None = None, model_cache: str | Path | None = None) -> list[Gate]:
    """Every gate's verdict on moving ``alias`` of registered model ``name`` to ``version`` (nothing is
    moved or written). ``root``: the artifact root of the audit log (serving.governance.audit.default_root)."""
    config = config or GateConfig()
    ref = resolve_model(f"models:/{name}/{version}", tracking_uri)
    mlflow_client = client(tracking_uri)
    index_gate, release = _index_gate(ref, tracking_uri)
    gates = [_spec_gate(ref, release, tracking_uri, model_cache), index_gate,
             _val_gate(ref, alias, mlflow_client, config), _parity_gate(ref, config)]
    if alias == config.champion_alias:
        gates.append(_canary_gate(ref, AuditLog(root, name), mlflow_client, config))
    return gates


def _spec_gate(ref: ModelRef, release: dict | None, tracking_uri, model_cache) -> Gate:
    from serving.model.versions import find_spec
    from serving.model.registry import DEFAULT_CACHE
    from serving.model.spec import SpecError, check_code_space, load_spec, spec_code_space

    try:
        folder = fetch_model(ref, model_cache or DEFAULT_CACHE, tracking_uri)
        specs = {}
        for kind in ("image", "text"):
            for variant in ("fp32", "int8"):
                try:
                    specs[f"{kind} {variant}"] = load_spec(find_spec(folder, kind, variant))
                except FileNotFoundError:
                    if variant == "fp32":
                        raise
        layouts = {key: (s.bits, s.data["bit_order"], spec_code_space(s)) for key, s in specs.items()}
        figures = {"bits": specs["image fp32"].bits, "code_space": layouts["image fp32"][2]}
        if len(set(layouts.values())) != 1:
            return Gate("spec", False, "the specs disagree on (bits, bit order, code space): " + "; ".join(
                f"{key}: {value}" for key, value in layouts.items()), figures)
        detail = f"{len(specs)} specs agree: {figures['bits']} bits, code space {str(figures['code_space'])[:19]}..."
        if release is None:
            return Gate("spec", True, f"{detail}; no verified index release to compare with (see the index gate)",
                        figures)
        for key, spec in specs.items():
            check_code_space(spec, release, require=True)
        return Gate("spec", True, f"{detail}, as release {release['release']}", figures)
    except (SpecError, ValueError, FileNotFoundError) as err:
        return Gate("spec", False, str(err))


def _index_gate(ref: ModelRef, tracking_uri) -> tuple[Gate, dict | None]:
    """The gate, and the release it verified (the newest recorded one that verifies)."""
    from serving.index.releases import read_release, verify_release

    recorded = index_releases(ref, tracking_uri)
    if not recorded:
        return Gate("index", False, f"no index release was built with version {ref.version} (build one: "
                                    f"`terrahash index build --model {ref.version_uri} ...`)"), None
    problems = []
    for entry in reversed(recorded):
        where = f"release {entry['release']} of {entry['index']}"
        try:
            release = read_release(entry["index"], entry["release"])
            built_with = (release.get("model") or {}).get("uri")
            if built_with != ref.version_uri:
                problems.append(f"{where} records model {built_with}, not {ref.version_uri}")
                continue
            report = verify_release(entry["index"], entry["release"])
        except (ValueError, OSError, RuntimeError) as err:
            problems.append(f"{where}: {err}")
            continue
        if report.ok:
            rows = {c: r["rows"] for c, r in release["collections"].items()}
            return Gate("index", True, f"{where} verified: {rows}",
                        {"index": entry["index"], "release": entry["release"], "rows": rows}), release
        problems.append(f"{where}: " + "; ".join([*report.problems, *(
            str(p) for r in report.collections.values() for p in r.problems)])[:500])
    return Gate("index", False, f"no recorded index release verifies: {' | '.join(problems)}",
                {"recorded": recorded}), None


def version_figures(ref_or_tags, keys=VAL_FIGURES) -> dict[str, float]:
    """The figures a version carries in its tags (only those present), as floats, by gate name."""
    tags = ref_or_tags.tags if isinstance(ref_or_tags, ModelRef) else ref_or_tags
    found = {}
    for label, key in keys.items():
        if key in tags:
            try:
                found[label] = float(tags[key])
            except ValueError:
                pass
    return found


def _current_holder(mlflow_client, name: str, alias: str):
    """The model version ``alias`` names now, or None when it is unset."""
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except Exception as err:  # noqa: BLE001  (MlflowException)
        if getattr(err, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _val_gate(ref: ModelRef, alias: str, mlflow_client, config: GateConfig) -> Gate:
    mine = version_figures(ref)
    missing = [VAL_FIGURES[k] for k in VAL_FIGURES if k not in mine]
    if missing:
        return Gate("val", False, f"version {ref.version} has no val figures ({', '.join(missing)} missing from its "
                                  f"tags): distil it with `terrahash distill`, which records them", {"candidate": mine})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in mine.items())
    holder = _current_holder(mlflow_client, ref.name, alias)
    if holder is None:
        return Gate("val", True, f"no current holder of {alias!r}; val {shown}", {"candidate": mine})
    if str(holder.version) == ref.version:
        return Gate("val", True, f"version {ref.version} holds {alias!r} already; val {shown}", {"candidate": mine})
    theirs = version_figures(dict(holder.tags or {}))
    figures = {"candidate": mine, "holder": theirs, "holder_version": str(holder.version)}
    if len(theirs) < len(VAL_FIGURES):
        return Gate("val", True, f"current holder version {holder.version} records no val figures: not compared; "
                                 f"val {shown}", figures)
    drops, worse = {}, []
    for label, value in mine.items():
        drops[label] = theirs[label] - value
        limit = config.max_val_drop_mr if label == "mR" else config.max_val_drop_map
        if drops[label] > limit:
            worse.append(f"{label} {value:.4f} vs {theirs[label]:.4f} (drop {drops[label]:.4f} > {limit})")
    figures["drop"] = drops
    if worse:
        return Gate("val", False, f"worse than holder version {holder.version} on val: {'; '.join(worse)}", figures)
    return Gate("val", True, f"not worse than holder version {holder.version} on val: " + ", ".join(
        f"{k} {mine[k]:.4f} vs {theirs[k]:.4f}" for k in mine), figures)


def _parity_gate(ref: ModelRef, config: GateConfig) -> Gate:
    wanted = {f"bit agreement {v} {kind}": (f"val_parity/bit_agreement/{v}/{kind}",
                                            getattr(config, f"min_bit_agreement_{v}"))
              for v in config.variants for kind in ("image", "text")}
    wanted.update({f"teacher agreement fp32 {kind}": (f"val_parity/teacher_agreement/fp32/{kind}",
                                                      config.min_teacher_agreement) for kind in ("image", "text")})
    wanted.update({f"map ratio {v} {task}": (f"val_parity/map_ratio/{v}/{task}", config.min_map_ratio)
                   for v in config.variants for task in ("image_to_image", "text_to_image")})
    values = version_figures(ref, {label: key for label, (key, _) in wanted.items()})
    missing = [wanted[label][0] for label in wanted if label not in values]
    if missing:
        return Gate("parity", False, f"version {ref.version} has no val parity figures ({', '.join(missing)} missing "
                                     f"from its tags)", values)
    short = [f"{label} {values[label]:.4f} < {minimum}" for label, (_, minimum) in wanted.items()
             if values[label] < minimum]
    if short:
        return Gate("parity", False, f"under the parity thresholds on val: {'; '.join(short)}", values)
    return Gate("parity", True, "val: " + ", ".join(f"{label} {values[label]:.4f} >= {wanted[label][1]}"
                                                    for label in wanted), values)


def _canary_gate(ref: ModelRef, audit: AuditLog, mlflow_client, config: GateConfig) -> Gate:
    challenger = config.challenger_alias
    holder = _current_holder(mlflow_client, ref.name, challenger)
    served = audit.held(challenger, ref.version) or (holder is not None and str(holder.version) == ref.version)
    record = canary_record(ref.tags)
    if not served:
        return Gate("canary", False, f"version {ref.version} never served as {challenger!r} (audit log and registry); "
                                     f"promote it to {challenger!r} and let its canary run first", record)
    if not record:
        return Gate("canary", False, f"version {ref.version} carries no canary record (canary.* tags)", record)
    problems = []
    if record.get("status") != "healthy":
        problems.append(f"status {record.get('status')!r}")
    requests = record.get("requests")
    if not isinstance(requests, (int, float)) or requests < config.min_canary_requests:
        problems.append(f"{requests} requests < {config.min_canary_requests}")
    if config.max_canary_age_h and record.get("updated"):
        try:
            age = (datetime.now(timezone.utc) - datetime.fromisoformat(record["updated"])).total_seconds() / 3600
            if age > config.max_canary_age_h:
                problems.append(f"record {age:.1f} h old > {config.max_canary_age_h} h")
        except (TypeError, ValueError):
            problems.append(f"unreadable canary.updated {record['updated']!r}")
    shown = ", ".join(f"{k} {v}" for k, v in record.items())
    if problems:
        return Gate("canary", False, f"canary not healthy: {'; '.join(problems)} ({shown})", record)
    return Gate("canary", True, f"served as {challenger!r}, canary healthy ({shown})", record)


def canary_record(tags: dict) -> dict:
    """The ``canary.*`` tags of a version as values (numbers parsed), {} when it has none."""
    record = {}
    for key in CANARY_FIELDS:
        value = tags.get(f"canary.{key}")
        if value is None:
            continue
        if key in ("requests",):
            try:
                value = int(value)
            except ValueError:
                pass
        elif key in ("error_rate", "p99_ms", "probe_map"):
            try:
                value = float(value)
            except ValueError:
                pass
        record[key] = value
    return record


def _version_of(ref_or_name_version) -> tuple[str, str]:
    if isinstance(ref_or_name_version, ModelRef):
        return ref_or_name_version.name, ref_or_name_version.version
    if isinstance(ref_or_name_version, str):
        from serving.model.registry import parse_model_uri

        parsed = parse_model_uri(ref_or_name_version)
        if parsed is None or parsed[1] is None:
            raise ValueError(f"expected models:/NAME/VERSION, got {ref_or_name_version!r}")
        return parsed[0], parsed[1]
    name, version = ref_or_name_version
    return str(name), str(version)


def write_canary_record(ref_or_name_version, record: dict, tracking_uri: str | None = None) -> dict:
    """Set a version's canary record (tags ``canary.status``, ``canary.requests``, ``canary.error_rate``,
    ``canary.p99_ms``, ``canary.probe_map``, ``canary.updated``): what a serving controller writes about
    the arm serving it. ``ref_or_name_version``: a ModelRef, ``(name, version)`` or ``models:/NAME/VERSION``.
    ``record``: ``status`` (one of CANARY_STATUSES) and any of the other fields; ``updated`` defaults to
    now (UTC ISO). Returns the record as written."""
    name, version = _version_of(ref_or_name_version)
    unknown = set(record) - set(CANARY_FIELDS)
    if unknown:
        raise ValueError(f"unknown canary record field(s) {sorted(unknown)}; known: {list(CANARY_FIELDS)}")
    if record.get("status") not in CANARY_STATUSES:
        raise ValueError(f"canary status must be one of {list(CANARY_STATUSES)}, got {record.get('status')!r}")
    written = {**record, "updated": record.get("updated") or _now()}
    mlflow_client = client(tracking_uri)
    for key, value in written.items():
        mlflow_client.set_model_version_tag(name, version, f"canary.{key}", str(value))
    return written


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
