"""Download the public data sets: resumable transfers, MD5 checksums, optional extraction.

Usage::

    python -m dens.data.download oc20 --split 2M [--dest data/oc20] [--extract]
    python -m dens.data.download oc22 --split s2ef
    python -m dens.data.download md17 --molecule aspirin
    python -m dens.data.download oc20 --split 2M --base-url http://127.0.0.1:8000/   # a mirror

A partial download is kept as ``<file>.part`` and resumed with an HTTP ``Range`` request. The MD5 of the
finished file is checked against the published value where one is recorded (the OC20 / OC22 tables of
the Open Catalyst Project); otherwise it is logged so it can be recorded. ``--base-url`` (or the
``DENS_DATA_MIRROR`` environment variable) replaces the host part of every address, e.g. by a local
mirror, an ``http://127.0.0.1`` server or a ``file://`` folder.

Note: the OC20 S2EF training/validation tarballs hold compressed extxyz files and ``*.txt`` logs with the
per-frame reference energies, not LMDBs; the official LMDBs are made with OCP's
``preprocess_ef.py --ref-energy`` (adsorption-referenced energies). The IS2RE, OC20 S2EF test and OC22
archives hold LMDBs that :func:`dens.data.open_dataset` reads directly.

Examples
--------
>>> resolve("md17", molecule="ethanol").url
'http://www.quantum-machine.org/gdml/data/npz/md17_ethanol.npz'
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .md17 import MD17_MOLECULES

__all__ = ["SOURCES", "Source", "download", "fetch", "main", "md5sum", "resolve"]

logger = logging.getLogger(__name__)

_OCP = "https://dl.fbaipublicfiles.com/opencatalystproject/data/"


@dataclass(frozen=True)
class Source:
    """One downloadable file: address, published MD5 (or ``None``) and what it holds."""

    url: str
    md5: str | None = None
    note: str = ""

    @property
    def filename(self) -> str:
        return Path(urllib.parse.urlparse(self.url).path).name


#: Public addresses and MD5 checksums (OCP DATASET.md tables).
SOURCES: dict[str, dict[str, Source]] = {
    "oc20": {
        "200K": Source(
            _OCP + "s2ef_train_200K.tar", "f8d0909c2623a393148435dede7d3a46", "S2EF train, extxyz + txt"
        ),
        "2M": Source(
            _OCP + "s2ef_train_2M.tar", "863bc983245ffc0285305a1850e19cf7", "S2EF train, extxyz + txt"
        ),
        "20M": Source(
            _OCP + "s2ef_train_20M.tar", "953474cb93f0b08cdc523399f03f7c36", "S2EF train, extxyz + txt"
        ),
        "all": Source(
            _OCP + "s2ef_train_all.tar", "12a7087bfd189a06ccbec9bc7add2bcd", "S2EF train, extxyz + txt"
        ),
        "val_id": Source(
            _OCP + "s2ef_val_id.tar", "f57f7f5c1302637940f2cc858e789410", "S2EF val, extxyz + txt"
        ),
        "val_ood_ads": Source(_OCP + "s2ef_val_ood_ads.tar", "431ab0d7557a4639605ba8b67793f053", "S2EF val"),
        "val_ood_cat": Source(_OCP + "s2ef_val_ood_cat.tar", "532d6cd1fe541a0ddb0aa0f99962b7db", "S2EF val"),
        "val_ood_both": Source(
            _OCP + "s2ef_val_ood_both.tar", "5731862978d80502bbf7017d68c2c729", "S2EF val"
        ),
        "test": Source(
            _OCP + "s2ef_test_lmdbs.tar.gz", "bcada432482f6e87b24e14b6b744992a", "S2EF test LMDBs"
        ),
        "md": Source(_OCP + "s2ef_md.tar", "9fed845aaab8fb4bf85e3a8db57796e0", "S2EF MD data"),
        "rattled": Source(_OCP + "s2ef_rattled.tar", "40431149b27b64ce1fb40cac4e2e064b", "S2EF rattled data"),
        "is2re": Source(
            _OCP + "is2res_train_val_test_lmdbs.tar.gz",
            "cfc04dd2f87b4102ab2f607240d25fb1",
            "IS2RE/IS2RS LMDBs",
        ),
    },
    "oc22": {
        "s2ef": Source(
            _OCP + "oc22/s2ef_total_train_val_test_lmdbs.tar.gz",
            "ebea523c6f8d61248a37b4dd660b11e6",
            "OC22 S2EF-Total LMDBs (total energies)",
        ),
        "is2re": Source(
            _OCP + "oc22/is2res_total_train_val_test_lmdbs.tar.gz", None, "OC22 IS2RE-Total LMDBs"
        ),
    },
    "md17": {
        name: Source(f"http://www.quantum-machine.org/gdml/data/npz/{fname}", None, "MD17 .npz, kcal/mol")
        for name, fname in MD17_MOLECULES.items()
    },
}


def resolve(
    dataset: str, split: str | None = None, molecule: str | None = None, base_url: str | None = None
) -> Source:
    """The :class:`Source` of a data set part, optionally on a mirror (``base_url``)."""
    if dataset not in SOURCES:
        raise ValueError(f"unknown data set {dataset!r}; known: {sorted(SOURCES)}")
    key = molecule if dataset == "md17" else split
    if key is None:
        raise ValueError(
            f"{dataset}: say which part to download ({'--molecule' if dataset == 'md17' else '--split'})"
        )
    table = SOURCES[dataset]
    if key not in table:
        raise ValueError(f"{dataset}: unknown part {key!r}; known: {sorted(table)}")
    src = table[key]
    base = base_url or os.environ.get("DENS_DATA_MIRROR")
    if base:
        src = Source(base.rstrip("/") + "/" + src.filename, src.md5, src.note)
    return src


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 hex digest of a file."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(
    url: str, dest: str | Path, md5: str | None = None, chunk: int = 1 << 20, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` (a file path), resuming a ``dest.part`` left by an earlier attempt.

    Parameters
    ----------
    url : str
        ``http(s)://`` or ``file://`` address.
    dest : str or Path
        Target file.
    md5 : str, optional
        Expected MD5; a mismatch removes the file and raises ``ValueError``.
    chunk : int
        Read size.
    timeout : float
        Socket timeout (s).

    Returns
    -------
    Path
        ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if md5 is None or md5sum(dest) == md5:
            logger.info("%s already present", dest)
            return dest
        logger.warning("%s has the wrong checksum; downloading again", dest)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url)
    if start and url.startswith(("http://", "https://")):
        req.add_header("Range", f"bytes={start}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing left to fetch
            resp = None
        else:
            raise OSError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise OSError(f"cannot download {url}: {err.reason}") from err
    if resp is not None:
        with resp:
            status = getattr(resp, "status", None)
            mode = "ab" if start and status == 206 else "wb"
            if start and mode == "wb":
                logger.info("server ignored the range request; restarting %s", url)
            elif start:
                logger.info("resuming %s at byte %d", url, start)
            with open(part, mode) as fh:
                shutil.copyfileobj(resp, fh, chunk)
    digest = md5sum(part)
    if md5 is not None and digest != md5:
        part.unlink()
        raise ValueError(f"{url}: MD5 {digest} does not match the published {md5}; the file was removed")
    if md5 is None:
        logger.info("%s: MD5 %s (no published checksum recorded)", dest.name, digest)
    part.replace(dest)
    return dest


def download(
    dataset: str,
    split: str | None = None,
    molecule: str | None = None,
    dest: str | Path = "data",
    base_url: str | None = None,
    extract: bool = False,
) -> Path:
    """Download one part of a data set into ``dest`` (and optionally extract an archive there).

    Returns
    -------
    Path
        The downloaded file.
    """
    src = resolve(dataset, split, molecule, base_url)
    target = fetch(src.url, Path(dest) / src.filename, md5=src.md5)
    if extract and tarfile.is_tarfile(target):
        with tarfile.open(target) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(Path(dest), filter="data")
            else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
                tar.extractall(Path(dest))
        logger.info("extracted %s into %s", target.name, dest)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(
        prog="python -m dens.data.download", description="Download OC20 / OC22 / MD17"
    )
    ap.add_argument("dataset", choices=sorted(SOURCES))
    ap.add_argument(
        "--split", help="oc20: " + ", ".join(SOURCES["oc20"]) + "; oc22: " + ", ".join(SOURCES["oc22"])
    )
    ap.add_argument("--molecule", help="md17: " + ", ".join(SOURCES["md17"]))
    ap.add_argument("--dest", default=None, help="target folder (default data/<dataset>)")
    ap.add_argument(
        "--base-url", default=None, help="mirror replacing the public host (also DENS_DATA_MIRROR)"
    )
    ap.add_argument("--extract", action="store_true", help="extract tar archives after download")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dest = args.dest or os.path.join("data", args.dataset)
    path = download(args.dataset, args.split, args.molecule, dest, args.base_url, args.extract)
    logger.info("done: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
