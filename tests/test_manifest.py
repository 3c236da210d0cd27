"""Checkpoint records: full-content digests computed while writing, and every kind of damage found."""

import json
import os

import pytest
import xxhash

from megaprolong.training import manifest


def write_hashed(path, chunks, rank=0):
    with manifest.HashingStream(path, rank) as stream:
        for chunk in chunks:
            stream.write(chunk)
    return path


def test_digest_while_writing_equals_the_files_content(tmp_path):
    chunks = [os.urandom(n) for n in (0, 1, 4096, 3 << 20, 17)]
    path = write_hashed(tmp_path / "shard.distcp", [memoryview(c) for c in chunks], rank=3)
    sidecar = json.loads((tmp_path / f"shard.distcp{manifest.SIDECAR}").read_text())
    content = path.read_bytes()
    assert content == b"".join(chunks)
    assert sidecar == {"bytes": len(content), "xxh3": xxhash.xxh3_64(content).hexdigest(), "rank": 3}
    assert manifest.digest_file(path) == sidecar["xxh3"]


def test_torch_save_through_the_stream_is_hashed_exactly(tmp_path):
    """DCP writes tensors with torch.save into the stream: what the stream digests is what lands on disk."""
    import torch

    with manifest.HashingStream(tmp_path / "t.pt", rank=0) as stream:
        torch.save({"w": torch.randn(1000, 37)}, stream)
    sidecar = json.loads((tmp_path / f"t.pt{manifest.SIDECAR}").read_text())
    assert sidecar["xxh3"] == manifest.digest_file(tmp_path / "t.pt")
    assert sidecar["bytes"] == (tmp_path / "t.pt").stat().st_size


@pytest.fixture
def checkpoint(tmp_path):
    """A folder as a save leaves it: two ranks' shards with sidecars, a small file without one."""
    folder = tmp_path / "step_00000004"
    folder.mkdir()
    write_hashed(folder / "__0_0.distcp", [os.urandom(3 << 20)], rank=0)
    write_hashed(folder / "__1_0.distcp", [os.urandom(3 << 20)], rank=1)
    (folder / "metadata.json").write_text("{}")
    record = manifest.collect(folder)
    assert not list(folder.glob(f"*{manifest.SIDECAR}"))  # folded into the record
    return folder, record


def test_collect_takes_the_writers_digests_and_hashes_the_rest(checkpoint):
    folder, record = checkpoint
    assert set(record) == {"__0_0.distcp", "__1_0.distcp", "metadata.json"}
    assert [record[n]["rank"] for n in ("__0_0.distcp", "__1_0.distcp", "metadata.json")] == [0, 1, None]
    for name, entry in record.items():
        assert entry["xxh3"] == manifest.digest_file(folder / name)
    assert manifest.problems(folder, record) == []


def test_same_size_damage_in_the_middle_is_found(checkpoint):
    folder, record = checkpoint
    shard = folder / "__1_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # a zeroed stretch in the middle, size unchanged
        f.seek(size // 2)
        f.write(b"\0" * 4096)
    assert shard.stat().st_size == size
    found = manifest.problems(folder, record)
    assert len(found) == 1 and str(shard) in found[0] and "content changed" in found[0]
    assert manifest.problems(folder, record, checksums=False) == []  # sizes alone cannot see it


def test_one_flipped_bit_is_found(checkpoint):
    folder, record = checkpoint
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 + 12345] ^= 0x10
    shard.write_bytes(bytes(data))
    assert str(shard) in manifest.problems(folder, record)[0]


def test_missing_and_truncated_files_are_named(checkpoint):
    folder, record = checkpoint
    (folder / "__0_0.distcp").unlink()
    with open(folder / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    found = manifest.problems(folder, record, checksums=False)
    assert any("__0_0.distcp: missing" in line for line in found)
    assert any("__1_0.distcp: 100 bytes, recorded" in line for line in found)


def test_each_rank_verifies_its_own_files_and_together_all(checkpoint):
    folder, record = checkpoint
    for world in (1, 2, 3):
        checked = [name for rank in range(world) for name, entry in record.items()
                   if manifest.owned_by(rank, world)(entry)]
        assert sorted(checked) == sorted(record)  # every file exactly once
    with open(folder / "__1_0.distcp", "r+b") as f:
        f.seek(1000)
        f.write(b"x")
    assert manifest.problems(folder, record, mine=manifest.owned_by(0, 2)) == []
    assert manifest.problems(folder, record, mine=manifest.owned_by(1, 2))


def test_hash_share_deals_every_file_once(checkpoint):
    folder, record = checkpoint
    shares = [manifest.hash_share(folder, rank, 2) for rank in range(2)]
    assert not set(shares[0]) & set(shares[1])
    merged = {**shares[0], **shares[1]}
    assert {k: v["xxh3"] for k, v in merged.items()} == {k: v["xxh3"] for k, v in record.items()}
    assert {len(s) for s in shares} == {1, 2}  # the two large shards go to different ranks


def test_a_checkpoint_without_a_file_list_does_not_verify(tmp_path):
    from megaprolong.training.checkpoint import verify

    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / "megaprolong.json").write_text(json.dumps({"step": 2}))
    assert "no file list" in verify(folder)[0]
    (folder / "megaprolong.json").write_text("{\"step\": 2, \"files\": {")  # cut short
    assert "unreadable" in verify(folder)[0]
