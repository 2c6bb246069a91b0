"""Tests for nnx.datasets on tiny IDX fixtures; never touches the real network.

The checksum and shape tables are swapped for ones describing the fixtures,
and downloads go to a local http.server on 127.0.0.1.
"""

import functools
import gzip
import hashlib
import http.server
import os
import pathlib
import socket
import threading

import numpy as np
import pytest

from nnx import datasets as ds

REPO = pathlib.Path(__file__).resolve().parents[1]

SHAPES = {
    "train-images-idx3-ubyte": (6, 28, 28),
    "train-labels-idx1-ubyte": (6,),
    "t10k-images-idx3-ubyte": (4, 28, 28),
    "t10k-labels-idx1-ubyte": (4,),
}


def idx_bytes(array):
    """Serialise a uint8 array as IDX (magic 0x0000080N, big-endian dims)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def make_payloads(seed):
    """Decompressed contents of the four fixture files of one fake dataset."""
    rng = np.random.default_rng(seed)
    return {
        name: idx_bytes(rng.integers(0, 256 if len(shape) == 3 else 10, shape))
        for name, shape in SHAPES.items()
    }


PAYLOADS = {"mnist": make_payloads(0), "fashion-mnist": make_payloads(1)}


def write_dataset(folder, dataset="mnist", gz=True, only=None):
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in PAYLOADS[dataset].items():
        if only is not None and name not in only:
            continue
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return folder


def expected_array(dataset, name):
    return np.frombuffer(PAYLOADS[dataset][name], np.uint8, offset=4 + 4 * len(SHAPES[name]))


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Fixture tables, a private cache, no env overrides, no system folders."""
    monkeypatch.setattr(ds, "SHAPES", SHAPES)
    monkeypatch.setattr(ds, "CHECKSUMS", {
        dataset: {n: hashlib.sha256(p).hexdigest() for n, p in payloads.items()}
        for dataset, payloads in PAYLOADS.items()
    })
    monkeypatch.setattr(ds, "SYSTEM_DIRS", {d: (str(tmp_path / "system" / d),) for d in ds.DATASETS})
    monkeypatch.setattr(ds, "MIRRORS", {d: (closed_port_url(),) for d in ds.DATASETS})
    monkeypatch.setattr(ds, "RETRY_BACKOFF", 0.0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("NNX_DATA_DIR", "NNX_MNIST_MIRRORS", "NNX_FASHION_MNIST_MIRRORS"):
        monkeypatch.delenv(var, raising=False)


def closed_port_url():
    """A 127.0.0.1 URL where nothing listens: connection refused, instantly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus two misbehaving prefixes over good/.

    /flaky/NAME answers 503 the first time, then serves good/NAME.
    /short/NAME promises the full length but sends half and hangs up.
    """

    seen = set()

    def do_GET(self):
        prefix, _, rest = self.path.lstrip("/").partition("/")
        if prefix == "flaky" and self.path not in self.seen:
            self.seen.add(self.path)
            self.send_error(503)
        elif prefix in ("flaky", "short"):
            body = (pathlib.Path(self.directory) / "good" / rest).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if prefix == "flaky" else body[: len(body) // 2])
            self.close_connection = True
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www: good/ (fixtures), corrupt/ (bad copies), missing/ (404)."""
    root = tmp_path / "www"
    write_dataset(root / "good")
    write_dataset(root / "fashion", "fashion-mnist")
    corrupt = write_dataset(root / "corrupt")
    # Valid gzip of altered content, and a gzip cut in half.
    for name in SHAPES:
        payload = bytearray(PAYLOADS["mnist"][name])
        payload[-1] ^= 0xFF
        (corrupt / f"{name}.gz").write_bytes(gzip.compress(bytes(payload)))
    blob = (root / "good" / "train-labels-idx1-ubyte.gz").read_bytes()
    (corrupt / "train-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    (root / "missing").mkdir()
    handler_class = type("Handler", (QuietHandler,), {"seen": set()})
    handler = functools.partial(handler_class, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def leftovers(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_good(tmp_path, gz):
    write_dataset(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte"
    path = tmp_path / (f"{name}.gz" if gz else name)
    arr = ds.read_idx(path, ds.CHECKSUMS["mnist"][name], SHAPES[name])
    assert arr.dtype == np.uint8 and arr.shape == (6, 28, 28)
    assert arr.flags.writeable
    np.testing.assert_array_equal(arr.ravel(), expected_array("mnist", name))
    # Without expectations it still parses the header.
    np.testing.assert_array_equal(ds.read_idx(path), arr)


def test_read_idx_other_dtype(tmp_path):
    data = np.arange(6, dtype=">i4").reshape(2, 3)
    path = tmp_path / "ints"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big")
                     + (3).to_bytes(4, "big") + data.tobytes())
    np.testing.assert_array_equal(ds.read_idx(path), data)


def read_bad(path, name="train-images-idx3-ubyte"):
    with pytest.raises(ds.DatasetError) as info:
        ds.read_idx(path, ds.CHECKSUMS["mnist"][name], SHAPES[name])
    message = str(info.value)
    assert str(path) in message
    assert "Delete" in message  # says what to do
    return message


def test_truncated_raw(tmp_path):
    payload = PAYLOADS["mnist"]["train-images-idx3-ubyte"]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(payload[:-100])
    message = read_bad(path)
    assert "truncated" in message
    assert f"expected {len(payload)} bytes" in message and f"got {len(payload) - 100}" in message


def test_truncated_header(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(PAYLOADS["mnist"]["train-images-idx3-ubyte"][:9])
    assert "truncated" in read_bad(path)


def test_truncated_gzip(tmp_path):
    blob = gzip.compress(PAYLOADS["mnist"]["train-images-idx3-ubyte"])
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    assert "truncated gzip" in read_bad(path)


def test_corrupted_gzip(tmp_path):
    blob = bytearray(gzip.compress(PAYLOADS["mnist"]["train-images-idx3-ubyte"]))
    blob[len(blob) // 2] ^= 0xFF
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(blob))
    read_bad(path)


def test_wrong_magic(tmp_path):
    # A labels file where images are expected.
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(PAYLOADS["mnist"]["train-labels-idx1-ubyte"])
    message = read_bad(path)
    assert "magic" in message and "0x00000801" in message and "0x00000803" in message


def test_not_idx(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ds.DatasetError, match="not an IDX file"):
        ds.read_idx(path)


def test_wrong_checksum(tmp_path):
    payload = bytearray(PAYLOADS["mnist"]["train-images-idx3-ubyte"])
    payload[100] ^= 1
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(payload)))
    message = read_bad(path)
    assert "checksum" in message and ds.CHECKSUMS["mnist"]["train-images-idx3-ubyte"] in message


def test_extra_bytes(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(PAYLOADS["mnist"]["train-images-idx3-ubyte"] + b"\0" * 7)
    assert "length mismatch" in read_bad(path) and "7 extra" in read_bad(path)


def test_wrong_dims(tmp_path):
    # Self-consistent file, but 5 images instead of the expected 6.
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((5, 28, 28))))
    message = read_bad(path)
    assert "(5, 28, 28)" in message and "(6, 28, 28)" in message


def test_recompressed_gz_is_fine(tmp_path):
    name = "t10k-labels-idx1-ubyte"
    path = tmp_path / f"{name}.gz"
    path.write_bytes(gzip.compress(PAYLOADS["mnist"][name], compresslevel=1, mtime=123))
    ds.read_idx(path, ds.CHECKSUMS["mnist"][name], SHAPES[name])


# --------------------------------------------------------------------------
# Look-up order


def test_cache_dir(monkeypatch, tmp_path):
    assert ds.cache_dir("mnist") == tmp_path / "xdg" / "nnx" / "mnist"
    assert ds.cache_dir("Fashion_MNIST") == tmp_path / "xdg" / "nnx" / "fashion-mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ds.cache_dir("mnist") == pathlib.Path.home() / ".cache" / "nnx" / "mnist"


def test_unknown_dataset():
    with pytest.raises(ds.DatasetError, match="mnist, fashion-mnist"):
        ds.load("cifar10")


def test_load_explicit_dir(tmp_path):
    write_dataset(tmp_path / "d", gz=False)
    data = ds.load(data_dir=tmp_path / "d", download=False)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (6, 28, 28) and ytr.shape == (6,)
    assert xte.shape == (4, 28, 28) and yte.shape == (4,)
    assert xtr.dtype == np.uint8
    np.testing.assert_array_equal(ytr, expected_array("mnist", "train-labels-idx1-ubyte"))


def test_data_dir_beats_env_beats_cache(monkeypatch, tmp_path):
    arg, env = write_dataset(tmp_path / "arg"), write_dataset(tmp_path / "env")
    cache = write_dataset(ds.cache_dir("mnist"))
    assert ds.find_data_dir("mnist") == cache
    monkeypatch.setenv("NNX_DATA_DIR", str(env))
    assert ds.find_data_dir("mnist") == env
    assert ds.find_data_dir("mnist", data_dir=arg) == arg


def test_env_subfolder_first(monkeypatch, tmp_path):
    root = write_dataset(tmp_path / "env")
    sub = write_dataset(root / "mnist")
    monkeypatch.setenv("NNX_DATA_DIR", str(root))
    assert ds.find_data_dir("mnist") == sub


def test_env_folder_of_other_dataset_is_skipped(monkeypatch, tmp_path):
    monkeypatch.setenv("NNX_DATA_DIR", str(write_dataset(tmp_path / "env", "mnist")))
    assert ds.find_data_dir("fashion-mnist") is None
    cache = write_dataset(ds.cache_dir("fashion-mnist"), "fashion-mnist")
    assert ds.find_data_dir("fashion-mnist") == cache


def test_system_folder(tmp_path):
    system = write_dataset(tmp_path / "system" / "fashion-mnist", "fashion-mnist")
    assert ds.find_data_dir("fashion-mnist") == system
    assert ds.find_data_dir("mnist") is None


def test_explicit_dir_missing_is_an_error(monkeypatch, tmp_path):
    # Even though NNX_DATA_DIR has the data, a wrong data_dir must not fall through.
    monkeypatch.setenv("NNX_DATA_DIR", str(write_dataset(tmp_path / "env")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ds.DatasetError, match="does not hold mnist") as info:
        ds.load(data_dir=empty)
    assert str(empty) in str(info.value)
    write_dataset(tmp_path / "partial", only=["train-images-idx3-ubyte"])
    with pytest.raises(ds.DatasetError, match="1 of 4 files"):
        ds.find_data_dir("mnist", data_dir=tmp_path / "partial")


def test_explicit_dir_other_dataset(tmp_path):
    with pytest.raises(ds.DatasetError, match="holds mnist"):
        ds.load("fashion-mnist", data_dir=write_dataset(tmp_path / "d"))


def test_damaged_file_is_not_skipped(monkeypatch, tmp_path):
    env = write_dataset(tmp_path / "env")
    write_dataset(ds.cache_dir("mnist"))
    bad = env / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])
    monkeypatch.setenv("NNX_DATA_DIR", str(env))
    with pytest.raises(ds.DatasetError, match="truncated") as info:
        ds.load()
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------
# Downloading


def test_download_falls_back_to_working_mirror(monkeypatch, server):
    mirrors = f"{closed_port_url()},{server}missing,{server}corrupt/,{server}good/"
    monkeypatch.setenv("NNX_MNIST_MIRRORS", mirrors)
    data = ds.load(progress=False)
    cache = ds.cache_dir("mnist")
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in SHAPES)
    assert leftovers(cache) == []
    np.testing.assert_array_equal(
        data["test"][1], expected_array("mnist", "t10k-labels-idx1-ubyte"))
    # Second call: found in the cache, the network is not needed.
    monkeypatch.setenv("NNX_MNIST_MIRRORS", closed_port_url())
    assert ds.find_data_dir("mnist") == cache
    ds.load(progress=False)


def test_download_function(tmp_path, server):
    dest = tmp_path / "dest"
    assert ds.download("fashion-mnist", dest, mirrors=[f"{server}fashion"],
                       retries=0, progress=False) == dest
    assert ds.find_data_dir("fashion-mnist", data_dir=dest) == dest


def test_download_keeps_valid_files(tmp_path, server):
    dest = write_dataset(tmp_path / "dest", gz=False, only=["train-images-idx3-ubyte"])
    ds.download("mnist", dest, mirrors=[f"{server}good/"], progress=False)
    assert not (dest / "train-images-idx3-ubyte.gz").exists()
    assert ds.find_data_dir("mnist", data_dir=dest) == dest


def test_corrupt_download_leaves_nothing(tmp_path, server):
    dest = tmp_path / "dest"
    with pytest.raises(ds.DatasetError) as info:
        ds.download("mnist", dest, mirrors=[f"{server}corrupt/"], progress=False)
    message = str(info.value)
    assert "checksum" in message or "truncated" in message
    assert f"{server}corrupt/" in message
    assert list(dest.iterdir()) == []  # no final name, no temp file


def test_retries_transient_errors(tmp_path, server):
    dest = tmp_path / "dest"
    ds.download("mnist", dest, mirrors=[f"{server}flaky/"], retries=1, progress=True)
    assert ds.find_data_dir("mnist", data_dir=dest) == dest
    assert leftovers(dest) == []


def test_cut_off_transfer_leaves_nothing(tmp_path, server):
    dest = tmp_path / "dest"
    with pytest.raises(ds.DatasetError, match=r"short/train-images.*\(3 attempts\)"):
        ds.download("mnist", dest, mirrors=[f"{server}short/"], retries=2, progress=False)
    assert list(dest.iterdir()) == []


def test_unwritable_destination(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(ds.DatasetError, match="cannot write"):
        ds.download("mnist", tmp_path, progress=False)


def test_offline_error(tmp_path):
    with pytest.raises(ds.DatasetError) as info:
        ds.load(progress=False)
    message = str(info.value)
    assert "NNX_DATA_DIR" in message
    assert str(ds.cache_dir("mnist")) in message
    assert str(tmp_path / "system" / "mnist") in message  # lists what was searched
    assert "train-images-idx3-ubyte.gz" in message  # says which files to put there
    assert "Connection refused" in message or "refused" in message.lower()
    assert leftovers(ds.cache_dir("mnist")) == []


def test_no_download(tmp_path):
    with pytest.raises(ds.DatasetError, match="download=False") as info:
        ds.load(download=False)
    assert "NNX_DATA_DIR" in str(info.value)
    assert not ds.cache_dir("mnist").exists()


# --------------------------------------------------------------------------
# The real thing, when a copy is around


def real_mnist_dir(monkeypatch):
    """Where the CLI finds MNIST ($NNX_DATA_DIR, the cache, the system folder), else the
    shared folder (tests/mnist_location.py); called after monkeypatch.undo()."""
    from mnist_location import SKIP_REASON, mnist_dir

    folder = mnist_dir()
    if folder is None:
        pytest.skip(SKIP_REASON)
    return folder


def test_real_mnist(monkeypatch):
    monkeypatch.undo()  # the real tables, not the fixture ones
    folder = real_mnist_dir(monkeypatch)
    data = ds.load("mnist", data_dir=folder, download=False)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (60000, 28, 28) and xtr.dtype == np.uint8
    assert ytr.shape == (60000,)
    assert xte.shape == (10000, 28, 28) and yte.shape == (10000,)
    assert ytr[0] == 5
    assert np.bincount(ytr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
