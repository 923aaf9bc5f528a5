"""Read CIFAR-10 from the official "python version" files, without trusting pickle.

The official batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) are Python 2 pickles
of dicts with bytes keys (``b"data"``, ``b"labels"``, ...). Plain :func:`pickle.load` would run
whatever a tampered file asks for, so they are read with :class:`_RestrictedUnpickler`, which
only lets through the few globals a numpy array needs. Anything else, and any malformed file,
becomes a one-line :class:`~bnlab.errors.UserError` naming the file.

Nothing is downloaded unless ``download=True`` is passed explicitly.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import stat
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from bnlab._paths import data_dir
from bnlab.errors import UserError, unknown_name

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "CIFAR10_SUBDIR",
    "load_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
"""Where the official python-version archive is published."""

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
"""md5 of the official ``cifar-10-python.tar.gz``."""

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
"""File name the archive is saved under inside ``root``."""

CIFAR10_SUBDIR = "cifar-10-batches-py"
"""Folder the official archive unpacks to."""

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""Class names, indexed by label (the order of ``batches.meta``)."""

_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_SPLITS = {"train": _TRAIN_FILES, "test": _TEST_FILES}
_IMAGE_SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32
_NUM_CLASSES = 10
_CHUNK = 1 << 20
_TIMEOUT_S = 60


# --------------------------------------------------------------------------- restricted pickle


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list."""


def _numpy_reconstruct():
    # numpy >= 2 moved the implementation to numpy._core; importing numpy.core there warns.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` so a pickle can name the class but never call it."""

    def __repr__(self) -> str:
        return "<numpy.ndarray token>"


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype, shape, typecode):
    """``numpy ... _reconstruct`` restricted to building a plain empty ndarray."""
    if subtype is not _NDARRAY:
        raise _Refused("array reconstruction with a subtype other than numpy.ndarray")
    return _numpy_reconstruct()(np.ndarray, shape, typecode)


