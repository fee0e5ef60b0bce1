"""Smoke checks for train.py: `python -m pytest -q test.py` (or `python test.py`).

Every test runs in temporary folders, never touches the network, and checks
something a broken training loop would get wrong.
"""

import copy
import errno
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train

REPO = Path(__file__).resolve().parent
IRIS_CSV = REPO / "datasets" / "Iris.csv"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection beyond this machine fails the test that made it."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family != socket.AF_UNIX and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def dirs(root: Path) -> list[str]:
    """Flags that keep every file a run reads or writes under root."""
    return ["--datasets-dir", str(root / "datasets"), "--checkpoint-dir", str(root / "checkpoints"),
            "--output-dir", str(root / "training-loop")]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One default 50-epoch run, shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("default")
    summary = train.main(dirs(root))
    return root, summary


@pytest.fixture(scope="module")
def iris(tmp_path_factory):
    cfg = train.TrainingConfig(datasets_dir=str(tmp_path_factory.mktemp("iris")))
    return cfg, train.prepare_data(cfg)


def raw_iris() -> np.ndarray:
    """The four Iris features, read without train.py, as an independent reference."""
    return np.loadtxt(IRIS_CSV, delimiter=",", skiprows=1, usecols=(1, 2, 3, 4), dtype=np.float32)


def model_without_dropout(data: dict) -> train.TinyMLP:
    torch.manual_seed(0)
    return train.TinyMLP(len(data["features"]), len(data["classes"]), dropout=0.0)


# ----------------------------------------------------------------------------- end to end

