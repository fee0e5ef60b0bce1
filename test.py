"""Smoke checks for train.py: `python -m pytest -q test.py` (or `python test.py`).

They check the training loop, not this project's defaults: every test builds its own
data (small generated tables, or the bundled Iris passed explicitly) and passes every
flag it depends on, so they hold in your copy after you change TrainingConfig's
defaults or swap the model in build_model. Tests of files beside the script (the
README's snippet, bench.py, the bundled Iris) skip when those files are absent. Every
test runs in temporary folders, never touches the network, and checks something a
broken training loop would get wrong.
"""

import copy
import csv
import errno
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train

REPO = Path(__file__).resolve().parent
IRIS_CSV = REPO / "datasets" / "Iris.csv"
README = REPO / "README.md"
# Said by the tests whose check only holds for a model whose outputs for a row do not depend
# on the other rows of its batch. BatchNorm in training mode breaks that (and under DDP it keeps
# per-rank statistics unless converted to SyncBatchNorm).
BATCH_INDEPENDENT = ("this check needs a model whose output for a row does not depend on the other rows "
                     "of the batch; BatchNorm in training mode (or its per-rank statistics under DDP) breaks that")


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


# ----------------------------------------------------------------------------- inputs the tests build

def blobs_csv(path: Path, rows_per_class: int = 40, seed: int = 1) -> Path:
    """Three separable blobs, the label first and as text, an id column the model must ignore.
    Features have 4 decimals drawn from a normal: no two rows are equal."""
    rng = np.random.default_rng(seed)
    lines = ["kind,sample_id,width,height,depth"]
    for kind, centre in (("small", (0, 0, 0)), ("medium", (4, 4, 0)), ("large", (0, 4, 4))):
        for point in rng.normal(centre, 0.8, size=(rows_per_class, 3)):
            lines.append(f"{kind},{len(lines)},{point[0]:.4f},{point[1]:.4f},{point[2]:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def raw_features(path: Path) -> np.ndarray:
    """A blobs table's feature columns, read without train.py, as an independent reference."""
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=(2, 3, 4), dtype=np.float32)


def linear_csv(path: Path) -> Path:
    """target = 3a - 2b + 0.5c + 10, plus noise; the label is the last column."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 3))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] + 10 + rng.normal(scale=0.3, size=600)
    path.write_text("a,b,c,target\n" + "".join(f"{r[0]:.5f},{r[1]:.5f},{r[2]:.5f},{t:.5f}\n" for r, t in zip(x, y)))
    return path


def dirs(root: Path) -> list[str]:
    """Flags that keep every file a run reads or writes under root."""
    return ["--datasets-dir", str(root / "datasets"), "--checkpoint-dir", str(root / "checkpoints"),
            "--output-dir", str(root / "training-loop")]


def flags(root: Path, source, *extra: str, label: str = "kind", epochs: int = 20) -> list[str]:
    """A full command line: every setting a test's assertions depend on is given here, so none of
    TrainingConfig's defaults (yours to edit) matter. Later flags in `extra` override these."""
    return [*dirs(root), "--dataset", str(source), "--label-column", label, "--feature-columns", "",
            "--task", "classification", "--epochs", str(epochs), "--batch-size", "16", "--learning-rate", "0.01",
            "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "0", "--scheduler", "cosine",
            "--grad-accum-steps", "1", "--early-stopping-patience", "0", "--loader", "auto", "--no-use-amp",
            "--no-compile", "--no-resume", "--no-eval-only", "--log-every", "1", *extra]


def config(source: Path, root: Path, **overrides) -> train.TrainingConfig:
    """The config the tests' prepare_data calls use: the same data settings as flags()."""
    return train.parse_config([*flags(root, source), *[a for k, v in overrides.items()
                                                       for a in (f"--{k.replace('_', '-')}", str(v))]])


def model_for(data: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return train.build_model(len(data["features"]), len(data["classes"]) or 1, train.TrainingConfig())


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two sets of rows hold the same rows, in any order."""
    return sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """A generated table, its prepared data, and its config."""
    root = tmp_path_factory.mktemp("blobs")
    source = blobs_csv(root / "blobs.csv")
    cfg = config(source, root)
    return source, cfg, train.prepare_data(cfg)


@pytest.fixture(scope="module")
def blobs_run(tmp_path_factory):
    """One 20-epoch run on a generated table, shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("blobs_run")
    source = blobs_csv(root / "blobs.csv")
    return root, source, train.main(flags(root, source))


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory):
    """The bundled Iris, passed explicitly, with the recipe this repo documents."""
    if not IRIS_CSV.is_file():
        pytest.skip("no bundled datasets/Iris.csv beside test.py")
    root = tmp_path_factory.mktemp("iris")
    saves, save_checkpoint = [], train.save_checkpoint
    with pytest.MonkeyPatch.context() as patch:  # which checkpoints it writes, and where in the epoch
        patch.setattr(train, "save_checkpoint", lambda path, state: saves.append((path.name, state.get("position")))
                      or save_checkpoint(path, state))
        summary = train.main(flags(root, "scikit-learn/iris", "--val-fraction", "0.15", "--test-fraction", "0.15",
                                   "--seed", "42", label="Species", epochs=50))
    return root, summary, saves


# ----------------------------------------------------------------------------- end to end

