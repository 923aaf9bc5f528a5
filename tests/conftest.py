import os

os.environ.setdefault("MPLBACKEND", "agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets a private bnlab cache dir (mnist1d arrays), shared within the session."""
    cache = tmp_path_factory.getbasetemp() / "bnlab-cache"
    monkeypatch.setenv("BNLAB_CACHE", str(cache))
    yield


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# Tiny tensors run faster and far more steadily on one intra-op thread, above all on a shared
# 2-core machine; the library itself leaves torch's default alone.
torch.set_num_threads(1)
