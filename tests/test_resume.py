"""Stops and resumes: kill -9, signals, torchrun, and what a resume may and may not change."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import train
from util import REPO, blobs_csv, dirs, flags, run_train, torchrun


def final_state(root) -> tuple[dict, list]:
    """A run's final weights, and its history without the wall-clock seconds."""
    last = torch.load(root / "checkpoints/last.pt", weights_only=True)
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(last["progress"]["history"])]
    on_disk = json.loads((root / "training-loop/history.json").read_text())
    assert history == [{k: v for k, v in h.items() if k != "seconds"} for h in on_disk]
    return last["model"], history


def assert_same_run(a, b) -> None:
    weights_a, history_a = final_state(a)
    weights_b, history_b = final_state(b)
    assert history_a == history_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # bit-identical


def mid_epoch_position(root) -> dict:
    position = torch.load(root / "checkpoints/last.pt", weights_only=True)["position"]
    assert position is not None, "last.pt was written at an epoch's end, not inside one"
    return position


@pytest.mark.parametrize("extra", [
    [],  # the in-memory path
    ["--loader", "dataloader", "--num-workers", "1", "--grad-accum-steps", "2", "--use-amp", "--amp-dtype", "bfloat16",
     "--early-stopping-patience", "2"],
], ids=["memory", "dataloader-worker-accumulation-bf16"])
def test_kill_9_mid_epoch_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, extra):
    source = blobs_csv(tmp_path / "blobs.csv")
    args = ["--batch-size", "4", "--save-every-steps", "2", "--datasets-dir", str(tmp_path / "datasets"), *extra]
    whole = train.main(flags(tmp_path / "whole", source, *args, epochs=6))
    killed = tmp_path / "killed"
    crashed = run_train(tmp_path, *flags(killed, source, *args, epochs=6), signal_at="3,4,SIGKILL")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert (mid_epoch_position(killed)["epoch"], mid_epoch_position(killed)["steps"]) == (3, 2)
    resumed = train.main(flags(killed, source, *args, "--resume", epochs=6))
    assert_same_run(tmp_path / "whole", killed)
    assert resumed["report"] == whole["report"]


def signal_during_epoch(monkeypatch, epoch: int, signum: int) -> None:
    """A real signal to this process in the middle of the given epoch."""
    real, calls = train.train_one_epoch, []

    def train_one_epoch(model, batches, *args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            batches = send_at_step(batches, 2, signum)
        return real(model, batches, *args, **kwargs)

    def send_at_step(batches, step, signum):
        for i, batch in enumerate(batches):
            if i == step:
                os.kill(os.getpid(), signum)
            yield batch

    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)


def dropout_model(in_shape, out_features, meta, cfg):
    """A model that draws random numbers every step: a resume must restore their stream."""
    return nn.Sequential(nn.Linear(in_shape[0], 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, out_features))


@pytest.mark.parametrize("signum, status, epoch", [
    (signal.SIGTERM, 143, 1),  # before the first epoch ends: still a last.pt to resume from
    (signal.SIGINT, 130, 4),
    (signal.SIGHUP, 129, 2),
])
def test_a_signal_mid_epoch_saves_that_step_and_resumes_exactly(tmp_path, monkeypatch, caplog, signum, status, epoch):
    monkeypatch.setattr(train, "build_model", dropout_model)
    source = blobs_csv(tmp_path / "blobs.csv")
    args = ["--save-every-steps", "0"]  # no saves but the signal's
    train.main(flags(tmp_path / "whole", source, *args, epochs=5))
    stopped = tmp_path / "stopped"
    handler_before = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        signal_during_epoch(patch, epoch=epoch, signum=signum)
        with pytest.raises(SystemExit) as stop:
            train.main(flags(stopped, source, *args, epochs=5))
    assert stop.value.code == status
    assert "Resume with: python train.py" in caplog.text and "--resume" in caplog.text
    position = mid_epoch_position(stopped)  # 72 training rows, batch 16: 5 steps an epoch
    assert position["epoch"] == epoch and 0 < position["steps"] < 5
    assert f"holds epoch {epoch}, step {position['steps']} of 5" in caplog.text
    history = stopped / "training-loop/history.json"
    assert len(json.loads(history.read_text())) == epoch - 1  # the finished epochs
    assert signal.getsignal(signum) is handler_before  # main() gives the signal back as it found it
    caplog.clear()
    train.main(flags(stopped, source, *args, "--resume", epochs=5))
    assert f"at epoch {epoch}, step {position['steps']}" in caplog.text
    assert_same_run(tmp_path / "whole", stopped)