def test_a_run_writes_every_file_and_learns(blobs_run):
    root, _, summary = blobs_run
    for path in ["checkpoints/best_model.pt", "checkpoints/last.pt", "training-loop/history.json",
                 "training-loop/loss_curve.png", "training-loop/confusion_matrix.png", "training-loop/test_report.json",
                 "training-loop/run_note.md"]:
        assert (root / path).stat().st_size > 0, path
    for png in ("loss_curve.png", "confusion_matrix.png"):
        assert (root / "training-loop" / png).read_bytes()[:4] == b"\x89PNG"
    history = json.loads((root / "training-loop/history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert set(history[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "grad_norm", "grad_norm_max", "clipped",
                               "lr", "seconds"}
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2
    report = json.loads((root / "training-loop/test_report.json").read_text())
    assert report["accuracy"] >= 0.9 and report["accuracy"] == summary["test_accuracy"]
    assert report["classes"] == ["large", "medium", "small"]  # text labels: sorted names
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == report["rows"] == 24 and np.trace(cm) / cm.sum() == pytest.approx(report["accuracy"])
    assert set(report["per_class"]) == set(report["classes"])


def test_best_checkpoint_holds_the_epoch_with_the_lowest_val_loss(blobs_run):
    root, source, summary = blobs_run
    history = json.loads((root / "training-loop/history.json").read_text())
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    lowest = min(history, key=lambda h: h["val_loss"])
    assert best["epoch"] == lowest["epoch"] == summary["best_epoch"]
    # The saved weights really are that epoch's: they reproduce its recorded val loss.
    data = train.prepare_data(config(source, root))
    val = train.evaluate(train.model_from_checkpoint(best), train.iterate_batches(*data["val"], 16))
    assert val["loss"] == pytest.approx(lowest["val_loss"], abs=1e-5), BATCH_INDEPENDENT


def test_checkpoints_load_with_weights_only_and_carry_what_prediction_needs(blobs_run):
    root, _, _ = blobs_run
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    last = torch.load(root / "checkpoints/last.pt", weights_only=True)
    assert {"model", "model_args", "epoch", "mean", "std", "features", "classes", "config"} <= set(best)
    assert best["features"] == ["width", "height", "depth"]  # neither the label nor the id column
    assert best["model_args"] == {"in_features": 3, "out_features": 3}
    assert {"model", "epoch", "optimizer", "scheduler", "scaler", "rng", "progress"} <= set(last)
    assert {"best_loss", "best_epoch", "stale", "history"} <= set(last["progress"])
    assert last["epoch"] == 20 and len(json.loads(last["progress"]["history"])) == 20


def test_the_learning_rate_follows_its_schedule_step_by_step(blobs_run):
    root, _, _ = blobs_run
    lrs = [h["lr"] for h in json.loads((root / "training-loop/history.json").read_text())]
    # Cosine over every optimizer step of the run: it peaks near the set rate and ends at zero.
    # A scheduler stepped once an epoch would still be near its peak at the end.
    assert max(lrs) == pytest.approx(0.01, rel=0.05)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9) and lrs[len(lrs) // 2] == pytest.approx(0.005, rel=0.2)


def test_iris_reaches_90_percent_on_rows_it_never_saw(iris_run):
    root, summary, _ = iris_run
    report = json.loads((root / "training-loop/test_report.json").read_text())
    assert report["rows"] == 24 and report["accuracy"] >= 0.9
    assert report["classes"] == ["Iris-setosa", "Iris-versicolor", "Iris-virginica"]


def test_iris_at_the_default_save_every_steps_writes_checkpoints_at_epoch_ends_only(iris_run):
    _, summary, saves = iris_run  # every flag pinned but --save-every-steps: its default, on 7-step epochs
    assert [name for name, _ in saves].count("last.pt") == 50
    assert all(position is None for _, position in saves), "mid-epoch saves on a small table cost more than they save"


def readme_predict_snippet() -> str:
    if not README.is_file():
        pytest.skip("no README.md beside test.py")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next((b for b in blocks if "best_model.pt" in b), None)
    if snippet is None:
        pytest.skip("README.md has no load-and-predict snippet")
    return snippet


def test_readme_snippet_predicts_like_the_pipeline_on_raw_rows(iris_run, monkeypatch, capsys):
    snippet = readme_predict_snippet()
    root, _, _ = iris_run
    monkeypatch.chdir(root)
    exec(snippet, {})  # as written: the two example rows are a setosa and a virginica
    assert capsys.readouterr().out.split()[::2] == ["Iris-setosa", "Iris-virginica"]
    # On every raw Iris row, the snippet agrees with the class train.py's own path assigns.
    raw = torch.from_numpy(np.loadtxt(IRIS_CSV, delimiter=",", skiprows=1, usecols=(1, 2, 3, 4), dtype=np.float32))
    scope = {"RAW": raw.tolist()}
    exec(re.sub(r"^rows = .*$", "rows = RAW", snippet, flags=re.M), scope)
    best = torch.load(root / "checkpoints/best_model.pt", weights_only=True)
    logits = train.predict(train.model_from_checkpoint(best), (raw - best["mean"]) / best["std"], batch_size=16)
    assert torch.equal(scope["probs"].argmax(1), logits.argmax(1))


def test_cli_run_is_offline_and_builds_its_cache_from_a_bundled_copy(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_OFFLINE", None)
    # A hub id whose copy ships with the project, as Iris's does. The first run builds the cache
    # from it with the hub in offline mode; the second reads the prepared tensors and never even
    # imports datasets.
    run = (f"import sys, train; from pathlib import Path; train.BUNDLED['someone/blobs'] = Path({str(source)!r}); "
           f"train.main({flags(tmp_path, 'someone/blobs', epochs=2)!r}); ")
    fresh = run + "import huggingface_hub.constants as hub; sys.exit(0 if hub.HF_HUB_OFFLINE else 3)"
    cached = run + "sys.exit(4 if 'datasets' in sys.modules else 0)"
    for script in (fresh, cached):
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "test accuracy" in result.stderr
        # stderr is a pipe here, not a terminal: plain log lines, no progress bar
        assert "\r" not in result.stderr and "epoch/s" not in result.stderr and "epoch   1/2" in result.stderr
    assert (tmp_path / "datasets" / "someone___blobs").is_dir()


def test_the_log_shows_examples_of_several_classes_and_plots_name_the_data_and_run(tmp_path, monkeypatch, caplog):
    titles = []
    real_figure = train.figure

    def figure(title, *args, **kwargs):
        titles.append(title)
        return real_figure(title, *args, **kwargs)

    monkeypatch.setattr(train, "figure", figure)
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    truths = re.findall(r"\] -> .*, true (\w+)$", caplog.text, re.M)
    assert len(truths) >= 3 and len(set(truths)) >= 2
    run = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)["run"]
    assert len(titles) == 2 and all("blobs.csv" in t and "kind" in t and run in t for t in titles)


# ----------------------------------------------------------------------------- the loop, one piece at a time

def test_the_model_returns_logits_sized_from_the_data(blobs):
    _, _, data = blobs
    model = model_for(data).eval()
    with torch.no_grad():
        out = model(torch.randn(64, len(data["features"])) * 3)
    assert out.shape == (64, len(data["classes"]))
    looks_like_probabilities = bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(64), atol=1e-4)
    assert not looks_like_probabilities, "the model must return raw logits: cross_entropy applies the softmax itself"


def test_forward_passes_see_train_mode_in_training_and_eval_mode_without_graph_in_evaluate(blobs):
    _, _, data = blobs
    model = model_for(data)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((module.training, out.requires_grad)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()  # a loop that forgets model.train() would stay here
    train.train_one_epoch(model, train.iterate_batches(*data["train"], 16), optimizer)
    assert seen and all(training and grad for training, grad in seen), "train_one_epoch must call model.train()"
    seen.clear()
    train.evaluate(model, train.iterate_batches(*data["val"], 16))
    assert seen and all(not training for training, _ in seen), "evaluate must call model.eval()"
    assert not any(grad for _, grad in seen), "evaluate must run without autograd (torch.inference_mode)"
    assert not train.predict(model, data["val"][0], 16).requires_grad


def test_gradients_do_not_leak_across_steps(blobs):
    _, _, data = blobs
    x, y = data["train"]
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:40], y[32:40])]
    model = model_for(data)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # the same dropout masks for both
    train.train_one_epoch(model, iter(batches), torch.optim.SGD(model.parameters(), lr=0.1))
    torch.manual_seed(1)
    reference.train()
    for xb, yb in batches:  # fresh gradients for every step, by hand
        reference.zero_grad(set_to_none=True)
        F.cross_entropy(reference(xb), yb).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.1 * p.grad
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, msg="each step must start from zeroed gradients")


def test_training_loss_is_averaged_over_rows_not_batches(blobs):
    _, _, data = blobs
    x, y = data["train"]  # 72 rows in batches of 20: the last batch has 12
    model = model_for(data)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put, so every batch sees one model
    torch.manual_seed(1)
    got = train.train_one_epoch(model, train.iterate_batches(x, y, 20), frozen)["loss"]
    torch.manual_seed(1)  # the same forward passes, dropout masks included, summed by hand
    with torch.no_grad():
        losses = [(F.cross_entropy(model(xb), yb, reduction="sum").item(), len(yb))
                  for xb, yb in train.iterate_batches(x, y, 20)]
    assert got == pytest.approx(sum(s for s, _ in losses) / len(y), rel=1e-5)
    assert got != pytest.approx(np.mean([s / n for s, n in losses]), rel=1e-5)  # what a per-batch mean gives


def test_evaluate_with_uneven_last_batch_equals_whole_split_at_once(blobs):
    _, _, data = blobs
    x, y = data["val"]
    assert len(x) % 7 != 0
    model = model_for(data)
    got = train.evaluate(model, train.iterate_batches(x, y, 7))
    with torch.no_grad():
        out = model.eval()(x)
    assert got["loss"] == pytest.approx(F.cross_entropy(out, y).item(), abs=1e-6), BATCH_INDEPENDENT
    assert got["acc"] == pytest.approx((out.argmax(1) == y).float().mean().item()), BATCH_INDEPENDENT


def test_the_running_loss_does_not_keep_each_steps_graph_alive(blobs):
    _, _, data = blobs
    alive = []

    class Marker(torch.autograd.Function):  # a node in each step's graph that we can watch die
        @staticmethod
        def forward(ctx, out):
            alive.append(weakref.ref(ctx))
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            return grad

    def loss_fn(out, y):
        # The step before this one is done: its graph must be gone, unless the running sum holds on to it.
        assert sum(ref() is not None for ref in alive) <= 1, "the running loss must be detached"
        return F.cross_entropy(Marker.apply(out), y)

    model = model_for(data)
    train.train_one_epoch(model, train.iterate_batches(*data["train"], 8), torch.optim.SGD(model.parameters(), lr=0.1),
                          loss_fn=loss_fn)
    assert len(alive) == 9


def test_clipping_limits_the_gradients_of_each_step_and_records_their_norm_before(blobs):
    _, _, data = blobs
    model = model_for(data)
    torch.manual_seed(1)  # the same dropout masks as the step below
    F.cross_entropy(model(data["train"][0]), data["train"][1]).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()  # by hand, before clipping
    before = params(model)
    torch.manual_seed(1)
    trained = train.train_one_epoch(model, iter([data["train"]]), torch.optim.SGD(model.parameters(), lr=1.0),
                                    grad_clip=1e-3)
    update = torch.cat([(a - b).flatten() for a, b in zip(params(model), before)]).norm().item()
    # SGD with lr 1 moves the weights by exactly the clipped gradient: norm 1e-3, whatever it was before.
    assert update == pytest.approx(1e-3, rel=1e-3), "clip after backward(), before the optimizer step"
    # What the run note reads: the norm before clipping, and that this one step was clipped.
    assert trained["grad_norm"] == trained["grad_norm_max"] == pytest.approx(norm, rel=1e-4) and norm > 1e-3
    assert trained["clipped"] == 1.0


