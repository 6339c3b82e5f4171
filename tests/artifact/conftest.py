"""The tiny model's artifact the hostile-artifact and fuzz tests tamper with (compiled once per session)."""

import pytest

from tests.artifact.tamper import compile_tiny


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return compile_tiny().save(tmp_path_factory.mktemp("tiny") / "artifact")
