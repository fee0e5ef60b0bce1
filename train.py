"""A PyTorch training loop you can trust and copy.

`python train.py` trains a small MLP on Iris, offline, in seconds: it keeps the checkpoint of the
best validation metric, tests it once on rows it never saw, and writes the history, a plot, a test
report and a run note that reads the curves. Every TrainingConfig field is a flag (--help).

Read it top to bottom. The core path comes first and holds all it calls: the config, the four
seams marked SWAP HERE (data, model, objective, optimizer), batches, the step and the epoch,
checkpoints and resume, main, fit and the report, then the machinery they use (files, random
streams, torchrun, signals). Optional blocks follow, each deletable whole once you do not need it
(README, "make it yours"): the built-in objectives, the table pipeline (the default data and
--predict's rows), the run note and the plot, and the live view (progress bar, TensorBoard).
"""

import argparse
import gc
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
import typing
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("train")


# ============================================================================= config

@dataclass
class TrainingConfig:
    # data: the table pipeline reads these; a data seam of your own may ignore them
    dataset: str = "scikit-learn/iris"  # hub id, or a local .csv, .json, .jsonl or .parquet file
    label_column: str = "Species"  # the column to predict
    feature_columns: str = ""  # comma-separated inputs; empty: all but the label and id columns
    categorical_columns: str = ""  # comma-separated number columns to one-hot as codes
    max_categories: int = 20  # one-hot slots per text column; rarer values share "other"
    missing: Literal["impute", "error"] = "impute"  # blank numbers: the training median, or refuse
    task: Literal["auto", "classification", "regression"] = "auto"  # auto: many numbers regress
    class_weight: Literal["none", "balanced"] = "none"  # balanced: a row weighs 1 / its class size
    datasets_dir: str = "datasets"  # dataset cache: once a dataset is here, runs are offline
    val_fraction: float = 0.15  # share of each class held out to pick the best epoch
    test_fraction: float = 0.15  # share of each class held out for one final test
    seed: int = 42  # seeds the splits, the initial weights and the shuffling
    # objective: what is optimized, and which validation metric picks best_model.pt
    best_metric: str = "val_loss"  # the history.json key that picks the best epoch and early-stops
    mode: Literal["auto", "min", "max"] = "auto"  # auto: as the objective declares (val_loss: min)
    label_smoothing: float = 0.1  # classification: train toward 0.9 so confidence stays honest
    # optimization
    epochs: int = 50  # passes over the training split
    batch_size: int = 0  # rows per step and rank; 0: from the data's size, 16 to 512
    learning_rate: float = 1e-2  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    scheduler: Literal["cosine", "none"] = "cosine"  # cosine: linear warmup, cosine decay to zero
    warmup_fraction: float = 0.05  # share of all steps spent warming up (cosine)
    grad_clip: float = 1.0  # largest gradient norm allowed; 0 turns clipping off
    early_stopping_patience: int = 0  # stop after this many epochs without a better best_metric
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # hardware
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU), or a device such as "cuda:1"
    use_amp: bool = False  # mixed precision through torch.autocast
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"  # auto: bfloat16 where supported
    loader: Literal["auto", "memory", "dataloader"] = "auto"  # memory: tensors on the device
    num_workers: int = 0  # DataLoader worker processes
    compile: bool = False  # torch.compile the model: slower start, faster steps on big models
    # outputs
    checkpoint_dir: str = "checkpoints"  # best_model.pt and last.pt
    output_dir: str = "training-loop"  # history.json, loss_curve.png, test_report.json, run_note.md
    resume: bool = False  # go on from checkpoint_dir/last.pt, at the step it holds
    save_every_steps: int = 1000  # also write last.pt every N steps into an epoch; 0: never
    log_every: int = 10  # log every N epochs (and the first and the last)
    tensorboard: bool = False  # also log to runs/ (needs: pip install tensorboard)
    # instead of training
    predict: str | None = None  # rows "5.1,3.5,1.4,0.2;6.7,3,5.2,2.3" or a .csv: print predictions


# Where and how a run executes, not what it computes: --resume takes these from the command
# line. Every other field, one you add included, comes from last.pt and may not change.
RUNTIME_FIELDS = {"device", "loader", "num_workers", "compile", "checkpoint_dir", "output_dir",
                  "datasets_dir", "save_every_steps", "log_every", "tensorboard", "resume",
                  "predict"}


def fail(message: str):
    """Stop with one line on stderr and exit status 1: bad input is not a crash. Under torchrun
    every rank meets the same bad input, and rank 0 alone says it."""
    raise SystemExit(1 if os.environ.get("RANK", "0") != "0" else f"error: {message}")


def parse_config(argv: list[str] | None = None, config_class=TrainingConfig) -> TrainingConfig:
    """Every field is a flag (`batch_size`: `--batch-size` or `--batch_size`), its comment the
    help. A field may be bool, int, float, str, a Literal of str, X | None ("none": None),
    list[X] or tuple[X, ...]."""
    source = Path(__file__).read_text() if Path(__file__).is_file() else ""  # frozen: no help
    body = source.split(f"class {config_class.__name__}:", 1)[-1].split("\n\n\n", 1)[0]
    docs = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", body, re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = lambda message: fail(message.replace("argument ", "", 1))  # one line, no usage
    kinds, scalars = typing.get_type_hints(config_class), (int, float, str)
    for f in fields(config_class):
        kind, args = kinds[f.name], typing.get_args(kinds[f.name])
        sequence = typing.get_origin(kind) in (list, tuple) and set(args) <= {*args[:1], ...}
        if kind is bool:
            options = {"action": argparse.BooleanOptionalAction}
        elif kind in scalars:
            options = {"type": kind, "metavar": kind.__name__.upper()}
        elif typing.get_origin(kind) is Literal:
            options = {"choices": args}
        elif len(args) == 2 and type(None) in args and args[0] in scalars:
            options = {"type": lambda text, t=args[0]: None if text.lower() == "none" else t(text)}
        elif sequence and args and args[0] in scalars:
            options = {"type": args[0], "nargs": "*"}
        else:
            fail(f"{config_class.__name__}.{f.name}: a field of type {kind} cannot be a flag; use "
                 "bool, int, float, str, Literal, X | None, list[X] or tuple[X, ...] of those")
        default = f.default if f.default_factory is MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, default=default, help=docs.get(f.name, ""), **options)
    argv = sys.argv[1:] if argv is None else argv
    argv = [re.sub(r"^--[^=]+", lambda m: m[0].replace("_", "-"), a) for a in argv]
    for i in range(len(argv) - 1, 0, -1):  # "--predict -1.5,2": argparse would take it for a flag
        if argv[i - 1] == "--predict" and re.match(r"-[\d.]", argv[i]):
            argv[i - 1:i + 1] = [f"--predict={argv[i]}"]
    values = vars(parser.parse_args(argv))
    tuples = {k for k in values if typing.get_origin(kinds[k]) is tuple}
    return config_class(**{k: tuple(v) if k in tuples else v for k, v in values.items()})


def given_fields(argv: list[str]) -> set[str]:
    """The fields named on the command line: given, which is not the same as truthy."""
    names = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    known = TrainingConfig.__dataclass_fields__
    return {n[3:] if n.startswith("no_") and n[3:] in known else n for n in names}


def validate_config(cfg: TrainingConfig) -> None:
    """Refuse impossible values before anything is read or written."""
    rules = [
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (0 <= cfg.seed < 2**32, "--seed must be in [0, 2**32)"),
        (0 <= cfg.batch_size < 2**31, "--batch-size must be at least 1 (0: from the data's size)"),
        (cfg.learning_rate > 0, "--learning-rate must be above 0"),
        (cfg.weight_decay >= 0, "--weight-decay must be 0 or more"),
        (0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (0 <= cfg.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)"),
        (cfg.grad_clip >= 0, "--grad-clip must be 0 (off) or more"),
        (cfg.early_stopping_patience >= 0, "--early-stopping-patience must be 0 (off) or more"),
        (min(cfg.grad_accum_steps, cfg.log_every, cfg.max_categories) >= 1,
         "--grad-accum-steps, --log-every and --max-categories must be at least 1"),
        (min(cfg.num_workers, cfg.save_every_steps) >= 0,
         "--num-workers and --save-every-steps must be 0 or more"),
        (min(cfg.val_fraction, cfg.test_fraction) > 0 and cfg.val_fraction + cfg.test_fraction < 1,
         "--val-fraction and --test-fraction must be above 0, and their sum below 1"),
        (cfg.predict is None or cfg.predict.strip() != "", "--predict was given an empty value"),
    ]
    problems = [message for ok, message in rules if not ok]
    if problems:
        fail("; ".join(problems))


# ============================================================================= the four seams
# SWAP HERE: data, model, objective, optimizer. Replace a function's body and nothing else needs
# an edit: resume, checkpoints, torchrun, the report, the run note and test.py all go through them.

def build_data(cfg: TrainingConfig) -> dict:
    """SWAP HERE for your data. Returns {"train": split, "val": split, "test": split, "meta": dict}.

    A split is (inputs, targets), or a torch Dataset of (input, target) pairs: table rows, images
    N x C x H x W, sequences. Inputs and targets are each a tensor, or a tuple, list or dict of
    tensors, nested (token ids and an attention mask), rows first; the model is given the inputs
    as they are. A Dataset's `collate_fn` attribute, if it has one, makes its batches (padding
    sequences to one length); a Subset of it (random_split) uses it too. Random augmentation in a
    Dataset is fine: each training batch draws from a seed of its own (the run's seed, the epoch
    and the batch's first row), so it is new every epoch, the same with any --num-workers, and
    the same after --resume. Keep the three splits apart; fit every statistic (normalization, a
    vocabulary) on the training split alone.
    "meta" is what the model, the objective and prediction need, in tensors and plain values
    (a vocabulary's size, the classes): every checkpoint holds it (loaded with weights_only), and
    --resume refuses a checkpoint whose meta differs, so a fingerprint of your data belongs in
    it. The built-in objectives read "task" ("classification" or "regression"), "classes"
    (names, in output order), "class_counts" (training rows per class: balanced weights, the run
    note's base rates) and a regression's "target_mean" and "target_std". The default reads any
    table through Hugging Face datasets: see "the table pipeline".
    """
    return table_data(cfg)


def predict_inputs(text: str, meta: dict, cfg: TrainingConfig) -> tuple:
    """SWAP HERE, with build_data, for --predict on your data: cfg.predict's text to (inputs for
    the model, as a split's inputs are, and a label for each input in the printout). meta and cfg
    are the checkpoint's. Raise ValueError, with a message naming the bad part, for bad text. The
    default reads raw table rows: see table_predict_inputs."""
    if "preprocess" not in meta:
        fail("--predict reads raw table rows, and best_model.pt was trained on data of your own: "
             "make predict_inputs read yours (or load it with model_from_checkpoint)")
    return table_predict_inputs(text, meta)


class TinyMLP(nn.Module):
    """Two hidden layers; raw outputs. No dropout: on six tables measured it never helped, and on
    a regression it adds noise that evaluation takes away again."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(in_shape, out_features: int, meta: dict, cfg: TrainingConfig) -> nn.Module:
    """SWAP HERE for your model: training, --resume, --predict and model_from_checkpoint all
    build it here. in_shape is one input's shape ((features,) for a table row, (C, H, W) for an
    image; for nested inputs, the same structure of shapes); out_features is what the objective
    asks for; meta is build_data's (a vocabulary's size). Hyperparameters go in TrainingConfig.
    Return raw outputs: the objective applies the softmax or the sigmoid."""
    return TinyMLP(math.prod(in_shape), out_features)


@dataclass
class Objective:
    """All that knows what the outputs mean: the loop, evaluation, the report, the run note and
    --predict read the outputs only through these."""
    outputs: int  # model outputs a row
    loss: typing.Callable  # loss(out, y): the training loss, a mean over the batch's rows
    row_losses: typing.Callable  # row_losses(out, y): each held-out row's loss (mean: val_loss)
    metrics: typing.Callable  # metrics(out, y): {name: value}, from a whole split's outputs at once
    describe: typing.Callable  # describe(out): each row's prediction in words
    baseline: torch.Tensor | None = None  # an output row that predicts the training base rates
    # {metric: True if higher is better}, for each metric --mode auto may select by; never guessed
    higher_is_better: dict = field(default_factory=dict)


def build_objective(meta: dict, cfg: TrainingConfig) -> Objective:
    """SWAP HERE for your objective. Under torchrun, metrics and row_losses see every rank's rows.
    cfg.best_metric picks the best checkpoint: val_loss, or "val_" and a key of metrics. The
    defaults: see "built-in objectives"."""
    if meta["task"] == "regression":
        return regression_objective(meta)
    return classification_objective(meta, cfg)


def lower_is_better(cfg: TrainingConfig, objective: Objective) -> tuple[bool, str]:
    """Which way cfg.best_metric is better, and why: --mode, or what the objective declares (a
    metric's name says nothing: "error" may be good news, "score" may be a loss)."""
    if cfg.mode != "auto":
        return cfg.mode == "min", f"--mode {cfg.mode}"
    if cfg.best_metric == "val_loss":
        return True, "a loss"
    key, higher = cfg.best_metric.removeprefix("val_"), objective.higher_is_better
    if cfg.best_metric != f"val_{key}" or key not in higher:
        declared = ", ".join(["val_loss", *(f"val_{k}" for k in higher)])
        fail(f"--best-metric {cfg.best_metric}: the objective declares no direction for it (it "
             f"does for {declared}); pass --mode min or --mode max")
    return not higher[key], "as the objective declares"


def build_optimizer(model: nn.Module, cfg: TrainingConfig, steps_per_epoch: int) -> tuple:
    """SWAP HERE for your optimizer and schedule. Returns (optimizer, scheduler or None, when it
    steps): "step", after every optimizer step; "epoch", after every epoch; "metric", after every
    epoch, given cfg.best_metric's value (ReduceLROnPlateau). --resume restores both through their
    state_dict, so any torch optimizer and scheduler works."""
    # The fused kernel updates every parameter in one call: about 2x the default's speed on CPU.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, fused=fused)
    if cfg.scheduler == "none":
        return optimizer, None, "step"
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_fraction * total)

    def factor(step: int) -> float:  # linear warmup, then cosine decay to zero at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"