def test_a_float16_grad_scaler_changes_the_scale_not_the_update(blobs):
    _, _, data = blobs
    cfg = train.TrainingConfig(epochs=2, learning_rate=0.01, scheduler="cosine")
    model = model_for(data)
    *_, scaler = train.make_optimization(model, cfg, torch.device("cpu"), torch.float16, steps_per_epoch=5)
    assert scaler.is_enabled(), "float16 needs an enabled GradScaler"
    *_, scaler = train.make_optimization(model, cfg, torch.device("cpu"), torch.bfloat16, steps_per_epoch=5)
    assert not scaler.is_enabled()
    # With the scaler in the step (scaled backward, unscale before clipping, scaler.step), the weights move
    # exactly as without one: powers of two scale exactly. Skipping any of those moves them 2**14 times more,
    # or less.
    for grad_clip in (0.0, 0.05):  # unscaled by scaler.step, or before clipping
        results = []
        for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**14)):
            model = model_for(data)
            torch.manual_seed(1)
            train.train_one_epoch(model, train.iterate_batches(*data["train"], 16),
                                  torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler, grad_clip=grad_clip)
            results.append(params(model))
        for plain, scaled in zip(*results):
            torch.testing.assert_close(plain, scaled, msg="the grad scaler must scale the loss, unscale before "
                                                          "clipping, and step the optimizer")


def test_the_scheduler_steps_once_per_optimizer_step(blobs):
    _, _, data = blobs
    model = model_for(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    x, y = data["train"]  # 72 rows, batches of 8: 9 micro-batches, stepping every 2 gives 5 steps
    train.train_one_epoch(model, train.iterate_batches(x, y, 8), optimizer, scheduler, accum_steps=2)
    assert scheduler.last_epoch == 5 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 6)


def test_accumulating_micro_batches_steps_once_on_their_averaged_gradient(blobs):
    _, _, data = blobs
    x, y = data["train"][0][:48], data["train"][1][:48]
    accumulated = model_for(data)
    reference, stepped_every_batch = copy.deepcopy(accumulated), copy.deepcopy(accumulated)
    torch.manual_seed(1)
    train.train_one_epoch(accumulated, train.iterate_batches(x, y, 16),
                          torch.optim.SGD(accumulated.parameters(), lr=0.5), accum_steps=3)
    torch.manual_seed(1)
    reference.train()
    for xb, yb in train.iterate_batches(x, y, 16):  # by hand: three backward passes of loss / 3, one step
        (F.cross_entropy(reference(xb), yb) / 3).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    for a, b in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)  # and without accumulation the result differs
    train.train_one_epoch(stepped_every_batch, train.iterate_batches(x, y, 16),
                          torch.optim.SGD(stepped_every_batch.parameters(), lr=0.5))
    assert not all(torch.allclose(a, b) for a, b in zip(accumulated.parameters(), stepped_every_batch.parameters()))


def test_bfloat16_autocast_trains_an_epoch_on_cpu(blobs):
    _, _, data = blobs
    dtype = train.resolve_amp_dtype(train.TrainingConfig(use_amp=True, amp_dtype="auto"), torch.device("cpu"))
    assert dtype == torch.bfloat16
    model = model_for(data)
    before = params(model)
    dtypes = []
    model.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    loss = train.train_one_epoch(model, train.iterate_batches(*data["train"], 16),
                                 torch.optim.AdamW(model.parameters(), lr=1e-2), amp_dtype=dtype)
    assert np.isfinite(loss["loss"]) and set(dtypes) == {torch.bfloat16}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps float32 master weights


def test_float16_on_cpu_is_refused_clearly():
    cfg = train.TrainingConfig(use_amp=True, amp_dtype="float16")
    with pytest.raises(SystemExit, match="float16 needs a CUDA device"):
        train.resolve_amp_dtype(cfg, torch.device("cpu"))


# ----------------------------------------------------------------------------- data

def test_splits_are_disjoint_stratified_reproducible_and_cover_every_row():
    labels = np.repeat([0, 1, 2], [40, 60, 100])
    splits = train.split_indices(labels, 0.2, 0.1, seed=5)
    rows = np.concatenate(list(splits.values()))
    assert sorted(rows.tolist()) == list(range(200))  # disjoint and complete
    for name, share in (("test", 0.1), ("val", 0.2)):
        assert np.bincount(labels[splits[name]]).tolist() == [round(n * share) for n in (40, 60, 100)], name
    again = train.split_indices(labels, 0.2, 0.1, seed=5)
    other = train.split_indices(labels, 0.2, 0.1, seed=6)
    assert all(np.array_equal(again[k], splits[k]) for k in splits)
    assert not np.array_equal(other["test"], splits["test"])


def test_each_split_holds_its_own_rows_normalized_by_training_statistics(blobs):
    source, _, data = blobs
    raw = raw_features(source)
    splits = data["splits"]
    assert sum(len(s) for s in splits.values()) == len(raw)
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"])) and not set(splits["val"]) & set(
        splits["test"])
    train_rows = raw[splits["train"]]
    np.testing.assert_allclose(data["mean"].numpy(), train_rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(data["std"].numpy(), train_rows.std(0), rtol=1e-5)
    assert not np.allclose(data["mean"].numpy(), raw.mean(0), rtol=1e-3)  # not the statistics of every row
    for name in ("train", "val", "test"):  # each split is exactly its rows: no row from another split
        restored = data[name][0].numpy() * data["std"].numpy() + data["mean"].numpy()
        np.testing.assert_allclose(restored, raw[splits[name]], rtol=1e-5, atol=1e-5, err_msg=name)


def test_features_skip_the_label_and_the_id_column(blobs):
    _, _, data = blobs
    assert data["features"] == ["width", "height", "depth"]
    assert data["classes"] == ["large", "medium", "small"]


# ----------------------------------------------------------------------------- the loop as main() drives it

def spy_on_the_loop(monkeypatch, val_losses: list | None = None) -> dict:
    """Record the rows of every batch main() trains and validates on, and the weights at each
    validation; with val_losses, report those as the validation losses instead."""
    seen = {"train": [], "val": [], "weights": []}
    real_train, real_evaluate = train.train_one_epoch, train.evaluate

    def train_one_epoch(model, batches, *args, **kwargs):
        batches = list(batches)
        seen["train"].append(torch.cat([xb for xb, _ in batches]).cpu())
        return real_train(model, iter(batches), *args, **kwargs)

    def evaluate(model, batches, *args, **kwargs):
        batches = list(batches)
        seen["val"].append(torch.cat([xb for xb, _ in batches]).cpu())
        seen["weights"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        result = real_evaluate(model, iter(batches), *args, **kwargs)
        return result if val_losses is None else {**result, "loss": val_losses[len(seen["val"]) - 1]}

    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(train, "evaluate", evaluate)
    return seen


def test_main_shuffles_every_epoch_trains_on_training_rows_and_validates_on_validation_rows(tmp_path, monkeypatch):
    source = blobs_csv(tmp_path / "blobs.csv")
    seen = spy_on_the_loop(monkeypatch)
    train.main(flags(tmp_path, source, epochs=3))
    data = train.prepare_data(config(source, tmp_path))
    train_x, val_x, test_x = (data[s][0] for s in ("train", "val", "test"))
    assert len(seen["train"]) == len(seen["val"]) == 3
    held_out = set(map(tuple, torch.cat([val_x, test_x]).tolist()))
    for epoch, rows in enumerate(seen["train"], 1):
        assert same_rows(rows, train_x), f"epoch {epoch} must visit every training row once"
        assert not held_out & set(map(tuple, rows.tolist())), "validation or test rows were trained on"
    assert not torch.equal(seen["train"][0], train_x), "training batches must be shuffled"
    assert not torch.equal(seen["train"][0], seen["train"][1]), "each epoch must be shuffled anew"
    for rows in seen["val"]:
        assert same_rows(rows, val_x), "each epoch must be validated on the validation rows, and only them"


def test_the_best_checkpoint_is_the_lowest_val_loss_not_the_last_epoch(tmp_path, monkeypatch):
    source = blobs_csv(tmp_path / "blobs.csv")
    seen = spy_on_the_loop(monkeypatch, val_losses=[0.9, 0.5, 0.7, 0.8, 0.6])
    summary = train.main(flags(tmp_path, source, epochs=5))
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] == 2, "the best checkpoint is the epoch with the lowest val loss"
    assert all(torch.equal(best["model"][k], v) for k, v in seen["weights"][1].items()), "best_model.pt holds " \
        "other weights than the epoch it names"
    # The test report is that checkpoint's, on the test rows.
    data = train.prepare_data(config(source, tmp_path))
    model = train.model_from_checkpoint(best)
    expected = train.classification_report(train.predict(model, data["test"][0], 16), data["test"][1],
                                           data["classes"])
    assert summary["report"]["confusion_matrix"] == expected["confusion_matrix"]


def test_every_path_builds_the_model_through_build_model(tmp_path, monkeypatch, capsys):
    built = []

    def another_model(in_features, out_features, cfg):  # another class, another constructor
        built.append((in_features, out_features))
        return nn.Sequential(nn.Linear(in_features, 8), nn.Tanh(), nn.Linear(8, out_features))

    monkeypatch.setattr(train, "build_model", another_model)
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    train.main(flags(tmp_path, source, "--eval-only", epochs=2))
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", "0,0,0;0,4,4"])["predictions"]
    train.model_from_checkpoint(torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True))
    assert built == [(3, 3)] * 4 and len(lines) == 2