def test_a_signal_ignored_at_start_stays_ignored(tmp_path, monkeypatch):
    source = blobs_csv(tmp_path / "blobs.csv")
    signal_during_epoch(monkeypatch, epoch=2, signum=signal.SIGHUP)
    handler = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup python train.py` starts
    try:
        summary = train.main(flags(tmp_path, source, epochs=3))
    finally:
        signal.signal(signal.SIGHUP, handler)
    assert len(summary["history"]) == 3


def from_a_terminal() -> None:
    """A child's signals as a terminal gives them: this suite may run as a background job, whose
    children inherit SIGINT ignored (and would rightly keep ignoring it)."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("signum, status, when", [
    (signal.SIGTERM, 143, "epoch   2/30"),  # in the loop: finishes the step, saves, says how to resume
    (signal.SIGINT, 130, "classes:"),  # outside it (preparing the data): one line, no traceback
    (signal.SIGHUP, 129, "classes:"),  # a closed terminal, a dropped ssh session
])
def test_a_stop_from_outside_is_one_line_and_its_exit_status(tmp_path, signum, status, when):
    source = blobs_csv(tmp_path / "blobs.csv")
    args = flags(tmp_path, source, "--batch-size", "2", epochs=30)
    train.build_data(train.parse_config(args))  # a warm cache: the run reaches its loop sooner
    run = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], stderr=subprocess.PIPE, text=True,
                           preexec_fn=from_a_terminal)
    lines = []
    for line in run.stderr:
        lines.append(line)
        if when in line:
            run.send_signal(signum)
    log = "".join(lines)
    assert run.wait(timeout=120) == status, log
    assert "Traceback" not in log and f"stopped by {signal.Signals(signum).name}" in log
    if signum == signal.SIGTERM:
        assert "--resume" in log and 2 <= torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["epoch"] < 30


def test_a_finished_run_cannot_be_stretched_but_a_resume_keeps_its_settings(tmp_path, caplog):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, "--learning-rate", "0.02", "--batch-size", "8", epochs=3))
    # A plain --resume goes on with last.pt's settings, not the defaults: here, nothing is left.
    summary = train.main([*dirs(tmp_path), "--resume"])
    assert len(summary["history"]) == 3
    for change, name in ((["--epochs", "6"], "--epochs (3 there, 6 now)"),
                         (["--batch-size", "16"], "--batch-size (8 there, 16 now)"),
                         (["--learning-rate", "0.002"], "--learning-rate"), (["--seed", "9"], "--seed")):
        with pytest.raises(SystemExit, match=re.escape(f"cannot change {name}")):
            train.main([*dirs(tmp_path), "--resume", *change])
    # A runtime flag may change: where it runs, and where it writes.
    train.main([*dirs(tmp_path), "--resume", "--log-every", "5", "--device", "cpu"])


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    source = blobs_csv(tmp_path / "blobs.csv")
    summary = train.main(flags(tmp_path, source, "--resume", epochs=2))
    assert "starting fresh" in caplog.text and len(summary["history"]) == 2


@pytest.fixture
def stopped_run(tmp_path, monkeypatch):
    """A run stopped by SIGTERM in its third epoch, and its command line."""
    (tmp_path / "a").mkdir()
    source = blobs_csv(tmp_path / "a" / "blobs.csv")
    args = flags(tmp_path / "a", source, epochs=6)
    with monkeypatch.context() as patch:
        signal_during_epoch(patch, epoch=3, signum=signal.SIGTERM)
        with pytest.raises(SystemExit):
            train.main(args)
    return tmp_path / "a", source, args


def test_running_the_command_again_without_resume_is_refused_over_a_stopped_run(stopped_run):
    root, _, args = stopped_run
    before = (root / "checkpoints/last.pt").read_bytes()
    with pytest.raises(SystemExit, match="holds a run stopped at epoch 2 of 6: go on with --resume, or start"):
        train.main(args)
    assert (root / "checkpoints/last.pt").read_bytes() == before


def test_a_copied_run_folder_resumes_into_its_own_folders(stopped_run, tmp_path):
    root, source, _ = stopped_run
    shutil.copytree(root, tmp_path / "b")
    history_a = (root / "training-loop/history.json").read_bytes()
    train.main([*dirs(tmp_path / "b"), "--resume"])
    assert (root / "training-loop/history.json").read_bytes() == history_a  # run a's files are untouched
    assert len(json.loads((tmp_path / "b/training-loop/history.json").read_text())) == 6


def test_a_resume_reads_the_same_file_by_another_path(stopped_run, monkeypatch):
    root, source, args = stopped_run
    monkeypatch.chdir(source.parent)
    summary = train.main([*dirs(root), "--resume", "--dataset", f"./{source.name}"])
    assert len(summary["history"]) == 6


def test_a_resume_without_its_best_checkpoint_is_refused_before_training(stopped_run):
    root, _, _ = stopped_run
    (root / "checkpoints/best_model.pt").rename(root / "elsewhere.pt")
    before = (root / "checkpoints/last.pt").read_bytes()
    with pytest.raises(SystemExit, match="best_model.pt is missing"):
        train.main([*dirs(root), "--resume"])
    assert (root / "checkpoints/last.pt").read_bytes() == before


def test_changed_data_and_a_foreign_best_checkpoint_are_refused(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, "--early-stopping-patience", "1", epochs=40))
    train.main(flags(tmp_path / "other", source, epochs=2))
    best = tmp_path / "checkpoints/best_model.pt"
    best.write_bytes((tmp_path / "other/checkpoints/best_model.pt").read_bytes())
    with pytest.raises(SystemExit, match="belongs to run .*not to this run"):
        train.main(flags(tmp_path, source, "--resume", "--early-stopping-patience", "1", epochs=40))
    source.write_text(source.read_text() + "small,999,0.1,0.2,0.3\n" * 5)  # rows added: other splits
    with pytest.raises(SystemExit, match="belongs to a run on other data"):
        train.main(flags(tmp_path, source, "--resume", "--early-stopping-patience", "1", epochs=40))


def rank_weights(root) -> dict:
    """Each rank's final weights, recorded by the script: the ranks must hold the same ones."""
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "the ranks' weights differ"
    return ranks[0]


def test_torchrun_two_processes_train_as_one_stop_together_and_resume_mid_epoch_exactly(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    args = ["--batch-size", "1", "--grad-accum-steps", "2", "--save-every-steps", "4",
            "--datasets-dir", str(tmp_path / "datasets")]  # 36 rows a rank, 2 micro-batches a step: 18 steps
    cfg = train.parse_config(flags(tmp_path / "whole", source, *args, epochs=8))
    data = train.build_data(cfg)  # builds the cache every run below reads
    whole = tmp_path / "whole"
    result = torchrun(tmp_path, *flags(whole, source, *args, epochs=8), record=whole)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("epoch   1/8") == 1 and "x 2 rank(s)" in output  # rank 0 alone logs
    written = sorted(str(p.relative_to(whole)) for d in ("checkpoints", "training-loop") for p in (whole / d).iterdir())
    assert written == ["checkpoints/best_model.pt", "checkpoints/last.pt", "training-loop/history.json",
                       "training-loop/loss_curve.png", "training-loop/run_note.md", "training-loop/test_report.json"]
    best = torch.load(whole / "checkpoints/best_model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in best["model"])  # loads in a single process
    model, objective = train.model_from_checkpoint(best), train.build_objective(data["meta"], cfg)
    history = json.loads((whole / "training-loop/history.json").read_text())
    val, _, _ = train.evaluate(model, train.iterate_batches(data["val"], 16), objective)
    assert val["loss"] == pytest.approx(history[best["epoch"] - 1]["val_loss"], abs=1e-5)
    assert val["acc"] == pytest.approx(history[best["epoch"] - 1]["val_acc"])
    report = json.loads((whole / "training-loop/test_report.json").read_text())
    test, _, _ = train.evaluate(model, train.iterate_batches(data["test"], 16), objective)
    assert report["confusion_matrix"] == test["confusion_matrix"] and report["rows"] == 24 and report["acc"] >= 0.9
    final = rank_weights(whole)
    # SIGTERM to rank 1 alone at step 4 of epoch 3: the ranks agree at their next check, both save
    # that step and stop; a resume (every rank reads rank 0's last.pt) goes on at the next step.
    stopped = tmp_path / "stopped"
    result = torchrun(tmp_path, *flags(stopped, source, *args, epochs=8), signal_at="3,4,SIGTERM,1")
    assert result.returncode != 0 and "stopped by SIGTERM" in result.stderr, result.stdout + result.stderr
    assert "holds epoch 3, step 10 of 18. Resume with: torchrun --nproc_per_node=2" in result.stderr
    result = torchrun(tmp_path, *flags(stopped, source, *args, "--resume", epochs=8), record=stopped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at epoch 3, step 10" in result.stderr
    assert_same_run(whole, stopped)
    assert all(torch.equal(final[k], rank_weights(stopped)[k]) for k in final)


def test_epoch_shards_follow_distributed_sampler():
    from torch.utils.data import DistributedSampler

    rows = list(range(103))  # odd: the last share is padded, as DistributedSampler pads it
    for rank in (0, 1):
        sampler = DistributedSampler(rows, num_replicas=2, rank=rank, shuffle=True, seed=42)
        sampler.set_epoch(7)
        assert train.shard_rows(103, rank, 2, shuffle_seed=42 + 7).tolist() == list(sampler)
    shares = [set(train.shard_rows(103, r, 2).tolist()) for r in (0, 1)]  # evaluation: disjoint, complete
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(rows)
