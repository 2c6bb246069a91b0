"""MNIST and Fashion-MNIST, found locally or downloaded, always verified.

Nothing here trusts a file it has not checked: every IDX file must have the
expected header and shape and the SHA-256 of its decompressed content must
match the table below, so a truncated download or a file from the wrong
dataset fails loudly instead of training on garbage.  See docs/data.md.

Only numpy, the standard library and tqdm are used, so this module can be
imported on its own.
"""

import gzip
import hashlib
import http.client
import os
import pathlib
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib

import numpy as np

DATASETS = ("mnist", "fashion-mnist")

ENV_DATA_DIR = "NNX_DATA_DIR"

#: The four files of both datasets, in the order load() uses them.
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: Expected array shape per file (the same for both datasets).
SHAPES = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}

#: SHA-256 of the *decompressed* files, so a recompressed .gz is still fine.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

#: Public mirrors, tried in turn; each serves NAME.gz under the base URL.
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

#: Folders installed by OS packages (Debian's dataset-fashion-mnist).
SYSTEM_DIRS = {
    "mnist": ("/usr/share/datasets/mnist",),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
}

#: Seconds to wait before retry n (times n), so a flaky link gets a breather.
RETRY_BACKOFF = 1.0

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(Exception):
    """Data missing, damaged or unobtainable; the message says what to do."""

    #: For a damaged file: what is wrong with it, without path or advice.
    problem = None


class _ChecksumMismatch(DatasetError):
    """A well-formed file with the wrong content (maybe another dataset)."""

    def __init__(self, message, problem, actual):
        super().__init__(message)
        self.problem = problem
        self.actual = actual


# --------------------------------------------------------------------------
# Small helpers


def _dataset_name(dataset):
    """Accept 'MNIST', 'fashion_mnist', ... but fail early on typos."""
    name = str(dataset).strip().lower().replace("_", "-")
    if name not in DATASETS:
        raise DatasetError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}"
        )
    return name


def _env_var(dataset, what):
    """NNX_MNIST_MIRRORS, NNX_FASHION_MNIST_MIRRORS, ..."""
    return f"NNX_{dataset.upper().replace('-', '_')}_{what}"


def _fix_hint(path):
    return (
        f"Delete {path} and run again to re-download it, or replace it with "
        f"an intact copy of {_base_name(path)}.gz."
    )


def _base_name(path):
    name = pathlib.Path(path).name
    return name[:-3] if name.endswith(".gz") else name


def _bad_file(path, problem):
    error = DatasetError(f"{path}: {problem}. {_fix_hint(path)}")
    error.problem = problem
    return error


def cache_dir(dataset):
    """Where downloads go: $XDG_CACHE_HOME/nnx/<dataset> or ~/.cache/nnx/<dataset>."""
    dataset = _dataset_name(dataset)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    root = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return root / "nnx" / dataset


# --------------------------------------------------------------------------
# Reading and verifying one IDX file


def _read_payload(path):
    """The decompressed bytes; gzip is detected by its magic, not the name."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e.strerror or e})") from e
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except EOFError as e:
        raise _bad_file(path, "truncated gzip file (the download was cut short)") from e
    except (OSError, zlib.error) as e:
        raise _bad_file(path, f"corrupted gzip file ({e})") from e


def _parse_header(path, data, expected_shape):
    """Check magic and dimensions against the payload; return (dtype, dims, offset)."""
    if len(data) < 4:
        raise _bad_file(path, f"truncated: got only {len(data)} bytes, "
                        f"not even an IDX header")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if expected_shape is not None:
        want = 0x0800 | len(expected_shape)
        if magic != want:
            raise _bad_file(
                path, f"wrong magic number 0x{magic:08X}, expected 0x{want:08X} "
                f"(uint8, {len(expected_shape)} dims); this is not the right IDX file"
            )
    elif data[:2] != b"\0\0" or code not in _IDX_DTYPES:
        raise _bad_file(path, f"not an IDX file (magic number 0x{magic:08X})")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise _bad_file(path, f"truncated: expected at least {offset} header bytes, "
                        f"got {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected_len = offset + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected_len:
        raise _bad_file(
            path, f"truncated: expected {expected_len} bytes for shape {dims}, "
            f"got {len(data)}"
        )
    if len(data) > expected_len:
        raise _bad_file(
            path, f"length mismatch: expected {expected_len} bytes for shape "
            f"{dims}, got {len(data)} ({len(data) - expected_len} extra)"
        )
    if expected_shape is not None and dims != tuple(expected_shape):
        raise _bad_file(path, f"shape {dims} in header, expected {tuple(expected_shape)}")
    return dtype, dims, offset


def read_idx(path, expected_sha256=None, expected_shape=None):
    """Read an IDX file (.gz or raw) into a fresh numpy array, checking it first.

    The header must agree exactly with the payload length.  With
    ``expected_sha256`` the SHA-256 of the decompressed content must match;
    with ``expected_shape`` the magic (uint8, that many dims) and dims must.
    Raises DatasetError naming the file on any problem.
    """
    path = pathlib.Path(path)
    data = _read_payload(path)
    dtype, dims, offset = _parse_header(path, data, expected_shape)
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            problem = (f"wrong checksum: SHA-256 of the decompressed content is "
                       f"{actual}, expected {expected_sha256} (corrupted, or a "
                       f"different file)")
            raise _ChecksumMismatch(f"{path}: {problem}. {_fix_hint(path)}",
                                    problem, actual)
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)
    # Copy: native byte order, writable, and independent of the read buffer.
    return array.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------
# Finding a folder with a complete, verified copy


def _file_in(folder, name):
    """The raw or .gz copy of ``name`` in ``folder``, raw first, or None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _other_dataset(dataset, digest):
    """Which other dataset a file with this digest belongs to, if any."""
    for other, table in CHECKSUMS.items():
        if other != dataset and digest in table.values():
            return other
    return None


