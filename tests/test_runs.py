"""Whole runs on tables: the files they write, what they learn, --predict, the
command line, the progress bar and TensorBoard."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from util import IRIS_CSV, REPO, blobs_csv, cli, dirs, flags, linear_csv, mixed_csv

README = REPO / "README.md"


@pytest.fixture(scope="module")
def blobs_run(tmp_path_factory):
    """One 20-epoch run on a generated table, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("blobs_run")
    source = blobs_csv(root / "blobs.csv")
    return root, source, train.main(flags(root, source))


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory):
    """The bundled Iris, with the recipe this repository documents."""
    root = tmp_path_factory.mktemp("iris")
    saves, save_checkpoint = [], train.save_checkpoint
    with pytest.MonkeyPatch.context() as patch:  # which checkpoints it writes, and where in the epoch
        patch.setattr(train, "save_checkpoint", lambda path, state: saves.append((path.name, state.get("position")))
                      or save_checkpoint(path, state))
        summary = train.main(flags(root, "scikit-learn/iris", "--val-fraction", "0.15", "--test-fraction", "0.15",
                                   "--seed", "42", "--batch-size", "0", label="Species", epochs=50))
    return root, summary, saves


def test_a_run_writes_every_file_and_learns(blobs_run):
    root, _, summary = blobs_run
    for name in ["checkpoints/best_model.pt", "checkpoints/last.pt", "training-loop/history.json",
                 "training-loop/loss_curve.png", "training-loop/test_report.json", "training-loop/run_note.md"]:
        assert (root / name).stat().st_size > 0, name
    assert (root / "training-loop/loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    history = json.loads((root / "training-loop/history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert set(history[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "val_balanced_acc", "val_macro_f1",
                               "grad_norm", "grad_norm_max", "clipped", "lr", "seconds"}
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2
    report = json.loads((root / "training-loop/test_report.json").read_text())
    assert report["acc"] >= 0.9 and report == summary["report"]
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == report["rows"] == 24 and np.trace(cm) / cm.sum() == pytest.approx(report["acc"])


def test_the_best_checkpoint_reproduces_its_recorded_validation_loss(blobs_run):
    root, source, summary = blobs_run
    history = json.loads((root / "training-loop/history.json").read_text())
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    assert best["epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"] == summary["best_epoch"]
    data = train.build_data(train.parse_config(flags(root, source)))
    val, _, _ = train.evaluate(train.model_from_checkpoint(best), train.iterate_batches(data["val"], 16),
                               train.build_objective(data["meta"], train.TrainingConfig()))
    assert val["loss"] == pytest.approx(history[best["epoch"] - 1]["val_loss"], abs=1e-5)


def test_checkpoints_load_with_weights_only_and_carry_what_prediction_needs(blobs_run):
    root, _, _ = blobs_run
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    last = torch.load(root / "checkpoints/last.pt", weights_only=True)
    assert {"model", "model_args", "epoch", "meta", "config", "run", "val_loss"} <= set(best)
    assert {"mean", "std", "features", "classes", "preprocess", "fingerprint"} <= set(best["meta"])
    assert best["meta"]["features"] == ["width", "height", "depth"]  # neither the label nor the id
    assert best["meta"]["classes"] == ["large", "medium", "small"]
    assert best["model_args"] == {"in_shape": (3,), "out_features": 3}
    assert {"optimizer", "scheduler", "scaler", "rng", "progress", "position"} <= set(last)
    assert last["epoch"] == 20 and len(json.loads(last["progress"]["history"])) == 20


def test_the_learning_rate_follows_its_schedule_step_by_step(blobs_run):
    root, _, _ = blobs_run
    lrs = [h["lr"] for h in json.loads((root / "training-loop/history.json").read_text())]
    # Cosine over every optimizer step of the run: near the set rate at its peak, zero at the end.
    assert max(lrs) == pytest.approx(0.01, rel=0.05)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9) and lrs[len(lrs) // 2] == pytest.approx(0.005, rel=0.2)


def test_iris_reaches_90_percent_on_rows_it_never_saw(iris_run):
    root, summary, saves = iris_run
    report = json.loads((root / "training-loop/test_report.json").read_text())
    assert report["rows"] == 24 and report["acc"] >= 0.9
    assert summary["history"][0]["val_acc"] < report["acc"]
    # On 7-step epochs of 10 ms: last.pt at epoch ends only (never mid-epoch at the default
    # --save-every-steps), a second apart at most, and at the end
    last = [position for name, position in saves if name == "last.pt"]
    assert 1 <= len(last) < 50 and all(position is None for position in last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [[], ["--use-amp"], ["--use-amp", "--amp-dtype", "float16"]])
def test_a_cuda_run_slices_its_tables_on_the_gpu_and_learns(tmp_path, amp):
    """--device auto takes the GPU, and the splits moved there are sliced there. (torch.device("cuda")
    is not equal to the tensors' cuda:0: the splits once went to a DataLoader, whose pinning refused
    them, and every CUDA run crashed at its first batch.)"""
    source = blobs_csv(tmp_path / "blobs.csv")
    summary = train.main(flags(tmp_path, source, "--device", "auto", *amp))
    assert summary["report"]["acc"] >= 0.9
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"] / 2


def test_the_readme_snippet_predicts_like_the_pipeline_on_raw_rows(iris_run, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(b for b in blocks if "best_model.pt" in b and "rows_to_inputs" in b)
    root, _, _ = iris_run
    monkeypatch.chdir(root)
    exec(snippet, {})  # as written: its two example rows are a setosa and a virginica
    assert capsys.readouterr().out.split()[::2] == ["Iris-setosa", "Iris-virginica"]
    raw = np.loadtxt(IRIS_CSV, delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    scope = {"RAW": raw.tolist()}
    exec(re.sub(r"^rows = .*$", "rows = RAW", snippet, flags=re.M), scope)
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    inputs = (torch.from_numpy(raw) - best["meta"]["mean"]) / best["meta"]["std"]
    logits = train.predict(train.model_from_checkpoint(best), inputs.float())
    assert torch.equal(scope["probs"].argmax(1), logits.argmax(1))


def test_a_cli_run_is_offline_and_builds_its_cache_from_a_bundled_copy(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    env = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
    # A hub id whose copy ships beside train.py, as Iris's does: the first run saves it with the
    # hub in offline mode; the second reads the prepared cache and never imports datasets.
    run = (f"import sys, train; from pathlib import Path; train.BUNDLED['someone/blobs'] = Path({str(source)!r}); "
           f"train.main({flags(tmp_path, 'someone/blobs', epochs=2)!r}); ")
    fresh = run + "import huggingface_hub.constants as hub; sys.exit(0 if hub.HF_HUB_OFFLINE else 3)"
    warm = run + "sys.exit(4 if 'datasets' in sys.modules else 0)"
    for script in (fresh, warm):
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                                env={k: v for k, v in {**os.environ, **env}.items() if k != "HF_HUB_OFFLINE"},
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "test, best epoch" in result.stderr
        assert "\r" not in result.stderr and "epoch   1/2" in result.stderr  # a pipe: no progress bar
    assert (tmp_path / "datasets" / "someone___blobs").is_dir()


def test_every_path_builds_the_model_through_build_model(tmp_path, monkeypatch, capsys):
    built = []

    def another_model(in_shape, out_features, meta, cfg):
        built.append((in_shape, out_features))
        return nn.Sequential(nn.Linear(in_shape[0], 8), nn.Tanh(), nn.Linear(8, out_features))

    monkeypatch.setattr(train, "build_model", another_model)
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", "0,0,0;0,4,4"])["predictions"]
    train.model_from_checkpoint(torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True))
    assert built == [((3,), 3)] * 3 and len(lines) == 2


def test_predict_reads_rows_and_csv_files_from_the_command_line(blobs_run, tmp_path):
    root, _, _ = blobs_run
    result = cli("--checkpoint-dir", str(root / "checkpoints"), "--predict", "0,0,0;0,4,4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # a line a row, on stdout
    assert len(lines) == 2 and lines[0].startswith("0, 0, 0 -> small (") and "-> large (" in lines[1]
    rows = tmp_path / "rows.csv"  # a header in another order, and a column the model does not read
    rows.write_text("depth,kind,width,height\n0,?,0,0\n")
    checkpoint = ["--checkpoint-dir", str(root / "checkpoints")]
    assert train.main(checkpoint + ["--predict", str(rows)])["predictions"] == [lines[0]]
    assert len(train.main(checkpoint + ["--predict", "-1.5,0,0"])["predictions"]) == 1  # not taken for a flag
    bom = tmp_path / "bom.csv"
    bom.write_bytes("width,height,depth\n0,0,0\n".encode("utf-8-sig"))
    assert train.main(checkpoint + ["--predict", str(bom)])["predictions"][0].startswith("0, 0, 0 -> ")
    assert not (tmp_path / "training-loop").exists()


@pytest.mark.parametrize("rows, message", [
    ("0,0", "row 1 has 2 values; expected 3: width, height, depth"),
    ("0,0,0;1,2", "row 2 has 2 values"),
    ("0,x,0", "row 1: column 'height' needs a finite number (or an empty cell), not 'x'"),
    ("0,inf,0", "column 'height' needs a finite number"),
    ("0,0,0,1;" * 100, "row 1 has 4 values"),  # longer than a file name may be: still rows
])
def test_predict_refuses_odd_rows_in_one_line(blobs_run, rows, message):
    root, _, _ = blobs_run
    with pytest.raises(SystemExit) as stop:
        train.main(["--checkpoint-dir", str(root / "checkpoints"), "--predict", rows])
    assert stop.value.code.startswith("error: --predict") and "\n" not in stop.value.code
    assert message in stop.value.code


def test_regression_learns_a_noisy_linear_target_and_predicts_near_the_truth(tmp_path, capsys):
    source = linear_csv(tmp_path / "linear.csv")
    summary = train.main(flags(tmp_path, source, label="target", epochs=30))
    report = json.loads((tmp_path / "training-loop/test_report.json").read_text())
    assert report["r2"] >= 0.95 and report["rmse"] < 1.0 and report == summary["report"]  # noise: 0.3
    assert {"val_rmse", "val_mae", "val_r2"} <= set(summary["history"][-1])
    capsys.readouterr()
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", "1,0,-1;0,1,0"])["predictions"]
    assert capsys.readouterr().out.splitlines() == lines
    assert [float(line.split("->")[1]) for line in lines] == pytest.approx([12.5, 8.0], abs=0.5)


def test_a_table_with_text_and_blank_cells_trains_and_predicts_raw_rows(tmp_path, caplog, capsys):
    source = mixed_csv(tmp_path / "mixed.csv")
    args = flags(tmp_path, source, "--categorical-columns", "plan", label="churn", epochs=30)
    summary = train.main(args)
    assert summary["report"]["acc"] >= 0.85  # city and plan carry most of the signal
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    spec = best["meta"]["preprocess"]
    assert best["meta"]["features"] == ["age", "city", "plan", "spend"]  # the id column is left out
    assert spec["city"]["kind"] == "categorical" and spec["age"]["flag"] and "age was missing" in best["meta"]["inputs"]
    assert {"plan=1", "plan=2", "plan=3", "plan=other", "city=other"} <= set(best["meta"]["inputs"])
    data = train.build_data(train.parse_config(args))
    with open(source) as f:
        table = list(csv.DictReader(f))
    training = [table[i] for i in data["rows"]["train"]]
    assert spec["age"]["median"] == pytest.approx(float(np.median([float(r["age"]) for r in training if r["age"]])))
    test_rows = [table[i] for i in data["rows"]["test"]]
    inputs, unseen = train.rows_to_inputs(test_rows, best["meta"])  # dicts of raw strings
    torch.testing.assert_close(inputs, data["test"][0])
    rows = tmp_path / "rows.csv"
    with open(rows, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["spend", "churn", "plan", "city", "age", "customer_id"])
        writer.writeheader()
        writer.writerows(test_rows)
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", str(rows)])["predictions"]
    outputs = train.predict(train.model_from_checkpoint(best), data["test"][0])
    said = train.build_objective(best["meta"], train.TrainingConfig()).describe(outputs)
    assert [line.split("-> ")[1] for line in lines] == said
    caplog.clear()
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", ",Atlantis,3,20;50,,2,"])
    assert len(lines["predictions"]) == 2 and "1 row(s) have a 'city' category training never saw" in caplog.text


def test_a_warm_run_says_what_became_of_every_column_as_a_cold_one_does(tmp_path, caplog):
    source = mixed_csv(tmp_path / "mixed.csv")
    said = []
    for _ in range(2):  # cold: reads the table; warm: reads the prepared cache
        caplog.clear()
        train.build_data(train.parse_config(flags(tmp_path, source, "--categorical-columns", "plan", label="churn")))
        said.append([line for line in caplog.messages if line.startswith("column ")])
    assert said[0] == said[1]
    assert "column customer_id: left out (an id-like name)" in said[0]
    assert any(line.startswith("column age: numeric, ") and "blanks, filled with" in line for line in said[0])
    assert any(line.startswith("column city: categorical, 5 categories") for line in said[0])


def test_many_classes_keep_the_log_small(tmp_path, caplog):
    rng = np.random.default_rng(5)
    source = tmp_path / "many.csv"
    source.write_text("a,b,label\n" + "".join(f"{rng.normal():.4f},{rng.normal():.4f},class-{i % 300}\n"
                                               for i in range(1500)))
    train.main(flags(tmp_path, source, label="label", epochs=1))
    assert max(len(line) for line in caplog.messages) < 1000 and "(300 in all)" in caplog.text


def test_a_terminal_gets_a_progress_bar_and_exit_hooks_run(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    source = blobs_csv(tmp_path / "blobs.csv")
    marker = tmp_path / "atexit-ran"  # the script ends through the interpreter: a tracker's hook runs
    script = (f"import atexit, runpy, sys; atexit.register(lambda: open({str(marker)!r}, 'w').write('ran')); "
              f"sys.argv = ['train.py', *{flags(tmp_path, source, epochs=3)!r}]; "
              f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    run = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=follower)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the run closed its end of the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert run.wait(timeout=120) == 0
    text = screen.decode(errors="replace")
    assert "3/3" in text and "\r" in text and "train_loss=" in text and "test, best epoch" in text
    assert marker.read_text() == "ran"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_an_event_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--tensorboard", epochs=2))
    events = list((tmp_path / "runs").glob("blobs-*/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_missing_is_one_warning_and_no_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--tensorboard", epochs=2))
    assert "pip install tensorboard" in caplog.text and not (tmp_path / "runs").exists()


def test_help_lists_every_field_with_its_comment(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_config(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    source = (REPO / "train.py").read_text().split("class TrainingConfig:", 1)[1].split("\n\n\n", 1)[0]
    docs = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M))
    assert set(docs) == set(train.TrainingConfig.__dataclass_fields__)
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in text and " ".join(doc.split()) in text


def test_the_readme_documents_every_field_and_its_default():
    table = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README.read_text(), re.M)
    assert {name: default for name, default in table} == {
        name: repr(f.default) for name, f in train.TrainingConfig.__dataclass_fields__.items()}


def test_the_bench_loops_do_the_same_work():
    import bench

    x, y = bench.synthetic(1000, 16)
    weights = {}
    for name in ("a", "c"):
        model, optimizer = bench.setup(name, 16, torch.device("cpu"))
        bench.LOOPS[name](model, optimizer, x, y, 64, 3, torch.device("cpu"))
        weights[name] = model.state_dict()
    assert all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_dirs_keep_every_file_under_the_root(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main([*dirs(tmp_path / "run"), "--dataset", str(source), "--label-column", "kind", "--epochs", "1"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "datasets", "training-loop"]


def image_data(cfg):
    """A data seam of one's own: 1 x 4 x 4 images of two kinds, as torch Datasets."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (240,), generator=g)
    x = torch.randn(240, 1, 4, 4, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float()
    meta = {"task": "classification", "classes": ["dark", "light"], "class_counts": [80, 80]}
    return {"train": TensorDataset(x[:160], y[:160]), "val": TensorDataset(x[160:200], y[160:200]),
            "test": TensorDataset(x[200:], y[200:]), "meta": meta}


def test_a_data_seam_of_datasets_trains_resumes_exactly_and_predict_says_it_reads_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_data", image_data)
    args = ["--epochs", "4", "--batch-size", "16", "--save-every-steps", "3"]
    whole = train.main([*dirs(tmp_path / "whole"), *args])
    assert whole["report"]["acc"] > 0.8 and whole["report"]["rows"] == 40
    stopped = tmp_path / "stopped"
    real, calls = train.train_one_epoch, []

    def stop_in_epoch_3(model, batches, *rest, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            batches = list(batches)
            os.kill(os.getpid(), 15)  # SIGTERM before the epoch's first step: stops after it
        return real(model, batches, *rest, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", stop_in_epoch_3)
    with pytest.raises(SystemExit):
        train.main([*dirs(stopped), *args])
    monkeypatch.setattr(train, "train_one_epoch", real)
    resumed = train.main([*dirs(stopped), *args, "--resume"])
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    with pytest.raises(SystemExit, match="--predict reads raw table rows"):
        train.main([*dirs(tmp_path / "whole"), "--predict", "1,2,3"])


@pytest.mark.parametrize("when", ["epoch", "metric"])
def test_schedulers_stepped_each_epoch_or_on_the_metric_resume_exactly(tmp_path, monkeypatch, when):
    def build_optimizer(model, cfg, steps_per_epoch):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if when == "epoch":
            return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5), "epoch"
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5), "metric"

    monkeypatch.setattr(train, "build_optimizer", build_optimizer)
    source = blobs_csv(tmp_path / "blobs.csv")
    whole = train.main(flags(tmp_path / "whole", source, epochs=6))
    lrs = [h["lr"] for h in whole["history"]]
    if when == "epoch":
        assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    else:
        assert lrs[0] == 0.1 and min(lrs) < 0.1  # cut when the validation loss did not improve
    real, calls = train.train_one_epoch, []

    def stop_in_epoch_4(model, batches, *rest, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            batches = list(batches)
            os.kill(os.getpid(), 15)  # SIGTERM: the epoch stops after its first step
        return real(model, batches, *rest, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", stop_in_epoch_4)
    with pytest.raises(SystemExit):
        train.main(flags(tmp_path / "split", source, epochs=6))
    monkeypatch.setattr(train, "train_one_epoch", real)
    resumed = train.main(flags(tmp_path / "split", source, "--resume", epochs=6))
    assert [h["lr"] for h in resumed["history"]] == lrs
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in whole["history"]]