def check_metric_mode(scheduler, when: str, cfg: TrainingConfig, lower: bool) -> None:
    """A scheduler steps at a time the loop knows, and one stepped on the selection metric reads
    it the run's way: ReduceLROnPlateau's default, mode="min", would halve the rate while an
    accuracy rises."""
    mode, wanted = getattr(scheduler, "mode", None), "min" if lower else "max"
    if when not in ("step", "epoch", "metric"):
        fail(f"build_optimizer's scheduler steps at {when!r}: use step, epoch or metric")
    if when == "metric" and mode in ("min", "max") and mode != wanted:
        fail(f"build_optimizer's scheduler steps on {cfg.best_metric} in mode {mode!r}, and the "
             f"run keeps the epoch where it is {'lower' if lower else 'higher'}: give it "
             f"mode={wanted!r}")


def start_epoch(epoch: int, model: nn.Module, optimizer, scheduler, cfg: TrainingConfig) -> None:
    """SWAP HERE, with build_optimizer, to change what trains as an epoch (1, 2, ...) starts: freeze
    or unfreeze (requires_grad), or set a parameter group's rate (its "lr"; under a scheduler that
    sets the rate, its base_lrs). last.pt keeps the parameters' requires_grad and the optimizer's
    and scheduler's state, so --resume goes on with the same; it runs once an epoch, not again
    for an epoch resumed part-way. Add no parameter group here: --resume rebuilds the optimizer
    by build_optimizer, so every group belongs there (frozen ones included)."""
# ============================================================================= batches

def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def tree_map(fn, obj):
    """fn applied to each tensor of a batch: a tensor, or a tuple, list or dict of them, nested."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, v) for v in obj)
    return obj


def rows_of(obj, index):
    """The rows `index` (an int, a slice or a tensor of row numbers) of every tensor in obj."""
    return tree_map(lambda t: t[index], obj)


def tensors_in(obj) -> list[torch.Tensor]:
    found = []
    tree_map(found.append, obj)
    return found


def rows_in(obj) -> int:
    """A batch's rows, read from it: the length of its first tensor."""
    return len(tensors_in(obj)[0])


def cat_rows(parts: list):
    """Batches of one structure as one: each tensor concatenated with its namesakes, row-wise."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: cat_rows([p[k] for p in parts]) for k in first}
    return type(first)(cat_rows(list(p)) for p in zip(*parts))


def split_rows(split) -> int:
    return rows_in(split) if isinstance(split, tuple) else len(split)


def input_shape(split):
    """One input's shape (nested inputs: the same structure of shapes), as build_model gets it."""
    one = rows_of(split[0], 0) if isinstance(split, tuple) else split[0][0]
    return tree_map(lambda t: tuple(t.shape), one)


def shard_rows(n: int, rank: int = 0, world: int = 1, shuffle_seed: int | None = None):
    """This rank's rows, dealt as DistributedSampler deals them. Shuffled: one permutation of
    shuffle_seed (seed + epoch) on every rank, padded so that every rank takes as many steps. In
    order (evaluation): every world-th row."""
    if shuffle_seed is None:
        return torch.arange(rank, n, world)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    return torch.cat([order, order[: math.ceil(n / world) * world - n]])[rank::world]


def batch_rows(rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`rows` cut into batches; a last batch of one row joins the one before it: BatchNorm cannot
    train on a single row (and its statistics would be that row's alone)."""
    parts = list(rows.split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def iterate_batches(split, batch_size: int, rows: torch.Tensor | None = None,
                    device: torch.device | None = None, num_workers: int = 0, seed=None):
    """(inputs, targets) batches of a split, in the order of `rows` (all, in order, by default).
    Tensors on the device are cut by indexing, a batch at a time; anything else comes through a
    DataLoader (see fetch_batch), whose pinned memory lets the copy to a GPU overlap compute.
    seed (a tuple of ints; training passes one) seeds each batch's random draws, with its first
    row."""
    rows = torch.arange(split_rows(split)) if rows is None else rows
    on = tensors_in(split)[0].device if isinstance(split, tuple) else None
    if on is not None and (device is None or on == device):
        for batch in batch_rows(rows.to(on), batch_size):
            yield rows_of(split, batch)
        return
    from torch.utils.data import DataLoader

    device = device or torch.device("cpu")
    jobs = [(None if seed is None else (*seed, part[0]), part)  # row numbers pickle small
            for part in (part.tolist() for part in batch_rows(rows, batch_size))]
    # The workers' own seeds come from a private generator: drawn from the global stream, they
    # would shift the model's random numbers. A batch's draws are seeded in fetch_batch.
    loader = DataLoader(jobs, batch_size=None, collate_fn=partial(fetch_batch, split),
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())
    for (key, _), batch in zip(jobs, loader):
        if key is not None:  # Python's and NumPy's streams here, after a batch, whichever process
            seed_streams((*key, -1), torch_too=False)  # fetched it (saving them costs 0.1 ms)
        yield tree_map(lambda t: t.to(device, non_blocking=True), batch)


def fetch_batch(split, job: tuple):
    """One batch, in this process or a DataLoader worker: the rows of a split of tensors, or a
    Dataset's items collated by its collate_fn. A training batch's random draws (augmentation)
    come from streams seeded by the job's key, its place in the run alone; torch's stream, which
    the model's dropout draws from in this process, is put back after."""
    key, rows = job
    if isinstance(split, tuple):
        return rows_of(split, torch.tensor(rows))
    model_stream = None
    if key is not None:
        model_stream = torch.get_rng_state()
        seed_streams(key)
    try:
        getitems = getattr(split, "__getitems__", None)  # as torch's own fetcher reads a Dataset
        return collate_of(split)(getitems(rows) if getitems else [split[i] for i in rows])
    finally:
        if key is not None:  # held-out splits are not seeded: random draws there show as such
            torch.set_rng_state(model_stream)


def collate_of(split):
    """The Dataset's collate_fn (a Subset's: of the dataset it cuts), or torch's default_collate."""
    from torch.utils.data import Subset, default_collate

    while isinstance(split, Subset) and not hasattr(split, "collate_fn"):
        split = split.dataset
    return getattr(split, "collate_fn", None) or default_collate


# ============================================================================= step and epoch

def train_one_epoch(model, batches, optimizer, loss_fn, scheduler=None, scaler=None,
                    amp_dtype=None, grad_clip: float = 0.0, accum_steps: int = 1,
                    tally: dict | None = None, after_step=None, count=None) -> dict | None:
    """One pass over `batches`, minimizing loss_fn(outputs, targets) (the objective's loss).
    Returns {"loss": averaged over rows (and ranks), not batches}; with clipping on, also the
    gradient norm before clipping ("grad_norm", "grad_norm_max": mean and max over the steps)
    and "clipped", the share of steps it cut.

    The optimizer steps every accum_steps micro-batches, and at the end; under DDP only that last
    backward all-reduces. A scheduler given here steps after every optimizer step. A resumed epoch
    passes the tally it saved ({"loss_sum", "rows", "steps", "norms"}), its batches starting where
    it stopped. after_step(tally) runs after every optimizer step but the epoch's last: if it
    returns True, the epoch stops there and this returns None. count: how many batches there are
    (len(batches) by default; give it for a generator), so that the last is known as it comes."""
    model.train()
    device = next(model.parameters()).device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    tally = tally or {"loss_sum": torch.zeros(()), "rows": 0, "steps": 0, "norms": torch.zeros(0)}
    # Sums stay on the device, so no step waits for the host; a norm slot a step, grown by doubling.
    loss_sum = tally["loss_sum"].to(device, copy=True)
    norms = torch.cat([tally["norms"][:tally["steps"]], torch.zeros(1024)]).to(device)
    rows, steps, count = tally["rows"], tally["steps"], len(batches) if count is None else count
    for i, (xb, yb) in enumerate(batches):
        if i % accum_steps == 0:
            optimizer.zero_grad(set_to_none=True)
        last = i == count - 1
        step_now = last or (i + 1) % accum_steps == 0
        with nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, amp_dtype):
                loss = loss_fn(model(xb), yb)
            scaler.scale(loss / accum_steps).backward()  # the scaler is a no-op unless float16
        n = rows_in(yb)
        loss_sum += loss.detach().float() * n  # detached: the sum keeps no step's graph
        rows += n
        if not step_now:
            continue
        if steps == len(norms):
            norms = torch.cat([norms, torch.zeros_like(norms)])
        if grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            # The norm before clipping, for the run note: free, as clipping computes it anyway.
            norms[steps] = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        steps += 1
        if not last and after_step is not None and after_step(
                {"loss_sum": loss_sum, "rows": rows, "steps": steps, "norms": norms}):
            return None
    total = sum(every_rank(torch.stack([loss_sum.cpu(), torch.tensor(float(rows))]))).double()
    result = {"loss": (total[0] / total[1].clamp_min(1)).item()}
    norms = norms[:steps][torch.isfinite(norms[:steps])]  # float16 steps that overflowed: skipped
    if grad_clip > 0 and len(norms):
        summary = torch.stack([norms.mean(), norms.max(), (norms > grad_clip).float().mean()])
        result.update(zip(("grad_norm", "grad_norm_max", "clipped"), summary.tolist()))
    return result


@torch.inference_mode()
def evaluate(model, batches, objective: Objective, amp_dtype=None) -> tuple:
    """A split's held-out loss and metrics, from all its outputs at once (under DDP, every rank's
    rows: all ranks report the same numbers); also each row's loss, and its target."""
    model.eval()
    device = next(model.parameters()).device
    outputs, targets = [], []
    for xb, yb in batches:  # on the device until the end: no sync a batch
        with autocast(device, amp_dtype):
            outputs.append(tree_map(torch.Tensor.float, model(xb)))
        targets.append(yb)
    gathered = every_rank(tree_map(torch.Tensor.cpu, (cat_rows(outputs), cat_rows(targets))))
    out, y = cat_rows(gathered)
    rows, metrics = objective.row_losses(out, y), objective.metrics(out, y)
    odd = [k for k, v in metrics.items() if not isinstance(v, (int, float, list))]
    if odd:  # a 0-d tensor would be left out of the log, then break the report's JSON
        fail(f"the objective's metric {odd[0]!r} is a {type(metrics[odd[0]]).__name__}, not a "
             "number: return a float (tensor.item())")
    return {"loss": rows.mean().item(), **metrics}, rows, y


# ============================================================================= checkpoints, resume

CHECKPOINT_VERSION = 4  # 4: last.pt holds made_by (issue 27)


@dataclass
class Run:
    """What passes between set_up, fit and report."""
    cfg: TrainingConfig
    device: torch.device
    rank: int  # this process, and how many there are (1 outside torchrun)
    world: int
    amp_dtype: torch.dtype | None
    data: dict  # build_data's; train and val on the device with loader "memory"
    objective: Objective
    lower: bool  # whether a lower cfg.best_metric is better (lower_is_better)
    model: nn.Module  # the model itself, as saved and loaded
    eval_model: nn.Module  # the same, compiled with --compile
    train_model: nn.Module  # the same, in DistributedDataParallel under torchrun
    model_args: dict  # what build_model was given
    optimizer: torch.optim.Optimizer
    scheduler: object  # a torch scheduler, or None
    when: str  # when it steps: "step", "epoch" or "metric"
    scaler: torch.amp.GradScaler
    batches: int  # batches an epoch, on each rank
    progress: dict  # epoch, best, best_epoch, stale, history, run id: what last.pt restores
    tally: dict | None = None  # after a mid-epoch stop: where the next epoch goes on

    @property
    def steps(self) -> int:
        """Optimizer steps an epoch, on each rank."""
        return math.ceil(self.batches / self.cfg.grad_accum_steps)


def path_of(cfg: TrainingConfig, name: str) -> Path:
    return Path(cfg.checkpoint_dir if name.endswith(".pt") else cfg.output_dir) / name


def model_state(run: Run, epoch: int) -> dict:
    """The weights, and all that rebuilding the model and predicting with it need."""
    return {"version": CHECKPOINT_VERSION, "model": run.model.state_dict(), "epoch": epoch,
            "run": run.progress["run"], "model_args": run.model_args, "meta": run.data["meta"],
            "config": asdict(run.cfg)}


def save_last(run: Run, position: dict | None = None) -> None:
    """last.pt: all --resume needs to go on exactly. `position` says where inside an epoch (its
    steps and rows so far, each rank's loss sum, the steps' gradient norms); None at its end."""
    made_by = made_by_names(run)
    save_checkpoint(path_of(run.cfg, "last.pt"), {
        **model_state(run, run.progress["epoch"]), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler else None, "position": position,
        "made_by": made_by, "scaler": run.scaler.state_dict(), "rng": rng_states(),
        "trainable": [parameter.requires_grad for parameter in run.model.parameters()],
        "progress": {**run.progress, "history": json.dumps(run.progress["history"])}})


def made_by_names(run: Run) -> list[str]:
    """What made the optimizer and the scheduler: --resume refuses a last.pt of others."""
    return [type(run.optimizer).__name__, type(run.scheduler).__name__ if run.scheduler else "none"]


def load_checkpoint(path: Path) -> dict:
    try:  # weights_only: a checkpoint is data, never code to run
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{path} does not exist: train first, or point --checkpoint-dir at a run")
    except Exception as e:  # zip, pickle and I/O errors all mean the same here
        fail(f"{path} is not a readable checkpoint (truncated or corrupt?): {first_line(e)}")
    version = checkpoint.get("version") if isinstance(checkpoint, dict) else None
    if version != CHECKPOINT_VERSION:
        fail(f"{path} was not of this train.py (version {version}, not {CHECKPOINT_VERSION})")
    return checkpoint


def config_of(checkpoint: dict) -> TrainingConfig:
    saved, known = checkpoint["config"], TrainingConfig.__dataclass_fields__
    return replace(TrainingConfig(), **{k: saved[k] for k in saved if k in known})


def load_weights(model: nn.Module, checkpoint: dict, path) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as e:
        fail(f"{path} holds weights shaped for another model or data: {first_line(e)}")


def model_from_checkpoint(checkpoint: dict, path="the checkpoint") -> nn.Module:
    """The model a checkpoint holds: build_model as recorded, its weights, eval mode, on the CPU."""
    cfg = config_of(checkpoint)
    model = build_model(**checkpoint["model_args"], meta=checkpoint["meta"], cfg=cfg)
    load_weights(model, checkpoint, path)
    return model.eval()


def digest(obj) -> str:
    """A fingerprint of plain values and tensors."""
    def tensor(t):
        return hashlib.sha256(t.numpy().tobytes()).hexdigest() + str(tuple(t.shape)) + str(t.dtype)

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=tensor).encode()).hexdigest()