# ----------------------------------------------------------------------------- config

def test_flags_override_fields_in_either_spelling():
    cfg = train.parse_config(["--batch-size", "8", "--learning_rate=0.5", "--use-amp", "--no-resume"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.use_amp, cfg.resume) == (8, 0.5, True, False)
    assert train.parse_config([]) == train.TrainingConfig()


def test_list_tuple_and_optional_fields_work_as_flags_and_other_types_are_refused():
    @dataclass
    class Config:
        hidden: tuple[int, ...] = (32, 32)
        pair: tuple[float, float] = (0.5, 1.0)
        names: list[str] = field(default_factory=list)
        limit: int | None = None

    assert train.parse_config([], Config) == Config()
    cfg = train.parse_config(["--hidden", "64", "16", "8", "--pair", "1", "2", "--names", "a", "b", "--limit", "3"],
                             Config)
    assert cfg == Config(hidden=(64, 16, 8), pair=(1.0, 2.0), names=["a", "b"], limit=3)
    assert train.parse_config(["--limit", "none"], Config).limit is None

    @dataclass
    class Unsupported:
        table: dict = field(default_factory=dict)

    with pytest.raises(SystemExit) as exit_info:
        train.parse_config([], Unsupported)
    assert "table" in exit_info.value.code and "cannot be a flag" in exit_info.value.code
    assert "\n" not in exit_info.value.code


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
    table = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README.read_text(), re.M) if README.is_file() else []
    if not table:
        pytest.skip("no README.md with a table of TrainingConfig's fields beside test.py")
    assert {name: default for name, default in table} == {
        name: repr(f.default) for name, f in train.TrainingConfig.__dataclass_fields__.items()}


# ----------------------------------------------------------------------------- the run note

def test_the_default_iris_runs_note_names_its_best_epoch_and_the_overfitting_onset(iris_run):
    root, summary, _ = iris_run
    best, diagnosis = summary["best_epoch"], summary["diagnosis"]
    assert json.loads((root / "training-loop/test_report.json").read_text())["diagnosis"] == diagnosis
    assert diagnosis["verdict"] == "overfitting"
    first = diagnosis["findings"][0]
    assert (first["pattern"], first["epoch"]) == ("overfitting", best + 1)
    note = (root / "training-loop/run_note.md").read_text()
    assert f"Best epoch {best} of 50" in note and f"overfitting from epoch {best + 1}" in note
    assert "--early-stopping-patience" in note  # each finding's suggestion names the flag to change


def shuffled_blobs_csv(path: Path) -> Path:
    """Blobs whose labels are shuffled: no feature says anything about them."""
    lines = blobs_csv(path, rows_per_class=200).read_text().splitlines()
    header, rows = lines[0], [line.split(",", 1) for line in lines[1:]]
    labels = [label for label, _ in rows]
    np.random.default_rng(0).shuffle(labels)
    path.write_text("\n".join([header, *[f"{label},{rest}" for label, (_, rest) in zip(labels, rows)]]) + "\n")
    return path


@pytest.mark.parametrize("case, verdicts", [
    ("3 epochs", {"still_improving"}),
    ("an absurd learning rate", {"unstable", "not_learning"}),
    ("shuffled labels", {"not_learning"}),
])
def test_the_verdict_reads_the_curves(tmp_path, monkeypatch, case, verdicts):
    source = shuffled_blobs_csv(tmp_path / "shuffled.csv") if case == "shuffled labels" else \
        blobs_csv(tmp_path / "blobs.csv")
    extra = {"3 epochs": ["--epochs", "3"], "an absurd learning rate": ["--learning-rate", "10"]}.get(case, [])
    marked, plot_history = [], train.plot_history
    monkeypatch.setattr(train, "plot_history", lambda *args: marked.append(args[4:]) or plot_history(*args))
    summary = train.main(flags(tmp_path, source, "--grad-clip", "1", *extra))
    diagnosis = summary["diagnosis"]
    assert diagnosis["verdict"] in verdicts, diagnosis
    first = diagnosis["findings"][0]
    assert first["epoch"] in [h["epoch"] for h in summary["history"]] and first["evidence"] and "--" in first["suggestion"]
    note = (tmp_path / "training-loop/run_note.md").read_text()
    assert f"Verdict: {diagnosis['verdict'].replace('_', ' ')}" in note and first["evidence"] in note
    assert marked == [(first,)]  # loss_curve.png marks where the first finding began


def test_the_verdict_is_never_converged_when_the_best_epoch_is_the_last():
    cfg = train.TrainingConfig(learning_rate=0.01, weight_decay=0.01, grad_clip=1.0)
    rng = np.random.default_rng(0)
    for epochs in (1, 2, 3, 5, 10, 50, 200):
        for shape in ("falling", "flat, a hair lower at the end", "noisy"):
            val = {"falling": np.linspace(1.0, 0.2, epochs), "flat, a hair lower at the end": np.full(epochs, 0.3),
                   "noisy": 0.3 + 0.05 * rng.random(epochs)}[shape]
            val[-1] = val.min() - 1e-6  # the last epoch is the best
            history = [{"epoch": e + 1, "train_loss": 0.5, "val_loss": v, "grad_norm": 0.3, "grad_norm_max": 0.6,
                        "clipped": 0.0} for e, v in enumerate(val)]
            diagnosis = train.diagnose(history, epochs, base_loss=1.1, cfg=cfg)
            assert diagnosis["verdict"] != "converged", (epochs, shape, diagnosis)


def test_every_way_a_run_ends_writes_the_note_and_the_diagnosis(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    note, report = tmp_path / "training-loop/run_note.md", tmp_path / "training-loop/test_report.json"
    early = train.main(flags(tmp_path, source, "--early-stopping-patience", "1", epochs=40))
    assert len(early["history"]) < 40 and f"of {len(early['history'])}" in note.read_text()  # early stopping
    for step in (["--resume", "--early-stopping-patience", "0", "--epochs", "45"], ["--eval-only"]):
        note.unlink()
        summary = train.main(flags(tmp_path, source, *step, epochs=45))
        assert f"Best epoch {summary['best_epoch']} of 45" in note.read_text()
        assert json.loads(report.read_text())["diagnosis"] == summary["diagnosis"]


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


TRAIN_MAIN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import train

real_save_checkpoint, real_load_weights = train.save_checkpoint, train.load_weights
signal_at = os.environ.get("SIGNAL_AT")  # "EPOCH,STEP,SIGNAL[,RANK]": see run_train
record = os.environ.get("RECORD_WEIGHTS")  # a folder for each rank's final weights

def save_or_signal(path, state):
    position = state.get("position")
    if signal_at and position:
        epoch, step, name, *ranks = signal_at.split(",")
        here = [position["epoch"], position["steps"]] == [int(epoch), int(step)]
        if here and os.environ.get("RANK", "0") in (ranks or ["0"]):
            os.kill(os.getpid(), getattr(signal, name))
    real_save_checkpoint(path, state)

def record_then_load(model, checkpoint, path):
    if record and path.name == "best_model.pt":  # training is over: record this rank's final weights
        torch.save(dict(model.named_parameters()), os.path.join(record, f"rank{{os.environ.get('RANK', 0)}}.pt"))
    real_load_weights(model, checkpoint, path)

train.save_checkpoint, train.load_weights = save_or_signal, record_then_load
train.main(sys.argv[1:])
"""


def run_train(tmp_path: Path, *args: str, signal_at: str = "", record: Path | None = None,
              launcher: tuple = (), timeout: int = 300) -> subprocess.CompletedProcess:
    """train.main in a process of its own (or several, under a launcher such as torchrun).
    signal_at "E,S,SIGKILL": the process sends itself that signal as epoch E saves its step S
    (a SIGKILL loses that save); "E,S,SIGTERM,1": rank 1 alone does. record: a folder for each
    rank's final weights."""
    script = tmp_path / "train_main.py"
    script.write_text(TRAIN_MAIN.format(repo=str(REPO)))
    env = {**os.environ, "SIGNAL_AT": signal_at, "RECORD_WEIGHTS": str(record or "")}
    # Output to files, not pipes: a killed run's DataLoader worker holds a pipe open for seconds.
    with open(tmp_path / "stdout.txt", "w+") as out, open(tmp_path / "stderr.txt", "w+") as err:
        run = subprocess.run([sys.executable, *launcher, str(script), *args], stdout=out, stderr=err, env=env,
                             timeout=timeout)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(run.args, run.returncode, out.read(), err.read())


def mid_epoch_position(root: Path) -> dict:
    position = torch.load(root / "checkpoints/last.pt", weights_only=True)["position"]
    assert position is not None, "last.pt was written at an epoch's end, not mid-epoch"
    return position


@pytest.mark.parametrize("extra", [
    [],  # the in-memory path
    ["--loader", "dataloader", "--num-workers", "1", "--grad-accum-steps", "2", "--use-amp", "--amp-dtype", "bfloat16",
     "--early-stopping-patience", "2"],
], ids=["memory", "dataloader-worker-accumulation-bf16"])
def test_kill_9_mid_epoch_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, extra):
    source = blobs_csv(tmp_path / "blobs.csv")
    cache = ["--datasets-dir", str(tmp_path / "datasets")]  # one for all: the subprocess starts warm
    args = ["--batch-size", "4", "--save-every-steps", "2", *cache, *extra]  # 18 batches an epoch: saves inside each
    whole = train.main(flags(tmp_path / "whole", source, *args, epochs=6))
    killed = tmp_path / "killed"
    crashed = run_train(tmp_path, *flags(killed, source, *args, epochs=6), signal_at="3,4,SIGKILL")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert (mid_epoch_position(killed)["epoch"], mid_epoch_position(killed)["steps"]) == (3, 2)
    resumed = train.main(flags(killed, source, *args, "--resume", epochs=6))
    assert_same_run(tmp_path / "whole", killed)  # the DataLoader path must also match the in-memory one
    assert resumed["report"] == whole["report"]


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


