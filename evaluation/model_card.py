"""Model cards, written by code for every registered model version (JSON and Markdown).

A card says what the model is and is not for, from the figures its runs recorded: the data and its
licence, the splits, the training and distillation configs, the retrieval figures of the teacher and the
students on the test split (reported, never used for selection), per-class AP and the worst class
(metrics.per_class_average_precision, as the evaluation report shows it), the energy and CO2 of each
phase, parity of the ONNX students with the torch ones, the intended use, and the limitations and
failure modes the figures show (class collapse, duplicate captions, a weak class, int8 drift).

``write_card`` runs at the end of ``terrahash distill`` for the version it registers (files ``model_card.json``
and ``model_card.md`` beside the ONNX students, so the registered version and every served copy carry
them; the Markdown is also the version's description in MLflow); ``terrahash card NAME VERSION`` writes
one for any version.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

CARD_JSON, CARD_MD = "model_card.json", "model_card.md"

# Licences of the datasets the project knows; a dataset JSON's own "license" field wins.
LICENCES = {
    "ucm_captions": "UC Merced Land Use images (Yang and Newsam, 2010), from the USGS National Map Urban Area "
                    "Imagery collection (public domain); UCM-Captions sentences (Qu et al., 2016), released for "
                    "research use. Cite both papers.",
}
INTENDED_USE = ("Search of aerial and satellite scene archives by text and by example: finding candidate scenes "
                "of a land-use class or a described layout for a person to look at. Not for identifying people, "
                "not for targeting, and not as sole evidence of what is on the ground: a hash code keeps the "
                "gist of a scene, and near-duplicates of rare scenes may be missed.")
LIMITATIONS = (
    "Trained on one archive (aerial RGB at about 0.3 m, 256 px scenes, 21 classes of US land use): other "
    "sensors, resolutions, seasons or regions need a transfer check (`terrahash eval` on a labelled sample) "
    "before indexing.",
    "Text queries are matched to the wording of the training captions, which are short and formulaic; free "
    "text worded differently retrieves worse than the dataset's own captions suggest.",
    "Binary codes rank by Hamming distance: many items tie at the same distance, broken by id, not by merit.",
)
# Thresholds of the failure modes a card flags (the figures are the test split's, binary codes).
COLLAPSE_GAP = 0.4  # image-to-image mAP@all minus mR/100 above this: classes kept, instances lost
WEAK_CLASS_GAP = 0.15  # a class this far below the mean over classes
INT8_RATIO = 0.97  # int8 mAP below this fraction of the teacher's
DUPLICATE_SHARE = 0.1  # test captions seen word for word in train or val


def caption_overlap(dataset, split: str = "test") -> dict:
    """How many of ``split``'s captions there are, are distinct, and occur word for word in the other splits."""
    from evaluation.ceiling import caption_key

    query = [c for r in dataset.split(split) for c in r.captions]
    other = {caption_key(c) for r in dataset.other_splits(split) for c in r.captions}
    keys = [caption_key(c) for c in query]
    return {"captions": len(query), "distinct": len(set(keys)), "seen_elsewhere": sum(k in other for k in keys)}


def failure_modes(figures: dict, per_class: dict | None, overlap: dict, map_ratio: dict) -> list[dict]:
    """The known failure modes, each with whether these figures show it and why."""
    from evaluation.metrics import worst_class

    modes = []
    fp32 = figures.get("fp32") or {}
    i2i, mr = (fp32.get("image_to_image") or {}).get("map_all"), fp32.get("mr")
    if i2i is not None and mr is not None:
        gap = i2i - mr / 100
        modes.append({"name": "class_collapse", "observed": gap > COLLAPSE_GAP,
                      "detail": f"image-to-image mAP@all {i2i:.3f} against mR {mr:.1f}: codes that separate classes "
                                f"but collapse within one find the class, rarely the exact scene (flagged above a gap "
                                f"of {COLLAPSE_GAP})"})
    if overlap["captions"]:
        share = overlap["seen_elsewhere"] / overlap["captions"]
        modes.append({"name": "duplicate_captions", "observed": share > DUPLICATE_SHARE,
                      "detail": f"{overlap['seen_elsewhere']} of the {overlap['captions']} test captions occur word for "
                                f"word in train or val and only {overlap['distinct']} are distinct: text-to-image figures "
                                f"on them flatter the text tower, and R@1 has a ceiling well below 100%"})
    if per_class:
        worst = worst_class(per_class)
        modes.append({"name": "weak_class", "observed": worst["gap"] > WEAK_CLASS_GAP,
                      "detail": f"worst class {worst['class']} at AP {worst['value']:.3f}, {worst['gap']:.3f} below the "
                                f"mean over classes {worst['mean']:.3f}"})
    ratio = (map_ratio.get("int8") or {}).get("image_to_image")
    if ratio is not None:
        modes.append({"name": "int8_drift", "observed": ratio < INT8_RATIO,
                      "detail": f"int8 image student at {ratio:.3f} of the teacher's image-to-image mAP@all"})
    return modes