def check_same_data(checkpoint: dict, path: Path, meta: dict) -> None:
    """Refuse a checkpoint of a run on other data: meta, the data's own description, differs."""
    if digest(checkpoint["meta"]) != digest(meta):
        fail(f"{path} belongs to a run on other data (rows added, removed or edited, or other data "
             "settings): restore the data, or start a new run with another --checkpoint-dir")


def refuse_overwrite(cfg: TrainingConfig) -> None:
    """A run started without --resume overwrites last.pt and best_model.pt: only those of a
    finished run of this train.py. Another loop's checkpoints (a project this file was copied
    into), or a run stopped part-way, are refused. save_file writes whole files or none, so an
    unreadable one is not ours."""
    for name in ("last.pt", "best_model.pt"):
        path = path_of(cfg, name)
        if not os.path.lexists(path):
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            ours = saved["version"] == CHECKPOINT_VERSION
        except Exception:  # unreadable, or no dict of ours: another program's file
            ours = False
        if not ours:
            fail(f"{path} was not written by this train.py (or by an older one), and a new run "
                 "would overwrite it: move it, or start in another --checkpoint-dir")
        if name == "last.pt":
            progress, last_cfg = saved["progress"], config_of(saved)
            patience = last_cfg.early_stopping_patience
            finished = progress["epoch"] >= last_cfg.epochs or bool(
                patience and progress["stale"] >= patience)
            if not finished or saved["position"] is not None:
                fail(f"{path} holds a run stopped at epoch {progress['epoch']} of "
                     f"{last_cfg.epochs}: go on with --resume, or start afresh in another "
                     "--checkpoint-dir")


def resumed_config(cfg: TrainingConfig, given: set[str], last: dict) -> TrainingConfig:
    """--resume goes on with last.pt's settings: runtime fields from the command line, and a flag
    that would change anything else refused, by name."""
    saved = config_of(last)
    # The dataset may be spelt another way (./data.csv): check_same_data compares its content.
    fixed = sorted(given - RUNTIME_FIELDS - {"dataset"})
    changed = [f"--{k.replace('_', '-')} ({getattr(saved, k)!r} there, {getattr(cfg, k)!r} now)"
               for k in fixed if getattr(saved, k) != getattr(cfg, k)]
    if changed:
        fail(f"--resume goes on with the settings of {path_of(cfg, 'last.pt')}, and cannot change "
             f"{', '.join(changed)}: drop the flag, or start a new run in another --checkpoint-dir")
    return replace(saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS | (given & {"dataset"})})


def restore(run: Run, last: dict) -> None:
    """Restore all that last.pt holds into the run, once it is known to be of this data and of
    the optimizer and scheduler build_optimizer makes now (swapped between a stop and --resume,
    loaded, they would fail or mislead later)."""
    path, best = path_of(run.cfg, "last.pt"), path_of(run.cfg, "best_model.pt")
    check_same_data(last, path, run.data["meta"])
    load_weights(run.model, last, path)
    run.progress = {**last["progress"], "history": json.loads(last["progress"]["history"])}
    if len(last["rng"]) != run.world:
        fail(f"{path} was saved by {len(last['rng'])} process(es), and this run has {run.world}: "
             "go on with as many, or start a new run in another --checkpoint-dir")
    made_by = made_by_names(run)
    groups = [len(state["param_groups"]) for state in (last["optimizer"],
                                                       run.optimizer.state_dict())]
    if last["made_by"] != made_by or groups[0] != groups[1]:
        fail(f"{path} was saved with {' and '.join(last['made_by'])} ({groups[0]} parameter "
             f"group(s)), and build_optimizer makes {' and '.join(made_by)} ({groups[1]}) now: "
             "restore build_optimizer as it was for this run, or start a new run in another "
             "--checkpoint-dir")
    try:
        run.optimizer.load_state_dict(last["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(last["scheduler"])
        run.scaler.load_state_dict(last["scaler"])
        restore_rng_states(last["rng"][run.rank])
        for parameter, trains in zip(run.model.parameters(), last["trainable"], strict=True):
            parameter.requires_grad_(trains)  # as start_epoch left them
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        fail(f"{path} cannot be resumed (incomplete, or of another optimizer): {first_line(e)}")
    if run.progress["best_epoch"] and not best.is_file():
        fail(f"{best} is missing (moved or deleted?), and the run in {path} needs it: put it back, "
             "or start a new run with another --checkpoint-dir")
    position = last["position"]
    if position is not None:
        run.tally = {**position, "loss_sum": position["loss_sum"][run.rank]}
    at = f"epoch {position['epoch']}, step {position['steps']} of {run.steps}" if position else \
        f"the end of epoch {run.progress['epoch']}"
    log.info("resumed from %s at %s", path, at)


# ============================================================================= main: a run

def main(argv: list[str] | None = None) -> dict:
    """Parse, set up, fit, report. Returns what a caller may check: the best epoch, the test
    report, the diagnosis, the history and the files written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # no-op if set up
    log.setLevel(logging.INFO)
    validate_config(cfg)
    with signals_caught() as stop:
        if cfg.predict is not None:  # given, even if empty: never "not given, so train"
            return {"predictions": predict_from_cli(cfg)}
        last = None
        if cfg.resume and path_of(cfg, "last.pt").is_file():
            last = load_checkpoint(path_of(cfg, "last.pt"))
            cfg = resumed_config(cfg, given_fields(argv), last)
        with distributed(cfg) as (device, rank, world), one_run_per_folder(cfg, rank):
            run = set_up(cfg, device, rank, world, last)
            last_rows = fit(run, stop, argv)
            return report(run, last_rows)


def set_up(cfg: TrainingConfig, device: torch.device, rank: int = 0, world: int = 1,
           last: dict | None = None) -> Run:
    """Data, objective, model and optimizer; progress from scratch, or from last.pt (--resume)."""
    if rank != 0:
        log.setLevel(logging.ERROR)  # one voice: rank 0 logs, writes and plots
    amp_dtype = resolve_amp_dtype(cfg, device)
    if rank == 0:
        check_writable(Path(cfg.output_dir))  # fail before anything is written
        if not cfg.resume:
            refuse_overwrite(cfg)
    for seed in (random.seed, np.random.seed, torch.manual_seed):  # torch's seeds CUDA too
        seed(cfg.seed + rank)  # DDP copies rank 0's initial weights; the offset varies the rest
    if rank > 0:
        barrier()  # rank 0 builds the dataset caches first; the others then read them
    data = build_data(cfg)
    if rank == 0:
        barrier()
    check_storable(data["meta"])
    # A batch that grows with the data: 16 rows up to ~1,500 training rows, doubling to 512 at
    # ~25,000: steps many enough to learn a small table, few enough to be quick on a big one.
    n_train = split_rows(data["train"])
    batch = cfg.batch_size or int(np.clip(2 ** round(math.log2(max(n_train, 1) / 64)), 16, 512))
    cfg = replace(cfg, batch_size=batch, loader=choose_loader(cfg, device, data))
    if cfg.loader == "memory":  # the data goes to the device once, not batch by batch
        data = {**data, **{s: tree_map(lambda t: t.to(device), data[s]) for s in ("train", "val")}}
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~8x float32's speed on Ampere+
    objective = build_objective(data["meta"], cfg)
    lower, why = lower_is_better(cfg, objective)  # refused now, not after an epoch, if undeclared
    model_args = {"in_shape": input_shape(data["train"]), "out_features": objective.outputs}
    model = build_model(**model_args, meta=data["meta"], cfg=cfg).to(device)
    eval_model, train_model = wrap_model(model, cfg, device, world)
    batches = len(batch_rows(torch.arange(math.ceil(n_train / world)), batch))
    optimizer, scheduler, when = build_optimizer(model, cfg,
                                                 math.ceil(batches / cfg.grad_accum_steps))
    check_metric_mode(scheduler, when, cfg, lower)
    # float16 needs a GradScaler, or small gradients underflow to zero; bfloat16 has the range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run_id = every_rank(f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}")[0]  # rank 0's
    progress = {"epoch": 0, "best": None, "best_epoch": 0, "stale": 0, "history": [],
                "run": run_id, "reference": None}
    run = Run(cfg, device, rank, world, amp_dtype, data, objective, lower, model, eval_model,
              train_model, model_args, optimizer, scheduler, when, scaler, batches, progress)
    if last is not None:
        restore(run, last)
    elif cfg.resume:
        log.info("resume: no %s yet, starting fresh", path_of(cfg, "last.pt"))
    sizes = " / ".join(f"{split_rows(data[s])} {s}" for s in ("train", "val", "test"))
    ddp = " (torchrun DDP)" if world > 1 else ""
    log.info("data: %s; %s, %d outputs; loader %s; device %s%s, amp %s; %d parameters", sizes,
             data["meta"].get("task", "?"), objective.outputs, cfg.loader, device, ddp,
             amp_dtype or "off", sum(p.numel() for p in model.parameters()))
    log.info("batch %d x %d accumulation x %d rank(s); best by %s (%s is better: %s)", batch,
             cfg.grad_accum_steps, world, cfg.best_metric, "lower" if lower else "higher", why)
    return run


def split_batches(run: Run, split: str, epoch: int | None = None, start: int = 0):
    """This rank's pass over a split: shuffled for an epoch, in order for evaluation (None). A
    resumed epoch starts `start` rows into this rank's share: nothing replayed or skipped."""
    cfg, seed = run.cfg, None if epoch is None else run.cfg.seed + epoch
    rows = shard_rows(split_rows(run.data[split]), run.rank, run.world, seed)[start:]
    key = None if epoch is None else (cfg.seed, epoch, run.rank)  # seeds a training batch's draws
    return iterate_batches(run.data[split], cfg.batch_size, rows, run.device, cfg.num_workers, key)


# last.pt and history.json are written at an epoch's end when this many seconds have passed since
# they last were, and always when the run ends or stops: an epoch of Iris takes 10 ms, and writing
# both after every one of them cost a quarter of its run. A kill loses a second; resume is exact.
SAVE_SECONDS = 1.0
# Under DDP, how often (in steps) the ranks compare stop flags: a small collective, not one a step.
STOP_CHECK_STEPS = 10


def fit(run: Run, stop: dict, argv: list[str]) -> torch.Tensor | None:
    """The epoch loop: train, validate, keep the best, save, stop. Ends after cfg.epochs, on early
    stopping, or on a signal: then last.pt holds that very step, and the exit status is 128 + the
    signal. Returns the last epoch's per-row validation losses (None if no epoch ran)."""
    cfg, progress, accum = run.cfg, run.progress, run.cfg.grad_accum_steps
    every = cfg.save_every_steps
    last_rows, saved_at = None, 0.0
    trainable = [parameter.requires_grad for parameter in run.model.parameters()]
    keep_reference = extra("reference_epoch")  # the run note compares the end with that epoch

    def after_step(tally: dict) -> bool:  # inside an epoch: save every N steps, and at a stop
        # A signal may reach the ranks a step apart: they agree every STOP_CHECK_STEPS steps.
        check = run.world == 1 or tally["steps"] % STOP_CHECK_STEPS == 0
        stopping = check and stop_agreed(stop, run.world)
        if stopping:
            stop["at"] = f"epoch {epoch}, step {tally['steps']} of {run.steps}"
        if stopping or (every and tally["steps"] % every == 0):
            # each rank's own loss sum: gathered, they keep the epoch's final sum exact
            save_last(run, {"epoch": epoch, "steps": tally["steps"], "rows": tally["rows"],
                            "norms": tally["norms"][:tally["steps"]].cpu(),
                            "loss_sum": every_rank(tally["loss_sum"].cpu())})
        return stopping

    live = extra("live_view")  # the progress bar and TensorBoard: deleted, the log alone
    if live is None and cfg.tensorboard:
        log.warning("--tensorboard needs the live view block, deleted from this train.py")
    stop["loop"] = True  # a signal now stops after the current step, and saves it
    with live(run) if live else nullcontext(lambda entry: None) as show:
        for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
            patience = cfg.early_stopping_patience
            if patience and progress["stale"] >= patience:
                log.info("early stop: %s not better in %d epochs", cfg.best_metric, patience)
                break
            # train
            started, tally, run.tally = time.perf_counter(), run.tally, None
            if tally is None:  # an epoch resumed part-way began before the stop: last.pt holds it
                start_epoch(epoch, run.model, run.optimizer, run.scheduler, cfg)
            trainable = follow_trainable(run, epoch, trainable)
            done = tally["steps"] * accum if tally else 0
            batches = split_batches(run, "train", epoch, tally["rows"] if tally else 0)
            trained = train_one_epoch(
                run.train_model, batches, run.optimizer, run.objective.loss,
                run.scheduler if run.when == "step" else None, run.scaler, run.amp_dtype,
                cfg.grad_clip, accum, tally, after_step, count=run.batches - done)
            if trained is None:
                break  # stopped mid-epoch, and after_step wrote last.pt at that very step
            # validate
            val, last_rows, _ = evaluate(run.eval_model, split_batches(run, "val"), run.objective,
                                         run.amp_dtype)
            for name, value in (("training", trained["loss"]), ("validation", val["loss"])):
                if not math.isfinite(value):
                    kept = f"holds epoch {progress['best_epoch']}" if progress["best_epoch"] else \
                        "is not written"
                    fail(f"epoch {epoch}: the {name} loss is {value}. Likely causes: a learning "
                         "rate too high (lower --learning-rate), float16 overflow (use --amp-dtype "
                         f"bfloat16), or extreme values in the data. This epoch is not saved; "
                         f"best_model.pt {kept}")
            metrics = {f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))}
            if cfg.best_metric not in metrics:  # not train_loss, lr or seconds: a held-out metric
                fail(f"--best-metric {cfg.best_metric} is not a validation metric of this "
                     f"objective, which reports {', '.join(metrics)}")
            rates = [group["lr"] for group in run.optimizer.param_groups]  # lr, lr_1, lr_2, ...
            entry = {"epoch": epoch, "train_loss": trained.pop("loss"), **metrics, **trained,
                     "lr": rates[0], **{f"lr_{i}": rate for i, rate in enumerate(rates[1:], 1)},
                     "seconds": time.perf_counter() - started}
            progress["history"].append(entry)
            progress["epoch"] = epoch
            if run.when == "metric":
                run.scheduler.step(entry[cfg.best_metric])
            elif run.when == "epoch" and run.scheduler is not None:
                run.scheduler.step()
            # select: never the last epoch as such; never NaN (0/0 on this split), unbeatable
            value, best = entry[cfg.best_metric], progress["best"]
            better = best is None or (value < best if run.lower else value > best)
            if better and not math.isnan(value):
                progress.update(best=value, best_epoch=epoch, stale=0)
                state = {**model_state(run, epoch), cfg.best_metric: value}
                save_checkpoint(path_of(cfg, "best_model.pt"), state)
            else:
                progress["stale"] += 1
            if keep_reference and epoch == keep_reference(cfg.epochs):
                progress["reference"] = last_rows.cpu()
            # save: last.pt and history.json, at most every SAVE_SECONDS (always at the end)
            due = time.monotonic() - saved_at >= SAVE_SECONDS
            if run.world > 1:
                due = any(every_rank(due))  # the ranks save together: saving gathers their streams
            if due:
                saved_at = save_progress(run)
            log_epoch(entry, cfg)
            show(entry)
            # stop, if a signal asked
            if stop_agreed(stop, run.world):
                break
    stop["loop"] = False
    if stop.get("at") is not None:  # mid-epoch: after_step wrote last.pt at that very step
        write_json(path_of(cfg, "history.json"), progress["history"])
    elif run.tally is None:  # the epoch's end: not yet saved, maybe
        save_progress(run)
    if stop["signal"] is not None:
        exit_resumable(run, stop, argv)
    return last_rows


