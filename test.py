"""Smoke checks for your copy of train.py: `python -m pytest -q test.py` (9 to 11 s on 2 cores).

They run your loop: the model build_model makes, the objective build_objective makes, the
optimizer and scheduler build_optimizer makes, on a slice of the data build_data gives, all with
your TrainingConfig defaults. Each test checks one thing your seams or the loop must keep true,
and fails, naming the mistake, when an edit breaks it. Checks of the table pipeline skip when
build_data is your own.
Every file a run writes goes to a temporary folder; nothing touches the network.
"""

import copy
import json
import math
import os
import signal
import socket
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
import torch.nn as nn

import train

SLICE = 48  # rows of each split the checks use: a few batches, fast on any model
# Said where a check only holds for a model whose output for a row does not depend on the other
# rows of its batch: BatchNorm in training mode breaks that, and so does padding left unmasked.
BATCH_INDEPENDENT = ("a row's outputs must not depend on the rest of its batch: does the model "
                     "mask the padding a collate_fn adds?")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection beyond this machine fails the test that made it."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family != socket.AF_UNIX and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


# ------------------------------------------------------------------------ your seams, on a slice

def cut(split, n: int):
    """n rows of a split, spread evenly over it, in order: a file sorted by class, or a rare class,
    still shows in the slice. Tensors, or a torch Dataset (a Subset uses its collate_fn)."""
    total = train.split_rows(split)
    rows = torch.linspace(0, total - 1, min(n, total)).round().long().unique()
    if isinstance(split, tuple):
        return train.rows_of(split, rows.to(train.tensors_in(split)[0].device))
    return torch.utils.data.Subset(split, rows.tolist())


@pytest.fixture(scope="session")
def cfg(tmp_path_factory) -> train.TrainingConfig:
    """Your defaults, with the run's outputs in a temporary folder."""
    root = tmp_path_factory.mktemp("run")
    return replace(train.TrainingConfig(), checkpoint_dir=str(root / "checkpoints"),
                   output_dir=str(root / "training-loop"), resume=False,
                   predict=None, tensorboard=False)


@pytest.fixture(scope="session")
def full_data(cfg) -> dict:
    return train.build_data(cfg)


@pytest.fixture(scope="session")
def data(full_data) -> dict:
    """Your data seam's splits, cut to SLICE rows each, spread over them."""
    return {**full_data, **{s: cut(full_data[s], SLICE) for s in ("train", "val", "test")}}


@pytest.fixture(scope="session")
def objective(data, cfg) -> train.Objective:
    return train.build_objective(data["meta"], cfg)


