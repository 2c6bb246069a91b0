"""MNIST and Fashion-MNIST, found locally or downloaded, always verified.

Nothing here trusts a file it has not checked: every IDX file must have the
expected header and shape and the SHA-256 of its decompressed content must
match the table below, so a truncated download or a file from the wrong
dataset fails loudly instead of training on garbage.  See docs/data.md.

Only numpy, the standard library and tqdm are used, so this module can be
imported on its own.
"""

import hashlib
import http.client
import math
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
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

#: Seconds to wait for a mirror to accept the connection and answer the request, and then
#: for each piece of data; a download as a whole gives up after DOWNLOAD_BUDGET seconds.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
DOWNLOAD_BUDGET = 300.0
#: While waiting on the network, a line every HEARTBEAT seconds says for what.
HEARTBEAT = 5.0

#: The largest IDX file read when no shape is expected (a decompression bomb stops here).
MAX_IDX_BYTES = 1 << 30

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


def _expected_length(header, expected_shape):
    """Bytes a complete file has, from its first bytes (or the expected shape); None while
    ``header`` is too short to tell."""
    if expected_shape is not None:
        return 4 + 4 * len(expected_shape) + math.prod(expected_shape)
    if len(header) < 4:
        return None
    ndim, dtype = header[3], _IDX_DTYPES.get(header[2])
    if dtype is None or header[:2] != b"\0\0":
        return len(header)  # not IDX: _parse_header says so
    if len(header) < 4 + 4 * ndim:
        return None
    dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return 4 + 4 * ndim + math.prod(dims) * dtype.itemsize


def _gunzip(path, f, expected_shape):
    """Inflate a gzip stream (all members), stopping as soon as the output passes the size
    the IDX header (or the expected shape) allows: a small file that inflates to gigabytes
    (a decompression bomb) is refused after reading at most one chunk too many."""
    out = bytearray()
    limit = _expected_length(b"", expected_shape)
    d = zlib.decompressobj(zlib.MAX_WBITS | 16)
    pending, member_done = b"", False
    while True:
        if not pending:
            pending = f.read(_CHUNK)
            if not pending:
                break
        if member_done:  # another gzip member, or trailing zero padding
            if not pending.strip(b"\0"):
                pending = b""
                continue
            d, member_done = zlib.decompressobj(zlib.MAX_WBITS | 16), False
        cap = (limit if limit is not None else MAX_IDX_BYTES) - len(out) + 1
        out += d.decompress(pending, max(1, min(cap, 16 * _CHUNK)))
        pending = d.unconsumed_tail
        if d.eof:
            pending, member_done = d.unused_data + pending, True
        if limit is None:
            limit = _expected_length(bytes(out[:1024]), None)
        if len(out) > (limit if limit is not None else MAX_IDX_BYTES):
            if expected_shape is not None:
                _parse_header(path, bytes(out[:4 + 4 * len(expected_shape)]),
                              expected_shape, header_only=True)
            raise _bad_file(
                path, f"decompresses to more than the {limit if limit is not None else MAX_IDX_BYTES} "
                "bytes its IDX header (or the expected shape) allows; it is not an intact file "
                "(possibly a decompression bomb)")
    if not member_done:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")
    return bytes(out)


