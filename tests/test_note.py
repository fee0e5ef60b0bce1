"""The run note on runs whose truth is known: each verdict where it belongs, and none where
noise alone could make it."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from util import after_each_epoch, blobs_csv, flags


def table(path, x: np.ndarray, y, names=None):
    names = names or [f"x{i}" for i in range(x.shape[1])]
    path.write_text(",".join([*names, "y"]) + "\n" + "".join(",".join(f"{v:.5f}" for v in row) + f",{t}\n"
                                                         for row, t in zip(x, y)))
    return path


def verdict(summary) -> str:
    return summary["diagnosis"]["verdict"]


def test_a_clean_easy_table_trained_to_convergence_reads_converged(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [6, 0], [0, 6]])
    labels = rng.integers(0, 3, 600)
    source = table(tmp_path / "clean.csv", centres[labels] + rng.normal(size=(600, 2)), labels)
    summary = train.main(flags(tmp_path, source, "--batch-size", "32", label="y", epochs=30))
    assert verdict(summary) == "converged", summary["diagnosis"]


def test_a_small_noisy_table_a_large_model_and_no_regularization_reads_overfitting(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2400, 22))  # 2 inputs that matter, 20 that do not
    y = ((x[:, 0] + x[:, 1] + rng.normal(scale=1.0, size=2400)) > 0).astype(int)
    source = table(tmp_path / "noisy.csv", x[:200], y[:200])
    truth = torch.tensor(x[200:], dtype=torch.float32), torch.tensor(y[200:])  # a large held-out set
    monkeypatch.setattr(train, "build_model", lambda in_shape, out_features, meta, cfg: nn.Sequential(
        nn.Linear(in_shape[0], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, out_features)))
    losses = []

    def truth_loss(run, epoch):  # the loss on 2,200 new rows, each epoch: the truth
        meta = run.data["meta"]
        with torch.no_grad():
            out = run.model.eval()(((truth[0] - meta["mean"]) / meta["std"]).float())
        losses.append(run.objective.row_losses(out, truth[1]).mean().item())

    after_each_epoch(monkeypatch, truth_loss)
    summary = train.main(flags(tmp_path, source, "--weight-decay", "0", "--label-smoothing", "0", "--scheduler",
                               "none", "--learning-rate", "0.003", "--grad-clip", "0", label="y", epochs=60))
    assert verdict(summary) == "overfitting", summary["diagnosis"]
    onset = next(f["epoch"] for f in summary["diagnosis"]["findings"] if f["pattern"] == "overfitting")
    assert abs(onset - (int(np.argmin(losses)) + 1)) <= 6  # near the truly best epoch


def test_the_default_iris_run_reads_overfitting_only_beyond_its_noise(tmp_path):
    summary = train.main(flags(tmp_path, "scikit-learn/iris", "--val-fraction", "0.15", "--test-fraction", "0.15",
                               "--seed", "42", "--batch-size", "0", label="Species", epochs=50))
    rise, se = summary["diagnosis"]["evidence"]["rise"]
    assert verdict(summary) != "overfitting" or rise > train.NOTE_LIMITS["z"] * se
    note = (tmp_path / "training-loop/run_note.md").read_text()
    assert f"Best epoch {summary['best_epoch']} of 50" in note and "paired row by row" in note


def test_shuffled_labels_read_not_learning(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv", rows_per_class=200)
    lines = source.read_text().splitlines()
    labels = [line.split(",", 1)[0] for line in lines[1:]]
    np.random.default_rng(0).shuffle(labels)
    source.write_text("\n".join([lines[0], *[f"{a},{line.split(',', 1)[1]}" for a, line in zip(labels, lines[1:])]]))
    summary = train.main(flags(tmp_path, source, epochs=15))
    assert verdict(summary) == "not_learning", summary["diagnosis"]
    assert "--label-column" in summary["diagnosis"]["findings"][0]["suggestion"]


def test_a_diverging_learning_rate_reads_unstable(tmp_path):
    summary = train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--learning-rate", "10", epochs=20))
    assert verdict(summary) == "unstable", summary["diagnosis"]
    note = (tmp_path / "training-loop/run_note.md").read_text()
    assert "Verdict: unstable" in note and "--learning-rate" in note


def test_the_regression_lab_predicts_within_0_2_of_the_truth(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 2))
    source = table(tmp_path / "lab.csv", x, [f"{t:.5f}" for t in 3 * x[:, 0] + 2 * x[:, 1] + 5 +
                                              rng.normal(scale=0.3, size=240)], names=["x1", "x2"])
    summary = train.main(["--dataset", str(source), "--label-column", "y", "--task", "regression", "--epochs", "80",
                          "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "out"),
                          "--datasets-dir", str(tmp_path / "ds")])
    assert verdict(summary) != "unstable"
    lines = train.main(["--checkpoint-dir", str(tmp_path / "ck"), "--predict", "1,2;-1,0.5;0,0"])["predictions"]
    assert [float(line.split("-> ")[1]) for line in lines] == pytest.approx([12, 3, 5], abs=0.2)


def test_early_stopping_is_not_told_to_train_longer(tmp_path):
    summary = train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--early-stopping-patience", "2",
                               epochs=100))
    assert len(summary["history"]) < 100 and verdict(summary) != "still_improving"
    assert f"of {len(summary['history'])}" in (tmp_path / "training-loop/run_note.md").read_text()


def test_three_epochs_read_still_improving(tmp_path):
    summary = train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), epochs=3))
    assert verdict(summary) == "still_improving" and summary["best_epoch"] == 3
    assert "--epochs 6" in summary["diagnosis"]["findings"][0]["suggestion"]


def test_a_near_perfect_regression_whose_tiny_loss_jitters_is_not_overfitting(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 2))
    source = table(tmp_path / "exact.csv", x, [f"{t:.6f}" for t in 3 * x[:, 0] + 2 * x[:, 1] + rng.normal(0, 0.02, 300)])
    summary = train.main(flags(tmp_path, source, "--task", "regression", label="y", epochs=60))
    assert summary["report"]["r2"] > 0.99 and verdict(summary) not in ("overfitting", "unstable"), summary["diagnosis"]


def test_a_collapse_to_chance_is_not_learning_not_overfitting(tmp_path):
    summary = train.main(flags(tmp_path, "scikit-learn/iris", "--learning-rate", "1.0", "--seed", "42",
                               "--batch-size", "0", label="Species", epochs=50))
    patterns = [f["pattern"] for f in summary["diagnosis"]["findings"]]
    assert "overfitting" not in patterns and "not_learning" in patterns, summary["diagnosis"]


def rows(mean: float, n: int = 400, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).normal(mean, spread, n)).clamp_min(0)


def history(val: list[float], train_loss: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v, "lr": 0.01, "seconds": 0.1}
            for i, (v, t) in enumerate(zip(val, train_loss))]


def test_a_real_overfit_after_little_learning_is_overfitting_not_not_learning():
    cfg = train.TrainingConfig(epochs=30)
    val = [1.0] * 3 + [0.95] + list(np.linspace(1.5, 9.5, 26))
    trained = list(np.linspace(1.0, 0.01, 30))
    found = train.diagnose(history(val, trained), 4, {"best": rows(0.95), "last": rows(9.5, spread=1.0),
                                                      "base": rows(1.0, seed=1), "reference": None}, cfg)
    assert found["verdict"] == "overfitting" and found["findings"][0]["epoch"] == 5, found


def test_converged_means_the_end_is_within_noise_or_a_small_rise_of_the_best():
    cfg = train.TrainingConfig(epochs=30)
    val, trained = [0.5] * 29 + [0.8], [0.6] * 30  # a real, large rise while training loss held still
    found = train.diagnose(history(val, trained), 29, {"best": rows(0.5), "last": rows(0.8, seed=2),
                                                       "base": rows(1.1, seed=1), "reference": None}, cfg)
    assert found["verdict"] != "converged", found
    for rise in (0.0, 0.02):  # within noise; real but under a tenth of the 0.6 learnt
        found = train.diagnose(history([0.5] * 30, trained), 29, {"best": rows(0.5), "last": rows(0.5 + rise, seed=0),
                                                                 "base": rows(1.1, seed=1), "reference": None}, cfg)
        assert found["verdict"] == "converged", (rise, found)


def test_the_note_and_early_stopping_follow_the_monitored_metric(tmp_path):
    summary = train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--best-metric", "val_acc",
                               "--early-stopping-patience", "3", epochs=40))
    history = summary["history"]
    best = max(history, key=lambda h: h["val_acc"])
    assert summary["best_epoch"] == best["epoch"] and len(history) == best["epoch"] + 3
    note = (tmp_path / "training-loop/run_note.md").read_text()
    assert "chosen by val_acc alone (higher is better)" in note and "test acc" in note


def test_every_way_a_run_ends_writes_the_note_and_the_diagnosis(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    note, report = tmp_path / "training-loop/run_note.md", tmp_path / "training-loop/test_report.json"
    early = train.main(flags(tmp_path, source, "--early-stopping-patience", "1", epochs=40))
    assert len(early["history"]) < 40 and f"of {len(early['history'])}" in note.read_text()
    note.unlink()  # a finished run, resumed: nothing to train, and the note written again
    summary = train.main(flags(tmp_path, source, "--early-stopping-patience", "1", "--resume", epochs=40))
    assert f"Best epoch {summary['best_epoch']} of" in note.read_text()
    assert json.loads(report.read_text())["diagnosis"] == summary["diagnosis"]


def test_paired_differences_and_their_standard_error():
    before, after = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.5, 2.5, 3.0, 5.0])
    mean, se = train.paired(before, after)
    d = np.array([0.5, 0.5, 0.0, 1.0])
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / math.sqrt(4))


def test_mode_says_which_way_is_better_whatever_the_metric_is_called(tmp_path):
    summary = train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--best-metric", "val_loss",
                               "--mode", "max", epochs=6))  # perverse, but said: the highest loss
    history = summary["history"]
    assert summary["best_epoch"] == max(history, key=lambda h: h["val_loss"])["epoch"] < 6
