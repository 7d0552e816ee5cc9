"""Reader for Karpathy-style caption datasets (RSICD, UCM-Captions, Sydney-Captions).

The layout is ``{"dataset": name, "images": [{"filename", "filepath"?, "split"?, "sentences"?:
[{"raw", ...}], "class"?, "imgid"?}]}``; the image file is ``<root>/<filepath>/<filename>``
(RSICD has no ``filepath`` and keeps its images in one folder next to the JSON).

Two kinds of labelled sets beyond the caption datasets are read too, for evaluation: image-only
sets (an entry with a ``class`` and no ``sentences``, or an empty list: ``ImageRecord.captions``
is then empty) and sets without a ``split`` field (``ImageRecord.split`` is None, in no split).
``split`` and ``class`` are given for every entry or for none. Training needs captions:
``CaptionDataset.require_captions`` says which images lack them.

A folder without a ``dataset*.json`` is read as a *class-folder* set, the layout image archives
come in (RSSCN7, AID, UC Merced's own release): one subfolder per class, ``DIR/<class>/**/*``
(JPEG, PNG or TIFF, at any depth inside the class folder; sorted by path; hidden files and folders
left out). Each image becomes an image-only record of that class, in no split (evaluation then goes
leave-one-out). Its ``json_path`` is the folder itself, and its fingerprint a hash of every
image's path in the folder and its bytes.

Every problem is reported with the file it was found in; nothing is skipped silently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

KNOWN_SPLITS = ("train", "val", "test", "restval")
# Folders RSICD-style datasets keep their images in when the JSON has no filepath.
_IMAGE_DIR_CANDIDATES = ("", "images", "RSICD_images", "imgs")
# Layouts load_dataset reads (CaptionDataset.layout).
KARPATHY, CLASS_FOLDERS = "karpathy", "class_folders"
# Image files a class folder's images are found by (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
ACCEPTED_LAYOUTS = ("a Karpathy-style dataset*.json annotation file, or one subfolder per class holding its "
                    "images (DIR/<class>/*.jpg|png|tif, any depth inside the class folder)")


class DatasetError(ValueError):
    """A dataset file or image that cannot be used, with the file named in the message."""


@dataclass(frozen=True)
class ImageRecord:
    index: int  # position in the dataset (stable id used by indexes and metrics)
    path: Path
    captions: tuple[str, ...]  # empty for an image-only entry
    label: str | None  # scene class, when the dataset gives one
    split: str | None  # None when the dataset has no split field


@dataclass(frozen=True)
class CaptionDataset:
    name: str
    json_path: Path  # the annotation file; for a class-folder set, the folder
    records: tuple[ImageRecord, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (file, reason) of images left out on request
    layout: str = KARPATHY  # or CLASS_FOLDERS

    @property
    def classes(self) -> tuple[str, ...]:
        """Sorted scene classes (empty when the dataset has none)."""
        return tuple(sorted({r.label for r in self.records if r.label is not None}))

    def split(self, *names: str) -> list[ImageRecord]:
        """Records of the given splits, in dataset order (``restval`` counts as ``train``)."""
        for name in names:
            if name not in KNOWN_SPLITS:
                raise DatasetError(f"unknown split {name!r}; known: {list(KNOWN_SPLITS)}")
        wanted = set(names) | ({"restval"} if "train" in names else set())
        return [r for r in self.records if r.split in wanted]

    def other_splits(self, name: str) -> list[ImageRecord]:
        """Records of every split but ``name``: the retrieval database for queries from ``name``."""
        self.split(name)  # validates the name
        excluded = {name} | ({"restval"} if name == "train" else set())
        return [r for r in self.records if r.split not in excluded]

    @property
    def has_splits(self) -> bool:
        """Whether the dataset says which split each image is in."""
        return any(r.split is not None for r in self.records)

    def without_captions(self, records: list[ImageRecord] | None = None) -> list[ImageRecord]:
        """The records (default: all) that have no caption."""
        return [r for r in (self.records if records is None else records) if not r.captions]

    def require_captions(self, splits: tuple[str, ...], purpose: str) -> None:
        """Fail, naming the file and the first images, if an image of ``splits`` has no caption (or
        the dataset has no splits at all, as a class-folder set)."""
        if self.records and not self.has_splits:
            missing = self.without_captions()
            what = f"{len(missing)} of its {len(self.records)} images have no caption and " if missing else ""
            raise DatasetError(f"{self.json_path}: {purpose} needs captions and the {'/'.join(splits)} split(s), but "
                               f"{what}no image is in a split; image-only and split-less sets can be evaluated "
                               "(terrahash eval), not trained on")
        missing = self.without_captions(self.split(*splits))
        if missing:
            names = ", ".join(r.path.name for r in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise DatasetError(f"{self.json_path}: {purpose} needs captions, but {len(missing)} image(s) of the "
                               f"{'/'.join(splits)} split(s) have none ({names}); image-only sets can be "
                               "evaluated (terrahash eval), not trained on")

    def label_ids(self, records: list[ImageRecord]) -> list[int]:
        """Class index of each record; fails if the dataset has no classes."""
        if not self.classes:
            raise DatasetError(f"{self.json_path}: has no 'class' field, so class relevance is undefined")
        lookup = {c: i for i, c in enumerate(self.classes)}
        return [lookup[r.label] for r in records]

    def fingerprint(self) -> str:
        """Content hash of the annotation file (names the data a model was trained on); of a
        class-folder set, of every image file it found (skipped ones too): path and bytes."""
        if self.layout == CLASS_FOLDERS:
            return self._folder_fingerprint
        return hashlib.sha256(self.json_path.read_bytes()).hexdigest()[:16]

    @cached_property
    def _folder_fingerprint(self) -> str:
        # Paths relative to the folder: a copy of the set elsewhere has the same fingerprint. The
        # bytes are hashed once per load (a large archive takes seconds).
        files = sorted({Path(r.path) for r in self.records} | {Path(p) for p, _ in self.skipped})
        digest = hashlib.sha256(f"{CLASS_FOLDERS}\n".encode())
        for path in files:
            try:
                with open(path, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                content = "missing"
            digest.update(f"{path.relative_to(self.json_path).as_posix()}\t{content}\n".encode())
        return digest.hexdigest()[:16]


def find_annotation_file(data_dir: Path) -> Path:
    """The single ``dataset*.json`` in ``data_dir`` (or ``data_dir`` itself if it is a file)."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        return data_dir
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: no such dataset folder")
    candidates = sorted(data_dir.glob("dataset*.json"))
    if len(candidates) != 1:
        found = [p.name for p in candidates] or "none"
        raise DatasetError(f"{data_dir}: expected exactly one dataset*.json annotation file, found {found}")
    return candidates[0]