def new_model(data: dict, objective, cfg, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return train.build_model(train.input_shape(data["train"]), objective.outputs, data["meta"], cfg)


def batches(split, size: int) -> list:
    return list(train.iterate_batches(split, size))


def inputs_of(split):
    """All the slice's inputs, as one batch (SLICE rows: one batch of 1024, padded alike)."""
    return train.cat_rows([xb for xb, _ in train.iterate_batches(split, 1024)])


def targets_of(split):
    return train.cat_rows([yb for _, yb in train.iterate_batches(split, 1024)])


@pytest.fixture(scope="session")
def fitted(data, objective, cfg) -> tuple:
    return fit_slice(data, objective, cfg)


def fit_slice(data: dict, objective, cfg) -> tuple:
    """Your model after 30 full-batch AdamW steps on the training slice by your loss, in eval mode,
    its outputs there, and the slice's inputs and targets."""
    model = new_model(data, objective, cfg)
    x, y = inputs_of(data["train"]), targets_of(data["train"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        objective.loss(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        return model.eval(), model(x), x, y


def starting_outputs(data: dict, objective, cfg, x) -> torch.Tensor:
    """What a fit must beat: predicting the training base rates, or without them, the untrained
    model."""
    if objective.baseline is not None:
        return objective.baseline.expand(train.rows_in(x), -1)
    with torch.no_grad():
        return new_model(data, objective, cfg).eval()(x)


def sgd(model: nn.Module, lr: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def flags(cfg, *extra: str, epochs: int = 3) -> list[str]:
    """A short run of your defaults, its files in cfg's temporary folders: only the length is set
    (epochs, and a batch that gives each epoch several optimizer steps)."""
    batch = max(1, SLICE // (4 * cfg.grad_accum_steps))
    return ["--checkpoint-dir", cfg.checkpoint_dir, "--output-dir", cfg.output_dir,
            "--epochs", str(epochs), "--batch-size", str(batch), "--save-every-steps", "0",
            "--no-resume", "--log-every", "1", *extra]


@pytest.fixture
def sliced(monkeypatch, data):
    """main() on the slice of your data, in fresh folders for each test."""
    monkeypatch.setattr(train, "build_data", lambda cfg: data)


@pytest.fixture
def fresh(cfg, tmp_path) -> train.TrainingConfig:
    return replace(cfg, checkpoint_dir=str(tmp_path / "checkpoints"),
                   output_dir=str(tmp_path / "training-loop"))


# ----------------------------------------------------------------------------- the seams' contracts

def test_meta_loads_with_weights_only_and_the_splits_hold_rows(full_data):
    train.check_storable(full_data["meta"])  # every checkpoint holds it, loaded with weights_only
    for split in ("train", "val", "test"):
        assert train.split_rows(full_data[split]) > 0, f"the {split} split is empty"


def test_the_model_returns_raw_outputs_shaped_for_the_objective(data, objective, cfg, fitted):
    model = new_model(data, objective, cfg).eval()
    with torch.no_grad():
        out = model(inputs_of(data["val"]))
    assert isinstance(out, torch.Tensor), "the model returns one tensor of outputs, a row each"
    assert out.shape == (train.split_rows(data["val"]), objective.outputs)
    sums_to_one = torch.allclose(out.sum(-1), torch.ones(len(out)), atol=1e-4)
    probabilities = bool((out >= 0).all()) and sums_to_one
    assert objective.outputs == 1 or not probabilities, "return logits: the objective has softmax"
    if objective.outputs == 1 and data["meta"].get("task") == "classification":
        # Two classes, one output: a logit, which fitting the training rows takes past 0 and 1. A
        # sigmoid in the model caps it there, and the objective's own then calls every row class 2.
        out = fitted[1]
        assert not ((out >= 0) & (out <= 1)).all(), "return a logit: the objective has the sigmoid"


def test_your_loss_pulls_the_outputs_toward_the_targets(data, objective, cfg, fitted):
    # Fitted by your loss, the model must beat predicting the base rates on the rows it fitted, as
    # row_losses measures. A loss that misses the targets (huber_loss(out, y) with out N x 1 and y
    # N broadcasts to N x N and fits the mean) lands near 1.0 of the base; a real fit, even of
    # shuffled labels, lands below 0.6.
    _, out, x, y = fitted
    fit = objective.row_losses(out, y).mean()
    base = objective.row_losses(starting_outputs(data, objective, cfg, x), y).mean()
    assert fit < 0.9 * base, f"your loss fits the training rows no better than the base: {fit:.4g}"


def test_the_objective_scores_whole_splits_in_any_row_order(data, objective, cfg):
    model = new_model(data, objective, cfg).eval()
    with torch.no_grad():
        x, y = inputs_of(data["val"]), targets_of(data["val"])
        out = model(x)
    loss = objective.loss(out.requires_grad_(), y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    n = train.rows_in(y)
    twice = objective.loss(torch.cat([out, out]).detach(), train.cat_rows([y, y]))
    assert twice.item() == pytest.approx(loss.item(), rel=1e-5), "the loss must be a mean over rows"
    rows = objective.row_losses(out.detach(), y)
    assert rows.shape == (n,) and torch.isfinite(rows).all()
    assert len(objective.describe(out.detach())) == n
    if objective.baseline is not None:
        assert objective.baseline.shape == (objective.outputs,)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # DDP: rank by rank
    out = out.detach()
    scores = objective.metrics(out, y)
    shuffled = objective.metrics(out[order], train.rows_of(y, order))
    assert scalars(scores) == pytest.approx(scalars(shuffled), rel=1e-4, abs=1e-6, nan_ok=True)
    key = cfg.best_metric.removeprefix("val_")
    assert key == "loss" or key in scores, f"--best-metric {cfg.best_metric}: no {key!r} metric"


def test_metrics_are_plain_numbers_the_run_and_the_report_can_store(data, objective, cfg, fitted):
    _, out, x, y = fitted
    for outputs in (out, starting_outputs(data, objective, cfg, x)):
        metrics = objective.metrics(outputs, y)
        for name, value in metrics.items():
            assert isinstance(value, (int, float, list)), \
                f"metric {name!r} is a {type(value).__name__}: return a plain number (.item())"
            infinite = isinstance(value, float) and math.isinf(value)
            assert not infinite, f"metric {name!r} is {value}: NaN says it cannot be computed"
        json.dumps(metrics)  # lists (a confusion matrix) of plain numbers only; NaN: not computable


def test_the_selection_metric_improves_the_way_the_run_reads_it(data, objective, cfg, fitted):
    # Fitting the training slice moves the selection metric there the good way, as against the
    # base rates (or the untrained model): a reversed --mode, or a metric declared the wrong way,
    # would keep the worst epoch.
    lower, why = train.lower_is_better(cfg, objective)
    _, out, x, y = fitted
    key = cfg.best_metric.removeprefix("val_")

    def value(outputs) -> float:
        if cfg.best_metric == "val_loss":
            return objective.row_losses(outputs, y).mean().item()
        return objective.metrics(outputs, y)[key]

    before, after = value(starting_outputs(data, objective, cfg, x)), value(out)
    way = "lower" if lower else "higher"
    if after == before:  # the slice cannot move it (no positive row for a precision): no verdict
        pytest.skip(f"{cfg.best_metric} is {after:.4g} before and after fitting the slice")
    assert (after < before) if lower else (after > before), \
        f"fitting the training rows took {cfg.best_metric} from {before:.4g} to {after:.4g}, and " \
        f"the run keeps the epoch where it is {way} ({why}): is the direction reversed?"
    _, scheduler, when = train.build_optimizer(new_model(data, objective, cfg), cfg, 4)
    train.check_metric_mode(scheduler, when, cfg, lower)  # a plateau schedule's mode, likewise


def test_evaluation_gives_the_same_outputs_twice(data, objective, cfg):
    model = new_model(data, objective, cfg)
    for split in ("val", "test"):
        first, rows, _ = train.evaluate(model, batches(data[split], 16), objective)
        again, rows_again, _ = train.evaluate(model, batches(data[split], 16), objective)
        same = scalars(first) == pytest.approx(scalars(again), rel=0, abs=0, nan_ok=True)
        assert torch.equal(rows, rows_again) and same, \
            f"the same model scored the {split} split twice differently: random augmentation " \
            "left on for held-out data, or randomness in the model's eval mode?"


def fingerprints(split, limit: int = 20_000) -> list[bytes]:
    """Each row's inputs as bytes (`limit` rows at most, spread evenly): a copy has the same."""
    n = train.split_rows(split)
    rows = torch.linspace(0, n - 1, min(n, limit)).round().long().unique()
    if isinstance(split, tuple):
        parts = [t[rows.to(t.device)].cpu().reshape(len(rows), -1).numpy() for t in
                 train.tensors_in(split[0])]
        joined = np.concatenate([p.view(np.uint8).reshape(len(rows), -1) for p in parts], axis=1)
        return [row.tobytes() for row in joined]
    return [b"".join(repr(tuple(t.shape)).encode() + t.cpu().contiguous().numpy().tobytes()
                     for t in train.tensors_in(split[int(i)][0])) for i in rows]


def test_held_out_rows_are_not_copies_of_training_rows(full_data):
    # Genuine duplicates happen (Iris repeats a few flowers): a held-out row copies some training
    # row about as often as a training row copies another. Allowed: that rate's count, plus three
    # standard deviations of it and 2 rows. A split drawn from the training rows is far past it.
    seen = Counter(fingerprints(full_data["train"]))
    twins = sum(count for count in seen.values() if count > 1) / sum(seen.values())
    for split in ("val", "test"):
        held = fingerprints(full_data[split])
        copies = sum(row in seen for row in held)
        expected = twins * len(held)
        allowed = expected + 3 * math.sqrt(expected * (1 - twins)) + 2
        assert copies <= allowed, \
            f"{copies} of {len(held)} {split} inputs are copies of training inputs, where " \
            f"{twins:.1%} of training inputs copy another ({allowed:.0f} allowed): build the " \
            f"{split} split from rows training never sees"


# ------------------------------------------------------------------------ the loop, piece by piece

def test_training_in_train_mode_and_evaluation_in_eval_mode_without_a_graph(data, objective, cfg):
    model = new_model(data, objective, cfg)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((m.training, out.requires_grad)))
    model.eval()  # a loop that forgets model.train() stays here
    train.train_one_epoch(model, batches(data["train"], 16), sgd(model), objective.loss)
    assert seen and all(mode and grad for mode, grad in seen), "training must call model.train()"
    seen.clear()
    train.evaluate(model, batches(data["val"], 16), objective)
    assert seen and all(not mode for mode, _ in seen), "evaluate must call model.eval()"
    assert not any(grad for _, grad in seen), "evaluate must run without autograd (inference_mode)"


def test_a_lone_last_row_trains_with_the_batch_before_it(data, objective, cfg):
    # BatchNorm cannot train on one row: the loop joins a last batch of one row to the one before,
    # so any training split's size works. A model that fails here would fail at an epoch's end.
    split = cut(data["train"], 9)
    sizes = [train.rows_in(yb) for _, yb in batches(split, 4)]
    assert 1 not in sizes, f"a training pass of 9 rows in batches of 4 gave batches of {sizes} rows"
    model = new_model(data, objective, cfg)
    loss = train.train_one_epoch(model, batches(split, 4), sgd(model), objective.loss)["loss"]
    assert math.isfinite(loss), f"the training loss over batches of {sizes} rows is {loss}"


def test_gradients_are_zeroed_before_every_step(data, objective, cfg):
    steps = batches(data["train"], 16)[:3]
    model = new_model(data, objective, cfg)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # the same dropout masks in both
    train.train_one_epoch(model, steps, sgd(model), objective.loss)
    torch.manual_seed(1)
    reference.train()
    optimizer = sgd(reference)
    for xb, yb in steps:  # a fresh gradient for each step, by hand
        optimizer.zero_grad(set_to_none=True)
        objective.loss(reference(xb), yb).backward()
        optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, msg="each step must start from zeroed gradients")


def test_the_training_loss_is_averaged_over_rows_not_batches(data, objective, cfg):
    uneven = batches(data["train"], 20)  # 48 rows: 20, 20 and 8
    model = new_model(data, objective, cfg)
    frozen = sgd(model, lr=0.0)  # every batch sees the same weights
    torch.manual_seed(1)
    got = train.train_one_epoch(model, uneven, frozen, objective.loss)["loss"]
    torch.manual_seed(1)  # the same forward passes, dropout included, added up by hand
    with torch.no_grad():
        losses = [(objective.loss(model(xb), yb).item(), train.rows_in(yb)) for xb, yb in uneven]
    by_rows = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert got == pytest.approx(by_rows, rel=1e-5)


def test_evaluation_does_not_depend_on_the_batch_size(data, objective, cfg):
    model = new_model(data, objective, cfg)
    small, _, _ = train.evaluate(model, batches(data["val"], 7), objective)
    whole, _, _ = train.evaluate(model, batches(data["val"], 1024), objective)
    assert scalars(small) == pytest.approx(scalars(whole), rel=1e-5, abs=1e-6, nan_ok=True), \
        BATCH_INDEPENDENT


def test_the_running_loss_keeps_no_steps_graph_alive(data, objective, cfg):
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
        assert sum(ref() is not None for ref in alive) <= 1, "the running loss must be detached"
        return objective.loss(Marker.apply(out), y)

    model = new_model(data, objective, cfg)
    train.train_one_epoch(model, batches(data["train"], 8), sgd(model), loss_fn)
    assert len(alive) == 6


def test_clipping_cuts_gradients_after_backward_and_records_the_norm_before(data, objective, cfg):
    step = batches(data["train"], SLICE)
    model = new_model(data, objective, cfg)
    torch.manual_seed(1)
    model.train()
    objective.loss(model(step[0][0]), step[0][1]).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    norm = norm.item()
    before = params(model)
    torch.manual_seed(1)
    trained = train.train_one_epoch(model, step, sgd(model, lr=1.0), objective.loss,
                                    grad_clip=norm / 10)
    moved = torch.cat([(a - b).flatten() for a, b in zip(params(model), before)]).norm().item()
    assert moved == pytest.approx(norm / 10, rel=1e-3), "clip after backward(), before the step"
    assert trained["grad_norm"] == pytest.approx(norm, rel=1e-4) and trained["clipped"] == 1.0


def test_a_float16_grad_scaler_changes_the_scale_not_the_update(data, objective, cfg):
    # With the scaler in the step (scaled backward, unscaled before clipping, scaler.step) the
    # weights move exactly as without one: powers of two scale exactly.
    start = params(new_model(data, objective, cfg))
    for grad_clip in (0.0, 1e-3):
        moves = []
        for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**14)):
            model = new_model(data, objective, cfg)
            torch.manual_seed(1)
            train.train_one_epoch(model, batches(data["train"], 16), sgd(model), objective.loss,
                                  scaler=scaler, grad_clip=grad_clip)
            moves.append([after - before for after, before in zip(params(model), start)])
        for plain, scaled in zip(*moves):
            torch.testing.assert_close(scaled, plain, rtol=1e-3, atol=1e-9,
                                       msg="scale the loss, unscale before clipping, step scaler")


def test_a_step_scheduler_steps_once_per_optimizer_step(data, objective, cfg):
    model = new_model(data, objective, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    # 48 rows in batches of 8, a step every 2 micro-batches: 3 steps
    train.train_one_epoch(model, batches(data["train"], 8), optimizer, objective.loss, scheduler,
                          accum_steps=2)
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 4)


def test_accumulated_micro_batches_step_once_on_their_average_gradient(data, objective, cfg):
    micro = batches(data["train"], 16)  # 3 micro-batches of 16
    accumulated = new_model(data, objective, cfg)
    reference = copy.deepcopy(accumulated)
    torch.manual_seed(1)
    train.train_one_epoch(accumulated, micro, sgd(accumulated), objective.loss, accum_steps=3)
    torch.manual_seed(1)
    reference.train()
    for xb, yb in micro:  # by hand: three backward passes of loss / 3, then one step
        (objective.loss(reference(xb), yb) / 3).backward()
    sgd(reference).step()
    for a, b in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_trains_float32_weights(data, objective, cfg):
    amp = replace(cfg, use_amp=True, amp_dtype="auto")
    dtype = train.resolve_amp_dtype(amp, torch.device("cpu"))
    assert dtype == torch.bfloat16
    model = new_model(data, objective, cfg)
    before = params(model)
    trained = train.train_one_epoch(model, batches(data["train"], 16), sgd(model), objective.loss,
                                    amp_dtype=dtype)
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert np.isfinite(trained["loss"]) and moved
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master weights


def test_your_optimizer_and_scheduler_go_on_exactly_from_their_state(data, objective, cfg):
    def build():
        model = new_model(data, objective, cfg)
        return (model, *train.build_optimizer(model, cfg, steps_per_epoch=6))

    def steps(model, optimizer, scheduler, when, n):
        for xb, yb in batches(data["train"], 8)[:n]:
            optimizer.zero_grad(set_to_none=True)
            objective.loss(model(xb), yb).backward()
            optimizer.step()
            if scheduler is not None and when == "step":
                scheduler.step()

    torch.manual_seed(1)
    model, optimizer, scheduler, when = build()
    assert when in ("step", "epoch", "metric")
    steps(model, optimizer, scheduler, when, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict() if scheduler else None})
    resumed, optimizer2, scheduler2, _ = build()  # as --resume builds them, then loads their state
    resumed.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    if scheduler2 is not None:
        scheduler2.load_state_dict(saved["scheduler"])
    torch.manual_seed(2)
    steps(model, optimizer, scheduler, when, 3)
    torch.manual_seed(2)
    steps(resumed, optimizer2, scheduler2, when, 3)
    assert optimizer.param_groups[0]["lr"] == optimizer2.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b), "a resumed optimizer or scheduler must go on exactly"


# ------------------------------------------------------------------------ the loop, as main runs it

def spy(monkeypatch, monitored: list | None = None) -> dict:
    """Record each pass main() makes over a split (the split, and its rows in the order taken), and
    the weights at each validation; with `monitored`, report those values of the monitored metric
    instead."""
    seen = {"passes": [], "epochs": 0, "weights": []}
    real_iterate, real_train, real_evaluate = (train.iterate_batches, train.train_one_epoch,
                                               train.evaluate)

    def iterate_batches(split, batch_size, rows=None, *args, **kwargs):
        seen["passes"].append((split, rows))
        return real_iterate(split, batch_size, rows, *args, **kwargs)

    def train_one_epoch(*args, **kwargs):
        seen["epochs"] += 1
        return real_train(*args, **kwargs)

    def evaluate(model, batches, objective, *args, **kwargs):
        result, rows, y = real_evaluate(model, batches, objective, *args, **kwargs)
        if len(seen["weights"]) < seen["epochs"]:  # the epoch's validation, not the final test
            seen["weights"].append(copy.deepcopy(model.state_dict()))
            if monitored is not None:
                key = train.TrainingConfig().best_metric.removeprefix("val_")  # your default
                result = {**result, key: monitored[len(seen["weights"]) - 1]}
        return result, rows, y

    monkeypatch.setattr(train, "iterate_batches", iterate_batches)
    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(train, "evaluate", evaluate)
    return seen


def which(split, data: dict) -> str:
    """The name of the split main() passed: a Dataset is itself; tensors may have been moved to
    the device, so they compare by value."""
    for name in ("train", "val", "test"):
        mine = data[name]
        same = isinstance(split, tuple) and isinstance(mine, tuple) and all(
            a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
            for a, b in zip(train.tensors_in(split), train.tensors_in(mine), strict=True))
        if split is mine or same:
            return name
    return "another split"


def test_each_epoch_shuffles_training_rows_and_validates_on_validation_rows(monkeypatch, sliced,
                                                                             data, fresh):
    seen = spy(monkeypatch)
    train.main(flags(fresh))
    names = [which(split, data) for split, _ in seen["passes"]]
    assert names[:6] == ["train", "val"] * 3, "each epoch trains, then validates on the val split"
    assert names.count("test") == 1 and names[-1] == "test", "test once, after the last epoch"
    epochs = [rows.tolist() for (_, rows), name in zip(seen["passes"], names) if name == "train"]
    n_train, n_val = (train.split_rows(data[s]) for s in ("train", "val"))
    for rows in epochs:
        assert sorted(rows) == list(range(n_train)), "an epoch trains on every training row, once"
    assert epochs[0] != sorted(epochs[0]), "training batches must be shuffled"
    assert epochs[0] != epochs[1], "each epoch must be shuffled anew"
    for (split, rows), name in zip(seen["passes"], names):
        if name == "val":
            assert rows is None or sorted(rows.tolist()) == list(range(n_val)), \
                "validation runs on every validation row"


def test_the_best_checkpoint_is_the_best_monitored_epoch_not_the_last(monkeypatch, sliced, cfg,
                                                                       data, fresh):
    lower, _ = train.lower_is_better(cfg, train.build_objective(data["meta"], cfg))
    values = [0.9, 0.5, 0.7, 0.8] if lower else [0.1, 0.5, 0.3, 0.2]  # epoch 2 is the best
    seen = spy(monkeypatch, values)
    summary = train.main(flags(fresh, epochs=4))
    best = torch.load(os.path.join(fresh.checkpoint_dir, "best_model.pt"), weights_only=True)
    assert best["epoch"] == summary["best_epoch"] == 2
    assert all(torch.equal(best["model"][k], v) for k, v in seen["weights"][1].items()), \
        "best_model.pt must hold the weights of the epoch it names"
    assert summary["report"]["best_epoch"] == 2
    noted = hasattr(train, "write_run_note")  # the run note's block, unless deleted
    assert noted == bool(summary["diagnosis"] and summary["diagnosis"]["verdict"] is not None)
    for name in ("history.json", "test_report.json") + ("run_note.md", "loss_curve.png") * noted:
        assert os.path.getsize(os.path.join(fresh.output_dir, name)) > 0


def test_a_stop_mid_epoch_resumes_to_the_same_weights_as_a_run_never_stopped(monkeypatch, sliced,
                                                                              cfg, tmp_path):
    whole, stopped = (replace(cfg, checkpoint_dir=str(tmp_path / d / "ck"),
                              output_dir=str(tmp_path / d / "out")) for d in ("whole", "stopped"))
    train.main(flags(whole))
    real, calls = train.train_one_epoch, []

    def signal_in_epoch_2(model, batches, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            batches = list(batches)
            batches.insert(1, None)  # a marker: the signal comes after the first batch

            def delivered():
                for batch in batches:
                    if batch is None:
                        os.kill(os.getpid(), signal.SIGTERM)
                        continue
                    yield batch
            return real(model, delivered(), *args, **kwargs)
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", signal_in_epoch_2)
    with pytest.raises(SystemExit) as stop:
        train.main(flags(stopped))
    assert stop.value.code == 128 + signal.SIGTERM
    last = torch.load(os.path.join(stopped.checkpoint_dir, "last.pt"), weights_only=True)
    assert last["position"] and last["position"]["epoch"] == 2, "a stop saves the step it stops at"
    monkeypatch.setattr(train, "train_one_epoch", real)
    train.main(flags(stopped, "--resume"))
    a, b = (torch.load(os.path.join(c.checkpoint_dir, "last.pt"), weights_only=True)
            for c in (whole, stopped))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "resume exactly"
    histories = [[{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(c["progress"]
                                                                                    ["history"])]
                 for c in (a, b)]
    assert histories[0] == histories[1], "the resumed epoch must keep its partial training loss"


def test_the_schedule_runs_through_every_epoch_and_resumes_exactly(monkeypatch, data, cfg,
                                                                    tmp_path):
    # All the configured epochs, each of 2 steps on 16 training rows: start_epoch, an epoch or a
    # plateau scheduler act at every boundary. Stopped at the middle epoch's end and resumed, the
    # run must end where the one never stopped did.
    tiny = {**data, **{s: cut(data[s], 16) for s in ("train", "val", "test")}}
    monkeypatch.setattr(train, "build_data", lambda cfg: tiny)
    whole, stopped = (replace(cfg, checkpoint_dir=str(tmp_path / d / "ck"),
                              output_dir=str(tmp_path / d / "out")) for d in ("whole", "stopped"))
    batch = ["--batch-size", str(max(1, 8 // cfg.grad_accum_steps))]
    train.main(flags(whole, *batch, epochs=cfg.epochs))
    real, calls = train.evaluate, []

    def signal_at_the_middle(*args, **kwargs):  # the epoch's validation: last.pt at its end
        calls.append(1)
        if len(calls) == max(1, cfg.epochs // 2):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate", signal_at_the_middle)
        with pytest.raises(SystemExit):
            train.main(flags(stopped, *batch, epochs=cfg.epochs))
    train.main(flags(stopped, *batch, "--resume", epochs=cfg.epochs))
    a, b = (torch.load(os.path.join(c.checkpoint_dir, "last.pt"), weights_only=True)
            for c in (whole, stopped))
    assert a["trainable"] == b["trainable"], "what start_epoch froze must resume as it was"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), \
        "stopped at an epoch's end and resumed, the run must end with the same weights"
    steps = [[{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(c["progress"]
                                                                                ["history"])]
             for c in (a, b)]
    assert steps[0] == steps[1], "and the same history, rates included, epoch by epoch"


# ------------------------------------------------------------------------ the table pipeline

@pytest.fixture
def table(full_data):
    if "preprocess" not in full_data["meta"]:
        pytest.skip("build_data is your own: the table pipeline is not in use")
    return full_data


def test_splits_are_disjoint_stratified_and_reproducible(table, cfg):
    y = np.repeat([0, 1, 2], [40, 60, 100])
    split = replace(cfg, val_fraction=0.2, test_fraction=0.1, seed=5)
    parts = train.split_indices(y, len(y), split, ["a", "b", "c"])
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(200))  # a partition
    for name, share in (("test", 0.1), ("val", 0.2)):
        expected = [round(n * share) for n in (40, 60, 100)]
        assert np.bincount(y[parts[name]]).tolist() == expected, name
    again = train.split_indices(y, len(y), split, ["a", "b", "c"])
    other = train.split_indices(y, len(y), replace(split, seed=6), ["a", "b", "c"])
    assert all(np.array_equal(again[k], parts[k]) for k in parts)
    assert not np.array_equal(other["test"], parts["test"])


def test_inputs_are_standardized_by_the_training_rows_alone(table):
    meta, x = table["meta"], table["train"][0]
    numbers = torch.tensor(["=" not in n and "was missing" not in n for n in meta["inputs"]])
    zeros = torch.zeros(int(numbers.sum()))
    torch.testing.assert_close(x[:, numbers].mean(0), zeros, atol=1e-4, rtol=0)
    held_out = torch.cat([table["val"][0], table["test"][0]])[:, numbers]
    assert not torch.allclose(held_out.mean(0), zeros, atol=1e-3), \
        "normalization statistics must come from the training rows alone"


def test_raw_rows_become_the_inputs_the_run_trained_on(table, cfg):
    raw = train.load_table(cfg)
    rows = table["rows"]["val"][:20]
    records = [raw[int(i)] for i in rows]  # dicts, cells as the file has them
    inputs, unseen = train.rows_to_inputs(records, table["meta"])
    torch.testing.assert_close(inputs, table["val"][0][:20])
    assert not any(unseen.values())


# ------------------------------------------------------------------------ the config

def test_every_field_is_a_flag_in_either_spelling_and_documented():
    cfg = train.parse_config(["--batch-size", "8", "--learning_rate=0.5", "--use-amp",
                              "--no-resume"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.use_amp, cfg.resume) == (8, 0.5, True, False)
    assert train.parse_config([]) == train.TrainingConfig()
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])


def test_list_tuple_and_optional_fields_are_flags_and_other_types_are_refused():
    @dataclass
    class Config:
        hidden: tuple[int, ...] = (32, 32)
        names: list[str] = field(default_factory=list)
        limit: int | None = None

    assert train.parse_config([], Config) == Config()
    got = train.parse_config(["--hidden", "64", "16", "--names", "a", "b", "--limit", "3"], Config)
    assert got == Config(hidden=(64, 16), names=["a", "b"], limit=3)
    assert train.parse_config(["--limit", "none"], Config).limit is None

    @dataclass
    class Unsupported:
        table: dict = field(default_factory=dict)

    with pytest.raises(SystemExit, match="cannot be a flag"):
        train.parse_config([], Unsupported)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