def follow_trainable(run: Run, epoch: int, trainable: list) -> list:
    """After start_epoch: a change in which parameters train is logged, and under DDP the model is
    wrapped anew (the old wrapper freed first: its reducer removes its hooks as it goes)."""
    now = [parameter.requires_grad for parameter in run.model.parameters()]
    if now == trainable:
        return now
    if not any(now):
        fail(f"epoch {epoch}: no parameter requires a gradient (did start_epoch freeze them all?)")
    sizes = [(parameter.numel(), parameter.requires_grad) for parameter in run.model.parameters()]
    log.info("epoch %d: %d of %d parameters train", epoch, sum(n for n, t in sizes if t),
             sum(n for n, _ in sizes))
    if run.world > 1:
        run.train_model = None
        gc.collect()
        run.train_model = data_parallel(run.eval_model, run.device, run.world)
    return now


def save_progress(run: Run) -> float:
    save_last(run)
    write_json(path_of(run.cfg, "history.json"), run.progress["history"])
    return time.monotonic()


def log_epoch(entry: dict, cfg: TrainingConfig) -> None:
    """The epoch's log line, every log_every epochs, and the first and the last."""
    if entry["epoch"] in (1, cfg.epochs) or entry["epoch"] % cfg.log_every == 0:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in entry.items() if k.startswith("val_"))
        rates = "/".join(f"{v:.2e}" for k, v in entry.items() if re.fullmatch(r"lr(_\d+)?", k))
        log.info("epoch %3d/%d  train_loss %.4f  %s  lr %s  %.2fs", entry["epoch"], cfg.epochs,
                 entry["train_loss"], scores, rates, entry["seconds"])


def report(run: Run, last_rows: torch.Tensor | None) -> dict:
    """The test split, touched once, by the best checkpoint, after every choice is made; then
    test_report.json, the run note and the plot (if their block is kept) and the log's summary.
    last_rows: the last epoch's per-row validation losses (None: evaluated now)."""
    cfg, progress, objective = run.cfg, run.progress, run.objective
    evaluation = partial(evaluate, run.eval_model, objective=objective, amp_dtype=run.amp_dtype)
    if last_rows is None:  # a finished run resumed: the weights it ended with, evaluated now
        _, last_rows, _ = evaluation(split_batches(run, "val"))
    barrier()  # rank 0's best_model.pt is whole before any rank reads it
    path = path_of(cfg, "best_model.pt")
    if not progress["best_epoch"]:
        fail(f"--best-metric {cfg.best_metric} was NaN at all {progress['epoch']} epochs, so no "
             f"epoch was kept in {path}: the objective cannot compute it on this validation split "
             "(a class missing from it?); choose another --best-metric")
    best = load_checkpoint(path)
    if best["run"] != progress["run"]:
        fail(f"{path} belongs to run {best['run']}, not to this run ({progress['run']}): a failed "
             "write, or another run in this --checkpoint-dir? Nothing was tested")
    check_same_data(best, path, run.data["meta"])
    load_weights(run.model, best, path)
    _, best_rows, y_val = evaluation(split_batches(run, "val"))
    test, _, _ = evaluation(split_batches(run, "test"))
    base = None if objective.baseline is None else objective.row_losses(
        objective.baseline.expand(rows_in(y_val), -1), y_val)
    rows = {"best": best_rows, "last": last_rows, "reference": progress["reference"], "base": base}
    result = {**test, "rows": split_rows(run.data["test"]), "best_epoch": progress["best_epoch"],
              "best_metric": cfg.best_metric, "mode": "min" if run.lower else "max"}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
    log.info("test, best epoch %d: %s on %d rows", progress["best_epoch"], scores, result["rows"])
    title = f"{run.data['meta'].get('title', 'run')}  (run {progress['run']})"
    note = extra("write_run_note")  # the run note and the plot: deleted, neither is written
    result["diagnosis"] = note(run.rank, progress["history"], rows, result, cfg, title) \
        if note else None
    write_json(path_of(cfg, "test_report.json"), result)
    names = ("best_model.pt", "last.pt", "history.json", "loss_curve.png", "test_report.json",
             "run_note.md")
    written = [path for path in (path_of(cfg, name) for name in names) if path.exists()]
    log.info("wrote %s", ", ".join(map(str, written)))
    return {"best_epoch": progress["best_epoch"], "best": progress["best"], "report": result,
            "diagnosis": result["diagnosis"], "history": progress["history"], "files": written}


@torch.inference_mode()
def predict(model, x, batch_size: int = 1024) -> torch.Tensor:
    """Raw model outputs for every row of x (inputs as a split holds them), float32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(tree_map(lambda t: t.to(device), rows_of(x, slice(i, i + batch_size))))
                      .float().cpu() for i in range(0, rows_in(x), batch_size)])


def predict_from_cli(cfg: TrainingConfig) -> list[str]:
    """Print best_model.pt's prediction for each input predict_inputs reads from cfg.predict.
    Trains nothing, writes nothing."""
    path = path_of(cfg, "best_model.pt")
    checkpoint = load_checkpoint(path)
    saved = config_of(checkpoint)
    try:
        inputs, labels = predict_inputs(cfg.predict, checkpoint["meta"], saved)
    except ValueError as e:
        fail(f"--predict {e}")
    outputs = predict(model_from_checkpoint(checkpoint, path), inputs)
    bad = (~torch.isfinite(outputs)).any(dim=-1).nonzero().flatten().tolist()
    if bad:
        fail(f"--predict row {bad[0] + 1}: the model's output is not finite (a huge value?)")
    texts = build_objective(checkpoint["meta"], saved).describe(outputs)
    lines = [f"{label} -> {text}" for label, text in zip(labels, texts)]
    print("\n".join(lines))
    return lines


# ============================================================================= machinery
# What the core path above uses, and a first reading may skip: the device, files written whole,
# random streams, torchrun's process group, the folder lock, signals.

def extra(name: str):
    """An optional block's entry point, or None once its block is deleted: the run goes on
    without it (README, "make it yours")."""
    return globals().get(name)


def get_best_device(requested: str = "auto") -> torch.device:
    """The device as its tensors name it: "cuda" is cuda:0, which is what the data's tensors are
    compared with (torch.device("cuda") != torch.device("cuda:0"))."""
    if requested == "auto" and torch.cuda.is_available():
        requested = "cuda"
    elif requested == "auto":
        requested = "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        return torch.empty(0, device=requested).device  # raises where there is no such device
    except (RuntimeError, AssertionError):
        fail(f"--device {requested!r} is not a device of this machine; use auto, cpu, cuda or mps")


def resolve_amp_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32 throughout."""
    if not cfg.use_amp:
        return None
    if cfg.amp_dtype == "float16" and device.type != "cuda":
        fail(f"--amp-dtype float16 needs a CUDA device (this run uses {device}); use bfloat16")
    if cfg.amp_dtype == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16


def choose_loader(cfg: TrainingConfig, device: torch.device, data: dict) -> str:
    """"memory" for tensors that fit the device: sliced there, no per-row fetch and collate."""
    if not all(isinstance(data[s], tuple) for s in ("train", "val")):
        return "dataloader"
    if cfg.loader != "auto" or device.type != "cuda":  # CPU and MPS: the data already sits there
        return "memory" if cfg.loader == "auto" else cfg.loader
    size = sum(t.numel() * t.element_size() for s in ("train", "val") for t in tensors_in(data[s]))
    return "memory" if size < torch.cuda.mem_get_info(device)[0] // 4 else "dataloader"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.unlink(missing_ok=True)
        probe.touch(exist_ok=False)  # O_EXCL: a link left at that name is not followed
        probe.unlink()
    except OSError as e:
        fail(f"cannot create or write to the folder {path}: {e.strerror or e}")


def check_storable(meta: dict) -> None:
    """Every checkpoint holds meta and loads with weights_only: refuse at once what would not."""
    buffer = io.BytesIO()
    try:
        torch.save(meta, buffer)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as e:
        fail("build_data's meta may hold only tensors, str, int, float, bool, None, and lists and "
             f"dicts of them: {first_line(e)}")


def save_file(path: Path, write) -> None:
    """Every output goes through here, on rank 0 alone. write(f) fills a temporary file beside
    `path`, then renamed over it: a kill at any instant leaves the old file or the new one, never
    half of one. (No fsync: it guards against power cuts, not kills, and cost 0.3 s.)"""
    if dist.is_initialized() and dist.get_rank() != 0:
        return  # under DDP every rank holds the same state: one writer
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # left by a killed run of this pid; "x" below follows no link
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except Exception as e:  # a full disk reaches torch.save as a RuntimeError, not an OSError
        why = getattr(e, "strerror", None) or first_line(e)
        fail(f"could not write {path}: {why}; any previous {path.name} is untouched")
    finally:
        with suppress(OSError):
            tmp.unlink()  # gone after the rename; left by a failure, or a stop mid-write


def save_checkpoint(path: Path, state: dict) -> None:
    save_file(path, partial(torch.save, state))


