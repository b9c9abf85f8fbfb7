"""Sequential recommendation: metrics against brute force, padding invariance, causality, streamed scoring,
a two-step CPU fit of each config through the CLI, checkpoint -> id map -> batch scoring."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from seqmamba.cli import main
from seqmamba.data.recommendation import IdMap, UnknownIdError
from seqmamba.tasks.recommendation import Mamba4Rec, SASRec, api
from seqmamba.tasks.recommendation.metrics import full_ranking_metrics, ranking_metrics, target_ranks
from tests.utils import assert_close

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "recommendation"


# ---------------------------------------------------------------------------------------------- metrics

def brute_force(scores: list[list[float]], targets: list[int], ks, history=None):
    """Sort each row by hand; rank = items strictly above the target after excluding its history."""
    out = {f"{m}@{k}": [] for k in ks for m in ("hit", "ndcg", "mrr")}
    for row, (s, t) in enumerate(zip(scores, targets)):
        banned = set() if history is None else {i for r, i in history if r == row and i != t}
        ranked = sorted((i for i in range(len(s)) if i not in banned and s[i] != -math.inf),
                        key=lambda i: -s[i])
        rank = sum(1 for i in ranked[:ranked.index(t)] if s[i] > s[t])
        for k in ks:
            out[f"hit@{k}"].append(1.0 if rank < k else 0.0)
            out[f"ndcg@{k}"].append(1 / math.log2(rank + 2) if rank < k else 0.0)
            out[f"mrr@{k}"].append(1 / (rank + 1) if rank < k else 0.0)
    return out


def test_metrics_hand_computed():
    scores = torch.tensor([[-math.inf, 0.1, 0.9, 0.5], [-math.inf, 0.3, 0.2, 0.1]])
    m = full_ranking_metrics(scores, torch.tensor([3, 1]), ks=(1, 2))
    assert m["hit@1"].tolist() == [0.0, 1.0] and m["hit@2"].tolist() == [1.0, 1.0]
    assert m["ndcg@2"].tolist() == pytest.approx([1 / math.log2(3), 1.0])
    assert m["mrr@2"].tolist() == pytest.approx([0.5, 1.0])
    excluded = full_ranking_metrics(scores, torch.tensor([3, 1]), ks=(1,),
                                    history=(torch.tensor([0, 1]), torch.tensor([2, 1])))
    assert excluded["hit@1"].tolist() == [1.0, 1.0]  # item 2 removed from row 0; row 1's target is kept


@pytest.mark.parametrize("exclude", [False, True])
def test_metrics_match_brute_force(exclude):
    gen = torch.Generator().manual_seed(1)
    b, n = 37, 53
    scores = torch.randn(b, n, generator=gen, dtype=torch.float64)
    scores[:, 0] = -math.inf
    targets = torch.randint(1, n, (b,), generator=gen)
    history = None
    if exclude:
        rows = torch.randint(0, b, (200,), generator=gen)
        items = torch.randint(1, n, (200,), generator=gen)
        history = (rows, items)
    ks = (1, 5, 10, 20)
    got = full_ranking_metrics(scores, targets, ks, history)
    want = brute_force(scores.tolist(), targets.tolist(), ks,
                       None if history is None else list(zip(rows.tolist(), items.tolist())))
    for name, values in want.items():
        assert got[name].tolist() == pytest.approx(values), name


def test_ranks_count_only_strictly_higher_scores():
    scores = torch.tensor([[-math.inf, 1.0, 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [1]
    assert ranking_metrics(torch.tensor([0, 9, 10]), ks=(10,))["hit@10"].tolist() == [1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------- models

def tiny(kind: str, n_items: int = 30):
    if kind == "mamba4rec":
        return Mamba4Rec(n_items, hidden_size=16, n_layers=2, d_state=8).eval()
    return SASRec(n_items, max_len=40, hidden_size=16, n_layers=2, n_heads=2, inner_size=32).eval()


def pad(rows: list[list[int]], width: int, left: bool = False):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, sl], mask[r, sl] = torch.tensor(row), True
    return ids, mask


def scores_of(model, rows, width, left=False):
    ids, mask = pad(rows, width, left)
    with torch.no_grad():
        return model.item_scores(model.last_hidden(model(ids, mask), mask))[:, 1:]  # column 0 is -inf


@pytest.mark.parametrize("kind, left", [("mamba4rec", False), ("mamba4rec", True), ("sasrec", False)])
def test_padding_invariance(kind, left):
    """A user's scores do not change with the batch's padding (their own length alone vs a longer batch)."""
    model = tiny(kind)
    user = [3, 7, 1, 12, 5]
    alone = scores_of(model, [user], len(user))
    batched = scores_of(model, [list(range(1, 30)), user, [4]], 35, left)
    assert_close("scores", batched[1], alone[0], 1e-5)
    assert_close("one-item user", batched[2], scores_of(model, [[4]], 1)[0], 1e-5)


@pytest.mark.parametrize("kind", ["mamba4rec", "sasrec"])
def test_all_positions_are_causal(kind):
    """Position t's state depends on items[:t+1] only: all positions can be trained in one pass."""
    model = tiny(kind)
    a = torch.tensor([[3, 7, 1, 12, 5, 9, 2]])
    b = a.clone()
    b[0, 4:] = torch.tensor([20, 21, 22])
    mask = torch.ones_like(a, dtype=torch.bool)
    with torch.no_grad():
        ha, hb = model(a, mask), model(b, mask)
    assert_close("prefix", hb[0, :4], ha[0, :4], 1e-6)
    assert (hb[0, 4:] - ha[0, 4:]).abs().max() > 1e-4


