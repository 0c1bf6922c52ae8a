"""The shard library: round trips, atomic writes, refusal of bad shards, worker safety."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fakecifar.errors import BadShardError, IncompatibleShardsError, OutputExistsError, UsageError
from fakecifar.shards import FORMAT, Shard, ShardSeriesWriter, ShardWriter, chunk_images, expand_inputs, open_shards

from helpers import CLASSES3, random_images


def test_round_trip_keeps_pixels_columns_and_attributes(tmp_path):
    images = random_images(300, (8, 8))
    path = tmp_path / "a.h5"
    with ShardWriter(path, classes=CLASSES3, image_size=(8, 8), producer="test", provenance=[{"step": "x"}]) as writer:
        writer.add_batch(images[:100], np.zeros(100), origin=np.ones(100), prompt=["p"] * 100)
        writer.add_batch(images[100:], np.ones(200), origin=np.zeros(200), prompt=["q"] * 200)
    assert not (tmp_path / "a.h5.partial").exists()
    shard = Shard(path)
    assert len(shard) == 300 and shard.image_size == (8, 8) and shard.classes == CLASSES3
    assert np.array_equal(shard.read("images"), images)
    assert shard.read("labels").dtype == np.int16 and shard.read("labels")[150] == 1
    assert shard.read("prompt")[0] == "p" and shard.read("origin")[0] == 1
    with h5py.File(path) as f:
        assert f.attrs["format"] == FORMAT and f.attrs["version"] == 1
        assert json.loads(f.attrs["provenance"]) == [{"step": "x"}]
        assert f["images"].chunks == (chunk_images(8, 8), 8, 8, 3)  # explicit, not auto-chunked
        assert f.attrs["created"].endswith("Z")


def test_writer_refuses_to_clobber_and_discards_on_error(tmp_path, make_shard):
    path = make_shard("a.h5")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="a.h5"):
        ShardWriter(path, classes=CLASSES3, image_size=(8, 8), producer="t")
    with (
        pytest.raises(RuntimeError),
        ShardWriter(tmp_path / "b.h5", classes=CLASSES3, image_size=(8, 8), producer="t") as w,
    ):
        w.add_batch(random_images(5), np.zeros(5))
        raise RuntimeError("boom")
    assert not (tmp_path / "b.h5").exists() and not (tmp_path / "b.h5.partial").exists()
    assert path.read_bytes() == before


def test_writer_rejects_wrong_size_and_inconsistent_columns(tmp_path):
    with ShardWriter(tmp_path / "a.h5", classes=CLASSES3, image_size=(8, 8), producer="t") as w:
        with pytest.raises(UsageError, match="16x16"):
            w.add_batch(random_images(2, (16, 16)), np.zeros(2))
        w.add_batch(random_images(2), np.zeros(2), origin=np.zeros(2))
        with pytest.raises(UsageError, match="columns"):
            w.add_batch(random_images(2), np.zeros(2))


def test_series_writer_rolls_over_and_reports_each_shard(tmp_path):
    done: list[Path] = []
    with ShardSeriesWriter(
        tmp_path, shard_size=10, classes=CLASSES3, image_size=(8, 8), producer="t", on_shard=done.append
    ) as w:
        w.add_batch(random_images(7), np.zeros(7))
        assert done == []
        w.add_batch(random_images(18), np.zeros(18))
        assert [p.name for p in done] == ["shard-00000.h5", "shard-00001.h5"]
    assert [len(Shard(p)) for p in done] == [10, 10, 5]


def test_truncated_shard_is_refused_with_its_path(tmp_path, make_shard):
    path = make_shard("t.h5", n=600, size=(16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadShardError, match="t.h5"):
        Shard(path)


def test_non_hdf5_and_non_shard_files_are_refused(tmp_path):
    fake = tmp_path / "notes.h5"
    fake.write_text("hello")
    with pytest.raises(BadShardError, match="notes.h5: not an HDF5 file"):
        Shard(fake)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros((1, 2, 2, 3), np.uint8)
    with pytest.raises(BadShardError, match="other.h5: not a fakecifar shard"):
        Shard(other)
    noimg = tmp_path / "noimg.h5"
    with h5py.File(noimg, "w") as f:
        f.attrs["format"] = FORMAT
    with pytest.raises(BadShardError, match="noimg.h5: shard has no 'images'"):
        Shard(noimg)


def test_mixed_classes_or_sizes_are_refused(make_shard):
    a = make_shard("a.h5")
    b = make_shard("b.h5", classes=["x", "y"])
    c = make_shard("c.h5", size=(16, 16))
    with pytest.raises(IncompatibleShardsError, match="b.h5: classes"):
        open_shards([a, b])
    with pytest.raises(IncompatibleShardsError, match="c.h5: images are 16x16"):
        open_shards([a, c])


def test_inputs_expand_directories_globs_and_refuse_empty(tmp_path, make_shard):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("b.h5", "a.h5"):
        make_shard(name, directory=d)
    assert [p.name for p in expand_inputs([d])] == ["a.h5", "b.h5"]
    assert [p.name for p in expand_inputs([str(d / "*.h5")])] == ["a.h5", "b.h5"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty: directory holds no"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(UsageError, match="missing.h5: no such file"):
        expand_inputs([tmp_path / "missing.h5"])


def test_shard_set_take_gathers_across_shards(make_shard):
    a = make_shard("a.h5", n=10, seed=1)
    b = make_shard("b.h5", n=7, seed=2)
    data = open_shards([a, b])
    everything = np.concatenate([Shard(a).read("images"), Shard(b).read("images")])
    idx = np.array([16, 0, 9, 10, 3])
    assert np.array_equal(data.take("images", idx), everything[idx])
    assert len(data) == 17


def test_shard_pickles_without_a_handle_and_reopens_after_fork(make_shard):
    path = make_shard("a.h5", n=50)
    shard = Shard(path)
    expected = shard.read("images", 0, 5)  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(shard))
    assert np.array_equal(clone.read("images", 0, 5), expected)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's handle
        ok = np.array_equal(shard.read("images", 0, 5), expected)
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_kill_9_during_write_never_leaves_a_half_shard(tmp_path, make_shard):
    """A writer killed mid-write leaves at most NAME.h5.partial; earlier shards stay intact."""
    done = make_shard("done.h5")
    before = done.read_bytes()
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from fakecifar.shards import ShardWriter
        w = ShardWriter({str(tmp_path / "big.h5")!r}, classes=['a'], image_size=(64, 64), producer='t')
        w.add_batch(np.zeros((10, 64, 64, 3), np.uint8), np.zeros(10))
        print('writing', flush=True)
        while True:
            w.add_batch(np.zeros((50, 64, 64, 3), np.uint8), np.zeros(50))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "big.h5").exists()
    assert (tmp_path / "big.h5.partial").exists()
    assert done.read_bytes() == before
    assert [p.name for p in expand_inputs([tmp_path])] == ["done.h5"]  # .partial is never an input