def write_json(path: Path, obj) -> None:
    """Readable JSON; a list (the history) an item a line: fast even at thousands of epochs."""
    text = json.dumps(obj, indent=2)
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(map(json.dumps, obj)) + "\n]"
    save_file(path, lambda f: f.write((text + "\n").encode()))


def rng_states() -> list[dict]:
    """Every random stream the run draws from, one entry a rank (shuffling needs none: it is a
    function of seed and epoch). weights_only loads no ndarray: numpy's key travels as a list."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return every_rank({"python": random.getstate(), "numpy": numpy_state,
                       "torch": torch.get_rng_state(), "cuda": cuda})


def seed_streams(key: tuple, torch_too: bool = True) -> None:
    """Python's, NumPy's and (torch_too) torch's CPU random streams seeded from key, ints."""
    seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little")
    random.seed(seed)
    np.random.seed(seed)
    if torch_too:
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed CUDA's too


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    states["numpy"]["state"]["key"] = np.array(states["numpy"]["state"]["key"], dtype=np.uint32)
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@contextmanager
def distributed(cfg: TrainingConfig):
    """Under torchrun (RANK and WORLD_SIZE set): join the process group (nccl on CUDA, gloo
    otherwise) and pin this rank to its GPU. Yields (device, rank, world size); outside
    torchrun, (the chosen device, 0, 1)."""
    device = get_best_device(cfg.device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield device, 0, 1
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device, dist.get_rank(), dist.get_world_size()
        dist.barrier()  # the ranks leave together, once rank 0 has written everything
    finally:
        # Destroyed, its threads joined, while Python is whole. A group alive at interpreter exit
        # can have a gloo thread free a finished collective's tensors then: it needs the GIL and
        # aborts the process (SIGABRT, "terminate called without an active exception"), and
        # torchrun kills the other ranks. DDP keeps its group alive: it gets one of its own.
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def every_rank(obj) -> list:
    """obj from every rank, in rank order (a collective under DDP); outside torchrun, [obj]."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_model(model: nn.Module, cfg: TrainingConfig, device: torch.device, world: int):
    """The model as evaluated (compiled with --compile) and as trained (in DDP under torchrun):
    one set of weights; checkpoints save `model` itself, with no prefixes."""
    if cfg.compile and device.type == "cpu" and not any(map(shutil.which, ("cc", "gcc", "clang"))):
        fail("--compile on CPU needs a C++ compiler (gcc or clang): install one, or drop it")
    eval_model = torch.compile(model) if cfg.compile else model
    return eval_model, data_parallel(eval_model, device, world)


def data_parallel(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """model in DistributedDataParallel under torchrun. DDP reduces the gradients of the parameters
    that required them when it was made: fit makes it anew when start_epoch changes which do."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    group = dist.new_group()  # of its own: DDP holds its group to the end (see distributed)
    return DistributedDataParallel(model, device_ids=ids, process_group=group)


@contextmanager
def one_run_per_folder(cfg: TrainingConfig, rank: int = 0):
    """Hold checkpoint_dir/.lock while the run lasts: a second run on the folder is refused in
    one line, instead of both overwriting each other's checkpoints."""
    path = cfg.checkpoint_dir
    fcntl = None
    with suppress(ImportError):  # not POSIX: unguarded
        import fcntl
    if rank != 0 or fcntl is None:
        yield
        return
    lock = Path(path) / ".lock"
    check_writable(lock.parent)
    try:  # O_NOFOLLOW: a .lock linking elsewhere (an unpacked archive): its target is never written
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        fail(f"cannot open {lock} ({e.strerror}): a symbolic link? delete it, or give this run "
             "another --checkpoint-dir")
    with open(descriptor, "r+") as handle:
        try:  # lockf, not flock: a DataLoader worker (a fork) outliving a kill -9 holds no lockf
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            fail(f"another run (pid {holder}) is using {path}; wait for it to end, or give this "
                 "one another --checkpoint-dir")
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


@contextmanager
def signals_caught():
    """SIGINT (Ctrl-C), SIGTERM (schedulers, spot reclaim) and SIGHUP (a closed terminal). In the
    epoch loop the first asks it to stop after the current step and save it (fit's after_step);
    anywhere else, or a second time, the run stops at once, in one line. Files are whole either
    way, being written atomically. A signal ignored when the run began (nohup's SIGHUP) stays
    ignored."""
    stop = {"signal": None, "loop": False}

    def caught(signum, frame):
        name = signal.Signals(signum).name
        if stop["loop"] and stop["signal"] is None:
            stop["signal"] = signum
            log.warning("%s: finishing the current step, then stopping (again: at once)", name)
            return
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped by {name}", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = {}
    with suppress(ValueError):  # not the main thread: signals belong to whoever owns it
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, caught)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_agreed(stop: dict, world: int) -> bool:
    """Whether to stop now. A signal may reach one rank alone: all stop if one is asked."""
    if world > 1:
        stop["signal"] = max(s or 0 for s in every_rank(stop["signal"])) or None
    return stop["signal"] is not None


def exit_resumable(run: Run, stop: dict, argv: list[str]) -> None:
    """After a stop in the loop, its files saved: plot what finished, say how to resume, and exit
    128 + the signal."""
    plot = extra("plot_history")
    if plot and run.progress["history"] and run.rank == 0:
        title = f"run {run.progress['run']}, stopped"
        plot(run.progress["history"], run.cfg, title, run.progress["best_epoch"], [])
    launcher = ["torchrun", f"--nproc_per_node={run.world}"] if run.world > 1 else ["python"]
    again = shlex.join([*launcher, "train.py", *[a for a in argv if a != "--resume"], "--resume"])
    at = stop.get("at") or f"the end of epoch {run.progress['epoch']}"
    log.warning("stopped by %s: %s holds %s. Resume with: %s", signal.Signals(stop["signal"]).name,
                path_of(run.cfg, "last.pt"), at, again)
    barrier()  # under torchrun a rank that exits first gets the others killed: rank 0 has spoken
    raise SystemExit(128 + stop["signal"])


# ============================================================================= built-in objectives
# Optional: what build_objective picks from meta. Read these when you write an objective of your
# own; delete them whole once build_objective is yours.

def classification_objective(meta: dict, cfg: TrainingConfig) -> Objective:
    """Cross-entropy over a logit a class; for two classes one logit and binary cross-entropy (the
    second class positive), which also reports ROC AUC. Training smooths the labels and, with
    --class-weight balanced, weighs each row by its class: cross_entropy's own weight would also
    weigh the smoothing by class, and favour the rare classes everywhere."""
    classes, binary = meta["classes"], len(meta["classes"]) == 2
    counts = torch.tensor(meta.get("class_counts") or [1] * len(classes)).float().clamp_min(0.5)
    weights = counts.sum() / (len(counts) * counts) if cfg.class_weight == "balanced" else None

    def row_losses(out, y, smoothing=0.0):
        if binary:
            target = y.float() * (1 - smoothing) + 0.5 * smoothing
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), target, reduction="none")
        return F.cross_entropy(out, y, label_smoothing=smoothing, reduction="none")

    def loss(out, y):
        rows = row_losses(out, y, cfg.label_smoothing)
        return rows.mean() if weights is None else (rows * weights.to(rows.device)[y]).mean()

    def probabilities(out):
        return torch.cat([-out, out], -1).sigmoid() if binary else out.softmax(-1)

    def metrics(out, y):
        found = class_metrics(probabilities(out).argmax(-1), y, len(classes))
        return {**found, "auc": roc_auc(out.squeeze(-1), y)} if binary else found

    def describe(out):
        p, i = probabilities(out.float()).max(-1)
        return [f"{classes[c]} ({q:.2f})" for q, c in zip(p.tolist(), i.tolist())]

    rates = counts / counts.sum()
    baseline = (rates[1] / rates[0]).log().reshape(1) if binary else rates.log()
    higher = {"acc": True, "balanced_acc": True, "macro_f1": True, "auc": True}
    return Objective(1 if binary else len(classes), loss, row_losses, metrics, describe,
                     baseline if "class_counts" in meta else None, higher)


