"""Smoke checks for train.py: `python -m pytest -q test.py` (or `python test.py`).

Every test runs in temporary folders, never touches the network, and checks
something a broken training loop would get wrong.
"""

import copy
import json
import os
import re
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
                 "training-loop/loss_curve.png", "training-loop/test_report.json"]:
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
    assert {"model", "epoch", "optimizer", "scheduler", "scaler", "best_loss", "history"} <= set(last)
    assert last["epoch"] == 50 and len(last["history"]) == 50


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
    fresh = [str(REPO / "train.py"), "--epochs", "2"]
    # The second run loads the cache the first one built, and must have put the hub in offline mode.
    cached = ["-c", "import sys, train; train.main(['--epochs', '2']); "
                    "import huggingface_hub.constants as hub; sys.exit(0 if hub.HF_HUB_OFFLINE else 3)"]
    for args in (fresh, cached):
        result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                                env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "test accuracy" in result.stderr
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


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", *sys.argv[1:]]))
