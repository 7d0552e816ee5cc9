"""GeoTIFF scenes as the index sees them: bands chosen per sensor, stretched to 8 bits, cut into chips.

A scene (a georeferenced TIFF, or any TIFF larger than a chip) is read with rasterio, whose wheels
ship GDAL. ``scene_chips`` plans its chips without reading it whole:

- **Bands**: ``ChipConfig.bands`` (1-based, in R, G, B order), by default a sensor's from
  ``SENSOR_BANDS`` (``rgb``: 1, 2, 3; ``sentinel2``: B4, B3, B2 of a 13-band L1C stack), or 1, 2, 3,
  or band 1 three times for a single-band scene.
- **Stretch**: per band, the ``percentiles`` (2 and 98 by default) of its valid pixels map to 0
  and 255, taken from one decimated read of at most ``sample`` x ``sample`` pixels (GDAL uses the
  overviews when the file has them): memory stays bounded on a scene of several GB.
- **Chips**: ``size`` x ``size`` windows on a grid of step ``size - overlap``, the last row and
  column aligned to the scene's edge so every pixel is covered; a scene smaller than a chip is one
  chip. A chip whose nodata share (from the decimated mask) exceeds ``max_nodata`` is skipped and
  counted. Nodata pixels of a kept chip are black.
- **Footprint**: each chip's window bounds in the scene's CRS, reprojected to a WGS84
  ``[west, south, east, north]`` (``rasterio.warp.transform_bounds``, densified edges); None when
  the scene has no CRS.
- **Time**: the scene's ``TIFFTAG_DATETIME`` (``YYYY:MM:DD HH:MM:SS``) as RFC 3339 UTC, unless a
  sidecar gives ``datetime``.

A chip's id is ``<scene id>?window=<col>,<row>,<width>,<height>`` (pixels), and what the encoding
tasks read is a ``ChipRef``: the scene path (or ``s3://`` URI, read by GDAL's /vsis3/, ``gdal_env``),
its window, bands and stretch; ``ChipRef.read`` does one windowed read of a scene each process keeps
open (the last 8 scenes it read).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from serving.index.items import WINDOW_MARK

SENSOR_BANDS = {"rgb": (1, 2, 3), "sentinel2": (4, 3, 2)}
WGS84 = "EPSG:4326"


@dataclass(frozen=True)
class ChipConfig:
    size: int = 256  # chip side in pixels (the encoder resizes it to the model's input)
    overlap: int = 0  # pixels shared by neighbouring chips
    bands: tuple[int, ...] | None = None  # 1-based R, G, B bands; None: the sensor's, else 1, 2, 3
    sensor: str | None = None  # a key of SENSOR_BANDS
    percentiles: tuple[float, float] = (2.0, 98.0)
    max_nodata: float = 0.5  # chips with a larger share of nodata pixels are skipped
    sample: int = 1024  # side of the decimated read the stretch and nodata shares come from

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"chip size {self.size}: must be at least 8 pixels")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"chip overlap {self.overlap}: must be in [0, size)")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"stretch percentiles {self.percentiles}: need 0 <= low < high <= 100")
        if self.sensor is not None and self.sensor not in SENSOR_BANDS:
            raise ValueError(f"unknown sensor {self.sensor!r}; known: {sorted(SENSOR_BANDS)}")
        if not 0 <= self.max_nodata <= 1:
            raise ValueError(f"max_nodata {self.max_nodata}: must be a fraction in [0, 1]")


@dataclass(frozen=True)
class ChipRef:
    """What an encoding task reads: one window of a scene, its bands and their stretch."""

    path: str
    window: tuple[int, int, int, int]  # col, row, width, height (pixels)
    bands: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    def __str__(self) -> str:  # how a skipped chip is listed
        return f"{self.path}{WINDOW_MARK}{','.join(map(str, self.window))}"

    def read(self) -> np.ndarray:
        """The chip as RGB uint8 (height, width, 3): one windowed read, stretched, nodata black. The
        scene stays open for the next chip of the same process (``open_scene``)."""
        from rasterio.windows import Window

        src, lock = open_scene(self.path)
        with lock, gdal_env(self.path):  # a dataset handle is not safe across threads (thumbnails use a pool)
            data = src.read(list(self.bands), window=Window(*self.window), masked=True)  # (3, h, w)
        return stretch(data, self.low, self.high)


def gdal_env(path: str):
    """The rasterio.Env GDAL reads ``path`` in: for an ``s3://`` scene, GDAL's /vsis3/ settings from the
    same environment boto3 reads (``AWS_ENDPOINT_URL`` becomes ``AWS_S3_ENDPOINT``, path-style, HTTP or
    HTTPS as the URL says); the keys and region GDAL takes from the environment itself."""
    import os
    from urllib.parse import urlparse

    import rasterio

    options = {}
    if str(path).startswith("s3://"):
        options["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"  # no listing of the prefix on every open
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint)
            options.update(AWS_S3_ENDPOINT=parsed.netloc or parsed.path, AWS_VIRTUAL_HOSTING="FALSE",
                           AWS_HTTPS="NO" if parsed.scheme == "http" else "YES")
    return rasterio.Env(**options)


def open_scene(path: str):
    """(an open rasterio dataset, its lock), kept open per process for the next chips of the scene; a
    local file that changed since is opened afresh."""
    import os

    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None  # not a local file: let rasterio say what it is
    return _open_scene(path, stamp)


@functools.lru_cache(maxsize=8)
def _open_scene(path: str, stamp):
    import threading

    import rasterio

    with gdal_env(path):
        return rasterio.open(path), threading.Lock()


@dataclass(frozen=True)
class Chip:
    id_suffix: str  # "?window=col,row,width,height"
    ref: ChipRef
    bbox: tuple[float, float, float, float] | None  # WGS84 west, south, east, north
    datetime: str | None  # RFC 3339


@dataclass
class ScenePlan:
    chips: list[Chip]
    skipped_nodata: int = 0  # chips left out for their nodata share
    width: int = 0
    height: int = 0
    crs: str | None = None
    extra: dict = field(default_factory=dict)


def stretch(data: np.ma.MaskedArray, low, high) -> np.ndarray:
    """(3, h, w) masked band values -> (h, w, 3) uint8: low -> 0, high -> 255 per band, masked -> 0."""
    low = np.asarray(low, np.float64)[:, None, None]
    span = np.maximum(np.asarray(high, np.float64)[:, None, None] - low, 1e-12)
    scaled = np.clip((np.ma.getdata(data).astype(np.float64) - low) / span * 255.0, 0, 255)
    scaled[np.ma.getmaskarray(data)] = 0
    return np.ascontiguousarray(np.round(scaled).astype(np.uint8).transpose(1, 2, 0))


def _bands(config: ChipConfig, count: int, path: str) -> tuple[int, ...]:
    bands = config.bands or (SENSOR_BANDS[config.sensor] if config.sensor else (1, 2, 3) if count >= 3 else (1, 1, 1))
    if len(bands) == 1:
        bands = tuple(bands) * 3
    if len(bands) != 3 or not all(1 <= b <= count for b in bands):
        raise ValueError(f"{path}: bands {tuple(bands)} do not name 3 of its {count} band(s) (1-based)")
    return tuple(int(b) for b in bands)


def _starts(extent: int, size: int, step: int) -> list[int]:
    """Window offsets covering [0, extent): a grid of ``step``, the last aligned to the edge."""
    if extent <= size:
        return [0]
    starts = list(range(0, extent - size + 1, step))
    if starts[-1] + size < extent:
        starts.append(extent - size)
    return starts


def tiff_datetime(value: str | None) -> str | None:
    """TIFFTAG_DATETIME ``YYYY:MM:DD HH:MM:SS`` -> ``YYYY-MM-DDTHH:MM:SSZ`` (None if absent or unreadable)."""
    if not value:
        return None
    try:
        return datetime.strptime(value.strip(), "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None


def _is_scene(src, size: int) -> bool:
    """Whether an open TIFF is read as a scene (georeferenced, larger than a chip, or not 3 bands of bytes)."""
    return src.crs is not None or max(src.width, src.height) > size or src.count != 3 or src.dtypes[0] != "uint8"


def scene_chips(path: str, config: ChipConfig = ChipConfig(), only_scenes: bool = False) -> ScenePlan | None:
    """The chips of one scene (see the module docstring); raises rasterio's errors for a bad file.
    With ``only_scenes``, a TIFF that is no scene (3 bands of bytes, no CRS, no larger than a chip)
    gives None: it is read as a plain image."""
    import rasterio
    from rasterio.warp import transform_bounds

    with gdal_env(path), rasterio.open(path) as src:
        if only_scenes and not _is_scene(src, config.size):
            return None
        bands = _bands(config, src.count, path)
        scale = max(1.0, max(src.width, src.height) / config.sample)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        sample = src.read(list(bands), out_shape=(3, *shape), masked=True)  # (3, h', w'), decimated
        valid = ~np.ma.getmaskarray(sample)
        low, high = [], []
        for b in range(3):
            values = np.ma.getdata(sample[b])[valid[b]]
            lo, hi = (np.percentile(values, config.percentiles) if values.size else (0.0, 1.0))
            low.append(float(lo))
            high.append(float(hi) if hi > lo else float(lo) + 1.0)
        nodata = ~valid.all(axis=0)  # (h', w'): any band missing
        when = tiff_datetime(src.tags().get("TIFFTAG_DATETIME"))
        crs = src.crs
        step = config.size - config.overlap
        chips, skipped = [], 0
        for row in _starts(src.height, config.size, step):
            for col in _starts(src.width, config.size, step):
                width, height = min(config.size, src.width - col), min(config.size, src.height - row)
                r0, c0 = int(row / scale), int(col / scale)
                r1, c1 = max(r0 + 1, math.ceil((row + height) / scale)), max(c0 + 1, math.ceil((col + width) / scale))
                if nodata[r0:r1, c0:c1].mean() > config.max_nodata:
                    skipped += 1
                    continue
                bbox = None
                if crs is not None:
                    corners = [src.transform @ (c, r) for c in (col, col + width) for r in (row, row + height)]
                    xs, ys = [x for x, _ in corners], [y for _, y in corners]
                    left, bottom, right, top = min(xs), min(ys), max(xs), max(ys)  # any rotation of the grid
                    bbox = tuple(float(v) for v in transform_bounds(crs, WGS84, left, bottom, right, top,
                                                                  densify_pts=21))
                chips.append(Chip(f"{WINDOW_MARK}{col},{row},{width},{height}",
                                  ChipRef(str(path), (col, row, width, height), bands, tuple(low), tuple(high)),
                                  bbox, when))
        return ScenePlan(chips, skipped, src.width, src.height, crs.to_string() if crs else None)
