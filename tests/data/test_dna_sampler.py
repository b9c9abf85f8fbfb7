"""The DNA training sampler under data parallelism: ranks see disjoint, equal shares of each epoch, a resumed
rank continues exactly where it stopped, and Lightning keeps the sampler instead of wrapping it (a real
two-process gloo run)."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from seqmamba.data.dna import EpochSampler
from seqmamba.data.dna.datamodules import _ShuffledEpochSampler


def shard(sampler, rank, world, monkeypatch):
    monkeypatch.setattr(type(sampler), "_rank_world", staticmethod(lambda: (rank, world)))
    return list(sampler)


@pytest.mark.parametrize("n, world", [(12, 2), (13, 3), (7, 4)])
def test_ranks_split_each_epoch(monkeypatch, n, world):
    epoch = 3
    shares = [shard(_ShuffledEpochSampler(n, lambda: (epoch, 0), seed=5), r, world, monkeypatch)
              for r in range(world)]
    assert all(len(s) == n // world for s in shares)
    seen = [i for s in shares for i in s]
    assert len(set(seen)) == len(seen) == n // world * world  # disjoint, nothing repeated
    assert all(epoch * n <= i < (epoch + 1) * n for i in seen)
    one_process = shard(_ShuffledEpochSampler(n, lambda: (epoch, 0), seed=5), 0, 1, monkeypatch)
    assert sorted(one_process) == list(range(epoch * n, (epoch + 1) * n))
    assert set(seen) <= set(one_process)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resumed_rank_continues_its_own_share(monkeypatch, world):
    n, epoch = 20, 1
    for rank in range(world):
        fresh = shard(_ShuffledEpochSampler(n, lambda: (epoch, 0), seed=0), rank, world, monkeypatch)
        for done in range(1, n // world):  # samples this rank trained on before the checkpoint
            resumed = shard(_ShuffledEpochSampler(n, lambda: (epoch, done), seed=0), rank, world, monkeypatch)
            assert resumed == fresh[done:], (rank, done)


def test_epoch_counter_without_trainer(monkeypatch):
    sampler = EpochSampler(4)
    assert shard(sampler, 0, 1, monkeypatch) == [0, 1, 2, 3]
    assert shard(sampler, 0, 1, monkeypatch) == [4, 5, 6, 7]


SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L
    import torch
    from seqmamba.data.dna.datamodules import DNATableData

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.rows = []

        def training_step(self, batch, batch_idx):
            self.rows += [int(i) for i in batch["index"]]
            return (self.w * 0).sum() + self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    table, out = sys.argv[1], sys.argv[2]
    data = DNATableData(train=table, val=table, batch_size=2)
    model = Record()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, data)
    sampler = type(trainer.train_dataloader.sampler).__name__
    with open(f"{out}.{trainer.global_rank}.json", "w") as f:
        json.dump({"rows": model.rows, "sampler": sampler, "steps": trainer.global_step}, f)
''')


def test_two_process_ddp_shards_rows(tmp_path):
    rng = np.random.default_rng(0)
    table = tmp_path / "t.csv"
    table.write_text("sequence,label\n" + "".join(
        "".join(rng.choice(list("ACGT"), 12)) + f",{i % 2}\n" for i in range(17)))
    (tmp_path / "run.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, "run.py", str(table), str(tmp_path / "seen")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen.{r}.json").read_text()) for r in (0, 1)]
    assert {r["sampler"] for r in ranks} == {"_ShuffledEpochSampler"}, ranks  # not Lightning's wrapper
    rows = [r["rows"] for r in ranks]
    assert len(rows[0]) == len(rows[1]) == 8 and ranks[0]["steps"] == 4
    assert not set(rows[0]) & set(rows[1]) and len(set(rows[0] + rows[1])) == 16
