"""Downloads against a loopback HTTP server (these machines have no internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest

from dens.data.download import download, fetch, main, resolve


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with support for ``Range: bytes=N-`` (SimpleHTTPRequestHandler has none)."""

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
            self.server.ranges.append(start)
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(root)))
    httpd.ranges = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def test_public_addresses_and_checksums():
    src = resolve("oc20", split="2M")
    assert src.url == "https://dl.fbaipublicfiles.com/opencatalystproject/data/s2ef_train_2M.tar"
    assert src.md5 == "863bc983245ffc0285305a1850e19cf7"
    assert resolve("oc22", split="s2ef").filename == "s2ef_total_train_val_test_lmdbs.tar.gz"
    assert resolve("md17", molecule="benzene").filename == "md17_benzene2017.npz"
    with pytest.raises(ValueError, match="unknown part"):
        resolve("oc20", split="3M")


def test_download_resumes_and_checks_md5(server, tmp_path):
    root, url, httpd = server
    payload = bytes(range(256)) * 4000
    (root / "md17_ethanol.npz").write_bytes(payload)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "md17_ethanol.npz.part").write_bytes(payload[:12345])  # an interrupted transfer
    out = fetch(f"{url}/md17_ethanol.npz", dest / "md17_ethanol.npz", md5=hashlib.md5(payload).hexdigest())
    assert out.read_bytes() == payload and httpd.ranges == [12345]
    assert not (dest / "md17_ethanol.npz.part").exists()
    # a wrong checksum is an error and leaves no file behind
    with pytest.raises(ValueError, match="does not match"):
        fetch(f"{url}/md17_ethanol.npz", tmp_path / "x.npz", md5="0" * 32)
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.npz.part").exists()


def test_cli_with_a_mirror(server, tmp_path):
    root, url, _ = server
    (root / "md17_uracil.npz").write_bytes(b"abc")
    assert main(["md17", "--molecule", "uracil", "--dest", str(tmp_path / "d"), "--base-url", url]) == 0
    assert (tmp_path / "d" / "md17_uracil.npz").read_bytes() == b"abc"
    # a missing file on the server is a clear error
    with pytest.raises(OSError, match="HTTP 404"):
        download("md17", molecule="toluene", dest=tmp_path / "d", base_url=url)


def test_extract_tar(server, tmp_path):
    import tarfile

    root, url, _ = server
    inner = tmp_path / "data.lmdb"
    inner.write_bytes(b"lmdb")
    with tarfile.open(root / "s2ef_total_train_val_test_lmdbs.tar.gz", "w:gz") as tar:
        tar.add(inner, arcname="oc22/data.lmdb")
    md5 = hashlib.md5((root / "s2ef_total_train_val_test_lmdbs.tar.gz").read_bytes()).hexdigest()
    import dens.data.download as dl

    src = dl.SOURCES["oc22"]["s2ef"]
    dl.SOURCES["oc22"]["s2ef"] = dl.Source(src.url, md5, src.note)
    try:
        download("oc22", split="s2ef", dest=tmp_path / "x", base_url=url, extract=True)
    finally:
        dl.SOURCES["oc22"]["s2ef"] = src
    assert (tmp_path / "x" / "oc22" / "data.lmdb").read_bytes() == b"lmdb"