def _run(client, run_id: str | None) -> dict | None:
    if not run_id or run_id == "unknown" or client is None:
        return None
    run = client.get_run(run_id)
    return {"run_id": run_id, "name": run.info.run_name, "params": dict(run.data.params),
            "metrics": dict(run.data.metrics), "tags": {k: v for k, v in run.data.tags.items()
                                                       if not k.startswith("mlflow.")}}


def _energy(run: dict | None) -> dict | None:
    if run is None:
        return None
    keep = ("energy_kwh", "emissions_kg_co2eq", "energy_kwh_per_1k_images", "emissions_kg_co2eq_per_1k_images")
    return {**{k: run["metrics"][k] for k in keep if k in run["metrics"]},
            "source": run["tags"].get("energy.source", "not measured"), "run_id": run["run_id"]}


def build_card(metrics: dict, dataset, name: str, version: str, client=None) -> dict:
    """The card of version ``version`` of ``name``, from its distillation's ``metrics`` (metrics.json),
    the dataset it was made from, and (with an MLflow ``client``) its runs' parameters and energy."""
    from evaluation.metrics import worst_class

    distill = _run(client, metrics.get("mlflow_run_id"))
    teacher = _run(client, metrics.get("teacher_run_id"))
    report = metrics.get("parity") or {}
    figures = {model: {"image_to_image": dict(f.get("image_to_image") or {}),
                       "text_to_image": dict(f.get("text_to_image") or {}), "mr": f.get("mr")}
               for model, f in (report.get("figures") or {}).items()}
    per_class_model = "fp32" if "fp32" in (report.get("per_class") or {}) else "teacher"
    chosen = (report.get("per_class") or {}).get(per_class_model) or {}
    per_class = {task: chosen.get(task) for task in ("image_to_image", "text_to_image")}
    overlap = caption_overlap(dataset, report.get("split", "test"))
    splits = {split: {"images": len(dataset.split(split)), "captions": sum(len(r.captions) for r in dataset.split(split))}
              for split in ("train", "val", "test")}
    document = json.loads(Path(dataset.json_path).read_text()) if Path(dataset.json_path).is_file() else {}
    card = {
        "model": {"name": name, "version": str(version), "uri": f"models:/{name}/{version}",
                  "card_written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "teacher_run_id": metrics.get("teacher_run_id"), "distill_run_id": metrics.get("mlflow_run_id"),
                  "bits": metrics.get("bits") or _int((teacher or {}).get("params", {}).get("train.bits"))},
        "data": {"dataset": dataset.name, "fingerprint": dataset.fingerprint(),
                 "licence": document.get("license") or document.get("licence") or LICENCES.get(dataset.name,
                                                                                               "unknown: record it as "
                                                                                               "'license' in the "
                                                                                               "dataset JSON"),
                 "classes": list(dataset.classes), "splits": splits, "test_captions": overlap},
        "training": {"teacher": (teacher or {}).get("params"), "distillation": (distill or {}).get("params")},
        "figures": {"split": report.get("split", "test"), "models": figures,
                    "note": "binary codes, Hamming ranking; test split as queries, train+val as the database"},
        "per_class": {"model": per_class_model, **{task: values for task, values in per_class.items() if values},
                      **({"worst": worst_class(per_class["image_to_image"])} if per_class["image_to_image"] else {})},
        "energy": {"training": _energy(teacher), "distillation": _energy(distill)},
        "parity": {key: report.get(key) for key in ("bit_agreement_with_torch", "bit_agreement_with_teacher", "map_ratio")},
        "sizes": metrics.get("sizes"),
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
        "failure_modes": failure_modes(figures, per_class["image_to_image"], overlap, report.get("map_ratio") or {}),
    }
    return card


