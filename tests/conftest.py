"""Small diffusers models and calibration batches shared by the tests (built, never downloaded)."""

from __future__ import annotations

import pytest

from ditq_compiler.toy import random_dit_batches, random_unet_batches, small_dit, small_unet


@pytest.fixture(scope="session")
def dit():
    return small_dit()


@pytest.fixture(scope="session")
def dit_batches():
    return random_dit_batches()


@pytest.fixture(scope="session")
def unet():
    return small_unet()


@pytest.fixture(scope="session")
def unet_batches():
    return random_unet_batches()


@pytest.fixture(scope="session")
def compiled_dit_w8a8(dit, dit_batches):
    import ditq_compiler as dq

    return dq.compile(dit, dq.Recipe.load("w8a8"), calibration=dit_batches, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _cache_in_a_temporary_folder(tmp_path_factory):
    """compile() keeps interrupted work under $DITQ_CACHE_DIR: never the user's ~/.cache during tests."""
    import os

    old = os.environ.get("DITQ_CACHE_DIR")
    os.environ["DITQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("ditq-cache"))
    yield
    if old is None:
        os.environ.pop("DITQ_CACHE_DIR", None)
    else:
        os.environ["DITQ_CACHE_DIR"] = old