def _image_path(root: Path, entry: dict) -> Path:
    if "filepath" in entry:
        return root / entry["filepath"] / entry["filename"]
    for folder in _IMAGE_DIR_CANDIDATES:
        path = root / folder / entry["filename"]
        if path.exists():
            return path
    return root / entry["filename"]


def _check_image(path: Path) -> str | None:
    """None if ``path`` is a decodable image, else the reason it is not."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: verify() alone passes a JPEG with its tail cut off
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return f"unreadable ({err})"
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_folder_images(folder: Path) -> list[tuple[Path, str]]:
    """(image file, class) of every image in the class folders of ``folder``, sorted by path;
    fails, saying which layouts are accepted, when there are none."""
    found, empty = [], []
    for entry in sorted(folder.iterdir()):
        if _is_hidden(entry.name) or not entry.is_dir():
            continue
        images = []
        for parent, dirs, files in os.walk(entry):
            dirs[:] = [d for d in dirs if not _is_hidden(d)]
            images += [Path(parent) / f for f in files
                       if not _is_hidden(f) and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if images:
            found += [(path, entry.name) for path in sorted(images, key=lambda p: p.relative_to(entry).as_posix())]
        else:
            empty.append(entry.name)
    loose = [p.name for p in folder.iterdir()
             if p.is_file() and not _is_hidden(p.name) and p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        hint = f" ({len(loose)} image(s) lie directly in it, in no class folder)" if loose else ""
        raise DatasetError(f"{folder}: no dataset*.json annotation file and no class folder holding images{hint}; "
                           f"accepted layouts: {ACCEPTED_LAYOUTS}")
    classes = sorted({label for _, label in found})
    if len(classes) == 1:
        raise DatasetError(f"{folder}: one class folder only ({classes[0]!r}), and class relevance needs two or "
                           f"more; if the classes are the subfolders of {classes[0]!r}, give "
                           f"{folder / classes[0]} instead")
    if empty:
        log.warning("%s: %d folder(s) without images, not read as classes: %s", folder, len(empty), empty[:5])
    if loose:
        log.warning("%s: %d image(s) directly in the folder, in no class folder, left out: %s", folder,
                    len(loose), sorted(loose)[:5])
    return found


def _karpathy_entries(json_path: Path) -> tuple[str, list[tuple[Path, tuple[str, ...], str | None, str | None]]]:
    """The dataset's name and (image file, captions, class, split) of every entry of its JSON."""
    root = json_path.parent
    try:
        document = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{json_path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{json_path}: not UTF-8 text ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DatasetError(f"{json_path}: expected an object with an 'images' list (Karpathy layout)")

    entries = []
    for position, entry in enumerate(document["images"]):
        where = f"{json_path}: images[{position}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
        if "filename" not in entry:
            raise DatasetError(f"{where}: missing key 'filename'")
        split = entry.get("split")
        if split is not None and split not in KNOWN_SPLITS:
            raise DatasetError(f"{where} ({entry['filename']}): unknown split {split!r}; known: {list(KNOWN_SPLITS)}")
        try:  # no "sentences" (or an empty list): an image-only entry
            captions = tuple(s["raw"].strip() for s in entry.get("sentences", []))
        except (TypeError, KeyError, AttributeError):
            raise DatasetError(f"{where} ({entry['filename']}): every sentence needs a 'raw' string") from None
        if not all(captions):
            raise DatasetError(f"{where} ({entry['filename']}): has an empty caption")
        entries.append((_image_path(root, entry), captions, entry.get("class"), split))
    return document.get("dataset") or json_path.parent.name, entries


def load_dataset(data: str | Path, check_images: bool = True, skip_bad_images: bool = False) -> CaptionDataset:
    """Read a Karpathy-style dataset from its folder or JSON file, or a class-folder set from its
    folder (one without a ``dataset*.json``: module docstring).

    ``check_images`` decodes every image once so that a corrupt file fails here, before any
    training starts. Bad images raise DatasetError listing them all, unless
    ``skip_bad_images``, in which case they are left out, counted and logged, and kept in
    ``dataset.skipped``.
    """
    data = Path(data)
    if data.is_dir() and not any(data.glob("dataset*.json")):
        source, layout, name = data, CLASS_FOLDERS, data.resolve().name
        entries = [(path, (), label, None) for path, label in _class_folder_images(data)]
    else:
        source, layout = find_annotation_file(data), KARPATHY
        name, entries = _karpathy_entries(source)

    records, bad = [], []
    for path, captions, label, split in entries:
        problem = _check_image(path) if check_images else None
        if problem:
            bad.append((str(path), problem))
            continue
        records.append(ImageRecord(len(records), path, captions, label, split))

    if bad and not skip_bad_images:
        listing = "; ".join(f"{p}: {why}" for p, why in bad[:5])
        raise DatasetError(f"{source}: {len(bad)} image(s) cannot be used ({listing}{' ...' if len(bad) > 5 else ''})")
    if bad:
        log.warning("%s: skipped %d bad image(s), first: %s", source, len(bad), bad[0])
    labelled = sum(r.label is not None for r in records)
    if 0 < labelled < len(records):
        raise DatasetError(f"{source}: {len(records) - labelled} images have no 'class' while others do")
    with_split = sum(r.split is not None for r in records)
    if 0 < with_split < len(records):
        raise DatasetError(f"{source}: {len(records) - with_split} images have no 'split' while others do")
    return CaptionDataset(name, source, tuple(records), tuple(bad), layout)
