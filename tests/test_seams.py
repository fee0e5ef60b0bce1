"""The seams' wider contracts: batches of any structure, a Dataset's collate_fn and its random
augmentation, start_epoch's changes (under torchrun too), --predict through predict_inputs, and a
copy of the template made as the README says."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset, random_split

import train
from test_resume import assert_same_run, signal_during_epoch
from util import REPO, after_each_epoch, blobs_csv, dirs, flags, torchrun


def seam_flags(root, *extra: str, epochs: int = 4) -> list[str]:
    """A run of a data seam of one's own: the table flags do not apply."""
    return [*dirs(root), "--epochs", str(epochs), "--batch-size", "8", "--seed", "0", "--no-resume",
            "--log-every", "1", "--save-every-steps", "0", "--learning-rate", "0.01", *extra]


# ------------------------------------------------------------------------ nested batches

def nested_data(cfg):
    """Inputs a dict holding a tensor and a tuple; targets a dict of the label and a row weight."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=g)
    x = torch.randn(200, 4, generator=g) + 2 * y[:, None].float()
    scale = torch.rand(200, 1, generator=g) + 0.5
    weight = torch.rand(200, generator=g) + 0.5

    def split(rows):
        inputs = {"x": x[rows] * scale[rows], "extra": (scale[rows], torch.arange(200)[rows])}
        return inputs, {"label": y[rows], "weight": weight[rows]}

    meta = {"task": "classification", "classes": ["a", "b", "c"],
            "class_counts": torch.bincount(y[:120], minlength=3).tolist()}
    return {"train": split(slice(0, 120)), "val": split(slice(120, 160)),
            "test": split(slice(160, 200)), "meta": meta}


class NestedModel(nn.Module):
    def __init__(self, in_shape, out_features):
        super().__init__()
        assert in_shape == {"x": (4,), "extra": ((1,), ())}, in_shape  # a tree of shapes
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, out_features))

    def forward(self, batch):
        assert batch["extra"][1].dtype == torch.int64  # a row id, as the split gave it
        return self.net(batch["x"] / batch["extra"][0])


def weighted_objective(meta, cfg):
    """The built-in classifier's, each row's loss weighted by the targets' "weight"."""
    base = train.classification_objective(meta, cfg)

    def row_losses(out, y):
        return base.row_losses(out, y["label"]) * y["weight"]

    def loss(out, y):
        return row_losses(out, y).mean()

    return replace(base, loss=loss, row_losses=row_losses,
                   metrics=lambda out, y: base.metrics(out, y["label"]))


@pytest.fixture
def nested_seams(monkeypatch):
    monkeypatch.setattr(train, "build_data", nested_data)
    monkeypatch.setattr(train, "build_model", lambda in_shape, out_features, meta, cfg:
                        NestedModel(in_shape, out_features))
    monkeypatch.setattr(train, "build_objective", weighted_objective)


def test_nested_batches_are_cut_counted_and_gathered_row_by_row():
    data = nested_data(None)
    inputs, targets = data["val"]
    batches = list(train.iterate_batches(data["val"], 16, torch.arange(40).flip(0)))
    assert [train.rows_in(yb) for _, yb in batches] == [16, 16, 8]  # read from the batch
    xb, yb = batches[0]
    assert set(xb) == {"x", "extra"} and isinstance(xb["extra"], tuple)
    assert torch.equal(xb["extra"][1], torch.arange(120, 160).flip(0)[:16])
    again = train.cat_rows([yb for _, yb in batches])
    assert torch.equal(again["label"], targets["label"].flip(0))
    fetched = train.fetch_batch(data["val"], (None, [3, 1]))  # the DataLoader path's
    assert torch.equal(fetched[0]["extra"][1], torch.tensor([123, 121]))
    assert train.input_shape(data["val"]) == {"x": (4,), "extra": ((1,), ())}


def test_dict_inputs_and_targets_train_evaluate_and_resume_exactly(tmp_path, monkeypatch,
                                                                   nested_seams):
    whole = train.main(seam_flags(tmp_path / "whole"))
    assert whole["report"]["acc"] > 0.6 and whole["report"]["rows"] == 40
    best = torch.load(tmp_path / "whole/checkpoints/best_model.pt", weights_only=True)
    assert best["model_args"]["in_shape"] == {"x": (4,), "extra": ((1,), ())}
    model = train.model_from_checkpoint(best)  # rebuilt from the recorded tree of shapes
    assert isinstance(model, NestedModel)
    with monkeypatch.context() as patch:
        signal_during_epoch(patch, epoch=3, signum=signal.SIGTERM)
        with pytest.raises(SystemExit):
            train.main(seam_flags(tmp_path / "stopped"))
    train.main(seam_flags(tmp_path / "stopped", "--resume"))
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")


