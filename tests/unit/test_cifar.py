"""CIFAR-10 loader: official-format fixtures, hostile/corrupt pickles, download from file:// URLs."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from bnlab import _cifar
from bnlab._cifar import CIFAR10_ARCHIVE, CIFAR10_SUBDIR, load_cifar10
from bnlab.errors import UserError

TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
ALL = TRAIN + ["test_batch"]
# Different sizes per batch, so a wrong concatenation order cannot go unnoticed.
SIZES = {"data_batch_1": 2, "data_batch_2": 3, "data_batch_3": 1, "data_batch_4": 4,
         "data_batch_5": 2, "test_batch": 3}


# ----------------------------------------------------------------------------- fixture making


def make_batch(seed: int, n: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    return data, labels


def batch_dict(name: str, data, labels):
    return {
        b"batch_label": f"{name} of fixture".encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def write_batch(path, name, data, labels):
    with open(path, "wb") as f:
        pickle.dump(batch_dict(name, data, labels), f, protocol=2)


def write_official_dir(directory):
    """Write all six batches (plus batches.meta) into ``directory``; return {name: (data, labels)}."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for seed, name in enumerate(ALL):
        data, labels = make_batch(seed, SIZES[name])
        write_batch(directory / name, name, data, labels)
        written[name] = (data, labels)
    meta = {b"label_names": [c.encode() for c in _cifar.CIFAR10_CLASSES], b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


class Py2StylePickler(pickle._Pickler):
    """Writes like Python 2 did: bytes/str as BINSTRING, numpy 1's ``numpy.core.multiarray`` path."""

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


@pytest.fixture()
def cifar(tmp_path):
    root = tmp_path / "flat"
    return root, write_official_dir(root)


def expected(written, names):
    data = np.concatenate([written[n][0] for n in names])
    labels = np.concatenate([np.asarray(written[n][1], dtype=np.int64) for n in names])
    return data, labels


def make_tar(path, members):
    """``members``: list of (TarInfo-name, bytes or None for a dir, or a prepared TarInfo)."""
    with tarfile.open(path, "w:gz") as tar:
        for item in members:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
                continue
            name, payload = item
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture()
def archive(tmp_path):
    """An official-layout cifar-10-python.tar.gz: returns (path, md5, written)."""
    src = tmp_path / "archive_src" / CIFAR10_SUBDIR
    written = write_official_dir(src)
    path = tmp_path / "served" / CIFAR10_ARCHIVE
    path.parent.mkdir()
    members = [(CIFAR10_SUBDIR, None)]
    members += [(f"{CIFAR10_SUBDIR}/{f.name}", f.read_bytes()) for f in sorted(src.iterdir())]
    return path, make_tar(path, members), written


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------- loading


def test_train_concatenates_batches_in_order_and_round_trips(cifar):
    root, written = cifar
    images, labels = load_cifar10(root, "train")
    n = sum(SIZES[b] for b in TRAIN)
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert images.flags.c_contiguous
    data, lab = expected(written, TRAIN)
    for i in range(n):
        np.testing.assert_array_equal(images[i], data[i].reshape(3, 32, 32))
    # Row layout is R plane, G plane, B plane, each 32x32 row-major.
    np.testing.assert_array_equal(images[0, 1, 2, 5], data[0][1024 + 2 * 32 + 5])
    np.testing.assert_array_equal(labels, lab)


def test_test_split_reads_only_test_batch(cifar):
    root, written = cifar
    images, labels = load_cifar10(root, split="test")
    data, lab = written["test_batch"]
    assert images.shape == (SIZES["test_batch"], 3, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, data.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(labels, lab)


def test_test_split_works_without_train_files(tmp_path):
    data, labels = make_batch(7, 2)
    write_batch(tmp_path / "test_batch", "test_batch", data, labels)
    images, lab = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(images.reshape(2, -1), data)
    with pytest.raises(UserError, match="--download"):
        load_cifar10(tmp_path, "train")


def test_subfolder_layout_and_str_root(tmp_path):
    written = write_official_dir(tmp_path / CIFAR10_SUBDIR)
    images, labels = load_cifar10(str(tmp_path), "train")
    data, lab = expected(written, TRAIN)
    np.testing.assert_array_equal(images.reshape(len(lab), -1), data)
    np.testing.assert_array_equal(labels, lab)


def test_default_root_is_data_dir_cifar10(tmp_path, monkeypatch):
    written = write_official_dir(tmp_path / "cifar10" / CIFAR10_SUBDIR)
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path))
    images, labels = load_cifar10(split="test")
    np.testing.assert_array_equal(labels, written["test_batch"][1])


