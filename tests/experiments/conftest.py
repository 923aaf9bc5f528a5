import pytest

from bnlab.reproduce import reproduce


@pytest.fixture(scope="session")
def tiny_reproduce(tmp_path_factory):
    """Every registered experiment at the tiny profile, once per test session: (out, report, rows)."""
    out = tmp_path_factory.mktemp("tiny-reproduce")
    report, rows = reproduce(profile="tiny", out=out, device="cpu", progress=False)
    return out, report, rows