def _int(value) -> int | None:
    return int(value) if value not in (None, "") else None


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def card_markdown(card: dict) -> str:
    """The card for people: the same facts as the JSON, in sections."""
    m, d = card["model"], card["data"]
    lines = [f"# Model card: {m['name']} version {m['version']}", "",
             f"`{m['uri']}`, {m['bits'] or '?'}-bit codes; teacher run `{m['teacher_run_id']}`, distillation run "
             f"`{m['distill_run_id']}`; card written {m['card_written']}.", "",
             "## Intended use", "", card["intended_use"], "",
             "## Data", "", f"**{d['dataset']}** (fingerprint `{d['fingerprint']}`), {len(d['classes'])} classes.", "",
             f"Licence: {d['licence']}", "", "| split | images | captions |", "|---|---:|---:|"]
    lines += [f"| {s} | {v['images']} | {v['captions']} |" for s, v in d["splits"].items()]
    t = d["test_captions"]
    lines += ["", f"Test captions: {t['captions']}, of which {t['distinct']} distinct and {t['seen_elsewhere']} seen "
                  f"word for word in train or val.", "",
              f"## Retrieval on the {card['figures']['split']} split", "", card["figures"]["note"] + ".", "",
              "| model | image to image mAP@all | text to image mAP@all | mR |", "|---|---:|---:|---:|"]
    for model, f in card["figures"]["models"].items():
        lines.append(f"| {model} | {_num(f['image_to_image'].get('map_all'))} | "
                     f"{_num(f['text_to_image'].get('map_all'))} | {_num(f['mr'], '.1f')} |")
    per_class = card["per_class"]
    if per_class.get("image_to_image"):
        worst = per_class["worst"]
        lines += ["", f"### Per class ({per_class['model']}, image to image AP)", "",
                  f"Worst class: **{worst['class']}** at {worst['value']:.3f}, {worst['gap']:.3f} below the mean over "
                  f"classes ({worst['mean']:.3f}).", "", "| class | image to image | text to image |", "|---|---:|---:|"]
        text = per_class.get("text_to_image") or {}
        for label, value in sorted(per_class["image_to_image"].items(), key=lambda item: (item[1], item[0])):
            lines.append(f"| {label} | {value:.3f} | {_num(text.get(label))} |")
    lines += ["", "## Energy and CO2", "", "| phase | kWh | kg CO2eq | measured by |", "|---|---:|---:|---|"]
    for phase, energy in card["energy"].items():
        energy = energy or {}
        lines.append(f"| {phase} | {_num(energy.get('energy_kwh'), '.6f')} | "
                     f"{_num(energy.get('emissions_kg_co2eq'), '.6f')} | {energy.get('source', 'not recorded')} |")
    parity = card["parity"]
    if parity.get("bit_agreement_with_torch"):
        lines += ["", "## Parity of the ONNX students", "", "| variant | image bits as torch | text bits as torch | "
                  "image mAP / teacher's |", "|---|---:|---:|---:|"]
        for variant, agree in parity["bit_agreement_with_torch"].items():
            ratio = (parity.get("map_ratio") or {}).get(variant, {}).get("image_to_image")
            lines.append(f"| {variant} | {_num(agree.get('image'))} | {_num(agree.get('text'))} | {_num(ratio)} |")
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in card["limitations"]]
    lines += ["", "## Known failure modes", ""]
    lines += [f"- **{mode['name']}** ({'observed' if mode['observed'] else 'not observed'}): {mode['detail']}"
              for mode in card["failure_modes"]]
    return "\n".join(lines) + "\n"


def write_card(folder: str | Path, metrics: dict, dataset, name: str, version: str, client=None) -> dict:
    """Build the card and write ``model_card.json`` and ``model_card.md`` into ``folder``; returns it."""
    card = build_card(metrics, dataset, name, version, client)
    folder = Path(folder)
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2, default=str))
    (folder / CARD_MD).write_text(card_markdown(card))
    return card


def publish_card(client, name: str, version: str, folder: str | Path, run_id: str, artifact_path: str) -> None:
    """Log the card files with the version's files (``artifact_path`` of its run, where its source is)
    and make the Markdown the version's description in the registry."""
    folder = Path(folder)
    for file in (CARD_JSON, CARD_MD):
        client.log_artifact(run_id, str(folder / file), artifact_path)
    client.update_model_version(name, str(version), description=(folder / CARD_MD).read_text()[:5000])
    client.set_model_version_tag(name, str(version), "model_card", f"{artifact_path}/{CARD_JSON}")
