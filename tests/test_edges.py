"""Round 3 of "nothing silently wrong": the seams' new surface, and a project that already has
checkpoints. Each test names the defect it guards (issue 26's rows)."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from util import IRIS_CSV, blobs_csv, cli, flags


def with_metric(monkeypatch, values):
    """The built-in objective, plus a metric "p" (higher is better) that is values[epoch - 1]."""
    real, calls = train.build_objective, []

    def build_objective(meta, cfg):
        objective = real(meta, cfg)

        def metrics(out, y):
            calls.append(1)
            return {**objective.metrics(out, y), "p": values[min(len(calls), len(values)) - 1]}

        return train.replace(objective, metrics=metrics,
                             higher_is_better={**objective.higher_is_better, "p": True})

    monkeypatch.setattr(train, "build_objective", build_objective)


def test_row1_a_nan_first_metric_is_never_kept_as_the_best(tmp_path, monkeypatch):
    with_metric(monkeypatch, [math.nan, 0.2, 0.5, 0.4] + [0.0] * 10)
    summary = train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--best-metric", "val_p", epochs=4))
    assert summary["best_epoch"] == 3 and summary["best"] == 0.5
    assert torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)["epoch"] == 3


def test_row1_a_metric_nan_at_every_epoch_says_so(tmp_path, monkeypatch):
    with_metric(monkeypatch, [math.nan])
    with pytest.raises(SystemExit, match="--best-metric val_p was NaN at all 3 epochs, so no epoch was kept"):
        train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--best-metric", "val_p", epochs=3))


@pytest.mark.parametrize("name", ["last.pt", "best_model.pt"])
@pytest.mark.parametrize("content", ["another loop's", "not a checkpoint"])
def test_row2_a_new_run_never_overwrites_a_checkpoint_it_did_not_write(tmp_path, name, content):
    path = tmp_path / "checkpoints" / name
    path.parent.mkdir()
    if content == "another loop's":
        torch.save({"epoch": 12, "model_state_dict": {"w": torch.ones(3)}}, path)
    else:
        path.write_bytes(b"weights of a loop in another format")
    before = path.read_bytes()
    with pytest.raises(SystemExit, match=f"{name} was not written by this train.py .*another --checkpoint-dir"):
        train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), epochs=2))
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == [name]


def test_row2_a_finished_run_of_this_train_py_may_be_started_over(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    first = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["run"]
    assert len(train.main(flags(tmp_path, source, epochs=3))["history"]) == 3
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["run"] != first


def sgd(model, cfg, steps):
    return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9), None, "step"


@pytest.mark.parametrize("swap", ["optimizer", "scheduler"])
def test_row7_a_resume_after_the_optimizer_or_scheduler_changed_is_refused_before_any_step(tmp_path, monkeypatch,
                                                                                           swap):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    last = tmp_path / "checkpoints/last.pt"
    before = last.read_bytes()
    real = train.build_optimizer
    if swap == "optimizer":
        monkeypatch.setattr(train, "build_optimizer", sgd)
    else:
        monkeypatch.setattr(train, "build_optimizer", lambda *a: (real(*a)[0], None, "step"))
    with pytest.raises(SystemExit, match="saved with AdamW and LambdaLR .* build_optimizer makes (SGD|AdamW and none)"):
        train.main(flags(tmp_path, source, "--resume", epochs=2))
    assert last.read_bytes() == before


def test_row8_a_semicolon_csv_with_decimal_commas_trains_on_numbers(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["Breite;Höhe;Klasse"]
    for i in range(90):
        kind = i % 3
        w, h = rng.normal((0, 3, 0)[kind], 0.5), rng.normal((0, 0, 3)[kind], 0.5)
        rows.append(f"{w:.3f};{h:.3f};{'abc'[kind]}".replace(".", ","))
    source = tmp_path / "europe.csv"
    source.write_text("\n".join(rows) + "\n")
    summary = train.main(flags(tmp_path, source, label="Klasse", epochs=30))
    meta = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)["meta"]
    assert meta["inputs"] == ["Breite", "Höhe"] and summary["report"]["acc"] > 0.8  # numbers, not text
    (tmp_path / "rows.csv").write_text("Breite;Höhe\n3,1;0,2\n0,1;2,9\n")  # as the table was written
    predicted = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", str(tmp_path / "rows.csv")])
    assert [line.split(" -> ")[1][0] for line in predicted["predictions"]] == ["b", "c"]


def test_row9_a_training_loss_far_above_chance_is_unstable_and_no_advice_raises_the_rate(tmp_path):
    summary = train.main(flags(tmp_path, IRIS_CSV, "--learning-rate", "3", label="Species", epochs=10))
    found = summary["diagnosis"]
    assert found["verdict"] == "unstable", found
    first = found["findings"][0]
    assert first["pattern"] == "unstable" and first["epoch"] == 1 and "over 2x the" in first["evidence"], first
    advice = " ".join(f["suggestion"] for f in found["findings"])
    assert "lower --learning-rate (3 -> 0.3)" in advice
    assert not any(raised in advice for raised in ("-> 9", "-> 30", "and 30")), advice


def test_row10_a_memorizing_fit_reads_overfitting_not_learning(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 42))  # 2 inputs that matter, 40 that do not, no weight decay
    y = (x[:, 0] + x[:, 1] + 0.5 * rng.normal(size=300) > 0).astype(int)
    source = tmp_path / "noisy.csv"
    source.write_text(",".join([*(f"f{i}" for i in range(42)), "y"]) + "\n" + "".join(
        ",".join(f"{v:.4f}" for v in row) + f",{t}\n" for row, t in zip(x, y)))
    summary = train.main(flags(tmp_path, source, "--weight-decay", "0", "--label-smoothing", "0", "--seed", "42",
                               "--val-fraction", "0.15", "--test-fraction", "0.15", label="y", epochs=200))
    assert summary["history"][-1]["train_loss"] < 0.01  # memorized
    assert summary["diagnosis"]["verdict"] == "overfitting", summary["diagnosis"]


def test_row11_a_run_still_improving_under_a_cosine_schedule_reads_still_improving(tmp_path):
    summary = train.main(flags(tmp_path, IRIS_CSV, "--learning-rate", "0.0003", "--batch-size", "0",
                               label="Species", epochs=30))
    val = [h["val_loss"] for h in summary["history"]]
    assert all(b < a for a, b in zip(val, val[1:]))  # falling every epoch, to the last
    assert summary["diagnosis"]["verdict"] == "still_improving", summary["diagnosis"]


def test_row12_a_last_batch_of_one_row_joins_the_one_before(tmp_path, monkeypatch):
    assert [len(b) for b in train.batch_rows(torch.arange(33), 16)] == [16, 17]
    assert [len(b) for b in train.batch_rows(torch.arange(34), 16)] == [16, 16, 2]
    assert [len(b) for b in train.batch_rows(torch.arange(1), 16)] == [1]
    monkeypatch.setattr(train, "build_model", lambda in_shape, out_features, meta, cfg: nn.Sequential(
        nn.Linear(in_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, out_features)))
    source = blobs_csv(tmp_path / "blobs.csv")
    n_train = train.split_rows(train.build_data(train.parse_config(flags(tmp_path, source)))["train"])
    summary = train.main(flags(tmp_path, source, "--batch-size", str(n_train - 1), epochs=2))
    assert len(summary["history"]) == 2
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["progress"]["epoch"] == 2


def test_row13_integers_past_int64_are_refused_by_name(tmp_path):
    source = tmp_path / "wei.csv"
    source.write_text("wei,x,y\n" + "".join(f"{(-1) ** i * (2 ** 62 + i * 10 ** 18)},{i % 7},{'ab'[i % 2]}\n"
                                            for i in range(40)))
    with pytest.raises(SystemExit, match="column wei holds integers past 64 bits"):
        train.main(flags(tmp_path, source, label="y", epochs=1))


def test_row14_the_lock_never_writes_through_a_symbolic_link(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/.lock").symlink_to(target)
    with pytest.raises(SystemExit, match=r"cannot open .*\.lock .*a symbolic link\?"):
        train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), epochs=1))
    assert target.read_text() == "keep me"


def test_row14_outputs_replace_a_link_left_at_their_name_not_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "training-loop").mkdir()
    (tmp_path / "training-loop/history.json").symlink_to(target)
    train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), epochs=1))
    assert target.read_text() == "keep me" and not (tmp_path / "training-loop/history.json").is_symlink()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_row15_a_plateau_schedule_on_the_selection_metric_reads_it_the_runs_way(tmp_path, monkeypatch, mode):
    def plateau(model, cfg, steps):
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode), "metric"

    monkeypatch.setattr(train, "build_optimizer", plateau)
    args = flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--best-metric", "val_acc", epochs=2)
    if mode == "min":
        with pytest.raises(SystemExit, match="steps on val_acc in mode 'min', and the run keeps the epoch where "
                                             "it is higher: give it mode='max'"):
            train.main(args)
        assert not (tmp_path / "checkpoints/last.pt").exists()
    else:
        assert len(train.main(args)["history"]) == 2


def test_rows3_to_5_eval_only_is_gone():
    result = cli("--eval-only")  # a finished run tested its best checkpoint once: --predict scores others
    assert result.returncode == 1 and "unrecognized arguments: --eval-only" in result.stderr
    assert "eval_only" not in train.TrainingConfig.__dataclass_fields__