def _read_payload(path, expected_shape=None):
    """The decompressed bytes; gzip is detected by its magic, not the name. Never reads or
    inflates more than the file's own header (or ``expected_shape``) allows."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            if magic != _GZIP_MAGIC:
                head = magic + f.read(1022)
                limit = _expected_length(head, None)
                size = os.fstat(f.fileno()).st_size
                if limit is not None and size > max(limit, len(head)):
                    _oversized(path, head, size)  # too long: say so without reading it all
                return head + f.read()
            f.seek(0)
            try:
                return _gunzip(path, f, expected_shape)
            except EOFError as e:
                raise _bad_file(path, "truncated gzip file (the download was cut short)") from e
            except zlib.error as e:
                raise _bad_file(path, f"corrupted gzip file ({e})") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e.strerror or e})") from e


def _oversized(path, head, size):
    """A raw file longer than its header allows: report it like _parse_header would."""
    ndim = head[3] if len(head) > 3 else 0
    dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = _expected_length(head, None)
    raise _bad_file(path, f"length mismatch: expected {expected} bytes for shape {dims}, got "
                    f"{size} ({size - expected} extra)")


def _parse_header(path, data, expected_shape, header_only=False):
    """Check magic and dimensions against the payload; return (dtype, dims, offset).
    ``header_only``: check magic and dims against ``expected_shape``, not the length."""
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
    if header_only:
        if dims != tuple(expected_shape):
            raise _bad_file(path, f"shape {dims} in header, expected {tuple(expected_shape)}")
        return None
    dtype = _IDX_DTYPES[code]
    expected_len = offset + math.prod(dims) * dtype.itemsize  # Python ints: no overflow
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
    data = _read_payload(path, expected_shape)
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
    try:
        os.listdir(folder)
    except OSError as e:
        return None, f"folder cannot be read ({e.strerror or e})"
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
                f"--data-dir {data_dir} does not hold {dataset} ({why}). "
                f"Put {', '.join(n + '.gz' for n in FILES)} (or the "
                f"uncompressed files) there, or leave --data-dir out (data_dir= in "
                f"Python) to use ${ENV_DATA_DIR} or download into {cache_dir(dataset)}."
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


class _Heartbeat:
    """While the download waits on the network, print every ``interval`` seconds what it is
    waiting for and how long it has waited (a daemon thread; silent when ``enabled`` is false)."""

    def __init__(self, enabled, interval=None):
        self.enabled, self.interval = enabled, HEARTBEAT if interval is None else interval
        self.what, self.since, self.limit = None, 0.0, None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.enabled and self.interval > 0:
            self._thread = threading.Thread(target=self._run, daemon=True, name="nnx-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return False

    def wait_for(self, what, limit=None):
        """Start waiting for ``what`` (None: not waiting)."""
        self.what, self.since, self.limit = what, time.monotonic(), limit

    def _run(self):
        last = None
        while not self._stop.wait(min(0.25, self.interval)):
            what, since = self.what, self.since
            if what is None:
                continue
            waited = time.monotonic() - since
            if waited >= self.interval and (last is None or last[0] != since
                                            or waited - last[1] >= self.interval):
                limit = f"; giving up after {self.limit:.0f} s" if self.limit else ""
                print(f"nnx: waiting for {what} ({waited:.0f} s{limit})", file=sys.stderr,
                      flush=True)
                last = (since, waited)


def _timeouts(timeout):
    """(connect, read) seconds from a number (both) or a pair; None: the module defaults."""
    if timeout is None:
        return CONNECT_TIMEOUT, READ_TIMEOUT
    if isinstance(timeout, (tuple, list)):
        connect, read = timeout
        return float(connect), float(read)
    return float(timeout), float(timeout)


class _BudgetSpent(Exception):
    """The download's overall time budget ran out."""


def _fetch(url, dest_dir, name, expected_sha256, timeout, progress, deadline=None,
           heartbeat=None):
    """Download ``url`` to a temp file in ``dest_dir``, verify, move into place.

    The final name only ever appears through os.replace of a verified file,
    so an interrupted or corrupt download leaves nothing behind. ``timeout`` is
    (connect, read) seconds: the first bounds connecting and waiting for the answer,
    the second each wait for more data; ``deadline`` (time.monotonic) bounds the whole.
    """
    from tqdm.auto import tqdm  # imported lazily: only downloads need it

    connect, read = _timeouts(timeout)
    heartbeat = heartbeat or _Heartbeat(False)
    host = urllib.parse.urlsplit(url).netloc or url

    def remaining(limit):
        if deadline is None:
            return limit
        left = deadline - time.monotonic()
        if left <= 0:
            raise _BudgetSpent()
        return min(limit, left)

    request = urllib.request.Request(url, headers={"User-Agent": "nnx-datasets"})
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    try:
        wait = remaining(connect)
        heartbeat.wait_for(f"{host} to answer the request for {name}.gz", wait)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=wait) as resp:
            heartbeat.wait_for(None)
            total = int(resp.headers.get("Content-Length") or 0) or None
            sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"{name}.gz", disable=None if progress else True,
                      leave=False) as bar:
                received = 0
                while True:
                    wait = remaining(read)
                    if sock is not None:
                        try:
                            sock.settimeout(wait)
                        except OSError:  # already handed to the response: keep its timeout
                            sock = None
                    heartbeat.wait_for(f"data of {name}.gz from {host} "
                                       f"({received:,} bytes so far)", wait)
                    chunk = resp.read(_CHUNK)
                    heartbeat.wait_for(None)
                    if not chunk:
                        break
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
        heartbeat.wait_for(None)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _timed_out(error):
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason
    return isinstance(error, (TimeoutError, socket.timeout))