def class_metrics(predicted: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    """Accuracy, balanced accuracy, macro F1 and the confusion matrix (rows: the true class)."""
    cm = torch.bincount(y * n + predicted, minlength=n * n).reshape(n, n).double()
    hits = cm.diagonal()
    recall, precision = hits / cm.sum(1).clamp_min(1), hits / cm.sum(0).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    balanced = recall[cm.sum(1) > 0].mean().item()  # the classes the split holds
    return {"acc": (hits.sum() / cm.sum()).item(), "balanced_acc": balanced,
            "macro_f1": f1.mean().item(), "confusion_matrix": cm.long().tolist()}


def roc_auc(scores: torch.Tensor, y: torch.Tensor) -> float:
    """The chance that a positive row scores above a negative one, ties counting half."""
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if not positives or not negatives:
        return float("nan")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    above = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return (above / (positives * negatives)).item()


def regression_objective(meta: dict) -> Objective:
    """One output, the squared error of a standardized target; RMSE, MAE and R² in the label's
    units. The baseline, predicting the training mean, is 0 once standardized."""
    mean, std = meta.get("target_mean", 0.0), meta.get("target_std", 1.0)
    decimals = max(0, 3 - math.floor(math.log10(std)))  # the label's own scale: 1747583, 12.05

    def row_losses(out, y):
        return (out.squeeze(-1) - y).square()

    def metrics(out, y):
        error, spread = out.squeeze(-1) - y, (y - y.mean()).square().sum()
        r2 = 1 - (error.square().sum() / spread).item() if spread > 0 else 0.0
        rmse, mae = error.square().mean().sqrt().item() * std, error.abs().mean().item() * std
        return {"rmse": rmse, "mae": mae, "r2": r2}

    def describe(out):
        return [f"{v * std + mean:.{decimals}f}" for v in out.float().squeeze(-1).tolist()]

    def loss(out, y):
        return row_losses(out, y).mean()

    higher = {"rmse": False, "mae": False, "r2": True}
    return Objective(1, loss, row_losses, metrics, describe, torch.zeros(1), higher)


# ============================================================================= the table pipeline
# Optional: the default data seam, any table by flags, text and blank cells included, and
# --predict's raw rows. Read it to know what becomes of each column; delete it whole once
# build_data and predict_inputs are yours.

import csv  # a block's own imports live with it, so that it goes whole
import socket
import tempfile
from urllib.parse import urlsplit

BUNDLED = {"scikit-learn/iris": Path(__file__).resolve().parent / "datasets" / "Iris.csv"}
LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BLANKS = {"", "?", "na", "n/a", "nan", "null", "none", "-"}  # feature cells that mean "no value"
NA = "(missing)"  # the category of a blank cell


def table_data(cfg: TrainingConfig) -> dict:
    """build_data's default. The labelled rows, split train / val / test (stratified by class,
    reproducible from the seed); columns made inputs (numbers, one-hot categories, blanks filled)
    by statistics of the training rows alone, then standardized by them."""
    table = cached_columns(cfg)
    task, classes, y = targets(cfg, table["labels"])
    splits = split_indices(y if classes else None, len(y), cfg, classes)
    train = splits["train"]
    spec = fit_inputs(table["features"], train, cfg.max_categories)
    x, inputs, flags = encode(table["features"], spec)
    bad = ~np.isfinite(x).all(axis=0)  # "inf" in a cell: any finite number fits, once standardized
    if bad.any():
        fail(f"input {inputs[int(np.argmax(bad))]!r} holds infinite values: fix or leave it out")
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std[std == 0] = 1.0  # a constant input stays 0, not a division by zero
    # 0/1 inputs (one-hot, was-missing) stay 0/1: standardized, a flag set in one training row in a
    # thousand would reach 30 and swamp every other input.
    mean[flags], std[flags] = 0.0, 1.0
    meta = {"task": task, "classes": classes, "features": list(spec), "inputs": inputs,
            "preprocess": spec, "mean": torch.from_numpy(mean), "std": torch.from_numpy(std),
            "title": f"{Path(cfg.dataset).name}: {cfg.label_column}"}
    if classes:
        meta["class_counts"] = np.bincount(y[train], minlength=len(classes)).tolist()
    else:  # a standardized target keeps the loss near 1, whatever the label's units
        meta.update(target_mean=float(y[train].mean()), target_std=float(y[train].std() or 1.0))
        y = ((y - meta["target_mean"]) / meta["target_std"]).astype(np.float32)
    # The content and each split's rows: a checkpoint of other data, or of this file after rows
    # were added (which reshuffles the splits), is refused rather than trusted.
    meta["fingerprint"] = digest([table["fingerprint"], *[p.tolist() for p in splits.values()]])
    if table["unlabelled"]:
        log.info("left out %d rows with no %r", table["unlabelled"], cfg.label_column)
    for line in describe_columns(table, spec):
        log.info("column %s", line)
    x, y = torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.from_numpy(y)
    source = table["source_rows"].numpy()  # the rows of each split, as the file numbers them
    return {**{name: (x[part], y[part]) for name, part in splits.items()}, "meta": meta,
            "rows": {name: source[part] for name, part in splits.items()}}


class FieldsRead:
    """A config that notes each field read: what a cached result depends on, no list to keep."""

    def __init__(self, cfg: TrainingConfig):
        self.cfg, self.read = cfg, {}

    def __getattr__(self, name: str):
        self.read[name] = getattr(self.cfg, name)
        return self.read[name]


def cached_columns(cfg: TrainingConfig) -> dict:
    """read_columns(cfg), kept under datasets_dir/prepared/ and read back (without even importing
    `datasets`) while the source's content and each setting that reading used are unchanged."""
    source = Path(cfg.dataset).resolve() if Path(cfg.dataset).is_file() else cfg.dataset
    name = f"{Path(cfg.dataset).name}-{hashlib.sha1(str(source).encode()).hexdigest()[:10]}.pt"
    cache, fingerprint = Path(cfg.datasets_dir) / "prepared" / name, source_digest(cfg)
    if fingerprint and cache.is_file():
        with suppress(Exception):  # unreadable or stale: rebuilt, never trusted
            columns = torch.load(cache, weights_only=True)
            same = all(getattr(cfg, k) == v for k, v in columns["read"].items())
            if columns["fingerprint"] == fingerprint and same:
                return columns
    watched = FieldsRead(cfg)
    columns = read_columns(watched)
    # A hub dataset's saved copy may be new: hashed now, the first time there is one.
    columns.update(fingerprint=fingerprint or source_digest(cfg), read=watched.read)
    try:
        save_file(cache, partial(torch.save, columns))
    except SystemExit as e:  # the cache only saves time: a run goes on without it
        log.warning("%s; going on without the prepared-data cache", str(e.code)[len("error: "):])
    return columns


def source_digest(cfg: TrainingConfig) -> str | None:
    """The source's content (a local file, or a hub dataset's saved copy), not its size and time,
    which a copy (cp -p, rsync -a) keeps through an edit; None while there is no copy."""
    path = Path(cfg.dataset)
    files = [path] if path.is_file() else sorted(filter(Path.is_file, saved_copy(cfg).rglob("*")))
    sha = hashlib.sha256(b"columns 5")  # bump when reading a table changes
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest() if files else None


def saved_copy(cfg: TrainingConfig) -> Path:
    return Path(cfg.datasets_dir) / cfg.dataset.replace("/", "___")


def load_table(cfg: TrainingConfig):
    """The raw table through Hugging Face `datasets`, offline whenever a copy is at hand: a local
    file is read directly; a hub id is saved under datasets_dir the first time (from the bundled
    copy for Iris, from the hub otherwise) and loaded from there after."""
    source, path, saved = cfg.dataset, Path(cfg.dataset), saved_copy(cfg)
    suffix = path.suffix.lower()
    if path.is_dir():
        fail(f"--dataset {source} is a directory; pass one of its files")
    if suffix in LOADERS and not path.is_file():
        fail(f"--dataset {source}: no such file")
    if path.is_file() and suffix not in LOADERS:
        fail(f"--dataset {source}: not one of {', '.join(LOADERS)}")
    if path.is_file() and path.stat().st_size == 0:
        fail(f"--dataset {source}: the file is empty")
    bundled = BUNDLED[source] if source in BUNDLED and BUNDLED[source].is_file() else None
    if path.is_file() or saved.exists() or bundled:
        os.environ["HF_HUB_OFFLINE"] = "1"  # huggingface_hub reads it once, at import: set it first
    elif source in BUNDLED and not hub_reachable():  # a copy of train.py without its datasets/
        fail(f"--dataset {source}: {BUNDLED[source]} is missing and the Hugging Face hub cannot be "
             f"reached: copy datasets/{BUNDLED[source].name} from the template beside train.py, "
             "or run once with a network")
    elif not hub_reachable():
        fail(f"--dataset {source} is not saved under {cfg.datasets_dir}/, and the Hugging Face hub "
             "cannot be reached: run once with a network, or pass a local file")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its errors reach the user as one line
    # A CSV is read whole, not in chunks of 10,000 rows that each guess their own column types, and
    # only an empty cell is missing: "NA" may name a class. The cache is temporary: a kept one grows
    # by a whole copy at every edit of a local file.
    csv_as_is = {"chunksize": 1 << 30, "keep_default_na": False, "na_values": [""]}
    read = partial(datasets.load_dataset, split="train", keep_in_memory=True)
    with tempfile.TemporaryDirectory(prefix="hf-cache-") as cache:
        try:
            if path.is_file():
                options = csv_options(path, csv_as_is) if suffix == ".csv" else {}
                table = read(LOADERS[suffix], data_files=source, cache_dir=cache, **options)
            elif saved.exists():
                table = datasets.load_from_disk(str(saved), keep_in_memory=True)
            else:
                log.info("saving %s under %s, once: later runs read it there", source, saved.parent)
                table = read("csv", data_files=str(bundled), cache_dir=cache, **csv_as_is) \
                    if bundled else read(source, cache_dir=cache)
                unfinished = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")  # renamed, whole
                with suppress(OSError):  # a read-only datasets_dir: read again next time
                    table.save_to_disk(str(unfinished))
                    os.replace(unfinished, saved)
        except Exception as e:  # datasets and pyarrow raise many types: the user needs the message
            cause = e.__cause__ or e
            if saved.exists() and not path.is_file():
                fail(f"the saved copy {saved} is damaged ({first_line(cause)}): delete it")
            if "corresponds to no data" in str(e):  # what datasets says of a header with no rows
                fail(f"--dataset {source} has no rows")
            if isinstance(cause, UnicodeDecodeError):
                fail(f"--dataset {source} is not UTF-8 text: an encoding or format problem")
            if "too large to convert" in str(cause) and suffix == ".csv":
                wide = ", ".join(wide_integer_columns(path))
                fail(f"--dataset {source}: column {wide} holds integers past 64 bits, on both "
                     "sides of 2**63: write them as decimals (1.5e19), or in a larger unit")
            fail(f"--dataset {source}: could not load it ({first_line(cause)})")
    if len(table) == 0:
        fail(f"--dataset {source} has no rows")
    names = {name: name.strip() for name in table.column_names}  # "age, income": " income"
    return table.rename_columns(names) if any(k != v for k, v in names.items()) else table


def csv_delimiter(path: Path) -> str:
    """"," or what the header line holds more of: ";" (Excel's across most of Europe) or a tab."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline(1 << 16)
    return max(",;\t", key=header.count)


def csv_options(path: Path, options: dict) -> dict:
    """A ";" file is read with a decimal comma, as Excel writes it there: "1,5" is 1.5 (a "1.5"
    cell is then text to pandas, and still a number to read_column)."""
    sep = csv_delimiter(path)
    if sep != ",":
        log.info("%s: cells separated by %r%s", path, sep, ", decimal comma" if sep == ";" else "")
    return {**options, "sep": sep, **({"decimal": ","} if sep == ";" else {})}


def wide_integer_columns(path: Path) -> list[str]:
    """A CSV's columns holding an integer past int64 (amounts in wei): pyarrow refuses them."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=csv_delimiter(path))
        names, wide = next(reader), set()
        for row in reader:
            wide.update(n for n, cell in zip(names, row)
                        if re.fullmatch(r"\s*[-+]?\d{19,}\s*", cell) and abs(int(cell)) >= 2**63)
    return [name for name in names if name in wide] or ["?"]


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick connection: huggingface_hub itself retries for ~25 s before it gives up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides what is reachable: let huggingface_hub ask it
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    with suppress(OSError):
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    return False


def read_columns(cfg: TrainingConfig) -> dict:
    """The labelled rows as {"labels", "features": {name: column}, "notes": {name: why it was left
    out}, "source_rows", "unlabelled"}. A column is {"kind": "numeric", "values": float64, NaN for
    blank} or {"kind": "categorical", "codes", "names"}. Features: the named ones, or all but the
    label and the ids."""
    table = load_table(cfg)
    columns, label = table.column_names, cfg.label_column
    chosen, as_category = ([c.strip() for c in text.split(",") if c.strip()]
                           for text in (cfg.feature_columns, cfg.categorical_columns))
    unknown = [c for c in chosen + as_category if c not in columns or c == label]
    if label not in columns:
        fail(f"--label-column {label!r} is not in the data; columns are: {', '.join(columns)}")
    if unknown:
        fail(f"--feature-columns / --categorical-columns: {', '.join(unknown)} cannot be inputs; "
             f"columns are: {', '.join(columns)}")
    values = table.data.column(label).to_numpy(zero_copy_only=False)
    if values.dtype == object and any(isinstance(v, (list, dict, np.ndarray)) for v in values):
        fail(f"column {label!r} holds lists or records, not one label a row")
    # For a label only an empty cell is missing: "none", "NA" and "-" can name classes.
    rows = np.flatnonzero([not (v is None or v != v or str(v).strip() == "") for v in values])
    if len(rows) == 0:
        fail(f"column {label!r} has no values")
    values = values[rows]
    if values.dtype.kind in "iuf" and not np.isfinite(values).all():
        fail(f"column {label!r} holds an infinite value in row {rows[~np.isfinite(values)][0] + 1}")
    if values.dtype.kind in "iuf":
        labels = {"kind": "numeric", "values": torch.from_numpy(values.astype(np.float64))}
    else:  # labels that differ by surrounding spaces alone are one class, as feature cells are
        stripped = np.array([str(v).strip() for v in values], dtype=object)
        names, codes = np.unique(stripped, return_inverse=True)
        labels = {"kind": "categorical", "codes": torch.from_numpy(codes), "names": names.tolist()}
    features, notes = {}, {}
    for name in chosen or [c for c in columns if c != label]:
        column = {"kind": "left out", "why": "an id-like name"}
        if chosen or not is_id_like(name):
            cells = table.data.column(name).to_numpy(zero_copy_only=False)[rows]
            column = read_column(cells, name, name in as_category, rows, cfg.missing)
        if column["kind"] == "left out":
            notes[name] = column["why"]
        else:
            features[name] = column
    if not features:
        why = "; ".join(f"{k} {v}" for k, v in notes.items())
        fail(f"no column but {label!r} can be an input: {why}")
    return {"labels": labels, "features": features, "notes": notes,
            "source_rows": torch.from_numpy(rows), "unlabelled": len(table) - len(rows)}


def read_column(values: np.ndarray, name: str, as_category: bool, rows: np.ndarray, missing: str):
    """One feature column as numbers, as categories, or left out with the reason."""
    if values.dtype == object and any(isinstance(v, (list, dict, np.ndarray)) for v in values[:99]):
        return {"kind": "left out", "why": "not a column of single values"}
    if values.dtype.kind in "iufb" and not as_category:
        numbers = values.astype(np.float64)
    else:  # text, or codes
        names, parsed, codes = cells_read(values)
        text = np.isin(codes, [i for i, v in enumerate(parsed) if v is None])
        if not as_category and text.any() and text.sum() <= (names[codes] != NA).sum() / 2:
            i = int(np.argmax(text))  # mostly numbers, a few words: a typo, not categories
            fail(f"column {name!r} holds a word, {values[i]!r}, among numbers in row {rows[i] + 1}:"
                 f" fix it, or pass --categorical-columns {name} to read the column as categories")
        if not as_category and text.any() and len(names) > max(20, len(values) // 2):
            return {"kind": "left out", "why": f"text, {len(names)} distinct in {len(values)} rows"}
        if as_category or text.any():
            return {"kind": "categorical", "codes": torch.from_numpy(codes), "names": list(names)}
        numbers = np.array(parsed, dtype=np.float64)[codes]
    if missing == "error" and np.isnan(numbers).any():
        row = rows[int(np.argmax(np.isnan(numbers)))] + 1
        fail(f"column {name!r} has a blank cell in row {row}, and --missing is error")
    # A constant column stays an input (0 once standardized): a model built for 64 pixels gets 64.
    return {"kind": "numeric", "values": torch.from_numpy(numbers)}


def cells_read(cells) -> tuple[np.ndarray, list, np.ndarray]:
    """The one cell reader of training and --predict: each distinct cell read once, as its category
    (category()), that category's number (NaN if blank, None if text), and each cell's code."""
    names, codes = np.unique(np.array([category(v) for v in cells], dtype=object),
                             return_inverse=True)
    return names, [math.nan if n == NA else parse_number(n) for n in names], codes


def is_id_like(name: str) -> bool:
    """id, user_id, PassengerId, customerID, index, RowNumber, "Unnamed: 0", __index_level_0__."""
    lower = name.lower()
    id_end = re.search(r"(^|_)id$", lower) or re.search(r"[a-z0-9](Id|ID)$", name)
    return bool(id_end) or lower in ("index", "rownumber", "row_number") or \
        lower.startswith(("unnamed:", "__index_level_"))


def parse_number(value) -> float | None:
    """A cell's number (3, "3.5", "18,111", "19%" as 19, True as 1); NaN if blank; None if text."""
    text = str(value).strip().lower()
    if value is None or (isinstance(value, float) and math.isnan(value)) or text in BLANKS:
        return math.nan
    if text in ("true", "false"):
        return float(text == "true")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?", text):  # "18,111" is one number, not two
        text = text.replace(",", "")
    with suppress(ValueError):
        return float(text.removesuffix("%"))
    return None


def category(value) -> str:
    """A cell as a category: numbers by exact value (1, 1.0 and "1" agree; 1000001 stays itself),
    blanks as NA, text stripped."""
    number = parse_number(value)
    if number is None or math.isinf(number):
        return str(value).strip()
    if math.isnan(number):
        return NA
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def targets(cfg: TrainingConfig, labels: dict) -> tuple[str, list, np.ndarray]:
    """The task, the classes (sorted; none to regress) and y: class ids, or values. "auto"
    regresses a numeric label of many distinct values for its rows; a task given stands."""
    numeric = labels["kind"] == "numeric"
    values = labels["values"].numpy() if numeric else None
    distinct = np.unique(values) if numeric else labels["names"]
    many = numeric and len(distinct) > 20 and len(distinct) > len(values) // 20
    task = cfg.task if cfg.task != "auto" else "regression" if many else "classification"
    if task == "regression" and not numeric:
        fail(f"--task regression needs a numeric label; column {cfg.label_column!r} holds text")
    if task == "regression":
        return task, [], values
    if len(distinct) < 2:
        fail(f"column {cfg.label_column!r} holds one class ({distinct[0]!r}): a classifier needs 2")
    if numeric:  # classes named by their values: 0, 1, 2 or 2.5
        classes = [int(v) if float(v).is_integer() else float(v) for v in distinct]
        y = np.searchsorted(distinct, values)
    else:
        classes, y = list(distinct), labels["codes"].numpy()
    more = f", ... ({len(classes)} in all)" if len(classes) > 20 else ""
    log.info("classes: %s%s", ", ".join(map(str, classes[:20])), more)
    return task, classes, y.astype(np.int64)


def split_indices(y: np.ndarray | None, n: int, cfg: TrainingConfig, classes=()) -> dict:
    """Disjoint train / val / test rows, stratified by class (y: class ids; None to regress),
    reproducible from the seed. A class of fewer than 3 rows cannot give each split one: all its
    rows train, and the log says so."""
    rng = np.random.default_rng(cfg.seed)
    groups = [np.arange(n)] if y is None else [np.flatnonzero(y == c) for c in range(len(classes))]
    parts = {"train": [], "val": [], "test": []}
    for c, rows in enumerate(groups):
        rows = rng.permutation(rows)
        if len(rows) < 3 and y is None:
            fail(f"the table has {n} labelled rows: train, val and test need one each")
        if len(rows) < 3:
            log.warning("class %r has %d row(s): too few for val and test, so all train",
                        classes[c], len(rows))
        n_test = min(max(1, round(len(rows) * cfg.test_fraction)), len(rows) - 2)
        n_val = min(max(1, round(len(rows) * cfg.val_fraction)), len(rows) - n_test - 1)
        n_test, n_val = (n_test, n_val) if len(rows) >= 3 else (0, 0)
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test:n_test + n_val])
        parts["train"].append(rows[n_test + n_val:])
    splits = {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}
    if not len(splits["val"]):
        fail("no class has 3 rows or more: there is nothing to hold out for val and test")
    return splits