@pytest.mark.parametrize("signum, status, epoch", [
    (signal.SIGTERM, 143, 1),  # before the first epoch ends: still a last.pt to resume from
    (signal.SIGINT, 130, 4),
    (signal.SIGHUP, 129, 2),
])
def test_a_signal_mid_epoch_saves_that_step_and_resumes_exactly(tmp_path, monkeypatch, caplog, signum, status, epoch):
    source = blobs_csv(tmp_path / "blobs.csv")
    args = ["--save-every-steps", "0"]  # no saves but the signal's: its own is the only mid-epoch last.pt
    train.main(flags(tmp_path / "whole", source, *args, epochs=5))
    stopped = tmp_path / "stopped"
    handler_before = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        signal_during_epoch(patch, epoch=epoch, signum=signum)
        with pytest.raises(SystemExit) as exit_info:
            train.main(flags(stopped, source, *args, epochs=5))
    assert exit_info.value.code == status
    assert "Resume with: python train.py" in caplog.text and "--resume" in caplog.text
    position = mid_epoch_position(stopped)  # 72 training rows, batch 16: 5 steps an epoch
    assert position["epoch"] == epoch and 0 < position["steps"] < 5
    assert f"holds epoch {epoch}, step {position['steps']} of 5" in caplog.text
    history = stopped / "training-loop/history.json"
    assert len(json.loads(history.read_text())) == epoch - 1 if epoch > 1 else not history.exists()
    assert signal.getsignal(signum) is handler_before  # main() gives the signal back as it found it
    caplog.clear()
    train.main(flags(stopped, source, *args, "--resume", epochs=5))
    assert f"at epoch {epoch}, step {position['steps']} of 5" in caplog.text
    assert_same_run(tmp_path / "whole", stopped)


def test_raising_epochs_extends_a_finished_run(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=3))
    before = json.loads((tmp_path / "training-loop/history.json").read_text())
    train.main(flags(tmp_path, source, "--resume", epochs=5))
    after = json.loads((tmp_path / "training-loop/history.json").read_text())
    assert [h["epoch"] for h in after] == [1, 2, 3, 4, 5] and after[:3] == before