def _describe(error):
    """A one-line reason for a failed attempt."""
    if _timed_out(error):
        return "no answer before the timeout (the mirror accepted the connection but sent nothing)" \
            if "read" not in str(error) else f"timed out ({error})"
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _permanent(error):
    """Errors that retrying the same URL cannot fix (a mirror that never answers is not
    asked again: each attempt would cost a whole timeout)."""
    if isinstance(error, (DatasetError, ValueError)) or _timed_out(error):
        return True
    return isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 \
        and error.code not in (408, 429)


def _fetch_any(dataset, name, dest_dir, mirrors, dead, timeout, retries, progress,
               deadline=None, heartbeat=None):
    """Try every live mirror for one file; return (path or None, failures)."""
    failures = []
    for base in mirrors:
        if base in dead:
            continue
        url = f"{base}{name}.gz"
        reasons = []
        for attempt in range(max(retries, 0) + 1):
            if attempt:
                pause = RETRY_BACKOFF * attempt
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)
            try:
                return _fetch(url, dest_dir, name, CHECKSUMS[dataset][name],
                              timeout, progress, deadline, heartbeat), failures
            except _BudgetSpent:
                failures.append(f"{url}: not tried, the download's time budget is spent")
                return None, failures
            except (OSError, http.client.HTTPException, ValueError, DatasetError) as e:
                reasons.append(_describe(e))
                if _permanent(e):
                    if _timed_out(e):
                        dead.add(base)
                    break
        else:
            # Every attempt failed without an answer: skip it for the other files.
            dead.add(base)
        tries = f" ({len(reasons)} attempts)" if len(reasons) > 1 else ""
        failures.append(f"{url}: {reasons[-1]}{tries}")
    return None, failures


def download(dataset, dest_dir, mirrors=None, timeout=None, retries=2, progress=True,
             budget=None):
    """Fetch the four ``NAME.gz`` files into ``dest_dir`` and return it.

    Mirrors (``mirrors``, else $NNX_MNIST_MIRRORS / $NNX_FASHION_MNIST_MIRRORS,
    else MIRRORS) are tried in turn, each ``retries`` extra times on network
    errors (not on timeouts: a mirror that does not answer is skipped).
    ``timeout`` is seconds for connecting and the answer, and for each wait for
    data: a number or a (connect, read) pair, default (CONNECT_TIMEOUT,
    READ_TIMEOUT); ``budget`` bounds the whole download (default
    DOWNLOAD_BUDGET seconds). With ``progress``, a line every HEARTBEAT seconds
    says what a slow download is waiting for. Files already present and valid
    are kept; a damaged one raises.
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
    budget = DOWNLOAD_BUDGET if budget is None else float(budget)
    deadline = time.monotonic() + budget
    dead = set()
    with _Heartbeat(progress) as heartbeat:
        for name in FILES:
            existing = _file_in(dest_dir, name)
            if existing is not None:
                read_idx(existing, CHECKSUMS[dataset][name], SHAPES[name])
                continue
            path, failures = _fetch_any(dataset, name, dest_dir, mirrors, dead,
                                        timeout, retries, progress, deadline, heartbeat)
            if path is None:
                spent = " (gave up: the download's time budget of " \
                    f"{budget:g} s is spent)" if time.monotonic() >= deadline else ""
                raise DatasetError(
                    f"could not download {name}.gz for {dataset} from any mirror{spent}:\n  "
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
        f"'{dataset}' subfolder), or pass --data-dir DIR (data_dir= in Python). "
        f"See docs/data.md."
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