def test_default_run_writes_every_file_and_learns(default_run):
    root, summary = default_run
    for path in ["checkpoints/best_model.pt", "checkpoints/last.pt", "training-loop/history.json",
                 "training-loop/loss_curve.png", "training-loop/confusion_matrix.png", "training-loop/test_report.json"]:
        assert (root / path).stat().st_size > 0, path
    history = json.loads((root / "training-loop/history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 51))
    assert set(history[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"}
    report = json.loads((root / "training-loop/test_report.json").read_text())
    assert report["accuracy"] >= 0.9
    assert report["accuracy"] == summary["test_accuracy"]
    assert report["classes"] == ["Iris-setosa", "Iris-versicolor", "Iris-virginica"]
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == report["rows"] == 24 and np.trace(cm) / cm.sum() == pytest.approx(report["accuracy"])
    assert set(report["per_class"]) == set(report["classes"])
    assert (root / "training-loop/loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_best_checkpoint_is_the_lowest_val_loss_not_the_last_epoch(default_run, iris):
    root, _ = default_run
    history = json.loads((root / "training-loop/history.json").read_text())
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    lowest = min(history, key=lambda h: h["val_loss"])
    assert best["epoch"] == lowest["epoch"] < len(history)
    # The saved weights really are that epoch's: they reproduce its recorded val loss.
    _, data = iris
    model = train.TinyMLP(len(best["features"]), len(best["classes"]))
    model.load_state_dict(best["model"])
    val = train.evaluate(model, train.iterate_batches(*data["val"], 16))
    assert val["loss"] == pytest.approx(lowest["val_loss"], abs=1e-6)


def test_checkpoints_load_with_weights_only(default_run):
    root, _ = default_run
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    last = torch.load(root / "checkpoints/last.pt", weights_only=True)
    assert {"model", "epoch", "mean", "std", "features", "classes", "config"} <= set(best)
    assert best["features"] == ["SepalLengthCm", "SepalWidthCm", "PetalLengthCm", "PetalWidthCm"]
    assert {"model", "epoch", "optimizer", "scheduler", "scaler", "rng", "progress"} <= set(last)
    assert {"best_loss", "best_epoch", "stale", "history"} <= set(last["progress"])
    assert last["epoch"] == 50 and len(json.loads(last["progress"]["history"])) == 50


def readme_predict_snippet() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if "best_model.pt" in b)


def test_readme_snippet_predicts_like_the_pipeline_on_raw_rows(default_run, monkeypatch, capsys):
    root, _ = default_run
    monkeypatch.chdir(root)
    snippet = readme_predict_snippet()
    exec(snippet, {})  # as written: the two example rows are a setosa and a virginica
    assert capsys.readouterr().out.split()[::2] == ["Iris-setosa", "Iris-virginica"]

    # On every raw Iris row, the snippet agrees with the class train.py's own path assigns.
    raw = torch.from_numpy(raw_iris())
    scope = {"RAW": raw}
    exec(re.sub(r"^rows = .*$", "rows = RAW", snippet, flags=re.M), scope)
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    model = train.TinyMLP(len(best["features"]), len(best["classes"]))
    model.load_state_dict(best["model"])
    logits = train.predict(model, (raw - best["mean"]) / best["std"], batch_size=16)
    assert torch.equal(scope["probs"].argmax(1), logits.argmax(1))


def test_cli_run_is_offline_and_builds_its_cache_from_the_bundled_copy(tmp_path):
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    # The first run builds the cache from the bundled copy with the hub in offline mode; the
    # second reads the prepared tensors and never even imports datasets.
    fresh = ["-c", "import sys, train; train.main(['--epochs', '2']); "
                   "import huggingface_hub.constants as hub; sys.exit(0 if hub.HF_HUB_OFFLINE else 3)"]
    cached = ["-c", "import sys, train; train.main(['--epochs', '2']); sys.exit(4 if 'datasets' in sys.modules else 0)"]
    for args in (fresh, cached):
        result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                                env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "test accuracy" in result.stderr
        # stderr is a pipe here, not a terminal: plain log lines, no progress bar
        assert "\r" not in result.stderr and "epoch/s" not in result.stderr and "epoch   1/2" in result.stderr
    assert (tmp_path / "datasets" / "scikit-learn___iris").is_dir()


# ----------------------------------------------------------------------------- the loop

def test_forward_passes_see_train_mode_in_training_and_eval_mode_without_graph_in_evaluate(iris):
    _, data = iris
    model = train.TinyMLP(len(data["features"]), len(data["classes"]))
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((module.training, out.requires_grad)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()  # a loop that forgets model.train() would stay here
    train.train_one_epoch(model, train.iterate_batches(*data["train"], 16), optimizer)
    assert seen and all(training and grad for training, grad in seen)
    seen.clear()
    train.evaluate(model, train.iterate_batches(*data["val"], 16))
    assert seen and all(not training and not grad for training, grad in seen)
    assert not train.predict(model, data["val"][0], 16).requires_grad


def test_gradients_do_not_leak_across_steps(iris):
    _, data = iris
    x, y = data["train"]
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:40], y[32:40])]
    model = model_without_dropout(data)
    reference = copy.deepcopy(model)
    train.train_one_epoch(model, iter(batches), torch.optim.SGD(model.parameters(), lr=0.1))
    for xb, yb in batches:  # fresh gradients for every step, by hand
        reference.zero_grad(set_to_none=True)
        F.cross_entropy(reference(xb), yb).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.1 * p.grad
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


def test_training_loss_is_averaged_over_rows_not_batches(iris):
    _, data = iris
    x, y = data["train"]  # 102 rows in batches of 16: the last batch has 6
    model = model_without_dropout(data)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put, so every batch sees one model
    got = train.train_one_epoch(model, train.iterate_batches(x, y, 16), frozen)
    with torch.no_grad():
        assert got == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-6)


def test_evaluate_with_uneven_last_batch_equals_whole_split_at_once(iris):
    _, data = iris
    x, y = data["val"]
    assert len(x) % 7 != 0
    model = model_without_dropout(data)
    got = train.evaluate(model, train.iterate_batches(x, y, 7))
    with torch.no_grad():
        out = model(x)
    assert got["loss"] == pytest.approx(F.cross_entropy(out, y).item(), abs=1e-6)
    assert got["acc"] == pytest.approx((out.argmax(1) == y).float().mean().item())


def test_bfloat16_autocast_trains_an_epoch_on_cpu(iris):
    _, data = iris
    cfg = train.TrainingConfig(use_amp=True)
    dtype = train.resolve_amp_dtype(cfg, torch.device("cpu"))
    assert dtype == torch.bfloat16
    model = model_without_dropout(data)
    before = [p.clone() for p in model.parameters()]
    dtypes = []
    model.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    loss = train.train_one_epoch(model, train.iterate_batches(*data["train"], 16),
                                 torch.optim.AdamW(model.parameters(), lr=1e-2), amp_dtype=dtype)
    assert np.isfinite(loss) and set(dtypes) == {torch.bfloat16}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps float32 master weights


def test_float16_on_cpu_is_refused_clearly():
    cfg = train.TrainingConfig(use_amp=True, amp_dtype="float16")
    with pytest.raises(SystemExit, match="float16 needs a CUDA device"):
        train.resolve_amp_dtype(cfg, torch.device("cpu"))


# ----------------------------------------------------------------------------- data

def test_splits_are_disjoint_stratified_reproducible_and_cover_every_row(iris):
    cfg, data = iris
    splits = data["splits"]
    rows = np.concatenate(list(splits.values()))
    assert sorted(rows.tolist()) == list(range(150))  # disjoint and complete
    species = np.repeat([0, 1, 2], 50)  # Iris.csv lists 50 rows of each class in order
    for name, expected in (("train", 34), ("val", 8), ("test", 8)):
        assert np.bincount(species[splits[name]]).tolist() == [expected] * 3, name
    again = train.split_indices(species, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    other = train.split_indices(species, cfg.val_fraction, cfg.test_fraction, cfg.seed + 1)
    assert all(np.array_equal(again[k], splits[k]) for k in splits)
    assert not np.array_equal(other["test"], splits["test"])


def test_normalization_statistics_come_from_the_training_split_only(iris):
    _, data = iris
    raw = raw_iris()
    train_rows = raw[data["splits"]["train"]]
    np.testing.assert_allclose(data["mean"].numpy(), train_rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(data["std"].numpy(), train_rows.std(0), rtol=1e-5)
    assert not np.allclose(data["mean"].numpy(), raw.mean(0), rtol=1e-5)
    x_test = data["test"][0].numpy()
    np.testing.assert_allclose(x_test * data["std"].numpy() + data["mean"].numpy(),
                               raw[data["splits"]["test"]], rtol=1e-5)


def test_features_skip_the_label_and_the_id_column(iris):
    _, data = iris
    assert data["features"] == ["SepalLengthCm", "SepalWidthCm", "PetalLengthCm", "PetalWidthCm"]
    assert data["classes"] == ["Iris-setosa", "Iris-versicolor", "Iris-virginica"]


# ----------------------------------------------------------------------------- config

def test_flags_override_fields_in_either_spelling():
    cfg = train.parse_config(["--batch-size", "8", "--learning_rate=0.5", "--use-amp", "--no-resume"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.use_amp, cfg.resume) == (8, 0.5, True, False)
    assert train.parse_config([]) == train.TrainingConfig()


def test_help_lists_every_field_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_config(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, doc in train.field_help().items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(doc.split()) in text
    assert len(train.field_help()) == len(train.TrainingConfig.__dataclass_fields__)


def test_readme_table_documents_every_field():
    table = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", (REPO / "README.md").read_text(), re.M)
    assert {name: default for name, default in table} == {
        name: repr(f.default) for name, f in train.TrainingConfig.__dataclass_fields__.items()}


# ----------------------------------------------------------------------------- faults

def final_state(root: Path) -> tuple[dict, list]:
    """A run's final weights and its history without the wall-clock seconds."""
    last = torch.load(root / "checkpoints/last.pt", weights_only=True)
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(last["progress"]["history"])]
    on_disk = json.loads((root / "training-loop/history.json").read_text())
    assert history == [{k: v for k, v in h.items() if k != "seconds"} for h in on_disk]
    return last["model"], history


def assert_same_run(a: Path, b: Path) -> None:
    weights_a, history_a = final_state(a)
    weights_b, history_b = final_state(b)
    assert history_a == history_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # bit-identical, not merely close


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["--epochs", "30", "--batch-size", "2", "--log-every", "1"]  # ~50 steps an epoch: time to kill mid-run
    train.main(dirs(tmp_path / "whole") + args)
    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO / "train.py"), *dirs(killed), *args]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in run.stderr:
        if "epoch   4/30" in line:
            run.kill()
            break
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert 4 <= torch.load(killed / "checkpoints/last.pt", weights_only=True)["epoch"] < 30  # whole and loadable
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "whole", killed)


def signal_during_epoch(monkeypatch, epoch: int, signum: int) -> None:
    """Deliver a real signal to this process in the middle of the given epoch."""
    real = train.train_one_epoch
    calls = []

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


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_drops_the_cut_epoch_and_resumes_exactly(tmp_path, monkeypatch, caplog, signum, status):
    args = ["--epochs", "8"]
    train.main(dirs(tmp_path / "whole") + args)
    stopped = tmp_path / "stopped"
    handler_before = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        signal_during_epoch(patch, epoch=5, signum=signum)
        with pytest.raises(SystemExit) as exit_info:
            train.main(dirs(stopped) + args)
    assert exit_info.value.code == status
    assert "Resume with: python train.py" in caplog.text and "--resume" in caplog.text
    assert torch.load(stopped / "checkpoints/last.pt", weights_only=True)["epoch"] == 4
    assert len(json.loads((stopped / "training-loop/history.json").read_text())) == 4
    assert (stopped / "training-loop/loss_curve.png").exists()
    assert signal.getsignal(signum) is handler_before  # main() gives the signal back as it found it
    train.main(dirs(stopped) + args + ["--resume"])
    assert_same_run(tmp_path / "whole", stopped)


def test_sigterm_from_outside_exits_143_with_a_resumable_last_checkpoint(tmp_path):
    command = [sys.executable, str(REPO / "train.py"), *dirs(tmp_path), "--epochs", "30", "--batch-size", "2",
               "--log-every", "1"]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in run.stderr:
        lines.append(line)
        if "epoch   2/30" in line:
            run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 143
    log = "".join(lines)
    assert "Traceback" not in log and "stopped by SIGTERM" in log and "--resume" in log
    epoch = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["epoch"]
    assert 2 <= epoch < 30
    resumed = subprocess.run(command + ["--resume", "--epochs", str(epoch + 1)], capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0 and f"resumed from {tmp_path / 'checkpoints/last.pt'} after epoch {epoch}" \
        in resumed.stderr


def test_raising_epochs_extends_a_finished_run(tmp_path):
    train.main(dirs(tmp_path) + ["--epochs", "3"])
    before = json.loads((tmp_path / "training-loop/history.json").read_text())
    train.main(dirs(tmp_path) + ["--epochs", "5", "--resume"])
    after = json.loads((tmp_path / "training-loop/history.json").read_text())
    assert [h["epoch"] for h in after] == [1, 2, 3, 4, 5] and after[:3] == before


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    summary = train.main(dirs(tmp_path) + ["--epochs", "2", "--resume"])
    assert "starting fresh" in caplog.text and len(summary["history"]) == 2


@pytest.fixture
def finished_run(tmp_path):
    """A finished 3-epoch run, and the bytes of every file it wrote."""
    train.main(dirs(tmp_path) + ["--epochs", "3"])
    files = {p: p.read_bytes() for p in tmp_path.glob("*/*") if p.is_file() and "datasets" not in p.parts}
    return tmp_path, files


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "batch size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "epochs 0": (["--epochs", "0"], "--epochs must be at least 1"),
    "learning rate 0": (["--learning-rate", "0"], "--learning-rate must be above 0"),
    "fraction above 1": (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    "fractions sum to 1": (["--val-fraction", "0.5", "--test-fraction", "0.5"], "must be below 1"),
    "unknown device": (["--device", "tpu"], "--device 'tpu' is unknown"),
    "absent CUDA": (["--device", "cuda"], "no CUDA device"),
    "absent MPS": (["--device", "mps"], "MPS is not available"),
    "unknown amp dtype": (["--amp-dtype", "fp8"], "--amp-dtype 'fp8' is unknown"),
    "unknown scheduler": (["--scheduler", "step"], "--scheduler 'step' is unknown"),
    "float16 on CPU": (["--device", "cpu", "--use-amp", "--amp-dtype", "float16"], "float16 needs a CUDA device"),
    "missing file": (["--dataset", "{tmp}/missing.csv"], "no such file"),
    "empty file": (["--dataset", "{empty}"], "the file is empty"),
    "header only": (["--dataset", "{header}", "--label-column", "y"], "has no rows"),
    "missing label column": (["--dataset", "{good}", "--label-column", "species"], "columns are: a, b, y"),
    "non-numeric value": (["--dataset", "{text}", "--label-column", "y"], "non-numeric value 'abc' in data row 2"),
    "missing value": (["--dataset", "{hole}", "--label-column", "y"], "column 'b' has a missing"),
    "single class": (["--dataset", "{one_class}", "--label-column", "y"], "single class"),
    "too few rows": (["--dataset", "{good}", "--label-column", "y"], "too few"),
    "uncached hub id offline": (["--dataset", "someone/not-cached"], "cannot be reached"),
    "resume with another seed": (["--resume", "--seed", "7"], "seed (42 there, 7 now)"),
    "output dir is a file": (["--output-dir", "{empty}/out"], "cannot create the folder"),
    "loss blows up": (["--learning-rate", "1e38", "--grad-clip", "0"], "epoch 1: the training loss is nan"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line_and_leaves_every_file_alone(finished_run, monkeypatch, case):
    if case == "absent CUDA" and torch.cuda.is_available() or case == "absent MPS" and torch.backends.mps.is_available():
        pytest.skip("this machine has that device")
    root, files = finished_run
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub that refuses at once, on this machine
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    paths = {"tmp": root, "empty": write_csv(root / "empty.csv", ""),
             "header": write_csv(root / "header.csv", "a,b,y\n"),
             "good": write_csv(root / "good.csv", "a,b,y\n1,2,x\n3,4,z\n5,6,x\n7,8,z\n"),
             "text": write_csv(root / "text.csv", "a,b,y\n1,2,x\n3,abc,z\n" + "5,6,x\n" * 9),
             "hole": write_csv(root / "hole.csv", "a,b,y\n1,2,x\n3,,z\n" + "5,6,z\n" * 9),
             "one_class": write_csv(root / "one.csv", "a,b,y\n" + "1,2,x\n" * 9)}
    args, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        train.main(dirs(root) + [a.format(**paths) for a in args])
    error = exit_info.value.code
    assert isinstance(error, str) and error.startswith("error: ") and "\n" not in error  # exit status 1, one line
    assert message in error
    for path, content in files.items():
        assert path.read_bytes() == content, f"{path} changed"


def test_bad_input_on_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *dirs(tmp_path), "--batch-size", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "error: --batch-size must be at least 1\n"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "old version", "other model"])
def test_damaged_checkpoint_is_refused_clearly(finished_run, damage):
    root, files = finished_run
    last = root / "checkpoints/last.pt"
    content = files[last]
    if damage == "truncated":
        last.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(len(content)))
    else:
        checkpoint = torch.load(last, weights_only=True)
        if damage == "old version":
            checkpoint["version"] = 0
        else:
            checkpoint["model"]["net.0.weight"] = torch.zeros(32, 7)
        torch.save(checkpoint, last)
    expected = {"truncated": "not a readable checkpoint", "garbage": "not a readable checkpoint",
                "old version": "not written by this train.py", "other model": "shaped for another model"}[damage]
    with pytest.raises(SystemExit, match=expected):
        train.main(dirs(root) + ["--resume", "--epochs", "5"])
    assert (root / "checkpoints/best_model.pt").read_bytes() == files[root / "checkpoints/best_model.pt"]


def test_non_finite_loss_mid_run_keeps_the_previous_best(tmp_path, monkeypatch):
    real = train.train_one_epoch
    calls = []

    def blows_up_in_epoch_4(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(train, "train_one_epoch", blows_up_in_epoch_4)
    with pytest.raises(SystemExit, match="epoch 4: the training loss is nan") as exit_info:
        train.main(dirs(tmp_path) + ["--epochs", "6"])
    assert "learning rate" in exit_info.value.code
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    history = json.loads((tmp_path / "training-loop/history.json").read_text())
    assert len(history) == 3 and best["epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["epoch"] == 3


def test_disk_full_names_the_path_and_keeps_the_old_file(finished_run, monkeypatch):
    root, files = finished_run

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit, match=r"could not write .*best_model.pt: No space left on device"):
        train.main(dirs(root) + ["--epochs", "3"])
    assert (root / "checkpoints/best_model.pt").read_bytes() == files[root / "checkpoints/best_model.pt"]
    assert not list((root / "checkpoints").glob(".*tmp"))  # no half-written file left behind


# ----------------------------------------------------------------------------- speed paths (correctness only)

def test_warm_run_reads_prepared_tensors_without_reloading_the_table(tmp_path, monkeypatch):
    cfg = train.TrainingConfig(datasets_dir=str(tmp_path))
    cold = train.prepare_data(cfg)

    def no_reload(cfg):
        raise AssertionError("a warm run reprocessed the table")

    monkeypatch.setattr(train, "load_table", no_reload)
    warm = train.prepare_data(cfg)
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(cold[split], warm[split]))
    assert (cold["features"], cold["classes"]) == (warm["features"], warm["classes"])


def test_prepared_cache_follows_changes_to_the_source(tmp_path):
    source = tmp_path / "blobs.csv"
    source.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(30)))
    cfg = train.TrainingConfig(dataset=str(source), label_column="y", datasets_dir=str(tmp_path / "cache"))
    assert sum(len(train.prepare_data(cfg)[s][0]) for s in ("train", "val", "test")) == 30
    source.write_text(source.read_text() + "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(30, 45)))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert sum(len(train.prepare_data(cfg)[s][0]) for s in ("train", "val", "test")) == 45
    (tmp_path / "cache" / "prepared").joinpath("junk.pt").write_bytes(b"junk")  # stray files are ignored
    for cached in (tmp_path / "cache" / "prepared").glob("blobs.csv-*.pt"):
        cached.write_bytes(b"not a checkpoint")  # a damaged cache is rebuilt, not trusted
    assert sum(len(train.prepare_data(cfg)[s][0]) for s in ("train", "val", "test")) == 45


def test_dataloader_path_trains_exactly_like_the_in_memory_path(tmp_path):
    for loader in ("memory", "dataloader"):
        train.main(dirs(tmp_path / loader) + ["--epochs", "4", "--loader", loader])
    assert_same_run(tmp_path / "memory", tmp_path / "dataloader")


def test_bench_loops_do_the_same_work():
    import bench

    x, y = bench.synthetic(1000, 16)
    weights = {}
    for name in ("a", "c"):
        model, optimizer = bench.setup(name, 16, torch.device("cpu"))
        bench.LOOPS[name](model, optimizer, x, y, 64, 3, torch.device("cpu"))
        weights[name] = model.state_dict()
    assert all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


# ----------------------------------------------------------------------------- scaling out

RANK_WEIGHTS = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train

real_load_weights = train.load_weights

def record_then_load(model, checkpoint, path):
    if path.name == "best_model.pt":  # training is over: record this rank's final weights
        torch.save(model.state_dict(), {out!r} + f"/rank{{dist.get_rank()}}.pt")
    real_load_weights(model, checkpoint, path)

train.load_weights = record_then_load
train.main(sys.argv[1:])
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # skip torch's slow teardown, as train.py itself does
"""


def torchrun(tmp_path: Path, *args: str) -> str:
    """Run train.py under torchrun, 2 CPU processes (gloo); each rank's final weights land in tmp_path."""
    script = tmp_path / "rank_weights.py"
    script.write_text(RANK_WEIGHTS.format(repo=str(REPO), out=str(tmp_path)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *dirs(tmp_path), "--device", "cpu", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "the ranks' weights differ"
    return result.stdout + result.stderr


def test_torchrun_two_cpu_processes_train_as_one(tmp_path):
    output = torchrun(tmp_path)
    assert output.count("epoch   1/50") == 1 and "effective batch 32" in output  # rank 0 alone logs
    written = sorted(str(p.relative_to(tmp_path)) for d in ("checkpoints", "training-loop")
                     for p in (tmp_path / d).iterdir())
    assert written == ["checkpoints/best_model.pt", "checkpoints/last.pt", "training-loop/confusion_matrix.png",
                       "training-loop/history.json", "training-loop/loss_curve.png", "training-loop/test_report.json"]
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in best["model"])  # loads in a single process
    # What the ranks logged together equals a single-process evaluation of the saved model.
    data = train.prepare_data(train.TrainingConfig(datasets_dir=str(tmp_path / "datasets")))
    model = train.TinyMLP(len(best["features"]), len(best["classes"]))
    model.load_state_dict(best["model"])
    history = json.loads((tmp_path / "training-loop/history.json").read_text())
    val = train.evaluate(model, train.iterate_batches(*data["val"], 16))
    assert val["loss"] == pytest.approx(history[best["epoch"] - 1]["val_loss"], abs=1e-5)
    assert val["acc"] == pytest.approx(history[best["epoch"] - 1]["val_acc"])
    report = json.loads((tmp_path / "training-loop/test_report.json").read_text())
    single = train.classification_report(train.predict(model, data["test"][0], 16), data["test"][1], data["classes"])
    assert report["accuracy"] == pytest.approx(single["accuracy"]) and report["accuracy"] >= 0.9
    assert report["confusion_matrix"] == single["confusion_matrix"] and report["rows"] == 24

    # Resume under torchrun (every rank reads rank 0's last.pt) and go on with accumulation (no_sync).
    output = torchrun(tmp_path, "--resume", "--epochs", "53", "--grad-accum-steps", "2")
    assert "after epoch 50" in output and "effective batch 64" in output
    assert [h["epoch"] for h in json.loads((tmp_path / "training-loop/history.json").read_text())][-4:] == \
        [50, 51, 52, 53]


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_b(iris):
    _, data = iris
    x, y = data["train"][0][:48], data["train"][1][:48]
    whole, accumulated = model_without_dropout(data), model_without_dropout(data)
    train.train_one_epoch(whole, iter([(x, y)]), torch.optim.SGD(whole.parameters(), lr=0.5))
    train.train_one_epoch(accumulated, train.iterate_batches(x, y, 16),
                          torch.optim.SGD(accumulated.parameters(), lr=0.5), accum_steps=3)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    stepped_every_batch = model_without_dropout(data)  # and without accumulation the result differs
    train.train_one_epoch(stepped_every_batch, train.iterate_batches(x, y, 16),
                          torch.optim.SGD(stepped_every_batch.parameters(), lr=0.5))
    assert not torch.allclose(next(whole.parameters()), next(stepped_every_batch.parameters()))


def test_epoch_shards_follow_distributed_sampler():
    from torch.utils.data import DistributedSampler

    rows = list(range(103))  # not divisible by 2: the last share is padded, as DistributedSampler pads it
    for rank in (0, 1):
        sampler = DistributedSampler(rows, num_replicas=2, rank=rank, shuffle=True, seed=42)
        sampler.set_epoch(7)
        assert train.shard_rows(103, rank, 2, shuffle_seed=42 + 7).tolist() == list(sampler)
    shares = [set(train.shard_rows(103, r, 2).tolist()) for r in (0, 1)]  # evaluation: disjoint, complete
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(rows)


# ----------------------------------------------------------------------------- your own data

def blobs_csv(path: Path, rows_per_class: int = 60) -> Path:
    """Three separable blobs, the label first and as text, an id column the model must ignore."""
    rng = np.random.default_rng(1)
    lines = ["kind,sample_id,width,height,depth"]
    for kind, centre in (("small", (0, 0, 0)), ("medium", (4, 4, 0)), ("large", (0, 4, 4))):
        for i, point in enumerate(rng.normal(centre, 0.8, size=(rows_per_class, 3))):
            lines.append(f"{kind},{len(lines)},{point[0]:.4f},{point[1]:.4f},{point[2]:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def linear_csv(path: Path) -> Path:
    """target = 3a - 2b + 0.5c + 10, plus noise; the label is the last column."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 3))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] + 10 + rng.normal(scale=0.3, size=600)
    path.write_text("a,b,c,target\n" + "".join(f"{r[0]:.5f},{r[1]:.5f},{r[2]:.5f},{t:.5f}\n" for r, t in zip(x, y)))
    return path


def test_a_csv_with_the_label_first_and_text_classes_trains_by_flags_alone(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    summary = train.main(dirs(tmp_path) + ["--dataset", str(source), "--label-column", "kind", "--epochs", "30"])
    assert summary["test_accuracy"] >= 0.9
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    assert best["features"] == ["width", "height", "depth"] and best["classes"] == ["large", "medium", "small"]
    assert best["model"]["net.6.weight"].shape[0] == 3  # sized from the data
    assert (tmp_path / "training-loop/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_feature_columns_choose_the_inputs(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(dirs(tmp_path) + ["--dataset", str(source), "--label-column", "kind", "--epochs", "2",
                                 "--feature-columns", "depth,width"])
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    assert best["features"] == ["depth", "width"] and best["model"]["net.0.weight"].shape[1] == 2
    with pytest.raises(SystemExit, match="weight cannot be used as features"):
        train.main(dirs(tmp_path) + ["--dataset", str(source), "--label-column", "kind", "--feature-columns", "weight"])


def test_regression_learns_a_noisy_linear_target_and_predicts_near_the_truth(tmp_path, monkeypatch, capsys):
    source = linear_csv(tmp_path / "linear.csv")
    summary = train.main(dirs(tmp_path) + ["--dataset", str(source), "--label-column", "target", "--task", "auto"])
    report = json.loads((tmp_path / "training-loop/test_report.json").read_text())
    assert report["task"] == "regression" and report["r2"] >= 0.95 and report == summary["report"]
    assert report["rmse"] < 1.0 and report["mae"] < 1.0  # in the label's units: the noise is 0.3
    history = json.loads((tmp_path / "training-loop/history.json").read_text())
    assert {"val_rmse", "val_mae", "val_r2"} <= set(history[-1]) and "val_acc" not in history[-1]
    assert (tmp_path / "training-loop/predictions.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", "1,0,-1;0,1,0"])["predictions"]
    assert capsys.readouterr().out.splitlines() == lines
    predicted = [float(line.split("->")[1]) for line in lines]
    assert predicted == pytest.approx([12.5, 8.0], abs=0.5)  # the noise-free values


def test_a_continuous_label_is_not_taken_for_classes(tmp_path):
    source = linear_csv(tmp_path / "linear.csv")
    with pytest.raises(SystemExit, match="continuous values .* use --task regression"):
        train.main(dirs(tmp_path) + ["--dataset", str(source), "--label-column", "target"])


# ----------------------------------------------------------------------------- predicting, evaluating

def test_predict_from_the_command_line_reads_rows_and_csv_files(default_run, tmp_path):
    root, _ = default_run
    checkpoint = ["--checkpoint-dir", str(root / "checkpoints")]
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *checkpoint,
                             "--predict", "5.1,3.5,1.4,0.2;6.7,3.0,5.2,2.3"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # one line per row, on stdout
    assert len(lines) == 2 and lines[0].startswith("5.1, 3.5, 1.4, 0.2 -> Iris-setosa (")
    assert "-> Iris-virginica (" in lines[1]
    rows = tmp_path / "rows.csv"  # a header in another order, and a column the model does not use
    rows.write_text("PetalWidthCm,Species,SepalLengthCm,SepalWidthCm,PetalLengthCm\n0.2,?,5.1,3.5,1.4\n")
    assert train.main(checkpoint + ["--predict", str(rows)])["predictions"] == [lines[0]]
    assert not (tmp_path / "training-loop").exists()  # trains nothing, writes nothing


@pytest.mark.parametrize("rows, message", [
    ("5.1,3.5,1.4", "row 1 has 3 values; expected 4 values: SepalLengthCm, SepalWidthCm, PetalLengthCm, PetalWidthCm"),
    ("5.1,3.5,1.4,0.2;1,2", "row 2 has 2 values"),
    ("5.1,3.5,x,0.2", "not a number"),
])
def test_predict_with_the_wrong_values_fails_clearly(default_run, rows, message):
    root, _ = default_run
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--checkpoint-dir", str(root / "checkpoints"), "--predict", rows])
    error = exit_info.value.code
    assert error.startswith("error: --predict") and "\n" not in error and message in error


def test_eval_only_rewrites_the_report_and_plots_without_training(tmp_path):
    train.main(dirs(tmp_path) + ["--epochs", "5"])
    report_path = tmp_path / "training-loop/test_report.json"
    before = json.loads(report_path.read_text())
    checkpoints = {p: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    history = (tmp_path / "training-loop/history.json").read_bytes()
    report_path.write_text("{}")
    (tmp_path / "training-loop/confusion_matrix.png").unlink()
    summary = train.main(dirs(tmp_path) + ["--epochs", "5", "--eval-only"])
    assert json.loads(report_path.read_text()) == before == {k: summary["report"][k] for k in before}
    assert (tmp_path / "training-loop/confusion_matrix.png").exists()
    assert all(p.read_bytes() == content for p, content in checkpoints.items())  # nothing trained
    assert (tmp_path / "training-loop/history.json").read_bytes() == history
    with pytest.raises(SystemExit, match="seed"):
        train.main(dirs(tmp_path) + ["--eval-only", "--seed", "3"])  # another test split: refused


# ----------------------------------------------------------------------------- progress and TensorBoard

def test_a_terminal_gets_a_progress_bar(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    run = subprocess.Popen([sys.executable, str(REPO / "train.py"), *dirs(tmp_path), "--epochs", "3"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
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
    assert "3/3" in text and "\r" in text and "train_loss=" in text
    assert "test accuracy" in text  # the log lines still come, above the bar


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_an_event_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(dirs(tmp_path) + ["--epochs", "3", "--tensorboard"])
    events = list((tmp_path / "runs").glob("iris-*/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_missing_is_one_clear_line_and_no_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    train.main(dirs(tmp_path) + ["--epochs", "2", "--tensorboard"])
    assert "pip install tensorboard" in caplog.text
    assert not (tmp_path / "runs").exists()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", *sys.argv[1:]]))