def test_python2_style_pickle_with_numpy_core_path_loads(tmp_path):
    data, labels = make_batch(3, 2)
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(batch_dict("test_batch", data, labels))
    raw = buf.getvalue()
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    (tmp_path / "test_batch").write_bytes(raw)
    images, lab = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(images.reshape(2, -1), data)
    np.testing.assert_array_equal(lab, labels)


def test_unknown_split(cifar):
    root, _ = cifar
    with pytest.raises(UserError) as e:
        load_cifar10(root, "validation")
    msg = one_line_error(e)
    assert "'validation'" in msg and "test, train" in msg


def test_missing_dir_without_download_mentions_download_and_fetches_nothing(tmp_path, archive):
    path, md5, _ = archive
    root = tmp_path / "absent"
    with pytest.raises(UserError) as e:
        load_cifar10(root, "train", url=path.as_uri(), md5=md5)
    msg = one_line_error(e)
    assert str(root) in msg and "--download" in msg and "data_batch_1..5" in msg
    assert not root.exists()


def test_partial_train_files_is_not_found(cifar):
    root, _ = cifar
    (root / "data_batch_4").unlink()
    with pytest.raises(UserError, match="--download"):
        load_cifar10(root, "train")


# ------------------------------------------------------------------------- hostile pickles


class CallOnLoad:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_payloads(sentinel):
    return {
        "os.system": CallOnLoad(os.system, f"touch {sentinel}"),
        "eval": CallOnLoad(eval, f"open({str(sentinel)!r}, 'w').close()"),
        "numpy.save": CallOnLoad(np.save, str(sentinel), np.zeros(1)),
    }


