"""faiss binary index kinds, named by factory strings (``BFlat``, ``BHNSW<M>``, ``BIVF<nlist>``,
``BHash<nhash>x<b>``): a registry keyed by the factory family, parsed by full-string regexes, each kind
with its search-time tuning and its check of the bits it can index."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import faiss

from serving.model.codes import check_packed, validate_bits


@dataclass(frozen=True)
class IndexKind:
    """One family of faiss binary index, named by its faiss factory string."""

    pattern: str  # full-match regex for the factory string; named groups are integer parameters
    exact: bool  # True when search is exhaustive, so results can be made tie-exact
    defaults: dict  # search-time parameters and their defaults
    tune: Callable  # tune(index, params, k): set the search-time parameters before a search
    check: Callable  # check(fields, bits): raise ValueError for parameters faiss would mishandle
    description: str


def _no_tuning(index, params, k):
    pass


def _tune_hnsw(index, params, k):
    index.hnsw.efSearch = max(int(params["ef_search"]), k)  # HNSW returns at most efSearch results


def _tune_ivf(index, params, k):
    index.nprobe = min(int(params["nprobe"]), index.nlist)


def _tune_hash(index, params, k):
    index.nflip = int(params["nflip"])


def _check_nothing(fields, bits):
    pass


def _check_hnsw(fields, bits):
    if not 2 <= fields["m"] <= 256:  # faiss crashes on M=1
        raise ValueError(f"BHNSW<M> needs 2 <= M <= 256, got M={fields['m']}")


def _check_ivf(fields, bits):
    if fields["nlist"] < 1:
        raise ValueError("BIVF<nlist> needs nlist >= 1")


def _check_hash(fields, bits):
    nhash, b = fields["nhash"], fields["b"]
    if nhash < 1 or not 1 <= b <= 64 or nhash * b > bits:
        raise ValueError(f"BHash<nhash>x<b> needs nhash >= 1, 1 <= b <= 64 and nhash * b <= {bits} bits, "
                         f"got {nhash}x{b}")


INDEX_KINDS: dict[str, IndexKind] = {
    "BFlat": IndexKind(r"BFlat", True, {}, _no_tuning, _check_nothing,
                       "IndexBinaryFlat: exhaustive, exact (the default)"),
    "BHNSW": IndexKind(r"BHNSW(?P<m>\d+)", False, {"ef_search": 64}, _tune_hnsw, _check_hnsw,
                       "IndexBinaryHNSW with M neighbours per node"),
    "BIVF": IndexKind(r"BIVF(?P<nlist>\d+)", False, {"nprobe": 16}, _tune_ivf, _check_ivf,
                      "IndexBinaryIVF with nlist lists, trained on the codes"),
    # faiss's own factory string for IndexBinaryMultiHash: nhash tables of b bits each.
    "BHash": IndexKind(r"BHash(?P<nhash>\d+)x(?P<b>\d+)", False, {"nflip": 2}, _tune_hash, _check_hash,
                       "IndexBinaryMultiHash: nhash hash tables of b bits, probing nflip bit flips"),
}


def parse_factory(factory: str, bits: int) -> tuple[IndexKind, dict]:
    """The IndexKind of ``factory`` and its integer parameters; ValueError for an unknown string."""
    bits = validate_bits(bits)
    for kind in INDEX_KINDS.values():
        match = re.fullmatch(kind.pattern, str(factory))
        if match:
            fields = {name: int(value) for name, value in match.groupdict().items()}
            kind.check(fields, bits)
            return kind, fields
    forms = ", ".join(kind.pattern.replace("(?P<", "<").replace(">\\d+)", ">") for kind in INDEX_KINDS.values())
    raise ValueError(f"unknown index factory {factory!r}; accepted forms: {forms}")


def build_faiss_index(codes_packed, bits: int, factory: str = "BFlat") -> faiss.IndexBinary:
    """A faiss binary index over ``codes_packed`` (uint8 (n, bits // 8)), trained first if it needs it."""
    _, fields = parse_factory(factory, bits)
    codes = check_packed(codes_packed, bits)
    index = faiss.index_binary_factory(bits, factory)
    if not index.is_trained:
        if len(codes) < fields.get("nlist", 1):
            raise ValueError(f"{factory} needs at least {fields.get('nlist')} codes to train, got {len(codes)}")
        index.train(codes)
    index.add(codes)
    return index


def _check_factory_fits(factory: str, bits: int, shard_rows) -> None:
    """Refuse at build time what would fail at load time (an IVF with more lists than codes)."""
    _, fields = parse_factory(factory, bits)
    smallest = min((int(r) for r in shard_rows if r), default=0)
    if "nlist" in fields and smallest and smallest < fields["nlist"]:
        raise ValueError(f"{factory} needs at least {fields['nlist']} codes per shard to train; "
                         f"the smallest shard would hold {smallest}")
