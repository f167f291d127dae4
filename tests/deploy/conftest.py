"""Shared paths and the Dockerfile's runtime user, which the chart and examples must match."""

from __future__ import annotations

import io

import pytest
from dockerfile_parse import DockerfileParser

from tests.deploy import REPO_ROOT


@pytest.fixture(scope="session")
def dockerfile() -> DockerfileParser:
    # In memory: the parser re-reads its file object on every access, long after this returns.
    return DockerfileParser(fileobj=io.BytesIO((REPO_ROOT / "Dockerfile").read_bytes()))


@pytest.fixture(scope="session")
def image_uid(dockerfile: DockerfileParser) -> int:
    """The UID of the image's last USER instruction (what the container runs as)."""
    users = [i["value"] for i in dockerfile.structure if i["instruction"] == "USER"]
    assert users, "Dockerfile sets no USER: the server would run as root"
    return int(users[-1].split(":")[0])
