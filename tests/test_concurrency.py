"""Several builders and a reader on one cache at once, compaction forced after every build: all
finish without error, and after a final compaction every poster is stored exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from posterfusion.cache import list_stores
from posterfusion.images import read_key

BUILDER = """
import json, sys
import torch
torch.set_num_threads(1)
from posterfusion import cache
cache.COMPACT_AFTER = 2  # compaction at the end of every build, while the others write
from posterfusion.extract import build_cache, open_stores
from posterfusion.frozen import FrozenModels

root, chunk, paths = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
models = FrozenModels("nanodet", "efficientnet_lite0", "cpu")
for start in range(0, len(paths), chunk):  # several short builds: several compactions
    summary = build_cache(paths[start:start + chunk], open_stores(models, root), models, batch_size=2, workers=0)
    assert summary.failed == 0, summary.failures
"""

READER = """
import sys, time
from pathlib import Path
from posterfusion.cache import FeatureStore, list_stores

root, done = Path(sys.argv[1]), Path(sys.argv[2])
reads = 0
while not done.exists():
    for store in list_stores(root) if root.is_dir() else []:
        # opening cleans up temporary files, as every build and 'fusion predict --cache' does
        FeatureStore.open(root, store.kind, store.identity, store.columns).read()
        reads += 1
    time.sleep(0.01)
print(reads)
"""


@pytest.mark.slow
def test_three_builders_and_a_reader_share_one_cache(real_manifest: Path, tmp_path: Path) -> None:
    table = pd.read_csv(real_manifest, dtype=str, keep_default_na=False)
    posters = [str((real_manifest.parent / p).resolve()) for p in table["poster"].iloc[::250].head(30)]
    cache, done = tmp_path / "cache", tmp_path / "done"
    shares = [posters[0:20], posters[10:30], posters[5:25]]  # overlapping: the same posters race
    reader = subprocess.Popen([sys.executable, "-c", READER, str(cache), str(done)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    builders = [subprocess.Popen([sys.executable, "-c", BUILDER, str(cache), "4", json.dumps(share)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for share in shares]
    deadline = time.monotonic() + 600
    results = [b.communicate(timeout=max(1.0, deadline - time.monotonic())) for b in builders]
    done.touch()
    reads, reader_errors = reader.communicate(timeout=60)
    for builder, (_, errors) in zip(builders, results):
        assert builder.returncode == 0, errors
    assert reader.returncode == 0, reader_errors
    assert int(reads) > 0

    expected = {read_key(p) for p in posters}
    stores = list_stores(cache)
    assert sorted(s.kind for s in stores) == ["backbone", "detectors"]
    for store in stores:
        store.compact(force=True)
        keys = [k for part in store.parts() for k in pq.read_table(part, columns=["key"]).column("key").to_pylist()]
        assert sorted(keys) == sorted(expected), store.folder.name  # each poster exactly once
        assert not list(store.folder.glob(".*.tmp"))