# ------------------------------------------------------------------------ collate_fn

class Ragged(Dataset):
    """Token sequences of 2 to 9 tokens; the class: is token 1 more frequent than token 2?
    collate_fn pads with 0."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.tokens = [torch.randint(1, 4, (int(torch.randint(2, 10, (1,), generator=g)),),
                                     generator=g) for _ in range(n)]
        self.y = torch.tensor([int((t == 1).sum() > (t == 2).sum()) for t in self.tokens])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.tokens[i], self.y[i]

    @staticmethod
    def collate_fn(items):
        tokens, y = zip(*items)
        return nn.utils.rnn.pad_sequence(tokens, batch_first=True), torch.stack(y)


def ragged_data(cfg):
    """Splits cut by random_split: Subsets, which use their dataset's collate_fn."""
    parts = random_split(Ragged(300, 0), [200, 50, 50], generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(parts[0].dataset.y[parts[0].indices], minlength=2).tolist()
    meta = {"task": "classification", "classes": ["no", "yes"], "class_counts": counts}
    return {"train": parts[0], "val": parts[1], "test": parts[2], "meta": meta}


class MaskedMean(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        self.embed = nn.Embedding(4, 16, padding_idx=0)
        self.head = nn.Linear(16, out_features)

    def forward(self, tokens):
        real = (tokens != 0).unsqueeze(-1).float()
        return self.head((self.embed(tokens) * real).sum(1) / real.sum(1))


def test_a_datasets_collate_fn_pads_every_batch_subsets_included(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_data", ragged_data)
    monkeypatch.setattr(train, "build_model", lambda in_shape, out_features, meta, cfg:
                        MaskedMean(out_features))
    data = ragged_data(None)
    assert train.collate_of(data["train"]) == Ragged.collate_fn  # found through the Subset
    lengths = {xb.shape[1] for xb, _ in train.iterate_batches(data["train"], 8)}
    assert len(lengths) > 1  # each batch padded to its own longest
    summary = train.main(seam_flags(tmp_path, epochs=6))
    assert summary["report"]["acc"] > 0.7


# ------------------------------------------------------------------------ augmentation

class Noisy(Dataset):
    """Rows; with augment, noise from all three random streams added as each is read."""

    def __init__(self, x, y, augment=False):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if not self.augment:
            return self.x[i], self.y[i]
        noise = torch.randn(3) + np.random.normal() + random.random()
        return self.x[i] + 0.1 * noise, self.y[i]


def noisy_data(cfg):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (240,), generator=g)
    x = torch.randn(240, 3, generator=g) + y[:, None].float()
    meta = {"task": "classification", "classes": ["a", "b"], "class_counts": [80, 80]}
    return {"train": Noisy(x[:160], y[:160], augment=True), "val": Noisy(x[160:200], y[160:200]),
            "test": Noisy(x[200:], y[200:]), "meta": meta}


def test_a_training_batchs_draws_are_its_own_new_each_epoch_and_the_same_with_workers():
    split = noisy_data(None)["train"]
    rows = torch.randperm(160, generator=torch.Generator().manual_seed(0))

    def epoch(number, workers=0):
        return [xb for xb, _ in train.iterate_batches(split, 16, rows, torch.device("cpu"),
                                                      workers, seed=(0, number, 0))]

    model_stream = torch.get_rng_state()
    first = epoch(1)
    assert torch.equal(torch.get_rng_state(), model_stream), "the model's dropout stream put back"
    after = np.random.get_state()[1].copy(), random.getstate()
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(1)))
    assert not any(torch.equal(a, b) for a, b in zip(first, epoch(2))), "new draws every epoch"
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(1, workers=2)))
    # Python's and NumPy's streams end alike whether this process fetched the batches or workers did
    assert np.array_equal(np.random.get_state()[1], after[0]) and random.getstate() == after[1]
    later = [xb for xb, _ in train.iterate_batches(split, 16, rows[48:], torch.device("cpu"),
                                                   seed=(0, 1, 0))]
    assert all(torch.equal(a, b) for a, b in zip(first[3:], later))  # a resumed epoch's batches


