"""verify_artifacts re-hashes what the meta files record and lists every problem at once."""

import shutil

import pytest

from tinylm.errors import DataError
from tinylm.verify import verify_artifacts


@pytest.fixture
def roots(tiny_raw, tiny_tokenizer_dir, tiny_packed, tmp_path):
    shutil.copytree(tiny_raw[0], tmp_path / "data" / "raw" / "tiny")
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "artifacts" / "tokenizers" / "tiny")
    shutil.copytree(tiny_packed["train"].parent, tmp_path / "data" / "processed" / "tiny")
    return tmp_path / "data", tmp_path / "artifacts"


def test_every_recorded_file_is_verified(roots):
    paths = verify_artifacts(roots)
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == sorted(["train.txt", "validation.txt", "test.txt", "train_indices.npy", "test_indices.npy",
                            "tokenizer.json", "train.bin", "validation.bin", "test.bin"])  # fmt: skip


def test_a_flipped_byte_and_a_missing_file_are_both_reported(roots):
    data, _ = roots
    bin_path = data / "processed" / "tiny" / "train.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[1000] ^= 0x01
    bin_path.write_bytes(raw)
    (data / "raw" / "tiny" / "test.txt").unlink()
    with pytest.raises(DataError, match="2 artifact") as err:
        verify_artifacts(roots)
    msg = str(err.value)
    assert f"{bin_path}: sha256" in msg and "train.meta.json records" in msg
    assert "test.txt: missing (recorded in" in msg


def test_a_changed_size_is_reported(roots):
    data, _ = roots
    with open(data / "raw" / "tiny" / "validation.txt", "a") as f:
        f.write("one more story\n")
    with pytest.raises(DataError, match=r"validation\.txt: \d+ bytes, .*meta\.json records \d+"):
        verify_artifacts(roots)