@pytest.mark.parametrize("kind", ["os.system", "eval", "numpy.save"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_that_runs_code_is_refused(cifar, tmp_path, kind, protocol):
    root, written = cifar
    sentinel = tmp_path / "pwned"
    data, labels = written["data_batch_2"]
    batch = batch_dict("data_batch_2", data, labels)
    batch[b"filenames"] = hostile_payloads(sentinel)[kind]
    (root / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(UserError) as e:
        load_cifar10(root, "train")
    msg = one_line_error(e)
    assert "data_batch_2" in msg and "refusing to load global" in msg
    assert not sentinel.exists() and not sentinel.with_suffix(".npy").exists()


def test_allowed_names_cannot_be_abused(cifar):
    root, _ = cifar
    # Calling numpy.ndarray directly (it may only be named as _reconstruct's subtype).
    p = root / "data_batch_1"
    p.write_bytes(b"\x80\x02cnumpy\nndarray\nK\x03\x85R.")
    with pytest.raises(UserError, match="data_batch_1"):
        load_cifar10(root, "train")
    # _codecs.encode with a codec other than latin-1.
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UserError, match="latin-1"):
        load_cifar10(root, "train")
    # bytes(n) (allocation) instead of the zero-argument bytes().
    p.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x10\x85R.")
    with pytest.raises(UserError, match="bytes"):
        load_cifar10(root, "train")


def test_real_pickle_would_have_run_the_payload(tmp_path):
    # Guards the test above against a payload that is harmless anyway.
    sentinel = tmp_path / "ran"
    pickle.loads(pickle.dumps(CallOnLoad(os.system, f"touch {sentinel}"), protocol=2))
    assert sentinel.exists()


# ------------------------------------------------------------------------- corrupt files


def _corrupt_cases():
    data, labels = make_batch(11, 3)
    good = batch_dict("data_batch_3", data, labels)

    def with_(**changes):
        d = dict(good)
        for k, v in changes.items():
            if v is None:
                d.pop(k.encode())
            else:
                d[k.encode()] = v
        return pickle.dumps(d, protocol=2)

    full = pickle.dumps(good, protocol=2)
    return {
        "truncated": (full[: len(full) // 2], "not a readable pickle"),
        "not a pickle": (b"<html>404 not found</html>\n", "not a readable pickle"),
        "empty": (b"", "not a readable pickle"),
        "not a dict": (pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
        "no data key": (with_(data=None), "missing key 'data'"),
        "no labels key": (with_(labels=None), "missing key 'labels'"),
        "data not array": (with_(data=[[0] * 3072] * 3), "expected a uint8 array"),
        "float data": (with_(data=data.astype(np.float32)), "dtype float32"),
        "wrong row size": (with_(data=data[:, :3000].copy()), "expected (N, 3072)"),
        "1-d data": (with_(data=data.reshape(-1)), "expected (N, 3072)"),
        "label 10": (with_(labels=[0, 10, 1]), "label 10 is out of range"),
        "label -1": (with_(labels=[0, -1, 1]), "label -1 is out of range"),
        "too few labels": (with_(labels=[0, 1]), "for 3 images"),
        "float labels": (with_(labels=[0.0, 1.0, 2.0]), "not all integers"),
        "labels not list": (with_(labels=b"abc"), "expected a list of ints"),
    }


CORRUPT = _corrupt_cases()


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_gives_user_error_naming_file(cifar, case):
    root, _ = cifar
    payload, needle = CORRUPT[case]
    (root / "data_batch_3").write_bytes(payload)
    with pytest.raises(UserError) as e:
        load_cifar10(root, "train")
    msg = one_line_error(e)
    assert str(root / "data_batch_3") in msg and needle in msg
    # The other split is unaffected.
    assert load_cifar10(root, "test")[0].shape[0] == SIZES["test_batch"]


def test_batch_path_is_a_directory(cifar):
    root, _ = cifar
    (root / "test_batch").unlink()
    (root / "test_batch").mkdir()
    with pytest.raises(UserError, match="not found"):
        load_cifar10(root, "test")


# --------------------------------------------------------------------------------- download


def test_download_from_file_url_extracts_and_loads(tmp_path, archive):
    path, md5, written = archive
    root = tmp_path / "dl" / "nested"
    images, labels = load_cifar10(root, "test", download=True, url=path.as_uri(), md5=md5)
    data, lab = written["test_batch"]
    np.testing.assert_array_equal(images.reshape(len(lab), -1), data)
    np.testing.assert_array_equal(labels, lab)
    assert (root / CIFAR10_ARCHIVE).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (root / CIFAR10_SUBDIR).iterdir()) == sorted(ALL + ["batches.meta"])
    assert leftovers(root) == []
    # Everything is now local: the train split loads without download.
    images, labels = load_cifar10(root, "train")
    np.testing.assert_array_equal(labels, expected(written, TRAIN)[1])


def test_wrong_md5_deletes_download(tmp_path, archive):
    path, md5, _ = archive
    root = tmp_path / "dl"
    with pytest.raises(UserError) as e:
        load_cifar10(root, "train", download=True, url=path.as_uri(), md5="0" * 32)
    msg = one_line_error(e)
    assert "md5" in msg and md5 in msg and "0" * 32 in msg
    assert list(root.iterdir()) == []


def test_present_files_are_not_downloaded(cifar, tmp_path):
    root, written = cifar
    bogus = (tmp_path / "does-not-exist.tar.gz").as_uri()
    _, labels = load_cifar10(root, "test", download=True, url=bogus)
    np.testing.assert_array_equal(labels, written["test_batch"][1])
    assert not (root / CIFAR10_ARCHIVE).exists()


def test_existing_good_archive_is_reused(tmp_path, archive):
    path, md5, written = archive
    root = tmp_path / "dl"
    root.mkdir()
    (root / CIFAR10_ARCHIVE).write_bytes(path.read_bytes())
    bogus = (tmp_path / "does-not-exist.tar.gz").as_uri()
    _, labels = load_cifar10(root, "test", download=True, url=bogus, md5=md5)
    np.testing.assert_array_equal(labels, written["test_batch"][1])


def test_network_failure_is_one_line_user_error(tmp_path):
    root = tmp_path / "dl"
    url = (tmp_path / "nowhere" / CIFAR10_ARCHIVE).as_uri()
    with pytest.raises(UserError) as e:
        load_cifar10(root, "train", download=True, url=url)
    msg = one_line_error(e)
    assert "could not download" in msg and url in msg
    assert list(root.iterdir()) == []


def test_unknown_url_scheme_is_user_error(tmp_path):
    with pytest.raises(UserError, match="could not download"):
        load_cifar10(tmp_path / "dl", "train", download=True, url="nosuchscheme://x/y.tar.gz")


def _unsafe_archives(tmp_path):
    link = tarfile.TarInfo(f"{CIFAR10_SUBDIR}/test_batch")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    return {
        "dotdot": ([(f"{CIFAR10_SUBDIR}/../../escaped", b"x")], "points outside"),
        "absolute": ([(str(tmp_path / "abs_escaped"), b"x")], "points outside"),
        "symlink": ([link], "not a regular file"),
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_unsafe_archive_is_refused(tmp_path, case):
    members, needle = _unsafe_archives(tmp_path)[case]
    path = tmp_path / "served" / CIFAR10_ARCHIVE
    path.parent.mkdir()
    md5 = make_tar(path, members)
    root = tmp_path / "a" / "b"
    with pytest.raises(UserError) as e:
        load_cifar10(root, "test", download=True, url=path.as_uri(), md5=md5)
    assert needle in one_line_error(e)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "a" / "escaped").exists()
    assert not (tmp_path / "abs_escaped").exists()
    assert not (root / CIFAR10_SUBDIR).exists() and leftovers(root) == []


def test_archive_without_batches_is_refused(tmp_path):
    path = tmp_path / CIFAR10_ARCHIVE
    md5 = make_tar(path, [("readme.html", b"<html></html>")])
    root = tmp_path / "dl"
    with pytest.raises(UserError, match="does not contain"):
        load_cifar10(root, "train", download=True, url=path.as_uri(), md5=md5)
    assert leftovers(root) == []


def test_archive_that_is_not_gzip_is_refused(tmp_path):
    path = tmp_path / "junk.tar.gz"
    path.write_bytes(b"definitely not a tarball" * 10)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(UserError) as e:
        load_cifar10(tmp_path / "dl", "train", download=True, url=path.as_uri(), md5=md5)
    assert "could not extract" in one_line_error(e)


# ----------------------------------------------------------------------------- hostile roots and sizes
def test_huge_batch_file_is_refused_before_reading(cifar):
    root, _ = cifar
    with open(root / "test_batch", "r+b") as f:
        f.truncate(_cifar.MAX_BATCH_BYTES + 1)  # sparse: no disk used
    with pytest.raises(UserError) as e:
        load_cifar10(root, "test")
    msg = one_line_error(e)
    assert str(root / "test_batch") in msg and "far more than an official batch" in msg


def test_root_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "cifar.tar"
    f.write_bytes(b"x")
    with pytest.raises(UserError) as e:
        load_cifar10(f, "test")
    assert "is a file, not a directory" in one_line_error(e)


def test_root_that_is_a_symlink_loop_is_one_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(UserError) as e:
        load_cifar10(a, "test", download=True, url="file:///nonexistent")
    assert "cannot be used" in one_line_error(e)