def fit_inputs(features: dict, train: np.ndarray, max_categories: int) -> dict:
    """How columns become inputs, learnt from the training rows alone: each numeric column's median
    for its blanks (and a 0/1 was-missing input where 1% or more of the training rows had one),
    each categorical column's most frequent categories (one-hot; the rest share "other")."""
    spec = {}
    for name, column in features.items():
        if column["kind"] == "numeric":
            seen = column["values"].numpy()[train]
            blanks = int(np.isnan(seen).sum())
            median = float(np.nanmedian(seen)) if blanks < len(seen) else 0.0
            # A flag set in a row or two of a thousand is an input the model can only memorize.
            flag = blanks > 0 and blanks >= 0.01 * len(seen)
            spec[name] = {"kind": "numeric", "median": median, "flag": flag}
            continue
        counts = np.bincount(column["codes"].numpy()[train], minlength=len(column["names"]))
        names = [column["names"][i] for i in np.argsort(-counts, kind="stable") if counts[i]]
        spec[name] = {"kind": "categorical", "categories": names[:max_categories],
                      "rest": names[max_categories:]}
    return spec


def encode(features: dict, spec: dict) -> tuple[np.ndarray, list[str], list[bool]]:
    """Columns to unnormalized float inputs (blanks filled, categories one-hot); the inputs' names,
    and which of them are 0/1 inputs."""
    parts, names, flags = [], [], []
    for name, s in spec.items():
        column = features[name]
        if s["kind"] == "numeric":
            blank = np.isnan(column["values"].numpy())
            parts.append(np.where(blank, s["median"], column["values"].numpy())[:, None])
            names.append(name)
            flags.append(False)
            if s["flag"]:
                parts.append(blank[:, None].astype(np.float64))
                names.append(f"{name} was missing")
                flags.append(True)
            continue
        slot = {c: i for i, c in enumerate(s["categories"])}
        slots = np.array([slot.get(c, len(slot)) for c in column["names"]], dtype=np.int64)
        parts.append(np.eye(len(slot) + 1)[slots[column["codes"].numpy()]])
        names += [f"{name}={c}" for c in s["categories"]] + [f"{name}=other"]
        flags += [True] * (len(slot) + 1)
    return np.concatenate(parts, axis=1), names, flags


def describe_columns(table: dict, spec: dict) -> list[str]:
    """A line a column: what this run made of it."""
    lines, plain = [], []
    for name, s in spec.items():
        values = table["features"][name].get("values")
        blanks = int(np.isnan(values.numpy()).sum()) if values is not None else 0
        if s["kind"] == "categorical":
            rarer = f" ({len(s['rest'])} rarer)" if s["rest"] else ""
            lines.append(f"{name}: categorical, {len(s['categories'])} categories + other{rarer}")
        elif blanks:
            flag = " and a was-missing input" if s["flag"] else ""
            lines.append(f"{name}: numeric, {blanks} blanks, filled with {s['median']:g}{flag}")
        else:
            plain.append(name)
    if plain:
        more = f", ... ({len(plain)} columns)" if len(plain) > 12 else ""
        lines.insert(0, f"numeric: {', '.join(plain[:12])}{more}")
    return lines + [f"{name}: left out ({why})" for name, why in table["notes"].items()]


def table_predict_inputs(text: str, meta: dict) -> tuple[torch.Tensor, list[str]]:
    """predict_inputs' default: raw rows, "5.1,3.5;6.7,3.0" (cells in the order of the features),
    or a CSV file, whose header, when it names the features (in any order, others ignored), maps
    the cells by name; each row's cells label it in the printout."""
    names, rows, is_file = meta["features"], [], False
    with suppress(OSError):  # a name too long for a file: rows, then
        is_file = Path(text).is_file()
    if is_file or text.lower().endswith(".csv"):
        try:
            sep = csv_delimiter(Path(text))
            with open(text, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM, not a name
                rows = [r for r in csv.reader(f, delimiter=sep) if r]
            if sep == ";":  # a decimal comma, as in training
                rows = [[cell.replace(",", ".") for cell in row] for row in rows]
        except OSError as e:
            fail(f"--predict {text}: {e.strerror or e}")
        except (UnicodeDecodeError, csv.Error) as e:
            fail(f"--predict {text}: not a UTF-8 CSV file ({first_line(e)})")
        header = [c.strip() for c in rows[0]] if rows else []
        if set(names) <= set(header):
            short = [i for i, r in enumerate(rows[1:], 1) if len(r) != len(header)]
            if short:  # a row that lost a cell is never read out of line with the header
                cells = len(rows[short[0]])
                fail(f"--predict row {short[0]} has {cells} values, and the header {len(header)}")
            rows = [dict(zip(header, r)) for r in rows[1:]]
    else:
        rows = [r.split(",") for r in text.split(";") if r.strip()]
    if not rows:
        fail(f"--predict: no rows given; expected {len(names)} values: {', '.join(names)}")
    inputs, unseen = rows_to_inputs(rows, meta)
    for name, count in unseen.items():
        if count:
            log.warning("%d row(s) have a %r category training never saw: it counts as other",
                        count, name)
    raw = [[r[n] for n in names] if isinstance(r, dict) else r for r in rows]
    return inputs, [", ".join(str(c).strip() for c in row) for row in raw]


def rows_to_inputs(rows, meta: dict) -> tuple[torch.Tensor, dict]:
    """Raw rows (lists in meta["features"] order, or dicts by column name; cells as the table had
    them) to model inputs, each cell read as training read it; and per categorical column, how
    many rows hold a category training never saw. ValueError, naming the row, for a missing
    column or a cell that is not a number where one belongs."""
    names, spec, table = meta["features"], meta["preprocess"], []
    for i, row in enumerate(rows, 1):
        absent = [n for n in names if n not in row] if isinstance(row, dict) else []
        if absent:
            raise ValueError(f"row {i} has no {absent[0]!r}; the model reads {', '.join(names)}")
        table.append([row[n] for n in names] if isinstance(row, dict) else list(row))
        if len(table[-1]) != len(names):
            raise ValueError(f"row {i} has {len(table[-1])} values; expected {len(names)}: "
                             + ", ".join(names))
    features, unseen = {}, {}
    for name, cells in zip(names, zip(*table)):
        found, numbers, codes = cells_read(cells)
        if spec[name]["kind"] == "numeric":
            bad = np.isin(codes, [k for k, v in enumerate(numbers) if v is None or math.isinf(v)])
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"row {i + 1}: column {name!r} needs a finite number (or an empty "
                                 f"cell), not {cells[i]!r}")
            features[name] = {"values": torch.tensor(numbers, dtype=torch.float64)[codes]}
            continue
        features[name] = {"codes": torch.from_numpy(codes), "names": found.tolist()}
        known = spec[name]["categories"] + spec[name]["rest"]
        unseen[name] = int(np.isin(found[codes], known, invert=True).sum())
    x, _, _ = encode(features, spec)
    return ((torch.from_numpy(x) - meta["mean"]) / meta["std"]).float(), unseen


# ============================================================================= the run note
# Optional: the run reads its own curves: run_note.md, the plot, and "diagnosis" in
# test_report.json. Read this to know how a verdict is reached; every threshold lives in
# NOTE_LIMITS, with its reason. Deleted whole, a run writes neither note nor plot.

NOTE_LIMITS = {
    # A difference is real past this many standard errors of its mean, over the same validation
    # rows paired row by row: about a 2.5% chance that noise alone makes one.
    "z": 2.0,
    # A real change worth acting on moves held-out loss by a tenth of what the model learnt (its
    # gain over the base rates): a smaller rise changes no decision, as best_model.pt holds the best
    # already, and a smaller fall at the end is not worth twice the epochs.
    "material": 0.1,
    # The end of a run is its last tenth, 3 epochs at least: a trend, not one noisy epoch.
    "stretch": 0.1,
    # Training loss, averaged over every training row, barely jitters: an epoch 25% above the lowest
    # yet that gives back half the progress made since epoch 1 is a spike.
    "spike_rise": 0.25, "spike_share": 0.5,
    # Clipping is a guard rail: when it cuts most steps, the clip sets the step, not the rate.
    "clipped": 0.5,
    # A model that trains never averages far worse than predicting the base rates, where it starts:
    # an epoch's training loss at twice theirs means the steps overshoot.
    "chance": 2.0,
    # Confident mistakes are heavy-tailed: a few rows can carry a rise past what a test of the mean
    # calls real. Held-out loss that doubles from its best while training loss halves is overfit.
    "doubled": 1.0,
}


def write_run_note(rank: int, history: list[dict], rows: dict, result: dict, cfg: TrainingConfig,
                   title: str) -> dict:
    """report's call: diagnose the curves, write run_note.md and the plot, and log the note up to
    its suggestions. Returns the diagnosis, for test_report.json."""
    diagnosis = diagnose(history, result["best_epoch"], rows, cfg)
    note = run_note(diagnosis, history, result, cfg, title)
    save_file(path_of(cfg, "run_note.md"), lambda f: f.write(note.encode()))
    if rank == 0 and history:
        plot_history(history, cfg, title, result["best_epoch"], diagnosis["findings"])
    for line in note.split("\n## ")[0].splitlines()[2:]:  # the note, up to its suggestions
        if line:
            log.info("%s", line.replace("**", ""))
    return diagnosis


def reference_epoch(epochs: int) -> int:
    """The epoch a stretch before the end: last.pt keeps its per-row validation losses, and the
    note compares the best with them to tell whether the run was still improving at its end."""
    return max(1, epochs - max(3, round(epochs * NOTE_LIMITS["stretch"])))


def paired(before: torch.Tensor, after: torch.Tensor) -> list[float]:
    """The mean of after - before over the same rows, and the standard error of that mean."""
    d = (after - before).double()
    return [d.mean().item(), d.std().item() / math.sqrt(len(d)) if len(d) > 1 else math.inf]


