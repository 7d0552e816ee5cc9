"""The items an index build encodes: image ids, files and classes, captions with their image ids, metadata.

Each source gives them: a Karpathy-style dataset (``dataset_items``), an archive
(serving.ingest.archive) or a STAC catalog (serving.ingest.stac). An image's id is its file path
relative to the dataset root (``images/beach/beach00.jpg``; relative to the images' common folder when
the JSON points outside its own folder), a caption's id is ``<image id>#<n>``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Items:
    """What gets indexed: image ids and files (and classes), and the captions with their image ids."""

    image_root: Path
    image_ids: list[str]
    image_paths: list[str]
    caption_ids: list[str]
    caption_image_ids: list[str]
    captions: list[str]
    labels: list[str] = ()  # each image's class ("" when the dataset has none)
    metadata: list[dict] = ()  # each image's other fields (an archive's sidecar, a chip's footprint), {} when none
    skipped: list = ()  # [path, reason] of the files left out before encoding (scenes that do not open)
    extra: dict = field(default_factory=dict)  # recorded in the image manifest (an archive's chipping)

    def without(self, positions) -> "Items":
        """These items less the images at ``positions`` (and those images' captions)."""
        drop = set(positions)
        keep = [i for i in range(len(self.image_ids)) if i not in drop]
        gone = {self.image_ids[i] for i in drop}
        captions = [j for j, image in enumerate(self.caption_image_ids) if image not in gone]
        labels = list(self.labels) or [""] * len(self.image_ids)
        metadata = list(self.metadata) or [{}] * len(self.image_ids)
        return Items(self.image_root, [self.image_ids[i] for i in keep], [self.image_paths[i] for i in keep],
                     [self.caption_ids[j] for j in captions], [self.caption_image_ids[j] for j in captions],
                     [self.captions[j] for j in captions], [labels[i] for i in keep], [metadata[i] for i in keep],
                     list(self.skipped), dict(self.extra))


def dataset_items(data: str | Path, splits: tuple[str, ...] | None = None) -> Items:
    """Read a Karpathy-style dataset (serving.ingest.dataset's reader, which imports no torch)."""
    from serving.ingest.dataset import load_dataset

    dataset = load_dataset(data, check_images=False)
    records = dataset.split(*splits) if splits else list(dataset.records)
    files = [Path(r.path).resolve() for r in records]
    root = dataset.json_path.parent.resolve()
    if not all(root in f.parents for f in files):  # a JSON that points elsewhere (absolute filepaths)
        root = Path(os.path.commonpath([f.parent for f in files])) if files else root
    image_ids, paths, caption_ids, caption_image_ids, captions = [], [], [], [], []
    for record, file in zip(records, files):
        image_id = file.relative_to(root).as_posix()
        image_ids.append(image_id)
        paths.append(str(record.path))
        for n, caption in enumerate(record.captions):
            caption_ids.append(f"{image_id}#{n}")
            caption_image_ids.append(image_id)
            captions.append(caption)
    return Items(root, image_ids, paths, caption_ids, caption_image_ids, captions, [r.label or "" for r in records])