def test_a_resume_keeps_its_recorded_settings_and_applies_the_flags_given(tmp_path, caplog):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, "--learning-rate", "0.02", "--batch-size", "8", epochs=3))
    # A plain --resume (and --epochs) goes on with last.pt's rate and batch size, not the defaults.
    train.main([*dirs(tmp_path), "--resume", "--epochs", "4"])
    last = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert (last["config"]["learning_rate"], last["config"]["batch_size"], last["epoch"]) == (0.02, 8, 4)
    assert last["config"]["dataset"] == str(source)
    # A rate given with --resume is applied from the resume point, said once, and recorded.
    caplog.clear()
    train.main([*dirs(tmp_path), "--resume", "--epochs", "6", "--learning-rate", "0.002", "--weight-decay", "0"])
    assert "learning_rate 0.02 -> 0.002" in caplog.text and "no longer identical" in caplog.text
    last = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert last["config"]["learning_rate"] == 0.002 and last["optimizer"]["param_groups"][0]["weight_decay"] == 0
    history = json.loads((tmp_path / "training-loop/history.json").read_text())
    assert history[0]["lr"] > 0.002 and 0 < history[4]["lr"] <= 0.002  # epoch 5 runs at the new rate
    with pytest.raises(SystemExit, match="seed"):  # what decides the data cannot change
        train.main([*dirs(tmp_path), "--resume", "--epochs", "7", "--seed", "9"])


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    source = blobs_csv(tmp_path / "blobs.csv")
    summary = train.main(flags(tmp_path, source, "--resume", epochs=2))
    assert "starting fresh" in caplog.text and len(summary["history"]) == 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-epoch run, its command line, and the bytes of every file it wrote."""
    root = tmp_path_factory.mktemp("finished")
    args = flags(root, blobs_csv(root / "blobs.csv"), epochs=3)
    train.main(args)
    files = {p: p.read_bytes() for p in root.glob("*/*") if p.is_file() and "datasets" not in p.parts}
    return root, args, files


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "batch size -1": (["--batch-size", "-1"], "--batch-size must be at least 1"),
    "label smoothing 1": (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    "unknown class weight": (["--class-weight", "inverse"], "--class-weight 'inverse' is unknown"),
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
    "missing value, strict": (["--dataset", "{hole}", "--label-column", "y", "--missing", "error"],
                              "column 'b' has a missing value in data row 2"),
    "infinite value": (["--dataset", "{inf}", "--label-column", "y"], "column 'b' holds an infinite value in data row 2"),
    "unknown missing policy": (["--missing", "drop"], "--missing 'drop' is unknown"),
    "unknown categorical column": (["--categorical-columns", "colour"], "colour cannot be used as features"),
    "single class": (["--dataset", "{one_class}", "--label-column", "y"], "single class"),
    "too few rows": (["--dataset", "{good}", "--label-column", "y"], "class 'x' has 2 rows: too few"),
    "uncached hub id offline": (["--dataset", "someone/not-cached"], "cannot be reached"),
    "resume with another seed": (["--resume", "--seed", "7"], "seed (0 there, 7 now)"),
    "output dir is a file": (["--output-dir", "{empty}/out"], "cannot create or write to the folder"),
    "seed out of range": (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    "huge batch": (["--batch-size", "20000000000000000000"], "--batch-size must be below 2**31"),
    "loss blows up": (["--learning-rate", "1e38", "--grad-clip", "0"], "epoch 1: the training loss is"),
    "a directory": (["--dataset", "{folder}"], "is a directory; pass one of its files"),
    "latin-1 file": (["--dataset", "{latin}", "--label-column", "y"], "is not UTF-8 text: an encoding or format problem"),
    "JSON by column": (["--dataset", "{by_column}", "--label-column", "y"], "is laid out by column"),
    "values near float32's limit": (["--dataset", "{huge}", "--label-column", "y"], "near float32's limit"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line_and_leaves_every_file_alone(finished_run, monkeypatch, case):
    if case == "absent CUDA" and torch.cuda.is_available() or case == "absent MPS" and torch.backends.mps.is_available():
        pytest.skip("this machine has that device")
    root, base, files = finished_run
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub that refuses at once, on this machine
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    paths = {"tmp": root, "empty": write_csv(root / "empty.csv", ""),
             "header": write_csv(root / "header.csv", "a,b,y\n"),
             "good": write_csv(root / "good.csv", "a,b,y\n1,2,x\n3,4,z\n5,6,x\n7,8,z\n"),
             "text": write_csv(root / "text.csv", "a,b,y\n1,2,x\n3,abc,z\n" + "5,6,x\n" * 9),
             "hole": write_csv(root / "hole.csv", "a,b,y\n1,2,x\n3,,z\n" + "5,6,z\n" * 9),
             "inf": write_csv(root / "inf.csv", "a,b,y\n1,2,x\n3,inf,z\n" + "5,6,z\n" * 9),
             "one_class": write_csv(root / "one.csv", "a,b,y\n" + "".join(f"{i},{2 * i},x\n" for i in range(9))),
             "huge": write_csv(root / "huge.csv", "a,b,y\n" + "".join(f"{i},{i}e37,{'xz'[i % 2]}\n" for i in range(20))),
             "by_column": write_csv(root / "columns.json", '{"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "y": ["x", "z", "x", "z"]}'),
             "folder": str(root / "datasets")}
    (root / "latin.csv").write_bytes("a,b,y\n1,caf\xe9,x\n".encode("latin-1") + b"2,3,z\n" * 9)
    paths["latin"] = str(root / "latin.csv")
    args, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        train.main(base + [a.format(**paths) for a in args])
    error = exit_info.value.code
    assert isinstance(error, str) and error.startswith("error: ") and "\n" not in error  # exit status 1, one line
    assert message in error
    for path, content in files.items():
        assert path.read_bytes() == content, f"{path} changed"


def test_a_second_run_on_the_same_checkpoint_dir_is_refused(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    (tmp_path / "checkpoints").mkdir()
    hold = (f"import fcntl, sys; f = open({str(tmp_path / 'checkpoints/.lock')!r}, 'a+'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('held', flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as other:  # another process, with a run in progress, holds the folder
        assert other.stdout.readline() == "held\n"
        with pytest.raises(SystemExit, match="another run \\(pid 4242\\) is using"):
            train.main(flags(tmp_path, source, epochs=1))
        other.stdin.close()
    assert not (tmp_path / "checkpoints/best_model.pt").exists()
    train.main(flags(tmp_path, source, epochs=1))  # once it has ended, the folder is free
    assert not (tmp_path / "checkpoints/.lock").exists()


def test_a_damaged_saved_copy_is_rebuilt_or_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(train.BUNDLED, "someone/blobs", blobs_csv(tmp_path / "blobs.csv"))
    broken = tmp_path / "datasets" / "someone___blobs"  # as a run killed mid-save left it
    broken.mkdir(parents=True)
    (broken / "data-00000-of-00001.arrow").write_bytes(b"half a file")
    summary = train.main(flags(tmp_path, "someone/blobs", epochs=1))
    assert "is damaged: rebuilding it" in caplog.text and summary["test_accuracy"] is not None
    other = tmp_path / "datasets" / "someone___other"
    other.mkdir()
    (other / "state.json").write_text("{")
    with pytest.raises(SystemExit, match="someone___other is damaged .*delete that folder"):
        train.main(flags(tmp_path, "someone/other", epochs=1))


def test_bad_input_on_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *dirs(tmp_path), "--epochs", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == "error: --epochs must be at least 1\n"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "old version", "other model"])
def test_damaged_checkpoint_is_refused_clearly(tmp_path, damage):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    last, best = tmp_path / "checkpoints/last.pt", tmp_path / "checkpoints/best_model.pt"
    best_bytes, content = best.read_bytes(), last.read_bytes()
    if damage == "truncated":
        last.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(len(content)))
    else:
        checkpoint = torch.load(last, weights_only=True)
        if damage == "old version":
            checkpoint["version"] = 0
        else:  # weights of the same model built for more inputs
            checkpoint["model"] = train.build_model(7, 3, train.TrainingConfig()).state_dict()
        torch.save(checkpoint, last)
    expected = {"truncated": "not a readable checkpoint", "garbage": "not a readable checkpoint",
                "old version": "not written by this train.py", "other model": "shaped for another model"}[damage]
    with pytest.raises(SystemExit, match=expected):
        train.main(flags(tmp_path, source, "--resume", epochs=4))
    assert best.read_bytes() == best_bytes


def test_non_finite_loss_mid_run_keeps_the_previous_best(tmp_path, monkeypatch):
    real = train.train_one_epoch
    calls = []

    def blows_up_in_epoch_4(*args, **kwargs):
        calls.append(1)
        trained = real(*args, **kwargs)
        return {**trained, "loss": float("nan")} if len(calls) == 4 else trained

    monkeypatch.setattr(train, "train_one_epoch", blows_up_in_epoch_4)
    source = blobs_csv(tmp_path / "blobs.csv")
    with pytest.raises(SystemExit, match="epoch 4: the training loss is nan") as exit_info:
        train.main(flags(tmp_path, source, epochs=6))
    assert "learning rate" in exit_info.value.code
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    history = json.loads((tmp_path / "training-loop/history.json").read_text())
    assert len(history) == 3 and best["epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64")])
def test_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, error):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    best_bytes = (tmp_path / "checkpoints/best_model.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):  # a real full disk fails part-way through the file
        f.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags(tmp_path, source, epochs=2))
    message = exit_info.value.code
    assert message.startswith("error: could not write") and "best_model.pt" in message and "\n" not in message
    assert (tmp_path / "checkpoints/best_model.pt").read_bytes() == best_bytes
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # no half-written file left behind


def test_an_empty_predict_is_an_error_not_a_training_run(blobs_run, tmp_path):
    root, _, _ = blobs_run
    before = (root / "checkpoints/best_model.pt").read_bytes()
    with pytest.raises(SystemExit, match="--predict was given an empty value"):
        train.main(["--checkpoint-dir", str(root / "checkpoints"), "--output-dir", str(tmp_path), "--predict", ""])
    assert (root / "checkpoints/best_model.pt").read_bytes() == before and not list(tmp_path.iterdir())


@pytest.mark.parametrize("rows, message", [
    ("0,inf,0", "row 1: column 'height' needs a finite number (or an empty cell), not 'inf'"),
    ("0,0,0;nan,0,0", "row 2: column 'width' needs a finite number"),
    ("0,0,0,1;" * 100, "row 1 has 4 values"),  # longer than a file name may be: still read as rows
])
def test_predict_refuses_non_finite_and_odd_rows_in_one_line(blobs_run, rows, message):
    root, _, _ = blobs_run
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--checkpoint-dir", str(root / "checkpoints"), "--predict", rows])
    assert "\n" not in exit_info.value.code and message in exit_info.value.code


def test_predict_reads_negative_rows_byte_order_marks_and_refuses_other_encodings(blobs_run, tmp_path):
    root, _, _ = blobs_run
    checkpoint = ["--checkpoint-dir", str(root / "checkpoints")]
    assert len(train.main(checkpoint + ["--predict", "-1.5,0,0"])["predictions"]) == 1  # not taken for a flag
    bom = tmp_path / "bom.csv"
    bom.write_bytes("width,height,depth\n0,0,0\n".encode("utf-8-sig"))
    assert train.main(checkpoint + ["--predict", str(bom)])["predictions"][0].startswith("0, 0, 0 -> ")
    short = tmp_path / "short.csv"  # a row that lost a cell: refused, never dropped out of line with the input
    short.write_text("width,height,depth\n0,0,0\n1,1\n2,2,2\n")
    with pytest.raises(SystemExit, match="row 2 has 2 values"):
        train.main(checkpoint + ["--predict", str(short)])
    latin = tmp_path / "latin.csv"
    latin.write_bytes("width,height,depth\n0,0,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="not a UTF-8 CSV file"):
        train.main(checkpoint + ["--predict", str(latin)])


def test_many_classes_keep_the_log_and_plots_small(tmp_path, caplog):
    rng = np.random.default_rng(5)
    source = tmp_path / "many.csv"
    source.write_text("a,b,label\n" + "".join(f"{rng.normal():.4f},{rng.normal():.4f},class-{i % 300}\n"
                                               for i in range(1500)))
    train.main(flags(tmp_path, source, label="label", epochs=1))
    assert max(len(line) for line in caplog.messages) < 1000 and "(300 in all)" in caplog.text
    assert (tmp_path / "training-loop/confusion_matrix.png").stat().st_size < 2_000_000


def from_a_terminal() -> None:
    """A child's signals as a terminal gives them: this suite may itself run as a background job,
    whose children inherit SIGINT ignored (and would then rightly keep ignoring it)."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def test_a_signal_ignored_at_start_stays_ignored(tmp_path, monkeypatch):
    source = blobs_csv(tmp_path / "blobs.csv")
    signal_during_epoch(monkeypatch, epoch=2, signum=signal.SIGHUP)
    handler = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup python train.py` starts
    try:
        summary = train.main(flags(tmp_path, source, epochs=3))
    finally:
        signal.signal(signal.SIGHUP, handler)
    assert len(summary["history"]) == 3  # not stopped


@pytest.mark.parametrize("signum, status, when", [
    (signal.SIGTERM, 143, "epoch   2/30"),  # in the epoch loop: finishes the step, saves, says how to resume
    (signal.SIGINT, 130, "classes:"),  # outside it (data preparation): one line, no traceback
    (signal.SIGHUP, 129, "classes:"),  # a closed terminal, a dropped ssh session
])
def test_a_stop_from_outside_is_one_line_and_its_exit_status(tmp_path, signum, status, when):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.prepare_data(config(source, tmp_path))  # a warm cache: the run reaches its loop sooner
    run = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags(tmp_path, source, "--batch-size", "2",
                                                                           epochs=30)],
                           stderr=subprocess.PIPE, text=True, preexec_fn=from_a_terminal)
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


# ----------------------------------------------------------------------------- speed paths (correctness only)

def test_warm_run_reads_prepared_tensors_without_reloading_the_table(tmp_path, monkeypatch):
    cfg = config(blobs_csv(tmp_path / "blobs.csv"), tmp_path)
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
    cfg = config(source, tmp_path, label_column="y")
    assert sum(len(train.prepare_data(cfg)[s][0]) for s in ("train", "val", "test")) == 30
    source.write_text(source.read_text() + "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(30, 45)))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert sum(len(train.prepare_data(cfg)[s][0]) for s in ("train", "val", "test")) == 45
    (tmp_path / "datasets" / "prepared").joinpath("junk.pt").write_bytes(b"junk")  # stray files are ignored
    for cached in (tmp_path / "datasets" / "prepared").glob("blobs.csv-*.pt"):
        cached.write_bytes(b"not a checkpoint")  # a damaged cache is rebuilt, not trusted
    assert sum(len(train.prepare_data(cfg)[s][0]) for s in ("train", "val", "test")) == 45


def test_caches_follow_an_edit_that_keeps_the_files_size_and_time(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    cfg = config(source, tmp_path)
    before = train.prepare_data(cfg)
    stat = source.stat()
    text = source.read_text()
    source.write_text(text.replace(",small,", ",small,", 1).replace("\nsmall,", "\nlarge,", 1))  # same size
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p or rsync -a leave it
    assert source.stat().st_size == stat.st_size
    after = train.prepare_data(cfg)
    assert not torch.equal(before["train"][1], after["train"][1]) or not torch.equal(before["val"][1], after["val"][1]) \
        or not torch.equal(before["test"][1], after["test"][1])


def test_changed_data_and_a_foreign_best_checkpoint_are_refused(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    other = tmp_path / "other"
    train.main(flags(other, source, epochs=2))
    # best_model.pt from another run (a failed write, a copy) is not reported as this run's.
    best = tmp_path / "checkpoints/best_model.pt"
    kept = best.read_bytes()
    best.write_bytes((other / "checkpoints/best_model.pt").read_bytes())
    with pytest.raises(SystemExit, match="belongs to run .*not to this run"):
        train.main(flags(tmp_path, source, "--resume", epochs=2))
    best.write_bytes(kept)
    # Rows appended: the recomputed splits would mix training rows into val and test.
    source.write_text(source.read_text() + "small,999,0.1,0.2,0.3\n" * 5)
    for mode in ("--resume", "--eval-only"):
        with pytest.raises(SystemExit, match="was trained on other rows"):
            train.main(flags(tmp_path, source, mode, epochs=3))


def test_bench_loops_do_the_same_work():
    if not (REPO / "bench.py").is_file():
        pytest.skip("no bench.py beside test.py")
    import bench

    x, y = bench.synthetic(1000, 16)
    weights = {}
    for name in ("a", "c"):
        model, optimizer = bench.setup(name, 16, torch.device("cpu"))
        bench.LOOPS[name](model, optimizer, x, y, 64, 3, torch.device("cpu"))
        weights[name] = model.state_dict()
    assert all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


# ----------------------------------------------------------------------------- scaling out

def torchrun(tmp_path: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """train.main under torchrun: 2 CPU processes (gloo)."""
    return run_train(tmp_path, *args, "--device", "cpu", launcher=("-m", "torch.distributed.run", "--standalone",
                                                                    "--nproc_per_node=2"), timeout=600, **kwargs)


def rank_weights(root: Path) -> dict:
    """Each rank's final weights (recorded by the script): the ranks must hold the same ones."""
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "the ranks' weights differ"
    return ranks[0]


def test_torchrun_two_cpu_processes_train_as_one_stop_together_and_resume_mid_epoch_exactly(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    data = train.prepare_data(config(source, tmp_path))  # builds the dataset cache every run below reads
    # 36 rows per rank, batch 1, 2 micro-batches a step (no_sync): 18 steps an epoch, a save every 4
    args = ["--batch-size", "1", "--grad-accum-steps", "2", "--save-every-steps", "4",
            "--datasets-dir", str(tmp_path / "datasets")]
    whole = tmp_path / "whole"
    result = torchrun(tmp_path, *flags(whole, source, *args, epochs=8), record=whole)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("epoch   1/8") == 1 and "effective batch 4" in output  # rank 0 alone logs
    written = sorted(str(p.relative_to(whole)) for d in ("checkpoints", "training-loop") for p in (whole / d).iterdir())
    assert written == ["checkpoints/best_model.pt", "checkpoints/last.pt", "training-loop/confusion_matrix.png",
                       "training-loop/history.json", "training-loop/loss_curve.png", "training-loop/run_note.md",
                       "training-loop/test_report.json"]
    best = torch.load(whole / "checkpoints/best_model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in best["model"])  # loads in a single process
    # What the ranks logged together equals a single-process evaluation of the saved model.
    model = train.model_from_checkpoint(best)
    history = json.loads((whole / "training-loop/history.json").read_text())
    val = train.evaluate(model, train.iterate_batches(*data["val"], 16))
    assert val["loss"] == pytest.approx(history[best["epoch"] - 1]["val_loss"], abs=1e-5), BATCH_INDEPENDENT
    assert val["acc"] == pytest.approx(history[best["epoch"] - 1]["val_acc"]), BATCH_INDEPENDENT
    report = json.loads((whole / "training-loop/test_report.json").read_text())
    single = train.classification_report(train.predict(model, data["test"][0], 16), data["test"][1], data["classes"])
    assert report["confusion_matrix"] == single["confusion_matrix"] and report["rows"] == 24, BATCH_INDEPENDENT
    assert report["accuracy"] >= 0.9
    final = rank_weights(whole)

    # SIGTERM to rank 1 alone at step 4 of epoch 3: the ranks agree at their next check, both save
    # that step and stop; a resume (every rank reads rank 0's last.pt) goes on at the next step.
    stopped = tmp_path / "stopped"
    result = torchrun(tmp_path, *flags(stopped, source, *args, epochs=8), signal_at="3,4,SIGTERM,1")
    assert result.returncode != 0 and "stopped by SIGTERM" in result.stderr, result.stdout + result.stderr
    assert "holds epoch 3, step 10 of 18. Resume with: torchrun --nproc_per_node=2" in result.stderr
    result = torchrun(tmp_path, *flags(stopped, source, *args, "--resume", epochs=8), record=stopped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at epoch 3, step 10 of 18" in result.stderr
    assert_same_run(whole, stopped)
    assert all(torch.equal(final[k], rank_weights(stopped)[k]) for k in final)


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

def test_feature_columns_choose_the_inputs(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, "--feature-columns", "depth,width", epochs=2))
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    assert best["features"] == ["depth", "width"] and best["model_args"]["in_features"] == 2
    with pytest.raises(SystemExit, match="weight cannot be used as features"):
        train.main(flags(tmp_path, source, "--feature-columns", "weight"))


def test_regression_learns_a_noisy_linear_target_and_predicts_near_the_truth(tmp_path, capsys):
    source = linear_csv(tmp_path / "linear.csv")
    summary = train.main(flags(tmp_path, source, "--task", "auto", label="target", epochs=30))
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
    with pytest.raises(SystemExit, match="600 distinct numbers in 600 rows.* use --task regression"):
        train.main(flags(tmp_path, source, label="target"))


def mixed_csv(path: Path, rows: int = 400, seed: int = 3) -> Path:
    """A table as real ones come: an id, a number with blank cells, a text column with blanks, an
    integer code that means categories, and a text label that depends on all of them."""
    rng = np.random.default_rng(seed)
    lines = ["customer_id,age,city,plan,spend,churn"]
    for i in range(rows):
        city, plan, age = ("Oslo", "Lima", "Pune", "Kyiv")[rng.integers(4)], int(rng.integers(1, 4)), rng.normal(40, 10)
        score = 2.0 * (city in ("Oslo", "Pune")) - 1 + 1.5 * (plan == 3) - 1.5 * (plan == 1) + (age - 40) / 8
        churn = "yes" if score + rng.normal(0, 0.3) > 0 else "no"
        age_cell = "" if rng.random() < 0.1 else f"{age:.1f}"
        city_cell = "" if rng.random() < 0.05 else city
        lines.append(f"{i},{age_cell},{city_cell},{plan},{rng.gamma(2, 50):.2f},{churn}")
    path.write_text("\n".join(lines) + "\n")
    return path


def mixed_flags(root: Path, source: Path, *extra: str, epochs: int = 30) -> list[str]:
    return flags(root, source, "--categorical-columns", "plan", *extra, label="churn", epochs=epochs)


def test_text_and_blank_cells_become_inputs_learnt_from_the_training_split_only(tmp_path):
    source = mixed_csv(tmp_path / "mixed.csv")
    data = train.prepare_data(train.parse_config(mixed_flags(tmp_path, source)))
    with open(source) as f:
        table = list(csv.DictReader(f))
    training = [table[i] for i in data["splits"]["train"]]
    spec = data["preprocess"]
    assert data["features"] == ["age", "city", "plan", "spend"]  # the id column is left out
    ages = [float(r["age"]) for r in training if r["age"]]
    assert spec["age"]["median"] == pytest.approx(float(np.median(ages)))  # the training rows' median only
    assert spec["age"]["flag"] and "age was missing" in data["inputs"]
    cities = {r["city"] or train.NA for r in training}
    assert set(spec["city"]["categories"]) == cities  # a blank cell is a category of its own
    assert spec["plan"]["categories"] == sorted(spec["plan"]["categories"], key=lambda c: -sum(
        r["plan"] == c for r in training))  # most frequent first
    assert {"plan=1", "plan=2", "plan=3", "plan=other", "city=other"} <= set(data["inputs"])
    assert len(data["inputs"]) == data["train"][0].shape[1]


def test_a_table_with_text_and_blank_cells_trains_and_predicts_raw_rows(tmp_path, caplog, capsys):
    source = mixed_csv(tmp_path / "mixed.csv")
    summary = train.main(mixed_flags(tmp_path, source))
    assert summary["test_accuracy"] >= 0.85  # city and plan carry most of the signal
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)  # the preprocessing loads safely
    assert best["preprocess"]["city"]["kind"] == "categorical"
    # The test rows, raw from the file (text, blank cells, columns in another order), predicted from the
    # command line, get the classes the pipeline gave them.
    data = train.prepare_data(train.parse_config(mixed_flags(tmp_path, source)))
    with open(source) as f:
        table = list(csv.DictReader(f))
    rows = tmp_path / "rows.csv"
    with open(rows, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["spend", "churn", "plan", "city", "age", "customer_id"])
        writer.writeheader()
        writer.writerows(table[i] for i in data["splits"]["test"])
    inputs, unseen = train.rows_to_inputs([table[i] for i in data["splits"]["test"]], best)  # dicts, raw strings
    torch.testing.assert_close(inputs, data["test"][0])  # the checkpoint reproduces the run's preprocessing
    assert not any(unseen.values())
    capsys.readouterr()
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", str(rows)])["predictions"]
    outputs = train.predict(train.model_from_checkpoint(best), data["test"][0], 64)
    assert [line.split("-> ")[1].split(" (")[0] for line in lines] == [data["classes"][i] for i in outputs.argmax(1)]
    # A category training never saw works, and is counted; a blank number is filled.
    caplog.clear()
    lines = train.main(["--checkpoint-dir", str(tmp_path / "checkpoints"), "--predict", ",Atlantis,3,20;50,,2,"])
    assert len(lines["predictions"]) == 2 and "1 row(s) have a 'city' category training never saw" in caplog.text


def test_a_warm_run_says_what_happened_to_every_column_as_a_cold_one_does(tmp_path, caplog):
    source = mixed_csv(tmp_path / "mixed.csv")
    said = []
    for _ in range(2):  # cold: reads the table; warm: reads the prepared cache
        caplog.clear()
        train.main(mixed_flags(tmp_path, source, epochs=1))
        said.append([line for line in caplog.messages if line.startswith("column ")])
    assert said[0] == said[1]
    assert any(line.startswith("column customer_id: left out") for line in said[0])
    assert any(line.startswith("column age: numeric, ") and "blank cells filled" in line for line in said[0])
    assert any(line.startswith("column city: categorical, 5 categories") for line in said[0])


def test_a_numeric_label_with_many_values_is_a_regression_target(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 2))
    price = (10_000 + 3_000 * x[:, 0] - 2_000 * x[:, 1]).round().astype(int)  # integers, hundreds of them
    source = tmp_path / "prices.csv"
    source.write_text("a,b,price\n" + "".join(f"{a:.4f},{b:.4f},{p}\n" for (a, b), p in zip(x, price)))
    data = train.prepare_data(train.parse_config(flags(tmp_path, source, "--task", "auto", label="price")))
    assert data["task"] == "regression"
    with pytest.raises(SystemExit, match="distinct numbers in 300 rows, too many to be classes: use --task regression"):
        train.prepare_data(train.parse_config(flags(tmp_path, source, label="price")))
    digits = tmp_path / "digits.csv"  # a few integer values: classes, even under auto
    digits.write_text("a,b,digit\n" + "".join(f"{a:.4f},{b:.4f},{i % 10}\n" for i, (a, b) in enumerate(x)))
    data = train.prepare_data(train.parse_config(flags(tmp_path, digits, "--task", "auto", label="digit")))
    assert data["task"] == "classification" and data["classes"] == list(range(10))


def test_balanced_class_weights_are_inverse_class_frequencies_in_training(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    text = source.read_text().splitlines()
    source.write_text("\n".join(text[:1] + text[1:41] + text[41:61] + text[81:91]) + "\n")  # 40 / 20 / 10 rows
    plain = train.prepare_data(train.parse_config(flags(tmp_path, source)))
    assert plain["class_weights"] is None
    data = train.prepare_data(train.parse_config(flags(tmp_path, source, "--class-weight", "balanced")))
    counts = np.bincount(data["train"][1].numpy(), minlength=3)
    expected = counts.sum() / (3 * counts)
    np.testing.assert_allclose(data["class_weights"].numpy(), expected, rtol=1e-6)
    out, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])
    got = train.loss_function("classification", data["class_weights"])(out, y)
    assert got.item() == pytest.approx(F.cross_entropy(out, y, weight=data["class_weights"]).item())


# ----------------------------------------------------------------------------- predicting, evaluating

def test_predict_from_the_command_line_reads_rows_and_csv_files(blobs_run, tmp_path):
    root, _, _ = blobs_run
    checkpoint = ["--checkpoint-dir", str(root / "checkpoints")]
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *checkpoint,
                             "--predict", "0,0,0;0,4,4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # one line per row, on stdout
    assert len(lines) == 2 and lines[0].startswith("0, 0, 0 -> small (") and "-> large (" in lines[1]
    rows = tmp_path / "rows.csv"  # a header in another order, and a column the model does not use
    rows.write_text("depth,kind,width,height\n0,?,0,0\n")
    assert train.main(checkpoint + ["--predict", str(rows)])["predictions"] == [lines[0]]
    assert not (tmp_path / "training-loop").exists()  # trains nothing, writes nothing


@pytest.mark.parametrize("rows, message", [
    ("0,0", "row 1 has 2 values; expected 3 values: width, height, depth"),
    ("0,0,0;1,2", "row 2 has 2 values"),
    ("0,x,0", "row 1: column 'height' needs a finite number (or an empty cell), not 'x'"),
])
def test_predict_with_the_wrong_values_fails_clearly(blobs_run, rows, message):
    root, _, _ = blobs_run
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--checkpoint-dir", str(root / "checkpoints"), "--predict", rows])
    error = exit_info.value.code
    assert error.startswith("error: --predict") and "\n" not in error and message in error


def test_eval_only_rewrites_the_report_and_plots_without_training(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=3))
    report_path = tmp_path / "training-loop/test_report.json"
    before = json.loads(report_path.read_text())
    checkpoints = {p: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    history = (tmp_path / "training-loop/history.json").read_bytes()
    report_path.write_text("{}")
    (tmp_path / "training-loop/confusion_matrix.png").unlink()
    summary = train.main(flags(tmp_path, source, "--eval-only", epochs=3))
    assert json.loads(report_path.read_text()) == before == {k: summary["report"][k] for k in before}
    assert before["diagnosis"]["verdict"] == "still_improving"  # read from history.json: 3 epochs, best the last
    assert (tmp_path / "training-loop/confusion_matrix.png").exists()
    assert all(p.read_bytes() == content for p, content in checkpoints.items())  # nothing trained
    assert (tmp_path / "training-loop/history.json").read_bytes() == history
    with pytest.raises(SystemExit, match="seed"):
        train.main(flags(tmp_path, source, "--eval-only", "--seed", "3"))  # another test split: refused


# ----------------------------------------------------------------------------- progress and TensorBoard

def test_a_terminal_gets_a_progress_bar_and_exit_hooks_run(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    source = blobs_csv(tmp_path / "blobs.csv")
    marker = tmp_path / "atexit-ran"  # and the script ends through the interpreter: a tracker's exit hook runs
    script = (f"import atexit, runpy, sys; atexit.register(lambda: open({str(marker)!r}, 'w').write('ran')); "
              f"sys.argv = ['train.py', *{flags(tmp_path, source, epochs=3)!r}]; "
              f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
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
    assert "3/3" in text and "\r" in text and "train_loss=" in text
    assert "test accuracy" in text  # the log lines still come, above the bar
    assert marker.read_text() == "ran"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_an_event_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--tensorboard", epochs=3))
    events = list((tmp_path / "runs").glob("blobs-*/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_missing_is_one_clear_line_and_no_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--tensorboard", epochs=2))
    assert "pip install tensorboard" in caplog.text
    assert not (tmp_path / "runs").exists()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", *sys.argv[1:]]))