def test_sasrec_rejects_left_padding_and_long_inputs():
    model = tiny("sasrec")
    ids, mask = pad([[1, 2], [3]], 2, left=True)
    with pytest.raises(ValueError, match="right padding"):
        model(ids, mask)
    with pytest.raises(ValueError, match="exceed max_len=40"):
        model(torch.ones(1, 41, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- CLI fit

TINY = ["--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--model.init_args.hidden_size=16", "--model.init_args.d_state=8",
        "--model.init_args.n_layers=1", "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=8"]


def fit(capsys, config: str, *extra: str) -> Path:
    main(["fit", "-c", str(CONFIGS / config), *TINY, *extra])
    out = capsys.readouterr().out
    run = [line for line in out.splitlines() if line.startswith("run directory: ")]
    assert len(run) == 1, out
    return Path(run[0].removeprefix("run directory: "))


@pytest.mark.parametrize("model", ["mamba4rec", "sasrec"])
def test_quickstart_two_step_fit_and_batch_scoring(workdir, capsys, model):
    run = fit(capsys, "quickstart.yaml", f"--model.init_args.model={model}",
              "--data.init_args.synthetic_users=30", "--data.init_args.max_len=12")
    metrics = pl.read_csv(run / "metrics.csv")
    assert {"train/loss", "val/hit@10", "val/ndcg@10", "val/mrr@10", "val/ndcg@20"} <= set(metrics.columns)
    assert (run / "learning_curves.png").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    ids = IdMap.load(ckpt.parent / "id_map")
    rec = api.load(ckpt)
    assert rec.model.n_items == ids.n_items
    log = pl.DataFrame({"user": ["a", "a", "a", "b"], "item": ids.items.gather([0, 1, 2, 3]),
                        "timestamp": [3, 1, 2, 0]})
    with pytest.warns(UserWarning, match="cannot stream") if model == "sasrec" else _nothing():
        out = rec.score_log(log, workdir / "recs.parquet", k=3, progress=False)
    recs = pl.read_parquet(out)
    assert recs.columns == ["user", "rank", "item", "score"] and recs.height == 6
    assert recs["user"].to_list() == ["a"] * 3 + ["b"] * 3 and recs["rank"].to_list() == [1, 2, 3] * 2
    assert recs.group_by("user").agg(pl.col("score").is_sorted(descending=True).all())["score"].all()
    # a's history in time order is items[1], items[2], items[0]: the same as recommend() on that list
    direct = rec.recommend({"a": ids.items.gather([1, 2, 0]).to_list()}, k=3)
    assert direct["item"].to_list() == recs["item"].to_list()[:3]
    only_b = pl.read_parquet(rec.score_log(log, workdir / "b.parquet", k=2, users=["b"], progress=False))
    assert only_b["user"].to_list() == ["b", "b"] and only_b["item"].to_list() == recs["item"].to_list()[3:5]
    with pytest.raises(UnknownIdError, match="unknown item id"):
        rec.recommend({"a": ["never-seen"]})
    with pytest.raises(UnknownIdError, match=r"1 unknown user id\(s\).*'zed'"):
        rec.score_log(log, workdir / "x.parquet", users=["a", "zed"], progress=False)
    bad = log.with_columns(pl.Series("item", ["nope", *log["item"].cast(pl.String).to_list()[1:]]))
    with pytest.raises(UnknownIdError, match="unknown item id.*'nope'"):
        rec.score_log(bad, workdir / "x.parquet", progress=False)
    assert not (workdir / "x.parquet").exists()
    dropped = pl.read_parquet(rec.score_log(bad, workdir / "d.parquet", k=3, progress=False, unknown_items="drop"))
    assert dropped["user"].to_list() == ["a"] * 3 + ["b"] * 3
    if model == "mamba4rec":  # the command-line entry point writes the same table
        log.rename({"user": "user_id", "item": "item_id"}).write_csv(workdir / "log.csv")
        api.main([str(ckpt), str(workdir / "log.csv"), str(workdir / "cli.parquet"), "-k", "3", "--device", "cpu"])
        assert pl.read_parquet(workdir / "cli.parquet").equals(recs)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sampled_softmax_and_exclusion_fit(workdir, capsys):
    run = fit(capsys, "quickstart.yaml", "--model.init_args.n_negatives=16", "--model.init_args.exclude_history=true",
              "--data.init_args.synthetic_users=20", "--data.init_args.max_len=8")
    assert "val/ndcg@10" in pl.read_csv(run / "metrics.csv").columns


@pytest.mark.parametrize("config", ["ml100k.yaml", "long_history.yaml"])
def test_other_configs_two_step_fit(workdir, capsys, config):
    extra = ["--data.init_args.max_len=16", "--trainer.precision=32"]
    if config == "ml100k.yaml":
        if importlib.util.find_spec("recbole") is None:
            pytest.skip("recbole wheel not installed")
    else:
        extra += ["--data.init_args.synthetic_users=10", "--data.init_args.synthetic_mean_len=60"]
    run = fit(capsys, config, *extra)
    assert (run / "checkpoints" / "id_map" / "items.parquet").is_file()


def test_training_loss_ignores_padding():
    """The batch loss is the mean CE over real positions: a padded batch equals its users trained alone."""
    from seqmamba.tasks.recommendation import SequentialRecModule

    module = SequentialRecModule(n_items=30, hidden_size=16, d_state=8, dropout=0.0)
    module.log = lambda *a, **k: None  # no trainer attached
    a, b = [3, 7, 1, 12, 5, 9], [4, 2, 8]

    def batch(rows):
        ids, mask = pad([r[:-1] for r in rows], max(len(r) for r in rows) - 1)
        targets, _ = pad([r[1:] for r in rows], ids.shape[1])
        return {"items": ids, "targets": targets, "mask": mask}

    with torch.no_grad():
        both = module.training_step(batch([a, b]), 0)
        alone = [module.training_step(batch([r]), 0) for r in (a, b)]
    expected = (alone[0] * (len(a) - 1) + alone[1] * (len(b) - 1)) / (len(a) + len(b) - 2)
    assert_close("loss", both, expected, 1e-5)


def test_load_without_id_map_says_where_it_looked(tmp_path):
    from seqmamba.tasks.recommendation import SequentialRecModule

    module = SequentialRecModule(n_items=5, hidden_size=8, d_state=4)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, ckpt)
    with pytest.raises(FileNotFoundError, match=r"id_map/users.parquet does not exist"):
        api.load(ckpt)
    with pytest.raises(FileNotFoundError, match="checkpoint .* does not exist"):
        api.load(tmp_path / "none.ckpt")


def test_full_history_evaluation_reads_the_whole_history():
    from seqmamba.data.recommendation import EvalCollate
    from seqmamba.tasks.recommendation import SequentialRecModule

    module = SequentialRecModule(n_items=30, hidden_size=16, d_state=8, eval_full_history=True).eval()
    items = np.random.default_rng(2).integers(1, 31, size=60).astype(np.int32)
    offsets = np.array([0, 25, 60])
    batch = EvalCollate(items, offsets, users=np.array([0, 1]), positions=np.array([24, 59]), max_len=5)([0, 1])
    assert batch["items"].shape[1] == 5
    full, mask = module.eval_inputs(batch)
    assert full.tolist()[1] == items[25:59].tolist() and mask.sum(1).tolist() == [24, 34]
    assert full.tolist()[0][:24] == items[:24].tolist() and not mask[0, 24:].any()
    with torch.no_grad():
        want = module.model.item_scores(module.model(full[1:, :34], mask[1:, :34])[:, -1])
        assert_close("scores", module(full, mask)[1, 1:], want[0, 1:], 1e-5)
    module.hparams.eval_full_history = False
    assert module.eval_inputs(batch)[0] is batch["items"]