def diagnose(history: list[dict], best_epoch: int, rows: dict, cfg: TrainingConfig) -> dict:
    """What the curves say: {"verdict", "findings", "evidence"}. A finding is a pattern, the epoch
    it began, its evidence and a suggestion naming the flag to change; the verdict is the gravest
    pattern found (unstable, not_learning, overfitting, still_improving), or converged. rows holds
    per-row validation losses: of the best epoch, the last, the reference epoch (or None), and of
    predicting the training base rates (None for an objective without a baseline)."""
    epochs = [h["epoch"] for h in history]
    if best_epoch not in epochs:
        return {"verdict": None, "findings": [], "evidence": {}}  # no curves of this run to read
    z, lr, found = NOTE_LIMITS["z"], cfg.learning_rate, []
    train = np.array([h["train_loss"] for h in history])
    b, end = epochs.index(best_epoch), len(epochs) - 1
    lower_lr = f"lower --learning-rate ({lr:g} -> {lr / 10:g})"
    span = max(3, epochs[-1] - reference_epoch(cfg.epochs))
    evidence = {"rows": len(rows["best"]), "best_loss": rows["best"].double().mean().item(),
                "rise": paired(rows["best"], rows["last"])}
    if rows["base"] is not None:
        evidence["base_loss"] = rows["base"].double().mean().item()
        evidence["gain"] = paired(rows["best"], rows["base"])
    gain, rise = evidence.get("gain", [evidence["best_loss"], 0.0]), evidence["rise"]
    learnt = "gain" not in evidence or gain[0] > z * gain[1]
    evidence["material"] = NOTE_LIMITS["material"] * max(gain[0], 0.0)
    rose = rise[0] > z * rise[1] and rise[0] > evidence["material"]
    doubled = rise[0] > NOTE_LIMITS["doubled"] * evidence["best_loss"] and train[-1] < train[b] / 2
    back = paired(rows["last"], rows["base"]) if rows["base"] is not None else [math.inf, 0.0]
    lost = learnt and b < end and back[0] <= z * back[1]  # by the end, all it had learnt is gone
    fell = train[-1] < train[b]  # a better fit of the training rows explains a held-out rise
    if not learnt:  # nothing carried over: a training loss that falls a tenth still memorizes
        fell = train[-1] < (1 - NOTE_LIMITS["material"]) * train[b]
    change = f"{rise[0]:+.3g} ± {z * rise[1]:.2g} after epoch {best_epoch}"
    found += unstable_training(history, evidence.get("base_loss"), cfg, lower_lr)
    too_high = bool(found)  # then no suggestion raises the rate
    if (rose or lost or doubled) and fell:  # training loss that falls is learning
        gone = "; by the end, no better than predicting the base rates" if lost else ""
        gone = gone if learnt else "; even the best epoch was no better than the base rates"
        found.append((
            "overfitting", b + 1, f"validation loss rose {change}, while training loss fell from "
            f"{train[b]:.4g} to {train[-1]:.4g}{gone}", f"stop sooner: --early-stopping-patience "
            f"{span} (or --epochs {best_epoch + span}); or regularize: --weight-decay "
            f"{max(10 * cfg.weight_decay, 0.01):g}"))
    elif not learnt:  # nothing learnt that carries over
        rates = f"{lr / 10:g}" if too_high else f"{lr / 10:g} and {lr * 10:g}"
        found.append((
            "not_learning", 0, f"the best validation loss, {evidence['best_loss']:.4g}, is no "
            f"better than the {evidence['base_loss']:.4g} of predicting the training base rates "
            f"({-gain[0]:+.3g} ± {z * gain[1]:.2g})", "check --label-column and the inputs; if "
            f"they are right, try --learning-rate {rates}"))
    elif lost:  # learnt, then lost it all without fitting the training rows better: a collapse
        at = next(i for i in range(b + 1, end + 1)
                  if history[i]["val_loss"] >= evidence["base_loss"] or i == end)
        found.append((
            "not_learning", at, f"after epoch {best_epoch} the model fell back to the base rates: "
            f"at the end it beats them by {back[0]:+.3g} ± {z * back[1]:.2g}", lower_lr))
    elif rose:
        found.append((
            "unstable", b + 1, f"validation loss rose {change} while training loss did not fall "
            f"({train[b]:.4g} -> {train[-1]:.4g})", lower_lr))
    stopped_early = cfg.early_stopping_patience and epochs[-1] < cfg.epochs
    if rows["reference"] is not None and not stopped_early and epochs[-1] - best_epoch < span:
        evidence["improvement"] = gained = paired(rows["best"], rows["reference"])
        # A schedule that ends near a zero rate flattens any run's end: a fall is judged against
        # the share of the rate the end spent, not the share of the epochs (the same at a constant
        # rate). Iris at a tenth of the rate falls every epoch, and is still improving.
        rates = np.array([h["lr"] for h in history])
        end_part = np.array(epochs) > reference_epoch(cfg.epochs)
        pace = rates[end_part].sum() / max(rates.sum(), 1e-300) / max(end_part.mean(), 1e-300)
        higher = "" if too_high else f", or a higher --learning-rate ({lr:g} -> {lr * 3:g})"
        if gained[0] > z * gained[1] and gained[0] > evidence["material"] * min(1.0, pace):
            found.append((
                "still_improving", b, f"validation loss fell {gained[0]:.3g} ± "
                f"{z * gained[1]:.2g} since epoch {reference_epoch(cfg.epochs)}, the best being "
                f"epoch {best_epoch} of {epochs[-1]}", f"train longer: --epochs {2 * cfg.epochs}"
                f"{higher}"))
    findings = [{"pattern": p, "epoch": epochs[i], "evidence": e, "suggestion": s}
                for p, i, e, s in sorted(found, key=lambda f: f[1])]
    gravest = [p for p in ("unstable", "not_learning", "overfitting", "still_improving")
               if any(p == f[0] for f in found)]
    return {"verdict": (gravest or ["converged"])[0], "findings": findings, "evidence": evidence}


def unstable_training(history: list[dict], base_loss, cfg: TrainingConfig, lower_lr: str) -> list:
    """The findings of a rate too high, as (pattern, epoch index, evidence, suggestion): training
    loss far above the base rates', a spike in it, or clipping that cuts most steps."""
    train, found = np.array([h["train_loss"] for h in history]), []
    above = np.flatnonzero(train > NOTE_LIMITS["chance"] * (base_loss or math.inf))
    if above.size:
        i = int(above[0])
        found.append(("unstable", i, f"training loss was {train[i]:.4g} at epoch "
                      f"{history[i]['epoch']}, over {NOTE_LIMITS['chance']:g}x the "
                      f"{base_loss:.4g} of predicting the base rates", lower_lr))
    for i in range(1, len(train)):
        low = train[:i].min()
        if train[i] > low * (1 + NOTE_LIMITS["spike_rise"]) and \
                train[i] - low > NOTE_LIMITS["spike_share"] * (train[0] - low):
            found.append(("unstable", i, f"training loss jumped to {train[i]:.4g}, from {low:.4g}",
                          lower_lr))
            break
    clipped = [h.get("clipped", 0.0) for h in history]
    if np.mean(clipped) > NOTE_LIMITS["clipped"]:
        clip = cfg.grad_clip
        found.append((
            "unstable", int(np.argmax(np.array(clipped) > NOTE_LIMITS["clipped"])),
            f"{np.mean(clipped):.0%} of steps were clipped at --grad-clip {clip:g}",
            f"raise --grad-clip ({clip:g} -> {3 * clip:g}), or {lower_lr}"))
    return found


def run_note(diagnosis: dict, history: list[dict], result: dict, cfg: TrainingConfig, title: str):
    """diagnose's verdict, findings and evidence in words: the best and the last epoch and why
    they differ, the curves, the numbers the verdict rests on, stability, and what to change."""
    verdict, findings, evidence = diagnosis["verdict"], diagnosis["findings"], diagnosis["evidence"]
    if verdict is None:
        return f"# Run note: {title}\n\nNo training history of this run to read.\n"
    z, best_epoch, start, end = NOTE_LIMITS["z"], result["best_epoch"], history[0], history[-1]
    best = history[[h["epoch"] for h in history].index(best_epoch)]
    key = cfg.best_metric.removeprefix("val_")
    floats = [k for k in result if isinstance(result[k], float)]
    shown = [key] if key in result and key != "loss" else floats[1:2]
    score = ", ".join(f"test {k} {result[k]:.4f}" for k in ["loss", *shown])
    differ = "best_model.pt and last.pt hold the same epoch, the last"
    if best is not end:
        direction = "lower" if result["mode"] == "min" else "higher"
        differ = (f"best_model.pt holds epoch {best_epoch}, last.pt epoch {end['epoch']} (where "
                  f"training ended, for --resume): the best is chosen by {cfg.best_metric} alone "
                  f"({direction} is better), and no later epoch beat its "
                  f"{best[cfg.best_metric]:.4g}")
    rise, se = evidence["rise"]
    kind = "lower at the end" if rise < -z * se else "within noise" if rise <= z * se else \
        "real, but under a tenth of what was learnt" if rise <= evidence["material"] else "real"
    moved = f"from the best epoch to the end, validation loss moved {rise:+.3g} ± {z * se:.2g} " \
        f"({kind})"
    if "gain" in evidence:
        moved += f"; the best beats the base rates by {evidence['gain'][0]:.3g} ± " \
            f"{z * evidence['gain'][1]:.2g}"
    unstable = [f["evidence"] for f in findings if f["pattern"] == "unstable"]
    stability = "not stable: " + "; ".join(unstable) if unstable else "stable"
    norms = [h for h in history if "grad_norm" in h]  # recorded while clipping is on
    if norms:
        stability += (f". Gradient norm before clipping: mean "
                      f"{np.mean([h['grad_norm'] for h in norms]):.3g}, largest "
                      f"{max(h['grad_norm_max'] for h in norms):.3g}; "
                      f"{np.mean([h['clipped'] for h in norms]):.1%} of steps clipped at "
                      f"--grad-clip {cfg.grad_clip:g}")
    tail = "" if best is end else f" -> {end['val_loss']:.4g} (epoch {end['epoch']})"
    lines = [f"# Run note: {title}", "",
             f"**Verdict: {verdict.replace('_', ' ')}.** Best epoch {best_epoch} of "
             f"{end['epoch']}; {score}.", "", f"- Best and last: {differ}.",
             f"- The curves: training loss {start['train_loss']:.4g} -> {end['train_loss']:.4g}; "
             f"validation loss {start['val_loss']:.4g} -> {best['val_loss']:.4g} "
             f"(epoch {best_epoch}){tail}.",
             f"- The evidence, over {evidence['rows']} validation rows paired row by row (± two "
             f"standard errors): {moved}.", f"- Stability: {stability}."]
    lines += [f"- {f['pattern'].replace('_', ' ')} from epoch {f['epoch']}: {f['evidence']}."
              for f in findings]
    if findings:
        lines += ["", "## What to change"]
        lines += [f"- {f['pattern'].replace('_', ' ')}: {f['suggestion']}." for f in findings]
    return "\n".join(lines) + "\n"


def plot_history(history: list[dict], cfg: TrainingConfig, title: str, best: int, findings: list):
    """Loss, the best metric, the learning rate and the gradient norm by epoch; the best epoch
    marked, and where the run note's first finding began."""
    from matplotlib.figure import Figure  # imported here: only plotting pays for it; no GUI
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    metric = cfg.best_metric if cfg.best_metric != "val_loss" else next(
        (k for k in history[0] if k.startswith("val_") and k != "val_loss"), "val_loss")
    panels = {"Loss": ("train_loss", "val_loss"), f"Validation {metric[4:]}": (metric,),
              "Learning rate": [k for k in history[-1] if re.fullmatch(r"lr(_\d+)?", k)],
              "Gradient norm, before clipping": ("grad_norm", "grad_norm_max")}
    fig = Figure(figsize=(18, 4.3))
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.12, top=0.84, wspace=0.22)  # layout: 0.1 s
    for ax, (name, keys) in zip(fig.subplots(1, 4), panels.items()):
        for key in [k for k in keys if k in history[-1]]:
            ax.plot([h["epoch"] for h in history], [h.get(key, math.nan) for h in history],
                    label=key)  # NaN: a key that began later (a group start_epoch added)
        ax.axvline(best, color="gray", linestyle="--", label=f"best epoch ({best})")
        for f in findings[:1]:
            label = f"{f['pattern'].replace('_', ' ')} from {f['epoch']}"
            ax.axvline(f["epoch"], color="tab:red", linestyle=":", label=label)
        ax.set(title=name, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if "grad_norm" in history[-1]:  # 0.1, 0.2, 0.5, 1: plain labels; 10^x costs 0.3 s of mathtext
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    save_file(path_of(cfg, "loss_curve.png"), lambda f: fig.savefig(f, format="png"))


# ============================================================================= the live view
# Optional: where epochs show besides the log. Deleted whole, the log alone shows them.

from contextlib import ExitStack  # a block's own imports live with it, so that it goes whole

@contextmanager
def live_view(run: Run):
    """Yields show(entry), called after every epoch with its history entry: a tqdm bar when stderr
    is a terminal (users expect progress on long runs), and TensorBoard scalars under runs/ with
    --tensorboard (never a hard dependency)."""
    bar = writer = None
    left = run.rank == 0 and run.progress["epoch"] < run.cfg.epochs
    with ExitStack() as stack:
        if left and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            bar = stack.enter_context(tqdm(total=run.cfg.epochs, initial=run.progress["epoch"],
                                           unit="epoch"))
            stack.enter_context(logging_redirect_tqdm())  # log lines print above the bar
        if left and run.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("--tensorboard needs: pip install tensorboard (going on without it)")
            else:
                logdir = Path("runs") / f"{Path(run.cfg.dataset).stem}-{run.progress['run']}"
                log.info("TensorBoard: tensorboard --logdir runs  (this run: %s)", logdir)
                writer = stack.enter_context(SummaryWriter(str(logdir)))

        def show(entry: dict) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train_loss=f"{entry['train_loss']:.4g}",
                                val_loss=f"{entry['val_loss']:.4g}")
            for name, value in entry.items() if writer is not None else ():
                if name not in ("epoch", "seconds"):
                    writer.add_scalar(name.replace("_", "/", 1), value, entry["epoch"])

        yield show


if __name__ == "__main__":
    try:
        main()
    except RuntimeError:
        if os.environ.get("RANK", "0") != "0":  # the group broke as rank 0 stopped, and it said why
            raise SystemExit(1)
        raise