def _load_folder(dataset, folder):
    """Verified arrays from ``folder``, or (None, why-not) when it lacks them.

    Missing files and another dataset's files mean "not here"; a damaged
    file raises, because silently skipping it would hide the problem.
    """
    if not folder.is_dir():
        return None, "folder does not exist"
    arrays = {}
    # Smallest first: another dataset's folder is rejected after reading 5 kB.
    order = sorted(FILES, key=lambda name: np.prod(SHAPES[name]))
    missing = [name for name in FILES if _file_in(folder, name) is None]
    if missing:
        found = len(FILES) - len(missing)
        return None, f"{found} of {len(FILES)} files" if found else "no files"
    for name in order:
        path = _file_in(folder, name)
        try:
            arrays[name] = read_idx(path, CHECKSUMS[dataset][name], SHAPES[name])
        except _ChecksumMismatch as e:
            other = _other_dataset(dataset, e.actual)
            if other is None:
                raise
            return None, f"holds {other}, not {dataset}"
    return arrays, None


def _candidates(dataset):
    """Search folders in order, each with a label for messages."""
    folders = []
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        root = pathlib.Path(env).expanduser()
        folders += [(root / dataset, f"${ENV_DATA_DIR}/{dataset}"), (root, f"${ENV_DATA_DIR}")]
    folders.append((cache_dir(dataset), "cache"))
    folders += [(pathlib.Path(d), "system") for d in SYSTEM_DIRS.get(dataset, ())]
    return folders


def _search(dataset, data_dir):
    """(folder, arrays) for the first complete copy, else (None, searched).

    ``searched`` lists "folder: why not" lines for the final error message.
    """
    if data_dir is not None:
        folder = pathlib.Path(data_dir).expanduser()
        arrays, why = _load_folder(dataset, folder)
        if arrays is None:
            raise DatasetError(
                f"data_dir={str(data_dir)!r} does not hold {dataset} ({why}). "
                f"Put {', '.join(n + '.gz' for n in FILES)} (or the "
                f"uncompressed files) there, or leave data_dir unset to use "
                f"${ENV_DATA_DIR} or download into {cache_dir(dataset)}."
            )
        return folder, arrays
    searched = []
    for folder, label in _candidates(dataset):
        arrays, why = _load_folder(dataset, folder)
        if arrays is not None:
            return folder, arrays
        searched.append(f"{folder} ({label}): {why}")
    return None, searched


def find_data_dir(dataset, data_dir=None):
    """The first folder holding all four verified files, or None.

    Order: ``data_dir`` (an error if it lacks them), $NNX_DATA_DIR/<dataset>,
    $NNX_DATA_DIR, cache_dir(dataset), then system folders.  Damaged files
    raise DatasetError rather than being skipped.
    """
    folder, _ = _search(_dataset_name(dataset), data_dir)
    return folder


# --------------------------------------------------------------------------
# Downloading


def _mirrors(dataset, mirrors):
    if mirrors is None:
        env = os.environ.get(_env_var(dataset, "MIRRORS"), "")
        mirrors = [m.strip() for m in env.split(",") if m.strip()] or MIRRORS[dataset]
    elif isinstance(mirrors, str):
        mirrors = [mirrors]
    return [m if m.endswith("/") else m + "/" for m in mirrors]