def dropout_model(in_shape, out_features, meta, cfg):
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, out_features))


def test_augmentation_in_a_dataset_resumes_bit_identically_with_or_without_workers(tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(train, "build_data", noisy_data)
    monkeypatch.setattr(train, "build_model", dropout_model)
    train.main(seam_flags(tmp_path / "whole"))
    with monkeypatch.context() as patch:
        signal_during_epoch(patch, epoch=2, signum=signal.SIGTERM)
        with pytest.raises(SystemExit):
            train.main(seam_flags(tmp_path / "stopped", "--num-workers", "2"))
    train.main(seam_flags(tmp_path / "stopped", "--resume"))
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")


# ------------------------------------------------------------------------ start_epoch

def two_groups(model, cfg, steps_per_epoch):
    """The first layer at a tenth of the rest's rate; no scheduler, so start_epoch's rates stand."""
    first = list(model.net[1].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    optimizer = torch.optim.AdamW([{"params": first, "lr": 0.001}, {"params": rest, "lr": 0.01}])
    return optimizer, None, "step"


def freeze_then_halve(epoch, model, optimizer, scheduler, cfg):
    """Stateless: the first layer frozen for two epochs. An event: group 1's rate halved once,
    at epoch 3 (run twice, it would be halved twice)."""
    model.net[1].requires_grad_(epoch > 2)
    if epoch == 3:
        optimizer.param_groups[1]["lr"] /= 2


@pytest.fixture
def fine_tuning(monkeypatch):
    monkeypatch.setattr(train, "build_optimizer", two_groups)
    monkeypatch.setattr(train, "start_epoch", freeze_then_halve)
    weights = []
    after_each_epoch(monkeypatch, lambda run, epoch: weights.append(run.model.net[1].weight.detach().clone()))
    return weights


def test_start_epoch_freezes_unfreezes_and_sets_a_groups_rate(tmp_path, caplog, fine_tuning):
    source = blobs_csv(tmp_path / "blobs.csv")
    summary = train.main(flags(tmp_path, source, epochs=5))
    rates = [(h["lr"], h["lr_1"]) for h in summary["history"]]
    assert rates == [(0.001, 0.01)] * 2 + [(0.001, 0.005)] * 3
    assert torch.equal(fine_tuning[0], fine_tuning[1]), "frozen for epochs 1 and 2"
    assert not torch.equal(fine_tuning[1], fine_tuning[2]), "trained from epoch 3"
    assert "epoch 1: 1155 of 1283 parameters train" in caplog.text  # all but 3 x 32 + 32
    assert "epoch 3: 1283 of 1283 parameters train" in caplog.text
    assert re.search(r"epoch   1/5 .* lr 1\.00e-03/1\.00e-02 ", caplog.text)


@pytest.mark.parametrize("stop", ["mid-epoch 2", "mid-epoch 3", "end of epoch 3"])
def test_start_epochs_changes_resume_exactly(tmp_path, monkeypatch, fine_tuning, stop):
    source = blobs_csv(tmp_path / "blobs.csv")
    whole = train.main(flags(tmp_path / "whole", source, epochs=5))
    with monkeypatch.context() as patch:
        if stop.startswith("mid-epoch"):  # start_epoch ran before the stop, and must not again
            signal_during_epoch(patch, epoch=int(stop[-1]), signum=signal.SIGTERM)
        else:  # the signal during epoch 3's validation: last.pt holds the epoch's end
            real, calls = train.evaluate, []

            def evaluate(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                return real(*args, **kwargs)

            patch.setattr(train, "evaluate", evaluate)
        with pytest.raises(SystemExit):
            train.main(flags(tmp_path / "stopped", source, epochs=5))
    position = torch.load(tmp_path / "stopped/checkpoints/last.pt", weights_only=True)["position"]
    assert (position is None) == stop.startswith("end")
    resumed = train.main(flags(tmp_path / "stopped", source, "--resume", epochs=5))
    assert [h["lr_1"] for h in resumed["history"]] == [h["lr_1"] for h in whole["history"]]
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")


def test_a_start_epoch_that_freezes_everything_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "start_epoch", lambda epoch, model, *rest: model.requires_grad_(False))
    source = blobs_csv(tmp_path / "blobs.csv")
    with pytest.raises(SystemExit, match="epoch 1: no parameter requires a gradient"):
        train.main(flags(tmp_path, source, epochs=2))


# torchrun: the first layer frozen for two epochs; each rank saves its weights at each epoch's end.
FREEZING_UNDER_TORCHRUN = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import train

def start_epoch(epoch, model, optimizer, scheduler, cfg):
    model.net[1].requires_grad_(epoch > 2)

runs, real_set_up, real_log = [], train.set_up, train.log_epoch

def set_up(*args, **kwargs):
    runs.append(real_set_up(*args, **kwargs))
    return runs[-1]

def log_epoch(entry, cfg):
    run = runs[-1]
    path = os.path.join({record!r}, f"rank{{run.rank}}-epoch{{entry['epoch']}}.pt")
    torch.save({{k: v.clone() for k, v in run.model.state_dict().items()}}, path)
    real_log(entry, cfg)

train.start_epoch, train.set_up, train.log_epoch = start_epoch, set_up, log_epoch
train.main(sys.argv[1:])
"""


def test_under_torchrun_what_trains_changes_alike_on_every_rank(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    record = tmp_path / "weights"
    record.mkdir()
    script = tmp_path / "freezing.py"
    script.write_text(FREEZING_UNDER_TORCHRUN.format(repo=str(REPO), record=str(record)))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([sys.executable, *launcher, str(script), *flags(tmp_path, source, epochs=4),
                             "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = {(rank, epoch): torch.load(record / f"rank{rank}-epoch{epoch}.pt", weights_only=True)
               for rank in (0, 1) for epoch in range(1, 5)}
    for epoch in range(1, 5):  # DDP kept every rank's weights the same, frozen and unfrozen
        assert all(torch.equal(weights[0, epoch][k], weights[1, epoch][k]) for k in weights[0, epoch])
    first = [weights[0, epoch]["net.1.weight"] for epoch in range(1, 5)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert not torch.equal(first[2], first[3])  # and it goes on training after the change


# ------------------------------------------------------------------------ --predict's seam

def test_predict_inputs_is_the_one_function_to_swap_for_ones_own_data(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(train, "build_data", noisy_data)

    def predict_inputs(text, meta, cfg):
        values = [[float(v) for v in part.split()] for part in text.split(";")]
        if any(len(v) != 3 for v in values):
            raise ValueError("needs three numbers an input, separated by spaces")
        return torch.tensor(values), [f"({part.strip()})" for part in text.split(";")]

    train.main(seam_flags(tmp_path))
    monkeypatch.setattr(train, "predict_inputs", predict_inputs)
    lines = train.main([*dirs(tmp_path), "--predict", "0 0 0; 2 2 2"])["predictions"]
    assert len(lines) == 2 and lines[0].startswith("(0 0 0) -> a (") and lines[1].startswith("(2 2 2) -> b")
    assert capsys.readouterr().out.splitlines() == lines
    with pytest.raises(SystemExit, match=r"^error: --predict needs three numbers"):
        train.main([*dirs(tmp_path), "--predict", "1 2"])


# ------------------------------------------------------------------------ tables and the copy

def test_a_constant_column_stays_an_input_and_what_is_left_out_is_named(tmp_path, caplog):
    lines = ["id,pixel0,pixel1,pixel2,note,label"]
    rng = np.random.default_rng(0)
    for i in range(120):
        label = i % 2
        lines.append(f"{i},0,{rng.normal(label):.3f},{rng.normal():.3f},text{i},{label}")
    (tmp_path / "digits.csv").write_text("\n".join(lines) + "\n")
    summary = train.main(flags(tmp_path, tmp_path / "digits.csv", label="label", epochs=2))
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    assert best["meta"]["features"] == ["pixel0", "pixel1", "pixel2"]  # pixel0 is constant
    assert best["model_args"]["in_shape"] == (3,) and summary["report"]["rows"] > 0
    assert "column id: left out (an id-like name)" in caplog.text
    assert "column note: left out (text, 120 distinct in 120 rows)" in caplog.text


def copy_step() -> str:
    """The README's copy command, as a user runs it."""
    found = re.search(r"^mkdir -p ~/my-project.*$", (REPO / "README.md").read_text(), re.M)
    assert found, "the README has no copy step"
    return found[0]


def test_the_readme_copy_step_trains_and_tests_offline(tmp_path):
    project = tmp_path / "my-project"
    command = copy_step().replace("~/my-project", str(project)).split(" && cd ")[0]
    subprocess.run(["bash", "-c", command], cwd=REPO, check=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    trained = subprocess.run([sys.executable, "train.py", "--epochs", "3"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test.py"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stdout[-3000:]
    for folder in ("datasets", "checkpoints", "training-loop"):  # a copy made without Iris.csv
        shutil.rmtree(project / folder)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: the hub cannot be reached
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    missing = subprocess.run([sys.executable, "train.py"], cwd=project, env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert "datasets/Iris.csv is missing" in missing.stderr and "copy datasets/Iris.csv" in missing.stderr


# ------------------------------------------------------------------------ which way is better

@pytest.mark.parametrize("metric, mode, lower, why", [
    ("val_loss", "auto", True, "a loss"),
    ("val_acc", "auto", False, "as the objective declares"),
    ("val_acc", "min", True, "--mode min"),  # said, so obeyed
])
def test_mode_auto_reads_the_objectives_declaration_and_the_log_says_why(tmp_path, caplog, metric,
                                                                        mode, lower, why):
    source = blobs_csv(tmp_path / "blobs.csv")
    summary = train.main(flags(tmp_path, source, "--best-metric", metric, "--mode", mode, epochs=5))
    way = "lower" if lower else "higher"
    assert f"best by {metric} ({way} is better: {why})" in caplog.text
    values = [h[metric] for h in summary["history"]]
    assert values[summary["best_epoch"] - 1] == (min(values) if lower else max(values))
    assert summary["report"]["mode"] == ("min" if lower else "max")


def test_every_built_in_metric_says_which_way_is_better():
    out = torch.randn(10, 1)
    for objective, y in (
            (train.classification_objective({"classes": ["a", "b"]}, train.TrainingConfig()),
             torch.tensor([0, 1] * 5)),
            (train.classification_objective({"classes": ["a", "b", "c"]}, train.TrainingConfig()),
             torch.tensor([0, 1, 2, 0, 1] * 2)),
            (train.regression_objective({}), torch.randn(10))):
        outputs = out.expand(-1, objective.outputs).contiguous()
        numbers = {k for k, v in objective.metrics(outputs, y).items() if isinstance(v, float)}
        assert numbers <= set(objective.higher_is_better), numbers - set(objective.higher_is_better)
    assert train.regression_objective({}).higher_is_better == {"rmse": False, "mae": False,
                                                               "r2": True}


@pytest.mark.parametrize("metric, message", [
    ("val_mape", "--best-metric val_mape: the objective declares no direction for it"),
    ("train_loss", "--best-metric train_loss: the objective declares no direction for it"),
])
def test_a_metric_of_no_declared_direction_asks_for_mode_in_one_line(tmp_path, metric, message):
    source = blobs_csv(tmp_path / "blobs.csv")
    with pytest.raises(SystemExit) as stop:
        train.main(flags(tmp_path, source, "--best-metric", metric, epochs=2))
    assert stop.value.code.startswith(f"error: {message}") and "pass --mode min or --mode max" in \
        stop.value.code and "\n" not in stop.value.code
    assert not (tmp_path / "checkpoints" / "best_model.pt").exists()  # refused before training


def test_a_best_metric_that_is_not_a_held_out_metric_is_refused_even_with_mode(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    with pytest.raises(SystemExit, match="--best-metric seconds is not a validation metric"):
        train.main(flags(tmp_path, source, "--best-metric", "seconds", "--mode", "min", epochs=2))


def test_a_metric_returned_as_a_tensor_is_one_line_not_a_broken_report(tmp_path, monkeypatch):
    real = train.classification_objective

    def tensor_metric(meta, cfg):
        objective = real(meta, cfg)
        return replace(objective, metrics=lambda out, y: {**objective.metrics(out, y),
                                                          "mean_logit": out.mean()})

    monkeypatch.setattr(train, "classification_objective", tensor_metric)
    source = blobs_csv(tmp_path / "blobs.csv")
    with pytest.raises(SystemExit, match="metric 'mean_logit' is a Tensor, not a number"):
        train.main(flags(tmp_path, source, epochs=2))