def _latin1_encode(obj, encoding="latin1"):
    """``_codecs.encode``: how Python 3 writes ``bytes`` at protocol 2; only str -> latin-1 bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode used for something other than latin-1 bytes")
    return obj.encode("latin1")


def _empty_bytes(*args):
    """``bytes()``: how Python 3 writes ``b""`` at protocol 2; only the no-argument call."""
    if args:
        raise _Refused("bytes() called with arguments")
    return b""


# Everything a CIFAR batch needs: numpy's array reconstruction (under both the numpy 1 and the
# numpy 2 module names) plus the two helpers Python 3 uses for bytes at protocol 2 (so batches
# re-saved by Python 3 also load). Callables are wrapped so they only do that one job.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED`` and refuses every other one."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(
                f"refusing to load global {_short(f'{module}.{name}', 80)} "
                "(only numpy array data is allowed)"
            ) from None

    def persistent_load(self, pid):
        raise _Refused("refusing a persistent id (not used by CIFAR-10 files)")


# --------------------------------------------------------------------------------- helpers


def _short(text: str, limit: int = 160) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(
        f"corrupt CIFAR-10 file {path}: {_short(what)}; expected an official python-version "
        "batch (delete it and fetch again with --download)"
    )


def _not_found(root: Path) -> UserError:
    return UserError(
        f"CIFAR-10 not found in {root}: expected the official python-version files "
        f"data_batch_1..5 and test_batch, directly or under {CIFAR10_SUBDIR}/ "
        "(or pass --download to fetch them)"
    )


def _locate(root: Path, names) -> Path | None:
    """The directory (``root`` or ``root/cifar-10-batches-py``) holding all ``names``, if any."""
    for candidate in (root, root / CIFAR10_SUBDIR):
        if all((candidate / n).is_file() for n in names):
            return candidate
    return None


def _get(batch: dict, key: str):
    for k in (key.encode("ascii"), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


#: the official batch files are 31,035,704 bytes (data_batch_*) and 31,035,526 (test_batch); anything
#: far larger is not one, and is refused before a byte of it is unpickled
MAX_BATCH_BYTES = 64 * 2**20


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load and check one batch file: images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read CIFAR-10 file {path}: {_short(e.strerror or e)}") from None
    if size > MAX_BATCH_BYTES:
        raise _corrupt(path, f"{size:,} bytes, far more than an official batch (about 31 MB; at most "
                             f"{MAX_BATCH_BYTES:,} accepted)")
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise _corrupt(path, str(e)) from None
    except OSError as e:
        raise UserError(f"cannot read CIFAR-10 file {path}: {_short(e.strerror or e)}") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes can make the unpickler raise anything
        raise _corrupt(path, f"not a readable pickle ({type(e).__name__}: {e})") from None

    if not isinstance(batch, dict):
        raise _corrupt(path, f"holds a {type(batch).__name__}, expected a dict")
    try:
        data = _get(batch, "data")
        labels = _get(batch, "labels")
    except KeyError as e:
        keys = ", ".join(sorted(repr(k) for k in batch)[:8])
        raise _corrupt(path, f"missing key {e.args[0]!r} (keys: {keys or 'none'})") from None

    if not isinstance(data, np.ndarray):
        raise _corrupt(path, f"'data' is a {type(data).__name__}, expected a uint8 array")
    if data.dtype != np.uint8:
        raise _corrupt(path, f"'data' has dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != _ROW:
        raise _corrupt(path, f"'data' has shape {data.shape}, expected (N, {_ROW})")
    n = data.shape[0]

    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise _corrupt(path, f"'labels' is a {type(labels).__name__}, expected a list of ints")
    try:
        lab = np.asarray(labels)
    except (ValueError, TypeError, OverflowError):
        raise _corrupt(path, "'labels' are not a flat list of integers") from None
    if lab.ndim != 1 or lab.shape[0] != n:
        raise _corrupt(path, f"'labels' has shape {lab.shape} for {n} images, expected ({n},)")
    if lab.size == 0:
        lab = np.zeros(0, dtype=np.int64)
    elif lab.dtype.kind not in "iu":
        raise _corrupt(path, f"'labels' are not all integers (dtype {lab.dtype})")
    bad = lab[(lab < 0) | (lab >= _NUM_CLASSES)]
    if bad.size:
        raise _corrupt(path, f"label {int(bad[0])} is out of range, expected 0..{_NUM_CLASSES - 1}")

    images = np.ascontiguousarray(data).reshape((n, *_IMAGE_SHAPE))
    return images, lab.astype(np.int64, copy=False)


# -------------------------------------------------------------------------------- download


def _md5_of(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _url_error_reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _download(url: str, dest: Path, md5: str | None) -> None:
    """Fetch ``url`` into a temp file next to ``dest``, check its md5, then rename it to ``dest``."""
    from tqdm import tqdm

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise UserError(f"cannot write the CIFAR-10 download to {dest.parent}: {_short(e)}") from None
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        written = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    bar = (
                        tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"downloading {dest.name}")
                        if total
                        else None
                    )
                    try:
                        while chunk := resp.read(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            written += len(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                    finally:
                        if bar is not None:
                            bar.close()
            except UserError:
                raise
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise UserError(
                    f"could not download CIFAR-10 from {url}: {_short(_url_error_reason(e))} "
                    f"(check the network, or put the official files in {dest.parent})"
                ) from None
        if total is not None and written != total:
            raise UserError(
                f"CIFAR-10 download from {url} was cut short ({written} of {total} bytes); "
                "run again to retry"
            )
        if md5 is not None and h.hexdigest() != md5.lower():
            raise UserError(
                f"CIFAR-10 archive from {url} has md5 {h.hexdigest()}, expected {md5.lower()}; "
                "the download was deleted (retry, or check the URL and md5)"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UserError(
            f"refusing to extract {archive}: member {_short(name, 80)!r} points outside the "
            "target folder; expected the official CIFAR-10 archive"
        )
    if not (member.isfile() or member.isdir()):
        raise UserError(
            f"refusing to extract {archive}: member {_short(name, 80)!r} is not a regular file "
            "or folder; expected the official CIFAR-10 archive"
        )


def _extract(archive: Path, root: Path) -> None:
    """Unpack ``archive`` safely and move its batch files into ``root/cifar-10-batches-py``."""
    tmpdir = None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, archive)
            tmpdir = Path(tempfile.mkdtemp(dir=root, prefix=".cifar-10-extract."))
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmpdir, members=members, filter="data")
            else:  # Python without extraction filters; members were checked above
                tar.extractall(tmpdir, members=members)
        src = _locate(tmpdir, _TRAIN_FILES + _TEST_FILES)
        if src is None:
            raise UserError(
                f"{archive} does not contain the CIFAR-10 python-version files data_batch_1..5 "
                "and test_batch; expected the official cifar-10-python.tar.gz"
            )
        target = root / CIFAR10_SUBDIR
        target.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            if item.is_file() and not item.is_symlink():
                os.replace(item, target / item.name)
    except UserError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"could not extract CIFAR-10 archive {archive}: {_short(e) or type(e).__name__}; "
            "delete it and fetch again with --download"
        ) from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _fetch(root: Path, url: str, md5: str | None) -> None:
    """Make sure the archive is in ``root`` (downloading it if needed) and unpack it."""
    archive = root / CIFAR10_ARCHIVE
    reuse = False
    if archive.is_file():
        try:
            reuse = md5 is None or _md5_of(archive) == md5.lower()
        except OSError:
            reuse = False
    if not reuse:
        _download(url, archive, md5)
    _extract(archive, root)


# ------------------------------------------------------------------------------------- API


def load_cifar10(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = False,
    url: str = CIFAR10_URL,
    md5: str | None = CIFAR10_MD5,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of CIFAR-10 from the official python-version batch files.

    Args:
        root: Directory that holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``,
            either directly or in a ``cifar-10-batches-py/`` subfolder. ``None`` means
            ``data_dir() / "cifar10"``.
        split: ``"train"`` (the five data batches, concatenated in order) or ``"test"``
            (``test_batch``).
        download: If the files for ``split`` are missing, fetch ``url`` into ``root``, check its
            md5, unpack it and then load. Without it nothing is ever downloaded.
        url: Where to fetch the archive from (any URL urllib opens, ``file://`` included).
        md5: Expected md5 hex digest of the archive; ``None`` skips the check.

    Returns:
        ``(images, labels)``: ``images`` is a C-contiguous uint8 array of shape
        ``(N, 3, 32, 32)`` (channels R, G, B), ``labels`` an int64 array of shape ``(N,)``
        with values in ``0..9`` (see :data:`CIFAR10_CLASSES`).

    Raises:
        UserError: For an unknown split; files that are missing (without ``download``),
            unreadable, corrupt or that try to load anything but numpy array data; a failed
            download, an md5 mismatch (the download is deleted) or an unsafe archive.
    """
    if split not in _SPLITS:
        raise unknown_name("CIFAR-10 split", str(split), _SPLITS)
    names = _SPLITS[split]
    root = Path(root).expanduser() if root is not None else data_dir() / "cifar10"
    try:
        st = os.stat(root)
    except FileNotFoundError:
        st = None
    except OSError as e:  # a symlink loop, a name too long, no permission
        raise UserError(f"CIFAR-10 root {root} cannot be used: {e.strerror or e}; give a directory") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UserError(f"CIFAR-10 root {root} is a file, not a directory; give the directory that holds "
                        f"data_batch_1..5 and test_batch (or {CIFAR10_SUBDIR}/)")

    batch_dir = _locate(root, names)
    if batch_dir is None:
        if not download:
            raise _not_found(root)
        _fetch(root, url, md5)
        batch_dir = _locate(root, names)
        if batch_dir is None:  # pragma: no cover - _extract already checked the contents
            raise _not_found(root)

    parts = [_read_batch(batch_dir / name) for name in names]
    if len(parts) == 1:
        return parts[0]
    images = np.concatenate([p[0] for p in parts], axis=0)
    labels = np.concatenate([p[1] for p in parts], axis=0)
    return images, labels