def _fetch(url, dest_dir, name, expected_sha256, timeout, progress):
    """Download ``url`` to a temp file in ``dest_dir``, verify, move into place.

    The final name only ever appears through os.replace of a verified file,
    so an interrupted or corrupt download leaves nothing behind.
    """
    from tqdm.auto import tqdm  # imported lazily: only downloads need it

    request = urllib.request.Request(url, headers={"User-Agent": "nnx-datasets"})
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"{name}.gz", disable=None if progress else True,
                      leave=False) as bar:
                received = 0
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:  # retryable, unlike bad content
                raise ConnectionError(f"transfer cut off after {received} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        try:
            read_idx(tmp, expected_sha256, SHAPES[name])
        except DatasetError as e:
            raise DatasetError(f"served a bad file: {e.problem or e}") from e
        with open(tmp, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        final = pathlib.Path(dest_dir) / (f"{name}.gz" if gz else name)
        os.replace(tmp, final)
        return final
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _describe(error):
    """A one-line reason for a failed attempt."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _permanent(error):
    """Errors that retrying the same URL cannot fix."""
    if isinstance(error, (DatasetError, ValueError)):  # wrong content, bad URL
        return True
    return isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 \
        and error.code not in (408, 429)


def _fetch_any(dataset, name, dest_dir, mirrors, dead, timeout, retries, progress):
    """Try every live mirror for one file; return (path or None, failures)."""
    failures = []
    for base in mirrors:
        if base in dead:
            continue
        url = f"{base}{name}.gz"
        reasons = []
        for attempt in range(max(retries, 0) + 1):
            if attempt:
                time.sleep(RETRY_BACKOFF * attempt)
            try:
                return _fetch(url, dest_dir, name, CHECKSUMS[dataset][name],
                              timeout, progress), failures
            except (OSError, http.client.HTTPException, ValueError, DatasetError) as e:
                reasons.append(_describe(e))
                if _permanent(e):
                    break
        else:
            # Every attempt failed without an answer: skip it for the other files.
            dead.add(base)
        tries = f" ({len(reasons)} attempts)" if len(reasons) > 1 else ""
        failures.append(f"{url}: {reasons[-1]}{tries}")
    return None, failures


def download(dataset, dest_dir, mirrors=None, timeout=30, retries=2, progress=True):
    """Fetch the four ``NAME.gz`` files into ``dest_dir`` and return it.

    Mirrors (``mirrors``, else $NNX_MNIST_MIRRORS / $NNX_FASHION_MNIST_MIRRORS,
    else MIRRORS) are tried in turn, each ``retries`` extra times on network
    errors.  Files already present and valid are kept; a damaged one raises.
    """
    dataset = _dataset_name(dataset)
    dest_dir = pathlib.Path(dest_dir).expanduser()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create {dest_dir} ({e.strerror or e}); "
                           f"set XDG_CACHE_HOME or pass a writable folder") from e
    if not os.access(dest_dir, os.W_OK):
        raise DatasetError(f"cannot write to {dest_dir}; set XDG_CACHE_HOME "
                           f"or pass a writable folder")
    mirrors = _mirrors(dataset, mirrors)
    dead = set()
    for name in FILES:
        existing = _file_in(dest_dir, name)
        if existing is not None:
            read_idx(existing, CHECKSUMS[dataset][name], SHAPES[name])
            continue
        path, failures = _fetch_any(dataset, name, dest_dir, mirrors, dead,
                                    timeout, retries, progress)
        if path is None:
            raise DatasetError(
                f"could not download {name}.gz for {dataset} from any mirror:\n  "
                + "\n  ".join(failures or ["(no mirrors)"])
            )
    return dest_dir


_download = download  # load() has a parameter named "download"


# --------------------------------------------------------------------------
# The entry point


def _where_to_put(dataset):
    return (
        f"To use {dataset} offline, put {', '.join(n + '.gz' for n in FILES)} "
        f"(or the uncompressed files) in {cache_dir(dataset)}, or in a folder "
        f"named by the {ENV_DATA_DIR} environment variable (or its "
        f"'{dataset}' subfolder), or pass data_dir=.  See docs/data.md."
    )


def load(dataset="mnist", data_dir=None, download=True, progress=True):
    """Verified train/test arrays: {"train": (images, labels), "test": (...)}.

    Images are uint8 (N, 28, 28), labels uint8 (N,).  Looks in the folders of
    find_data_dir(); if none has the data and ``download`` is true, fetches
    it into cache_dir(dataset).
    """
    dataset = _dataset_name(dataset)
    folder, arrays = _search(dataset, data_dir)
    if folder is None:
        searched = arrays
        target = cache_dir(dataset)
        if not download:
            raise DatasetError(
                f"{dataset} not found (download=False). Searched:\n  "
                + "\n  ".join(searched) + "\n" + _where_to_put(dataset)
            )
        if progress:
            print(f"nnx: downloading {dataset} into {target}", file=sys.stderr)
        try:
            _download(dataset, target, progress=progress)
        except DatasetError as e:
            raise DatasetError(
                f"{dataset} not found locally and the download failed.\n"
                f"Searched:\n  " + "\n  ".join(searched) + f"\n{e}\n"
                + _where_to_put(dataset)
            ) from e
        arrays, why = _load_folder(dataset, target)
        if arrays is None:  # download() verified each file; this is a race
            raise DatasetError(f"{target}: {why} after downloading. {_where_to_put(dataset)}")
    return {
        "train": (arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]),
        "test": (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    }
