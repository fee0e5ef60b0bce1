"""A PyTorch training loop you can trust and copy.

`python train.py` trains a small MLP on Iris, offline, in seconds: it keeps the
best checkpoint by validation loss, tests it once on rows it never saw, and
writes history, plots and a test report. Every knob is a TrainingConfig field
and a command-line flag (`python train.py --help`): any table by flags
(`--dataset my.csv --label-column y`, regression too), `--predict` and
`--eval-only` from the best checkpoint, `--resume` after a stop, and `torchrun`
for several processes, all without code changes.

The file reads top to bottom in the order the work happens:
config -> device -> data -> model -> step/epoch -> checkpoint -> report -> main,
then the machinery a first reading can skip (distributed, signals, progress, the
prediction command line). The two places you are expected to swap are marked
"SWAP HERE": prepare_data for your data, build_model for your model.
"""

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import typing
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- config

@dataclass
class TrainingConfig:
    # data
    dataset: str = "scikit-learn/iris"  # Hugging Face hub id, or a local .csv/.json/.jsonl/.parquet file
    label_column: str = "Species"  # the column to predict
    feature_columns: str = ""  # comma-separated input columns; empty: every column but the label and id-like ones
    categorical_columns: str = ""  # comma-separated columns to one-hot even though they hold numbers (codes)
    max_categories: int = 20  # one-hot slots per categorical column: the most frequent; the rest share "other"
    missing: str = "impute"  # blank numeric cells: "impute" (training median + a was-missing input) or "error"
    task: str = "classification"  # "classification", "regression", or "auto" (a numeric label of many values regresses)
    class_weight: str = "none"  # "none", or "balanced": weight the loss by inverse class frequency in training
    datasets_dir: str = "datasets"  # dataset cache; once a dataset is here, runs load it offline
    val_fraction: float = 0.15  # share of each class held out to pick the best epoch
    test_fraction: float = 0.15  # share of each class held out for one final test
    seed: int = 42  # seeds the splits, the initial weights, dropout and shuffling
    # optimization
    epochs: int = 50  # passes over the training split
    batch_size: int = 0  # rows per step, per rank (see grad_accum_steps); 0: grows with the data, 16 to 512
    learning_rate: float = 1e-2  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    label_smoothing: float = 0.1  # classification: train toward 0.9 (+0.1 spread) so confidence stays honest
    scheduler: str = "cosine"  # "cosine" (linear warmup, then cosine decay to zero) or "none"
    warmup_fraction: float = 0.05  # share of all steps spent warming up when scheduler is "cosine"
    grad_clip: float = 1.0  # largest gradient norm allowed; 0 turns clipping off
    early_stopping_patience: int = 0  # stop after this many epochs without a better val loss; 0 never stops
    grad_accum_steps: int = 1  # micro-batches per optimizer step: effective batch = batch_size x this x ranks
    # hardware
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU), or a torch device such as "cuda:1" or "cpu"
    use_amp: bool = False  # mixed precision through torch.autocast
    amp_dtype: str = "auto"  # "auto" (bfloat16 where supported, else float16), "bfloat16" or "float16"
    loader: str = "auto"  # "memory" (tensors on the device, sliced), "dataloader" (pinned host memory), or "auto"
    num_workers: int = 0  # DataLoader worker processes, for loader "dataloader"
    compile: bool = False  # torch.compile the model: slower start, faster steps on big models
    # outputs
    checkpoint_dir: str = "checkpoints"  # best_model.pt and last.pt go here
    output_dir: str = "training-loop"  # history.json, loss_curve.png and test_report.json go here
    resume: bool = False  # continue from checkpoint_dir/last.pt, at the epoch and step it recorded
    save_every_steps: int = 1000  # also write last.pt every N optimizer steps into an epoch; 0: at epoch ends only
    log_every: int = 10  # log every N epochs (the first and last are always logged)
    tensorboard: bool = False  # also log scalars to runs/<dataset>-<time> (needs: pip install tensorboard)
    # instead of training
    predict: str | None = None  # raw rows "5.1,3.5,1.4,0.2;6.7,3,5.2,2.3" or a .csv file: print best_model.pt's predictions
    eval_only: bool = False  # evaluate best_model.pt on the test split and rewrite the report and plots


def field_help() -> dict[str, str]:
    """Each field's trailing comment above, so the dataclass is the only place its doc lives."""
    try:
        source = Path(__file__).read_text()
    except OSError:  # no source at hand (a frozen app): flags still work, without help
        return {}
    body = source.split("class TrainingConfig:", 1)[-1].split("\n\n\n", 1)[0]
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", body, re.M))


def flag_options(name: str, kind) -> dict:
    """argparse keywords for a field of type bool, int, float, str, X | None, list[X] or tuple[X, ...]."""
    scalars, args = (int, float, str), typing.get_args(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in scalars:
        return {"type": kind, "metavar": kind.__name__.upper()}
    if len(args) == 2 and type(None) in args and args[0] in scalars:  # X | None: the word "none" gives None
        return {"type": lambda text: None if text.lower() == "none" else args[0](text),
                "metavar": f"{args[0].__name__.upper()}|none"}
    if typing.get_origin(kind) in (list, tuple) and args and args[0] in scalars and set(args) <= {args[0], ...}:
        fixed = typing.get_origin(kind) is tuple and ... not in args  # tuple[int, int] takes exactly two
        return {"type": args[0], "nargs": len(args) if fixed else "*", "metavar": args[0].__name__.upper()}
    fail(f"TrainingConfig.{name}: a field of type {kind} cannot be a flag; use bool, int, float, str, "
         "X | None, list[X] or tuple[X, ...] of those")


def parse_config(argv: list[str] | None = None, config_class=TrainingConfig) -> TrainingConfig:
    """Every TrainingConfig field becomes a flag: `batch_size` is `--batch-size` (or `--batch_size`)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs, kinds = field_help(), typing.get_type_hints(config_class)
    for f in fields(config_class):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, help=docs.get(f.name, ""),
                            **flag_options(f.name, kinds[f.name]))
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [re.sub(r"^--[^=]+", lambda m: m[0].replace("_", "-"), a) for a in argv]
    for i in range(len(argv) - 1, 0, -1):  # "--predict -1.5,2": argparse would take the rows for a flag
        if argv[i - 1] == "--predict" and re.match(r"-[\d.]", argv[i]):
            argv[i - 1:i + 1] = [f"--predict={argv[i]}"]
    values = vars(parser.parse_args(argv))
    return config_class(**{k: tuple(v) if typing.get_origin(kinds[k]) is tuple else v for k, v in values.items()})


def other_rank() -> bool:
    """Under torchrun, any process but rank 0: every rank meets the same bad input, rank 0 says it."""
    return os.environ.get("RANK", "0") != "0"


def fail(message: str):
    """Stop with one clear line on stderr and exit status 1: bad input is not a crash."""
    raise SystemExit(1 if other_rank() else f"error: {message}")


def validate_config(cfg: TrainingConfig) -> None:
    """Refuse impossible values before anything is read or written."""
    rules = [
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (0 <= cfg.seed < 2**32, "--seed must be in [0, 2**32)"),
        (cfg.batch_size < 2**31, "--batch-size must be below 2**31"),
        (cfg.predict is None or cfg.predict.strip() != "", "--predict was given an empty value; give rows or a .csv file"),
        (cfg.batch_size >= 0, "--batch-size must be at least 1 (or 0: chosen from the data's size)"),
        (0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (cfg.learning_rate > 0, "--learning-rate must be above 0"),
        (cfg.weight_decay >= 0, "--weight-decay must be 0 or more"),
        (0 < cfg.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (0 < cfg.test_fraction < 1, "--test-fraction must be between 0 and 1"),
        (cfg.val_fraction + cfg.test_fraction < 1, "--val-fraction plus --test-fraction must be below 1"),
        (0 <= cfg.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)"),
        (cfg.grad_clip >= 0, "--grad-clip must be 0 (off) or more"),
        (cfg.early_stopping_patience >= 0, "--early-stopping-patience must be 0 (off) or more"),
        (cfg.log_every >= 1, "--log-every must be at least 1"),
        (cfg.save_every_steps >= 0, "--save-every-steps must be 0 (epoch ends only) or more"),
        (cfg.num_workers >= 0, "--num-workers must be 0 or more"),
        (cfg.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
        (cfg.loader in ("auto", "memory", "dataloader"),
         f"--loader {cfg.loader!r} is unknown; use auto, memory or dataloader"),
        (cfg.scheduler in ("cosine", "none"), f"--scheduler {cfg.scheduler!r} is unknown; use cosine or none"),
        (cfg.max_categories >= 1, "--max-categories must be at least 1"),
        (cfg.missing in ("impute", "error"), f"--missing {cfg.missing!r} is unknown; use impute or error"),
        (cfg.class_weight in ("none", "balanced"), f"--class-weight {cfg.class_weight!r} is unknown; use none or balanced"),
        (cfg.task in ("classification", "regression", "auto"),
         f"--task {cfg.task!r} is unknown; use classification, regression or auto"),
        (cfg.amp_dtype in ("auto", "bfloat16", "float16"),
         f"--amp-dtype {cfg.amp_dtype!r} is unknown; use auto, bfloat16 or float16"),
    ]
    problems = [message for ok, message in rules if not ok]
    if problems:
        fail("; ".join(problems))


# ----------------------------------------------------------------------------- device

def get_best_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return check_device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(requested: str) -> torch.device:
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {requested!r} is unknown; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {requested}: this machine has no CUDA device; use --device auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {requested}: MPS is not available here; use --device auto or cpu")
    return device


def resolve_amp_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32."""
    if not cfg.use_amp:
        return None
    if cfg.amp_dtype == "auto":
        cuda_without_bf16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        return torch.float16 if cuda_without_bf16 else torch.bfloat16
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype]
    if dtype == torch.float16 and device.type != "cuda":
        fail(f"--amp-dtype float16 needs a CUDA device (this run uses {device}); use --amp-dtype bfloat16")
    return dtype


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------- data
# SWAP HERE: to train on your own table, pass --dataset and --label-column. To train
# on something that is not a table, replace prepare_data: it must return the dict
# described in its docstring.

HERE = Path(__file__).resolve().parent
# Hub datasets whose copy ships with this repo, so the default run never needs a network.
BUNDLED = {"scikit-learn/iris": HERE / "datasets" / "Iris.csv"}
LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def saved_copy(cfg: TrainingConfig) -> Path:
    """Where a hub dataset is kept after its first load: datasets_dir/owner___name."""
    return Path(cfg.datasets_dir) / cfg.dataset.replace("/", "___")


def load_table(cfg: TrainingConfig):
    """Load the raw table through Hugging Face `datasets`, offline whenever a local copy exists.

    A local file is read directly. A hub id is saved under datasets_dir the first time
    (from the bundled copy for Iris, from the hub otherwise) and loaded from there after.
    """
    source = cfg.dataset
    path, suffix = Path(source), Path(source).suffix.lower()
    saved = saved_copy(cfg)
    if path.is_dir():
        fail(f"--dataset {source} is a directory; pass one of its files ({', '.join(LOADERS)})")
    if suffix in LOADERS and not path.is_file():
        fail(f"--dataset {source}: no such file")
    if path.is_file() and suffix not in LOADERS:
        fail(f"--dataset {source}: unsupported file type; use {', '.join(LOADERS)}")
    if path.is_file() and path.stat().st_size == 0:
        fail(f"--dataset {source}: the file is empty")
    download = not (path.is_file() or saved.exists() or source in BUNDLED)
    if not download:
        # huggingface_hub reads this once, at import: setting it any later has no effect.
        os.environ["HF_HUB_OFFLINE"] = "1"
    elif not hub_reachable():
        fail(f"--dataset {source} is not saved under {cfg.datasets_dir}/ and the Hugging Face hub cannot be "
             "reached. Run once with a network so it is saved for offline use, or pass a local file: "
             "--dataset path/to/data.csv")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its errors reach the user as one line of ours
    # The caches are optional: a read-only datasets_dir gets a temporary one, and a warning.
    writable = os.access(cfg.datasets_dir, os.W_OK) if Path(cfg.datasets_dir).exists() else True
    hf_cache = str(Path(cfg.datasets_dir) / "hf_cache") if writable else tempfile.mkdtemp(prefix="hf_cache-")
    if not writable:
        log.warning("%s is not writable: reading %s without saving a copy or cache", cfg.datasets_dir, source)
    try:
        if path.is_file():
            # datasets keys its cache of a local file on path and modification time: read it afresh.
            return checked_table(datasets.load_dataset(LOADERS[suffix], data_files=source, split="train",
                                                       cache_dir=hf_cache, download_mode="force_redownload"), source)
        if saved.exists():
            try:
                return checked_table(datasets.load_from_disk(str(saved)), source)
            except Exception as e:  # a copy cut short by a kill, say
                if source not in BUNDLED:
                    fail(f"the saved copy {saved} is damaged ({first_line(e)}); delete that folder and run again")
                log.warning("the saved copy %s is damaged: rebuilding it from %s", saved, BUNDLED[source])
                shutil.rmtree(saved)
        if source in BUNDLED:
            table = datasets.load_dataset("csv", data_files=str(BUNDLED[source]), split="train", cache_dir=hf_cache,
                                          download_mode="force_redownload")
        else:
            log.info("downloading %s from the Hugging Face hub (once; later runs load %s offline)", source, saved)
            table = datasets.load_dataset(source, split="train", cache_dir=hf_cache)
        if writable:  # into a temporary folder, then renamed: a kill mid-save leaves no half copy
            unfinished = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
            table.save_to_disk(str(unfinished))
            os.replace(unfinished, saved)
        return checked_table(table, source)
    except SystemExit:
        raise
    except Exception as e:  # datasets and pyarrow raise many types; the user needs the message
        explain_load_error(e, source)


def explain_load_error(error: Exception, source: str):
    cause = error.__cause__ or error
    if "corresponds to no data" in str(error):  # what datasets says of a file with a header and no rows
        fail(f"--dataset {source} has no rows")
    if isinstance(cause, UnicodeDecodeError):
        fail(f"--dataset {source} is not UTF-8 text: an encoding or format problem ({first_line(cause)}). "
             "Re-save it as UTF-8, or check that it really is a table")
    fail(f"--dataset {source}: could not load it ({first_line(cause)})")


def checked_table(table, source: str):
    """The loaded table, or one line saying why it is not a table of rows."""
    if len(table) == 0:
        fail(f"--dataset {source} has no rows")
    if len(table) == 1 and all(type(f).__name__ in ("List", "Sequence", "LargeList") for f in table.features.values()):
        fail(f"--dataset {source} is laid out by column ({{\"column\": [values, ...]}}); write one record per row: "
             "JSON lines, or a list of objects")
    return table


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick connection to the hub; huggingface_hub itself retries for ~25 s before giving up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides what is reachable: let huggingface_hub ask it
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_id_like(name: str) -> bool:
    name = name.lower()
    return name in ("id", "index") or name.endswith("_id") or name.startswith("unnamed:")


BLANKS = ("", "?", "na", "n/a", "nan", "null", "none", "-")  # cells that mean "no value" in real tables
NA = "(missing)"  # the category of a blank cell


def is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and value.strip().lower() in BLANKS)


def parse_number(value) -> float | None:
    """float(value); NaN for a blank cell; None for anything that is not a number."""
    if is_blank(value):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def category(value) -> str:
    """A cell as a category: numbers by value (so 1, 1.0 and "1" agree), blanks as NA."""
    if is_blank(value):
        return NA
    number = parse_number(value)
    return f"{number:g}" if number is not None and math.isfinite(number) else str(value).strip()


def read_column(table, name: str, as_category: bool, rows: np.ndarray) -> tuple[str, object]:
    """One feature column, for the given rows: ("numeric", float64 array, NaN for blanks),
    ("categorical", array of category strings), or ("left out", the reason)."""
    values = table.data.column(name).to_numpy()[rows]
    if values.dtype.kind in "iufb" and not as_category:
        return "numeric", values.astype(np.float64)
    if values.dtype == object and any(isinstance(v, (list, dict, np.ndarray)) for v in values[:100]):
        return "left out", "not a column of single values"
    if as_category:
        return "categorical", np.array([category(v) for v in values], dtype=object)
    parsed = [parse_number(v) for v in values]
    text = [i for i, v in enumerate(parsed) if v is None]
    filled = sum(not is_blank(v) for v in values)
    if text and len(text) <= filled / 2:  # mostly numbers, a few words: a typo more likely than categories
        i = text[0]
        fail(f"column {name!r} holds a non-numeric value '{values[i]}' in data row {rows[i] + 1} among numbers; "
             f"fix it, or pass --categorical-columns {name} to treat the column as categories")
    if not text:
        return "numeric", np.array(parsed, dtype=np.float64)
    categories = np.array([category(v) for v in values], dtype=object)
    distinct = len(set(categories.tolist()))
    if distinct > max(20, len(values) // 2):
        return "left out", f"text with {distinct} distinct values in {len(values)} rows: an identifier or free text"
    return "categorical", categories


def table_to_columns(table, cfg: TrainingConfig) -> dict:
    """The raw feature columns, the labels and a note on every column, for rows with a label.
    Features are the named columns, or else every column but the label and id-like ones."""
    columns = list(table.column_names)
    if cfg.label_column not in columns:
        fail(f"--label-column {cfg.label_column!r} is not in the data; columns are: {', '.join(columns)}")
    chosen, as_category = ([c.strip() for c in text.split(",") if c.strip()]
                           for text in (cfg.feature_columns, cfg.categorical_columns))
    unknown = [c for c in chosen + as_category if c not in columns]
    if unknown or cfg.label_column in chosen:
        fail(f"--feature-columns / --categorical-columns: {', '.join(unknown) or cfg.label_column} cannot be used "
             f"as features; columns are: {', '.join(columns)}")
    labels = table.data.column(cfg.label_column).to_numpy()
    rows = np.array([i for i, v in enumerate(labels) if not is_blank(v)], dtype=np.int64)
    if len(rows) == 0:
        fail(f"column {cfg.label_column!r} has no values")
    labels = labels[rows]
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        fail(f"column {cfg.label_column!r} holds an infinite value in data row {rows[~np.isfinite(labels)][0] + 1}")
    features, notes = {}, {}
    for name in chosen or [c for c in columns if c != cfg.label_column]:
        if not chosen and is_id_like(name):
            kind, values = "left out", "an id-like name"
        else:
            kind, values = read_column(table, name, name in as_category, rows)
        if kind == "numeric" and np.isinf(values).any():
            fail(f"column {name!r} holds an infinite value in data row {rows[np.isinf(values)][0] + 1}")
        if kind == "numeric" and cfg.missing == "error" and np.isnan(values).any():
            fail(f"column {name!r} has a missing value in data row {rows[np.isnan(values)][0] + 1} "
                 "(--missing error); use --missing impute to fill it")
        if kind == "numeric":  # one value in every row, or no value at all: nothing to learn from
            filled = values[~np.isnan(values)]
            if len(filled) == 0 or (len(filled) == len(values) and filled.min() == filled.max()):
                kind, values = "left out", "constant"
        elif kind == "categorical" and len(set(values.tolist())) < 2:
            kind, values = "left out", "constant"
        if kind == "left out":
            notes[name] = f"left out ({values})"
        else:
            features[name] = (kind, values)
    if not features:
        fail(f"no usable feature columns besides {cfg.label_column!r}: "
             + "; ".join(f"{k} {v}" for k, v in notes.items()))
    return {"features": features, "labels": labels.tolist(), "notes": notes, "unlabelled": len(table) - len(rows)}


def split_indices(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int, classes=None) -> dict:
    """Disjoint train/val/test row indices, stratified by class (y holds class ids, named by
    `classes`), reproducible from seed."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, round(len(rows) * test_fraction))
        n_val = max(1, round(len(rows) * val_fraction))
        if len(rows) - n_test - n_val < 1:
            name = repr(classes[c]) if classes else str(c)
            fail(f"class {name} has {len(rows)} rows: too few to put at least one in each of train, "
                 "val and test; add rows or lower --val-fraction / --test-fraction")
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test:n_test + n_val])
        parts["train"].append(rows[n_test + n_val:])
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


PREPARED_VERSION = 2  # bump when the way a table becomes columns changes


def source_fingerprint(cfg: TrainingConfig) -> dict | None:
    """What the prepared columns depend on: the source's content, not its size and modification
    time, which a copy (cp -p, rsync -a, tar) keeps through an edit. None while there is no source."""
    path, saved = Path(cfg.dataset), saved_copy(cfg)
    files = [path] if path.is_file() else sorted(f for f in saved.rglob("*") if f.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {"version": PREPARED_VERSION, "sha256": digest.hexdigest()}  # the column settings name the file


def load_prepared(cfg: TrainingConfig) -> dict:
    """table_to_columns' result, built from the table once, then read back while the source is
    unchanged, without even importing `datasets`."""
    source = Path(cfg.dataset).resolve() if Path(cfg.dataset).is_file() else cfg.dataset
    settings = f"{source}|{cfg.label_column}|{cfg.feature_columns}|{cfg.categorical_columns}|{cfg.missing}"
    cache = Path(cfg.datasets_dir) / "prepared" / f"{Path(cfg.dataset).name}-{hashlib.sha1(settings.encode()).hexdigest()[:12]}.pt"
    fingerprint = source_fingerprint(cfg)
    if fingerprint is not None and cache.is_file():
        with suppress(Exception):  # an unreadable or stale cache is rebuilt, never trusted
            prepared = torch.load(cache, weights_only=True)
            if prepared["fingerprint"] == fingerprint:
                prepared["features"] = {k: (kind, v.numpy() if kind == "numeric" else np.array(v, dtype=object))
                                        for k, (kind, v) in prepared["features"].items()}
                return prepared
    prepared = table_to_columns(load_table(cfg), cfg)
    storable = {k: (kind, torch.from_numpy(v) if kind == "numeric" else v.tolist())  # weights_only: no ndarrays
                for k, (kind, v) in prepared["features"].items()}
    prepared["fingerprint"] = source_fingerprint(cfg)  # again: loading may have just saved the source
    try:
        save_file(cache, lambda f: torch.save({**prepared, "features": storable}, f))
    except SystemExit as e:  # the cache only saves time: a run goes on without it
        log.warning("%s; going on without the prepared-data cache", str(e.code).removeprefix("error: "))
    return prepared


def resolve_task(cfg: TrainingConfig, labels: list) -> str:
    """A numeric label with many distinct values for its row count is a regression target."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels)
    distinct = len(set(labels))
    continuous = numeric and distinct > 20 and distinct > len(labels) // 20
    if cfg.task == "auto":
        return "regression" if continuous else "classification"
    if cfg.task == "classification" and continuous:
        fail(f"column {cfg.label_column!r} holds {distinct} distinct numbers in {len(labels)} rows, too many to be "
             "classes: use --task regression (or --task auto)")
    if cfg.task == "regression" and not numeric:
        fail(f"--task regression needs a numeric label; column {cfg.label_column!r} holds text")
    return cfg.task


def targets(cfg: TrainingConfig, labels: list) -> tuple[str, list, np.ndarray]:
    """The task, the classes (sorted distinct values; none for regression) and y: class ids or values."""
    task = resolve_task(cfg, labels)
    if task == "regression":
        return task, [], np.asarray(labels, dtype=np.float64)
    classes = sorted(set(labels))
    if len(classes) < 2:
        fail(f"column {cfg.label_column!r} holds a single class ({classes[0]!r}); a classifier needs two or more")
    log.info("classes: %s", ", ".join(map(str, classes[:20])) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else ""))
    index = {c: i for i, c in enumerate(classes)}
    return task, classes, np.array([index[v] for v in labels], dtype=np.int64)


def fit_inputs(features: dict, train_rows: np.ndarray, max_categories: int) -> dict:
    """How raw columns become model inputs, learnt from the training rows only: each numeric
    column's median (for blank cells, plus a 0/1 was-missing input if 1% or more of the training
    rows had blanks there), and each categorical column's most frequent categories (one-hot; the
    rest share an "other" slot)."""
    spec = {}
    for name, (kind, values) in features.items():
        seen = values[train_rows]
        if kind == "numeric":
            blanks = int(np.isnan(seen).sum())
            median = float(np.nanmedian(seen)) if blanks < len(seen) else 0.0
            # A flag set in a row or two of a thousand is an input the model can only memorize.
            spec[name] = {"kind": kind, "median": median, "flag": blanks > 0 and blanks >= 0.01 * len(seen)}
        else:
            names, counts = np.unique(seen.astype(str), return_counts=True)
            order = np.argsort(-counts, kind="stable")
            spec[name] = {"kind": kind, "categories": names[order[:max_categories]].tolist(),
                          "rest": names[order[max_categories:]].tolist()}  # seen in training, but in "other"
    return spec


def model_inputs(spec: dict) -> list[tuple[str, bool]]:
    """The model's inputs, in order: (name, whether it is a 0/1 input)."""
    inputs = []
    for name, s in spec.items():
        if s["kind"] == "numeric":
            inputs += [(name, False)] + ([(f"{name} was missing", True)] if s["flag"] else [])
        else:
            inputs += [(f"{name}={c}", True) for c in s["categories"]] + [(f"{name}=other", True)]
    return inputs


def encode(features: dict, spec: dict) -> tuple[np.ndarray, dict]:
    """Raw columns (numeric arrays with NaN, category strings) to unnormalized float inputs, and
    for each categorical column the number of rows whose category training never saw."""
    parts, unseen = [], {}
    for name, s in spec.items():
        values = features[name]
        if s["kind"] == "numeric":
            values = np.asarray(values, dtype=np.float64)
            blank = np.isnan(values)
            parts.append(np.where(blank, s["median"], values)[:, None])
            if s["flag"]:
                parts.append(blank[:, None].astype(np.float64))
        else:
            slot = {c: i for i, c in enumerate(s["categories"])}
            codes = np.array([slot.get(v, len(slot)) for v in values], dtype=np.int64)
            known = set(s["categories"]) | set(s["rest"])
            unseen[name] = sum(v not in known for v in values)
            parts.append(np.eye(len(slot) + 1)[codes])
    return np.concatenate(parts, axis=1), unseen


def describe_columns(prepared: dict, spec: dict) -> list[str]:
    """One line per column: what this run made of it."""
    lines, plain = [], []
    for name, (kind, values) in prepared["features"].items():
        s = spec[name]
        if kind == "numeric":
            blanks = int(np.isnan(values).sum())
            if blanks:
                lines.append(f"{name}: numeric, {blanks} blank cells filled with the training median {s['median']:g}"
                             + (" (plus a was-missing input)" if s["flag"] else ""))
            else:
                plain.append(name)
        else:
            other = f" + other ({len(s['rest'])} rarer)" if s["rest"] else " + other"
            lines.append(f"{name}: categorical, {len(s['categories'])} categories{other}")
    if plain:
        lines.insert(0, f"numeric: {', '.join(plain[:12])}{f', ... ({len(plain)} columns)' if len(plain) > 12 else ''}")
    return lines + [f"{name}: {note}" for name, note in prepared["notes"].items()]


def prepare_data(cfg: TrainingConfig) -> dict:
    """Everything the loop needs, as plain tensors and values:

    task: "classification" or "regression"; classes: names, in model output order
    features: the raw columns a row must give; inputs: the model's input names, in order
    preprocess: how raw columns become inputs (medians, categories), fit on the training split
    mean, std: normalization statistics of the training split's inputs, applied to every split
    target_mean, target_std: the same for a regression target (0 and 1 for classification)
    class_weights: the loss's weight per class (None: all 1)
    train, val, test: (x, y) tensors: x normalized float32; y class ids, or the standardized target
    splits: the row indices of each split in the (labelled rows of the) source table
    """
    prepared = load_prepared(cfg)
    task, classes, y = targets(cfg, prepared["labels"])
    splits = split_indices(y if task == "classification" else np.zeros(len(y), dtype=np.int64),
                           cfg.val_fraction, cfg.test_fraction, cfg.seed, classes)
    spec = fit_inputs(prepared["features"], splits["train"], cfg.max_categories)
    x, _ = encode({k: v for k, (_, v) in prepared["features"].items()}, spec)
    inputs, binary = zip(*model_inputs(spec))
    huge = np.abs(x).max(axis=0) > 1e37  # float32 ends at 3.4e38: such inputs overflow in the first layer
    if huge.any():
        fail(f"input {inputs[int(np.argmax(huge))]!r} holds values near float32's limit (above 1e37): "
             "rescale that column (or take its log) before training")
    train_x = x[splits["train"]]
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std[std == 0] = 1.0  # a constant input stays 0 instead of dividing by zero
    # 0/1 inputs (one-hot, was-missing) stay 0/1: standardized, a flag set in one training row
    # in a thousand would reach 30 and swamp every other input.
    mean[np.array(binary)], std[np.array(binary)] = 0.0, 1.0
    x = ((x - mean) / std).astype(np.float32)
    if prepared["unlabelled"]:
        log.info("left out %d rows with no %r", prepared["unlabelled"], cfg.label_column)
    for line in describe_columns(prepared, spec):
        log.info("column %s", line)
    target_mean, target_std, weights = 0.0, 1.0, None
    if task == "regression":  # a standardized target keeps the loss near 1, whatever the label's units
        target_mean, target_std = float(y[splits["train"]].mean()), float(y[splits["train"]].std() or 1.0)
        y = ((y - target_mean) / target_std).astype(np.float32)
    elif cfg.class_weight == "balanced":  # each class weighs as much in the loss, however rare
        counts = np.bincount(y[splits["train"]], minlength=len(classes))
        weights = torch.tensor(len(splits["train"]) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
    data = {"task": task, "features": list(prepared["features"]), "inputs": list(inputs), "classes": classes,
            "preprocess": spec, "splits": splits, "columns": prepared["features"],
            "mean": torch.from_numpy(mean.astype(np.float32)), "std": torch.from_numpy(std.astype(np.float32)),
            "target_mean": target_mean, "target_std": target_std, "class_weights": weights}
    for name, rows in splits.items():
        data[name] = (torch.from_numpy(x[rows]), torch.from_numpy(y[rows]))
    # The source's content and the splits: a checkpoint from other data, or from this file after
    # rows were added (which reshuffles the splits), is refused rather than trusted.
    digest = hashlib.sha256(json.dumps([prepared["fingerprint"], cfg.label_column, data["features"]]).encode())
    for rows in splits.values():
        digest.update(rows.tobytes())
    data["fingerprint"] = digest.hexdigest()[:16]
    return data


def rows_to_inputs(rows, checkpoint: dict) -> tuple[torch.Tensor, dict]:
    """Raw rows (lists in checkpoint["features"] order, or dicts by column name; numbers, text and
    blanks as in the source table) to normalized model inputs, as the run did for its own rows.
    Also returns, per categorical column, how many rows had a category training never saw."""
    names, spec = checkpoint["features"], checkpoint["preprocess"]
    rows = [[r.get(n) for n in names] if isinstance(r, dict) else list(r) for r in rows]
    columns = {}
    for j, name in enumerate(names):
        cells = [r[j] for r in rows]
        if spec[name]["kind"] == "numeric":
            columns[name] = np.array([parse_number(v) for v in cells], dtype=np.float64)
        else:
            columns[name] = [category(v) for v in cells]
    x, unseen = encode(columns, spec)
    return ((torch.from_numpy(x) - checkpoint["mean"].double()) / checkpoint["std"].double()).float(), unseen


def choose_loader(cfg: TrainingConfig, device: torch.device, data: dict) -> str:
    """"memory" unless the data would crowd a GPU: then a DataLoader streams it from host memory."""
    if cfg.loader != "auto":
        return cfg.loader
    if device.type != "cuda":
        return "memory"  # on CPU (and MPS's unified memory) the data already sits where the model runs
    size = sum(t.numel() * t.element_size() for split in ("train", "val") for t in data[split])
    free, _ = torch.cuda.mem_get_info(device)
    return "memory" if size < free // 4 else "dataloader"  # leave most of the GPU to activations


def shard_rows(n: int, rank: int = 0, world: int = 1, shuffle_seed: int | None = None) -> torch.Tensor:
    """This rank's rows, dealt as DistributedSampler deals them. Shuffled: one permutation from
    shuffle_seed (seed + epoch), the same on every rank, padded to equal shares so every rank takes
    the same number of steps. Unshuffled (evaluation): every world-th row, no padding."""
    if shuffle_seed is None:
        return torch.arange(rank, n, world)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    padded = torch.cat([order, order[: math.ceil(n / world) * world - n]])
    return padded[rank::world]


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, rows: torch.Tensor | None = None):
    """Batches cut from in-memory tensors, in the order of `rows` (all rows in order when None):
    one indexing op a batch, no per-row fetch and collate."""
    if rows is None:
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    for batch in rows.to(x.device).split(batch_size):
        yield x[batch], y[batch]


def loader_batches(x: torch.Tensor, y: torch.Tensor, cfg: TrainingConfig, device: torch.device,
                   epoch: int | None, rank: int = 0, world: int = 1, start: int = 0):
    """The same batches, in the same order, through a torch DataLoader over host memory. Pinned
    pages let the copy to the GPU run alongside compute (non_blocking)."""
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(x, y)
    if epoch is None:
        rows = shard_rows(len(x), rank, world).tolist()
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        rows = list(sampler)[start:]
    # A private generator for the workers' base seed: otherwise each epoch's iterator draws it from
    # the global RNG, shifting dropout's stream and so breaking exact resume.
    loader = DataLoader(dataset, sampler=BatchSampler(rows, cfg.batch_size, drop_last=False), batch_size=None,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def epoch_batches(split: tuple, cfg: TrainingConfig, device: torch.device, epoch: int | None = None,
                  rank: int = 0, world: int = 1, start: int = 0):
    """This rank's pass over a split: shuffled for `epoch`, or in order for evaluation (None). A
    resumed epoch starts `start` rows into this rank's share: the same order, nothing replayed."""
    x, y = split
    if cfg.loader == "dataloader":
        return loader_batches(x, y, cfg, device, epoch, rank, world, start)
    if epoch is None and world == 1:
        return iterate_batches(x, y, cfg.batch_size)
    seed = None if epoch is None else cfg.seed + epoch
    return iterate_batches(x, y, cfg.batch_size, shard_rows(len(x), rank, world, seed)[start:])


# ----------------------------------------------------------------------------- model

class TinyMLP(nn.Module):
    """Two hidden layers. Returns raw logits, one per class (cross_entropy applies the softmax
    itself); for regression, one output: the standardized prediction."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(in_features: int, out_features: int, cfg: TrainingConfig) -> nn.Module:
    """SWAP HERE for your model: training, --predict, --eval-only and model_from_checkpoint all
    build it through this one function. Checkpoints record its arguments (the sizes and the
    config), so a model that needs more (say a new `hidden` field in TrainingConfig) changes
    only this. Contract: (batch, in_features) float32 in, (batch, out_features) raw logits out
    (out_features is 1 for regression); no softmax at the end."""
    return TinyMLP(in_features, out_features)


# ----------------------------------------------------------------------------- step and epoch

def make_optimization(model: nn.Module, cfg: TrainingConfig, device: torch.device, amp_dtype,
                      steps_per_epoch: int):
    """AdamW, a per-step learning-rate schedule, and the grad scaler float16 needs."""
    # The fused kernel updates every parameter in one call: about 2x faster than the default on CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_fraction * total) if cfg.scheduler == "cosine" else 0

    def factor(step: int) -> float:  # linear warmup, then cosine decay to zero at the last step
        if cfg.scheduler == "none":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # float16 needs a GradScaler, or small gradients underflow to zero; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def regression_loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.mse_loss(out.squeeze(-1), y, reduction=reduction)


def loss_function(task: str, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
    """The training loss. Evaluation always reports plain (unweighted, unsmoothed) cross-entropy."""
    if task == "regression":
        return regression_loss
    return partial(F.cross_entropy, weight=class_weights, label_smoothing=label_smoothing)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over all ranks; in a single process, the tensor itself."""
    if not dist.is_initialized():
        return t
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = t.to(on)
    dist.all_reduce(total, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return total.to(t.device)


def with_last(items):
    """Yield (item, is_last) pairs, so a loop over a generator knows its final item."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def train_one_epoch(model, batches, optimizer, scheduler=None, scaler=None, amp_dtype=None,
                    grad_clip: float = 0.0, loss_fn=F.cross_entropy, accum_steps: int = 1,
                    tally: dict | None = None, after_step=None) -> dict | None:
    """One pass over `batches`. Returns {"loss": the training loss averaged over rows (and ranks),
    not batches}; with clipping on, also "grad_norm" and "grad_norm_max", the gradient norm before
    clipping (mean and max over the steps), and "clipped", the share of steps that clipping cut.

    With accum_steps > 1 the optimizer steps once every accum_steps micro-batches (and at the end);
    under DDP, only that last micro-batch's backward all-reduces gradients.

    The epoch so far is a tally: {"loss_sum", "rows", "steps", "norms"} (a gradient norm a step, in
    the first `steps` slots). A resumed epoch passes in the one it saved, with `batches` starting
    where it stopped.
    `after_step(tally)` runs after every optimizer step but the epoch's last, where nothing is
    half accumulated; if it returns True, the epoch stops there and this returns None."""
    model.train()
    device = next(model.parameters()).device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    tally = tally or {"loss_sum": torch.zeros(()), "rows": 0, "steps": 0, "norms": torch.zeros(0)}
    # Both stay on the device, so no step waits for the host; norms has a slot a step, grown by doubling.
    loss_sum = tally["loss_sum"].to(device, copy=True)
    norms = torch.cat([tally["norms"][:tally["steps"]].to(device), torch.zeros(1024, device=device)])
    rows, steps = tally["rows"], tally["steps"]
    for i, ((xb, yb), last) in enumerate(with_last(batches)):
        if i % accum_steps == 0:
            optimizer.zero_grad(set_to_none=True)
        step_now = last or (i + 1) % accum_steps == 0
        with nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, amp_dtype):
                loss = loss_fn(model(xb), yb)
            scaler.scale(loss / accum_steps).backward()  # the scaler is a no-op unless float16 needs it
        loss_sum += loss.detach().float() * len(yb)  # detached: the sum must not keep every step's graph
        rows += len(yb)
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
            scheduler.step()  # once per optimizer step: the schedule is laid out in steps, not epochs
        steps += 1
        if not last and after_step is not None and after_step({"loss_sum": loss_sum, "rows": rows, "steps": steps,
                                                               "norms": norms}):
            return None
    loss_sum, rows = all_reduce(torch.stack([loss_sum, torch.tensor(float(rows), device=device)])).tolist()
    return {"loss": loss_sum / max(rows, 1), **norm_summary(norms[:steps], grad_clip)}


def norm_summary(norms: torch.Tensor, grad_clip: float) -> dict:
    """An epoch's gradient norms, one a step, as mean, max and the share clipped; nothing without
    clipping. Non-finite ones are left out: float16 steps that overflowed, which the scaler skips."""
    norms = norms[torch.isfinite(norms)]
    if grad_clip <= 0 or not len(norms):
        return {}
    mean, peak, clipped = torch.stack([norms.mean(), norms.max(), (norms > grad_clip).float().mean()]).tolist()
    return {"grad_norm": mean, "grad_norm_max": peak, "clipped": clipped}


def batch_sums(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """What evaluation adds up, batch by batch. Classification: loss, correct. Regression: squared
    error, absolute error, sum of y, sum of y squared (all standardized)."""
    if task == "classification":
        return torch.stack([F.cross_entropy(out, y, reduction="sum"), (out.argmax(1) == y).sum()])
    error = out.squeeze(-1) - y
    return torch.stack([error.square().sum(), error.abs().sum(), y.sum(), y.square().sum()])


def metrics(sums: torch.Tensor, rows: int, task: str, target_std: float = 1.0) -> dict:
    """Sums (and the row count) over every rank, turned into loss and metrics. Regression's rmse
    and mae are in the label's units; its loss is the MSE of the standardized target."""
    *totals, rows = all_reduce(torch.cat([sums, torch.tensor([float(rows)], device=sums.device)])).tolist()
    rows = max(rows, 1)
    if task == "classification":
        return {"loss": totals[0] / rows, "acc": totals[1] / rows}
    squared, absolute, y_sum, y_squares = totals
    spread = y_squares - y_sum**2 / rows  # sum of squared deviations from the mean
    return {"loss": squared / rows, "rmse": math.sqrt(squared / rows) * target_std,
            "mae": absolute / rows * target_std, "r2": 1 - squared / spread if spread > 0 else 0.0}


@torch.inference_mode()
def evaluate(model, batches, amp_dtype=None, task: str = "classification", target_std: float = 1.0) -> dict:
    """Loss and metrics over every row of `batches`, whatever the batch sizes; under DDP, over every
    rank's rows, so all ranks report the same numbers. Classification: loss (cross-entropy) and
    acc. Regression: loss, rmse, mae, r2 (see metrics)."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2 if task == "classification" else 4, device=device)  # on the device until the end
    rows = 0
    for xb, yb in batches:
        with autocast(device, amp_dtype):
            out = model(xb).float()
        sums += batch_sums(out, yb, task)
        rows += len(yb)
    return metrics(sums, rows, task, target_std)


@torch.inference_mode()
def predict(model, x: torch.Tensor, batch_size: int, amp_dtype=None) -> torch.Tensor:
    """Raw model outputs (logits) for every row of x, as float32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    with autocast(device, amp_dtype):
        return torch.cat([model(xb.to(device)).float().cpu() for xb in x.split(batch_size)])


# ----------------------------------------------------------------------------- checkpoint

CHECKPOINT_VERSION = 2
# These decide the data and so the model's shape: a run cannot resume across a change to them.
RESUME_MUST_MATCH = ("dataset", "label_column", "feature_columns", "categorical_columns", "max_categories", "missing",
                     "val_fraction", "test_fraction", "seed")


def save_file(path: Path, write) -> None:
    """Every output goes through here, on rank 0 only. `write(f)` fills a temporary file beside `path`, which is
    fsynced and then renamed over it: a kill at any instant leaves the old file or the new one,
    never half of one, and a failed write leaves the old one in place."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return  # one writer: under DDP every rank holds the same state, and rank 0 saves it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # this process's own: two runs never share one
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # a full disk reaches torch.save as RuntimeError, not OSError
        fail(f"could not write {path}: {getattr(e, 'strerror', None) or first_line(e)}; "
             f"any previous {path.name} is untouched")
    finally:
        with suppress(OSError):
            tmp.unlink()  # gone after the rename; left only by a failure, or a stop mid-write


def save_checkpoint(path: Path, state: dict) -> None:
    save_file(path, lambda f: torch.save(state, f))


def write_json(path: Path, obj) -> None:
    """Readable JSON; a list (the history) one item a line, which stays fast at thousands of epochs."""
    text = "[\n" + ",\n".join(json.dumps(item) for item in obj) + "\n]" if isinstance(obj, list) else \
        json.dumps(obj, indent=2)
    save_file(path, lambda f: f.write((text + "\n").encode()))


def model_state(model, data: dict, cfg: TrainingConfig, epoch: int) -> dict:
    """The weights plus everything needed to rebuild the model and predict on raw rows."""
    return {
        "version": CHECKPOINT_VERSION, "model": model.state_dict(), "epoch": epoch,
        "model_args": {"in_features": len(data["inputs"]), "out_features": len(data["classes"]) or 1},
        "task": data["task"], "features": data["features"], "inputs": data["inputs"],
        "preprocess": data["preprocess"], "mean": data["mean"], "std": data["std"], "data": data["fingerprint"],
        "classes": data["classes"], "target_mean": data["target_mean"], "target_std": data["target_std"],
        "config": asdict(cfg),
    }


def every_rank(obj) -> list:
    """obj from every rank, in rank order (a collective under DDP); outside torchrun, [obj]."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def rng_states() -> list[dict]:
    """Every random stream the run draws from, as plain values, one entry per rank. Resuming
    without them drifts; shuffling needs none, being a function of seed and epoch."""
    # weights_only loads no ndarrays, so numpy's and Python's keys travel as tensors.
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    version, python_key, gauss = random.getstate()
    return every_rank({"python": (version, torch.tensor(python_key), gauss), "numpy": numpy_state,
                       "torch": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})


def restore_rng_states(states: dict) -> None:
    version, python_key, gauss = states["python"]
    random.setstate((version, tuple(python_key.tolist()), gauss))
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def load_checkpoint(path: Path) -> dict:
    try:
        # weights_only: a checkpoint is data, never code to run
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and I/O errors all mean the same thing here
        fail(f"{path} is not a readable checkpoint (truncated or corrupt?): {first_line(e)}")
    version = checkpoint.get("version") if isinstance(checkpoint, dict) else None
    if version != CHECKPOINT_VERSION:
        fail(f"{path} was not written by this train.py (checkpoint version {version}, expected {CHECKPOINT_VERSION})")
    return checkpoint


def load_weights(model, checkpoint: dict, path: Path | str) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as e:
        fail(f"{path} holds weights shaped for another model or data: {first_line(e)}")


def model_from_checkpoint(checkpoint: dict, path: Path | str = "the checkpoint") -> nn.Module:
    """The model a checkpoint describes: build_model with the recorded arguments, its weights
    loaded, in eval mode, on the CPU."""
    known = {k: v for k, v in checkpoint["config"].items() if k in TrainingConfig.__dataclass_fields__}
    model = build_model(**checkpoint["model_args"], cfg=replace(TrainingConfig(), **known))
    load_weights(model, checkpoint, path)
    return model.eval()


def check_same_data(checkpoint: dict, path: Path, cfg: TrainingConfig, data: dict) -> None:
    """Refuse a checkpoint from a run on other data: its splits, features or classes differ."""
    derived = ("task", "features", "inputs", "classes")  # recorded beside the config, derived from the data
    saved = {**checkpoint["config"], **{k: checkpoint.get(k) for k in derived}}
    current = {**asdict(cfg), **{k: data[k] for k in derived}}
    differ = [f"{k} ({saved.get(k)!r} there, {current[k]!r} now)"
              for k in (*RESUME_MUST_MATCH, *derived) if saved.get(k) != current[k]]
    if differ:
        fail(f"{path} belongs to a run on other data: {'; '.join(differ)}. "
             "Use the same values, or start fresh with another --checkpoint-dir")
    if checkpoint.get("data") != data["fingerprint"]:
        fail(f"{path} was trained on other rows: {cfg.dataset} changed since (rows added, removed or edited), "
             "so its splits would put training rows into validation and test. Restore the data, or start fresh "
             "with another --checkpoint-dir")


# ----------------------------------------------------------------------------- report

def classification_report(logits: torch.Tensor, y: torch.Tensor, classes: list) -> dict:
    """Accuracy, confusion matrix (rows = true class) and per-class precision / recall / F1, over
    every rank's rows: each rank passes the outputs for its own share."""
    n = len(classes)
    cm = all_reduce(torch.bincount(y * n + logits.argmax(1), minlength=n * n).reshape(n, n))
    loss_sum = all_reduce(F.cross_entropy(logits, y, reduction="sum")).item()
    rows = int(cm.sum())
    per_class = {}
    for i, name in enumerate(classes):
        tp, predicted, actual = cm[i, i].item(), cm[:, i].sum().item(), cm[i].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(name)] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    recalls = [m["recall"] for m in per_class.values() if m["support"]]
    return {
        "accuracy": cm.trace().item() / max(rows, 1), "loss": loss_sum / max(rows, 1), "rows": rows,
        # rare classes count as much as common ones in these two
        "balanced_accuracy": sum(recalls) / max(len(recalls), 1),
        "macro_f1": sum(m["f1"] for m in per_class.values()) / n,
        "classes": classes, "confusion_matrix": cm.tolist(), "per_class": per_class,
    }


def test_report(outputs: torch.Tensor, y: torch.Tensor, data: dict, label: str) -> dict:
    """The test metrics of `outputs` against `y` (this rank's share of the test rows)."""
    if data["task"] == "classification":
        return {"task": "classification", **classification_report(outputs, y, data["classes"])}
    sums = batch_sums(outputs, y, "regression")
    return {"task": "regression", "target": label, **metrics(sums, len(y), "regression", data["target_std"]),
            "rows": int(all_reduce(torch.tensor(len(y))))}


def describe_predictions(outputs: torch.Tensor, meta: dict) -> list[str]:
    """Each row's prediction in words: its class and probability, or its value in the label's units.
    `meta` is the data dict or a best_model.pt checkpoint: both hold task, classes, target_*."""
    if meta["task"] == "classification":
        return [f"{meta['classes'][p.argmax()]} ({p.max():.2f})" for p in outputs.softmax(1)]
    return [f"{v * meta['target_std'] + meta['target_mean']:.6g}" for v in outputs.squeeze(-1).tolist()]


def raw_row(data: dict, row: int) -> str:
    """A source row's feature cells as the table had them (a blank cell shows as an empty field)."""
    cells = [values[row] for _, values in data["columns"].values()]
    return ", ".join("" if isinstance(v, float) and math.isnan(v) else f"{v:g}" if isinstance(v, float) else
                     "" if v == NA else str(v) for v in cells)


def log_report(report: dict, outputs: torch.Tensor, y: torch.Tensor, rows: np.ndarray, data: dict,
               shown: int = 5) -> None:
    """The test metrics, and a few test rows (source row numbers `rows`) with their predictions."""
    if data["task"] == "regression":
        log.info("test: rmse %.4g, mae %.4g, r2 %.4f on %d rows", report["rmse"], report["mae"], report["r2"],
                 report["rows"])
        truths = [f"{v * data['target_std'] + data['target_mean']:.6g}" for v in y.tolist()]
    else:
        classes = report["classes"]
        log.info("test: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f, loss %.4f on %d rows",
                 report["accuracy"], report["balanced_accuracy"], report["macro_f1"], report["loss"], report["rows"])
        if len(classes) <= 20:  # past that, a matrix in the log is noise: test_report.json holds it
            width = max(len(str(c)) for c in classes)
            log.info("confusion matrix (rows = true, columns = predicted):")
            for name, row in zip(classes, report["confusion_matrix"]):
                log.info("  %*s  %s", width, name, " ".join(f"{v:4d}" for v in row))
            for name, m in report["per_class"].items():
                log.info("  %*s  precision %.3f  recall %.3f  f1 %.3f  support %d",
                         width, name, m["precision"], m["recall"], m["f1"], m["support"])
        truths = [str(classes[v]) for v in y.tolist()]
    # Examples spread over the sorted labels: several classes (or the target's range), not the first rows.
    picks = np.unique(np.argsort(y.numpy(), kind="stable")[np.linspace(0, len(y) - 1, shown).round().astype(int)])
    said = describe_predictions(outputs[picks], data)
    for i, pick in enumerate(picks):
        log.info("  [%s] -> %s, true %s", raw_row(data, rows[pick]), said[i], truths[pick])


def diagnosis_limits(epochs: int) -> dict:
    """Every threshold the run note uses, in one place, each with the reason it sits where it does."""
    return {
        # A trend, not one noisy epoch: a stretch of a tenth of the run, and at least 3 epochs. A run
        # needs that many epochs after its best to have shown it flattened (or turned); fewer, and
        # it may well still be improving.
        "stretch": max(3, round(epochs / 10)),
        # Validation loss over the last stretch at least 3% above its best is a rise; less is the noise of
        # a minimum picked among noisy epochs (Iris's 22 validation rows jitter by about that much).
        "rise": 0.03,
        # A held-out loss within 5% of predicting the training base rates (the class frequencies, or
        # the mean for regression) has learnt nothing that carries over to new rows.
        "chance": 0.95,
        # Training loss is averaged over every row of an epoch and barely jitters: an epoch 25% above
        # the best so far, giving back half the progress made since epoch 1, is a spike.
        "spike_rise": 0.25, "spike_share": 0.5,
        # On healthy runs here the largest step's gradient norm reaches 2-10x the median epoch mean
        # (10x: digits, 78 steps an epoch); 20x is an explosion. Epoch 1, from random weights, is left out.
        "norm_ratio": 20.0,
        # Clipping is a guard rail: when it cuts most steps, the clip, not the learning rate, sets the step.
        "clipped": 0.5,
    }


def base_rate_loss(data: dict) -> float:
    """The validation loss of a model that learnt only the training base rates: the class
    frequencies (cross-entropy), or the training mean (MSE of the standardized target)."""
    y_train, y_val = data["train"][1].cpu(), data["val"][1].cpu()
    if data["task"] == "regression":
        return y_val.float().square().mean().item()  # the training mean is 0 once standardized
    rates = torch.bincount(y_train, minlength=len(data["classes"])).float() / len(y_train)
    return -rates.clamp_min(1e-12).log()[y_val].mean().item()


def diagnose(history: list[dict], best_epoch: int, base_loss: float, cfg: TrainingConfig) -> dict:
    """What the curves say: {"verdict", "findings"}. Each finding has its pattern, the epoch it began,
    its evidence in numbers and a suggestion naming the flag to change, the first seen first. The
    verdict is the most serious pattern found (not_learning, unstable, overfitting, still_improving),
    or converged when none is."""
    if not history or best_epoch not in [h["epoch"] for h in history]:
        return {"verdict": None, "findings": []}  # nothing recorded to read (say, --eval-only without a history)
    limits, findings = diagnosis_limits(len(history)), []
    epochs = [h["epoch"] for h in history]
    train, val = np.array([h["train_loss"] for h in history]), np.array([h["val_loss"] for h in history])
    b, last, stretch = epochs.index(best_epoch), len(history) - 1, limits["stretch"]

    def found(pattern: str, i: int, evidence: str, suggestion: str) -> None:
        findings.append({"pattern": pattern, "epoch": epochs[i], "evidence": evidence, "suggestion": suggestion})

    lr = cfg.learning_rate
    lower_lr = f"lower --learning-rate ({lr:g} -> {lr / 10:g})"
    if val[b] >= limits["chance"] * base_loss:
        flat = ", and training loss stayed flat" if train.min() >= limits["chance"] * train[0] else ""
        found("not_learning", 0, f"the best validation loss, {val[b]:.4g}, is within {1 - limits['chance']:.0%} of "
              f"the {base_loss:.4g} that predicting the training base rates scores{flat}",
              f"check --label-column and --feature-columns; if they are right, try --learning-rate {lr / 10:g} "
              f"and {lr * 10:g}")
    for i in range(1, len(history)):
        low = train[:i].min()
        if train[i] > low * (1 + limits["spike_rise"]) and train[i] - low > limits["spike_share"] * (train[0] - low):
            found("unstable", i, f"training loss jumped to {train[i]:.4g}, from {low:.4g} before", lower_lr)
            break
    if len(history) > 1 and all("grad_norm" in h for h in history):  # histories from before it was recorded lack it
        for i in range(1, len(history)):
            typical = float(np.median([h["grad_norm"] for h in history[1:i + 1]]))
            if history[i]["grad_norm_max"] > limits["norm_ratio"] * typical:
                found("unstable", i, f"a gradient norm of {history[i]['grad_norm_max']:.3g}, "
                      f"{history[i]['grad_norm_max'] / typical:.0f}x the median epoch mean ({typical:.3g})",
                      f"{lower_lr}, or clip harder: --grad-clip {max(typical, 1e-3):.2g}")
                break
        clipped = [h["clipped"] for h in history]
        if np.mean(clipped) > limits["clipped"]:
            found("unstable", next(i for i, c in enumerate(clipped) if c > limits["clipped"]),
                  f"{np.mean(clipped):.0%} of steps were clipped at --grad-clip {cfg.grad_clip:g}",
                  f"raise --grad-clip ({cfg.grad_clip:g} -> {3 * cfg.grad_clip:g}) so that it catches only "
                  f"outliers, or {lower_lr}")
    if last - b >= stretch:
        rise, before, after = val[-stretch:].mean() / val[b] - 1, train[max(0, b - stretch + 1):b + 1].mean(), \
            train[-stretch:].mean()
        if rise >= limits["rise"] and after < before:
            found("overfitting", b + 1, f"validation loss bottomed at {val[b]:.4g} in epoch {best_epoch}, and its "
                  f"last {stretch} epochs average {rise:+.0%} above that while training loss went on falling "
                  f"({before:.4g} -> {after:.4g})",
                  f"stop sooner: --early-stopping-patience {stretch} (or --epochs {best_epoch + stretch}); "
                  f"or regularize: --weight-decay {max(10 * cfg.weight_decay, 0.01):g}")
    if last - b < stretch:
        found("still_improving", b, f"the best validation loss came at epoch {best_epoch} of {epochs[-1]}"
              + ("" if b == last else f", too near the end to show a trend (fewer than {stretch} epochs after it)"),
              f"train longer: --epochs {2 * epochs[-1]}, or a higher --learning-rate ({lr:g} -> {lr * 3:g})")
    verdict = next((p for p in ("not_learning", "unstable", "overfitting", "still_improving")
                    if any(f["pattern"] == p for f in findings)), "converged")
    return {"verdict": verdict, "findings": sorted(findings, key=lambda f: f["epoch"])}


def run_note(diagnosis: dict, history: list[dict], best_epoch: int, result: dict, cfg: TrainingConfig,
             title: str) -> str:
    """The run in words (training-loop/run_note.md): the best and the last epoch and why they differ,
    what the curves imply, whether the run was stable, the first finding and what to change."""
    verdict, findings = diagnosis["verdict"], diagnosis["findings"]
    if verdict is None:
        return f"# Run note: {title}\n\nNo training history to read: the curves were not recorded.\n"
    best, start, end = next(h for h in history if h["epoch"] == best_epoch), history[0], history[-1]
    score = f"test accuracy {result['accuracy']:.4f}" if "accuracy" in result else f"test R² {result['r2']:.4f}"
    implied = {
        "converged": f"validation loss settled within {diagnosis_limits(len(history))['rise']:.0%} of its best: "
                     "more epochs would not help",
        "overfitting": f"after epoch {best_epoch} the model fit the training rows better and new rows worse",
        "still_improving": "training ended before validation loss showed it had flattened: more epochs would "
                           "likely help",
        "not_learning": "the model did no better on held-out rows than predicting the base rates",
        "unstable": "the loss or the gradients jumped, so the curves are not steady enough to trust",
    }[verdict]
    if best_epoch == end["epoch"]:
        differ = "best_model.pt and last.pt hold the same epoch, the last"
    else:
        differ = (f"best_model.pt holds epoch {best_epoch}, last.pt epoch {end['epoch']} (where training ended, for "
                  f"--resume). They differ because the best is chosen by validation loss alone, and no epoch after "
                  f"{best_epoch} went below its {best['val_loss']:.4g}")
    lines = [f"# Run note: {title}", "",
             f"**Verdict: {verdict.replace('_', ' ')}.** Best epoch {best_epoch} of {end['epoch']}; {score}.", "",
             f"- Best and last: {differ}.",
             f"- The curves: training loss {start['train_loss']:.4g} -> {end['train_loss']:.4g}; validation loss "
             f"{start['val_loss']:.4g} -> {best['val_loss']:.4g} (epoch {best_epoch})"
             + (f" -> {end['val_loss']:.4g} (epoch {end['epoch']})" if best is not end else "") + f". So {implied}."]
    unstable = [f["evidence"] for f in findings if f["pattern"] == "unstable"]
    norms = [h for h in history if "grad_norm" in h]  # recorded only while clipping is on
    peak = max(norms, key=lambda h: h["grad_norm_max"]) if norms else None
    lines.append(f"- Stability: {'not stable: ' + '; '.join(unstable) if unstable else 'stable'}. " + (
        f"Gradient norm before clipping: mean {np.mean([h['grad_norm'] for h in norms]):.3g}, largest "
        f"{peak['grad_norm_max']:.3g} (epoch {peak['epoch']}); {np.mean([h['clipped'] for h in norms]):.1%} of "
        f"steps clipped at --grad-clip {cfg.grad_clip:g}." if norms else
        "Gradient norms were not recorded: they come free with clipping, and --grad-clip is 0."))
    first = findings[0] if findings else None
    lines.append(f"- First finding: {first['pattern'].replace('_', ' ')} from epoch {first['epoch']}: "
                 f"{first['evidence']}." if first else "- First finding: none; nothing to change.")
    if findings:
        lines += ["", "## What to change", *[f"- {f['pattern'].replace('_', ' ')}: {f['suggestion']}." for f in findings]]
    return "\n".join(lines) + "\n"


def figure(title: str, width: float, height: float, panels: int = 1, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # imported here: only plotting pays for it; no GUI backend

    fig = Figure(figsize=(width, height), layout=layout)
    fig.suptitle(title, fontsize=10)
    return fig, fig.subplots(1, panels)


def plot_history(history: list[dict], best_epoch: int, title: str, path: Path, finding: dict | None = None) -> None:
    """Loss curves, the validation metric, the learning rate and the gradient norm; the best epoch
    marked, and the epoch where the run note's first finding began."""
    epochs = [h["epoch"] for h in history]
    metric = "val_acc" if "val_acc" in history[0] else "val_r2"
    fig, (loss_ax, metric_ax, lr_ax, norm_ax) = figure(title, 18, 4.3, panels=4, layout=None)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.12, top=0.84, wspace=0.22)  # fixed: layout engines cost 0.1 s
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy" if metric == "val_acc" else "MSE (standardized)")
    metric_ax.plot(epochs, [h[metric] for h in history], color="tab:green")
    metric_ax.set(title="Validation " + ("accuracy" if metric == "val_acc" else "R²"), xlabel="epoch",
                  ylim=(0, 1.02) if metric == "val_acc" else None)
    lr_ax.plot(epochs, [h["lr"] for h in history], color="tab:purple")
    lr_ax.set(title="Learning rate (end of epoch)", xlabel="epoch")
    if "grad_norm" in history[-1]:  # histories from before it was recorded lack it
        norm_ax.plot(epochs, [h.get("grad_norm") for h in history], color="tab:brown", label="mean")
        norm_ax.plot(epochs, [h.get("grad_norm_max") for h in history], color="tab:brown", alpha=0.4, label="max")
        norm_ax.legend(fontsize=8)
    norm_ax.set(title="Gradient norm before clipping", xlabel="epoch", yscale="log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    norm_ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.1, 0.2, 0.5, 1, ...: labelled plainly,
    norm_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # as the default's 10^x costs 0.3 s of mathtext
    norm_ax.yaxis.set_minor_formatter(NullFormatter())
    for ax in (loss_ax, metric_ax, lr_ax, norm_ax):
        ax.axvline(best_epoch, color="gray", linestyle="--", label=f"best epoch ({best_epoch})")
        if finding:
            ax.axvline(finding["epoch"], color="tab:red", linestyle=":",
                       label=f"{finding['pattern'].replace('_', ' ')} from {finding['epoch']}")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    save_file(path, lambda f: fig.savefig(f, format="png"))


def plot_confusion_matrix(report: dict, title: str, path: Path) -> None:
    """Counts in each cell while they stay readable; past a few dozen classes, colour alone."""
    cm, classes = np.array(report["confusion_matrix"]), [str(c) for c in report["classes"]]
    side = min(2 + 0.6 * len(classes), 16)  # bounded: a figure for 1000 classes must not take gigabytes
    fig, ax = figure(f"{title}\ntest accuracy {report['accuracy']:.3f}", side + 1, side)
    ax.imshow(cm, cmap="Blues")
    if len(classes) <= 30:
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true")
    save_file(path, lambda f: fig.savefig(f, format="png"))


def plot_predictions(true: np.ndarray, predicted: np.ndarray, report: dict, title: str, path: Path) -> None:
    fig, ax = figure(f"{title}\ntest R² {report['r2']:.3f}, RMSE {report['rmse']:.3g}", 5, 5.4)
    ax.scatter(true, predicted, s=12, alpha=0.6)
    low, high = min(true.min(), predicted.min()), max(true.max(), predicted.max())
    ax.plot([low, high], [low, high], color="gray", linestyle="--", label="predicted = true")
    ax.set(xlabel=f"true {report['target']}", ylabel=f"predicted {report['target']}")
    ax.legend()
    ax.grid(alpha=0.3)
    save_file(path, lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------- main: the story of a run

@dataclass
class Run:
    """What a run holds between the steps of main(), so each step is a function of its own."""
    cfg: TrainingConfig
    device: torch.device
    rank: int  # this process, and the number of processes (1 outside torchrun)
    world: int
    amp_dtype: torch.dtype | None
    data: dict  # prepare_data's dict
    train_split: tuple  # data's train and val splits, on the device when the loader is "memory"
    val_split: tuple
    model: nn.Module  # the model itself: saved and loaded
    eval_model: nn.Module  # the same, compiled with --compile
    train_model: nn.Module  # the same, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    progress: dict  # epoch, best_loss, best_epoch, stale, history, run: what last.pt restores
    best_path: Path
    last_path: Path
    out: Path  # cfg.output_dir
    tally: dict | None = None  # after a mid-epoch stop: this rank's tally where the next epoch resumes


def main(argv: list[str] | None = None) -> dict:
    """Parse, set up, fit, test, report. Returns what a caller wants to check: the best epoch,
    the test report, the history and the files written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # no-op if already set up
    log.setLevel(logging.INFO)
    validate_config(cfg)
    if cfg.predict is not None:  # given, even if empty: never "not given, so train"
        return {"predictions": predict_from_cli(cfg)}
    last = None  # last.pt, read once: its config now, its state in set_up
    if cfg.resume and not cfg.eval_only:
        cfg, last = resumed_config(cfg, given_fields(argv))
        validate_config(cfg)
    with distributed(cfg) as (device, rank, world), one_run_per_folder(cfg.checkpoint_dir, rank):
        run = set_up(cfg, device, rank, world, last)
        if not cfg.eval_only:
            fit(run, argv)
        outputs, rows = test(run)
        return report(run, outputs, rows)


def set_up(cfg: TrainingConfig, device: torch.device, rank: int = 0, world: int = 1, last: dict | None = None) -> Run:
    """Data, model and optimizer; progress from scratch, from last.pt (--resume), or from
    best_model.pt (--eval-only)."""
    if rank != 0:
        log.setLevel(logging.ERROR)  # one voice: rank 0 logs, writes and plots
    amp_dtype = resolve_amp_dtype(cfg, device)
    for folder in (cfg.checkpoint_dir, cfg.output_dir) if rank == 0 else ():  # fail before replacing anything
        check_writable(Path(folder))
    seed_everything(cfg.seed + rank)  # DDP copies rank 0's initial weights; the offset decorrelates dropout
    if rank > 0:
        barrier()  # rank 0 builds the dataset caches first; the other ranks then read them
    data = prepare_data(cfg)
    if rank == 0:
        barrier()
    # A batch that grows with the data: 16 rows up to ~1,500 training rows, then doubling to 512
    # at ~25,000; steps stay many enough to learn a small table, few enough to be quick on a big one.
    batch = cfg.batch_size or int(np.clip(2 ** round(math.log2(len(data["train"][0]) / 64)), 16, 512))
    cfg = replace(cfg, loader=choose_loader(cfg, device, data), batch_size=batch)
    train_split, val_split = data["train"], data["val"]
    if cfg.loader == "memory":  # put the data on the device once, not batch by batch
        train_split, val_split = [(x.to(device), y.to(device)) for x, y in (train_split, val_split)]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~8x the float32 throughput on Ampere+
    model = build_model(len(data["inputs"]), len(data["classes"]) or 1, cfg).to(device)
    eval_model, train_model = wrap_model(model, cfg, device, world)
    optimizer, scheduler, scaler = make_optimization(model, cfg, device, amp_dtype,
                                                     steps_per_epoch=steps_per_epoch(cfg, data, world))
    run_id = [f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"]  # ties best_model.pt to last.pt
    if world > 1:
        dist.broadcast_object_list(run_id, src=0)  # one id for the run, rank 0's
    progress = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "stale": 0, "history": [], "run": run_id[0]}
    checkpoints = Path(cfg.checkpoint_dir)
    run = Run(cfg, device, rank, world, amp_dtype, data, train_split, val_split, model, eval_model, train_model,
              optimizer, scheduler, scaler, progress, checkpoints / "best_model.pt", checkpoints / "last.pt",
              Path(cfg.output_dir))
    if cfg.eval_only:
        run.progress = recorded_progress(run)
    elif cfg.resume:
        run.progress = resume(run, last) or progress
    log_setup(run)
    return run


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        fail(f"cannot create or write to the folder {folder}: {e.strerror or e}")


def wrap_model(model: nn.Module, cfg: TrainingConfig, device: torch.device, world: int):
    """The model as evaluated (compiled with --compile) and as trained (also in DDP under torchrun).
    All three share one set of weights; checkpoints save `model` itself, with no prefixes."""
    if cfg.compile and device.type == "cpu" and not any(map(shutil.which, ("cc", "gcc", "clang", "c++"))):
        fail("--compile on CPU needs a C++ compiler (gcc or clang) on PATH; install one, or drop --compile")
    eval_model = torch.compile(model) if cfg.compile else model
    if world == 1:
        return eval_model, eval_model
    from torch.nn.parallel import DistributedDataParallel

    return eval_model, DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None)


def batches_per_epoch(cfg: TrainingConfig, data: dict, world: int) -> int:
    return math.ceil(math.ceil(len(data["train"][0]) / world) / cfg.batch_size)  # each rank's share, in batches


def steps_per_epoch(cfg: TrainingConfig, data: dict, world: int) -> int:
    return math.ceil(batches_per_epoch(cfg, data, world) / cfg.grad_accum_steps)


def log_setup(run: Run) -> None:
    cfg, data = run.cfg, run.data
    log.info("data: %s, %s of %r from %d columns (%d inputs)%s; %d train / %d val / %d test rows; loader: %s",
             cfg.dataset, data["task"], cfg.label_column, len(data["features"]), len(data["inputs"]),
             f", {len(data['classes'])} classes" if data["classes"] else "",
             len(data["train"][0]), len(data["val"][0]), len(data["test"][0]), cfg.loader)
    log.info("device: %s%s, amp: %s, %d parameters; batch %d x %d accumulation x %d rank(s) = effective batch %d",
             run.device, " (torchrun DDP)" if run.world > 1 else "", run.amp_dtype or "off",
             sum(p.numel() for p in run.model.parameters()), cfg.batch_size, cfg.grad_accum_steps, run.world,
             cfg.batch_size * cfg.grad_accum_steps * run.world)


def fit(run: Run, argv: list[str] | None = None) -> None:
    """The epoch loop: train, validate, keep the best, save, log. Ends after cfg.epochs, on early
    stopping, or on a signal (then with exit status 128 + signal, after saving last.pt at the
    step it stopped on)."""
    cfg, progress = run.cfg, run.progress
    weights = run.data["class_weights"]
    loss_fn = loss_function(run.data["task"], None if weights is None else weights.to(run.device), cfg.label_smoothing)
    with stop_on_signals() as stop, live_view(run) as view:
        for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
            if cfg.early_stopping_patience and progress["stale"] >= cfg.early_stopping_patience:
                log.info("early stop: no better val loss in %d epochs", progress["stale"])
                break
            started = time.perf_counter()
            tally, run.tally = run.tally, None  # only the first epoch of a mid-epoch resume has one
            trained = train_one_epoch(run.train_model, training_batches(run, epoch, tally, view), run.optimizer,
                                      run.scheduler, run.scaler, run.amp_dtype, cfg.grad_clip, loss_fn,
                                      cfg.grad_accum_steps, tally, partial(step_done, run, epoch, stop))
            if trained is None:
                break  # stopped mid-epoch, and last.pt holds that step
            val = evaluate(run.eval_model, epoch_batches(run.val_split, cfg, run.device, None, run.rank, run.world),
                           run.amp_dtype, run.data["task"], run.data["target_std"])
            record_epoch(run, epoch, trained, val, time.perf_counter() - started)
            show_epoch(run, view)
            if stop_agreed(stop, run.world):
                break
    if stop["signal"] is not None:
        exit_resumable(run, stop, argv or [])


# Under DDP, how often (in steps) the ranks compare stop flags: one tiny all_reduce, not one per step.
STOP_CHECK_STEPS = 10


def step_done(run: Run, epoch: int, stop: dict, tally: dict) -> bool:
    """After each optimizer step inside an epoch: write last.pt every save_every_steps steps, and
    on a stop, at that very step; return whether to stop. Under DDP a signal may reach some ranks
    a step apart, so they agree every STOP_CHECK_STEPS steps and all stop on the same one."""
    steps, every = tally["steps"], run.cfg.save_every_steps
    stopping = (run.world == 1 or steps % STOP_CHECK_STEPS == 0) and stop_agreed(stop, run.world)
    if stopping or (every and steps % every == 0):
        # each rank's own loss sum: gathering them keeps the epoch's final all_reduce, and so its loss, exact
        save_last(run, {"epoch": epoch, "steps": steps, "rows": tally["rows"],
                        "loss_sum": every_rank(tally["loss_sum"].cpu()), "norms": tally["norms"][:steps].cpu()})
    if stopping:
        stop["at"] = where(run, epoch, steps)
    return stopping


def where(run: Run, epoch: int, steps: int) -> str:
    return f"epoch {epoch}, step {steps} of {steps_per_epoch(run.cfg, run.data, run.world)}"


def save_last(run: Run, position: dict | None = None) -> None:
    """last.pt: everything --resume needs to go on exactly. `position` is None at an epoch's end;
    mid-epoch it says where: the epoch, its steps and rows (per rank) so far, each rank's loss sum,
    the steps' gradient norms (the same on every rank)."""
    progress = run.progress
    save_checkpoint(run.last_path, {**model_state(run.model, run.data, run.cfg, progress["epoch"]),
                                    "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                                    "scaler": run.scaler.state_dict(), "rng": rng_states(), "position": position,
                                    # the history as JSON text: one string, not a pickled object a value
                                    "progress": {**progress, "history": json.dumps(progress["history"])}})


def record_epoch(run: Run, epoch: int, trained: dict, val: dict, seconds: float) -> None:
    """The epoch's line in the history; best_model.pt if it has the lowest val loss so far; last.pt."""
    progress, history = run.progress, run.progress["history"]
    check_finite(epoch, {"training": trained["loss"], "validation": val["loss"]}, run.best_path, progress["best_epoch"])
    history.append({"epoch": epoch, "train_loss": trained["loss"], "val_loss": val["loss"],
                    **{f"val_{k}": v for k, v in val.items() if k != "loss"},
                    **{k: v for k, v in trained.items() if k != "loss"},
                    "lr": run.optimizer.param_groups[0]["lr"], "seconds": seconds})
    progress["epoch"] = epoch
    if val["loss"] < progress["best_loss"]:  # selection by held-out loss, never by the last epoch
        progress.update(best_loss=val["loss"], best_epoch=epoch, stale=0)
        save_checkpoint(run.best_path, {**model_state(run.model, run.data, run.cfg, epoch), "val_loss": val["loss"],
                                        "run": progress["run"]})
    else:
        progress["stale"] += 1
    save_last(run)
    write_json(run.out / "history.json", history)


def check_finite(epoch: int, losses: dict, best_path: Path, best_epoch: int) -> None:
    for name, value in losses.items():
        if not math.isfinite(value):
            kept = f"{best_path} still holds epoch {best_epoch}" if best_epoch else "this run saved no best checkpoint"
            fail(f"epoch {epoch}: the {name} loss is {value}. Likely causes: a learning rate too high "
                 "(lower --learning-rate), float16 overflow (use --amp-dtype bfloat16), or extreme values "
                 f"in the data. Nothing from this epoch was saved; {kept}")


def given_fields(argv: list[str]) -> set[str]:
    """The fields named on the command line: given, which is not the same as truthy."""
    names = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {n[3:] if n.startswith("no_") and n[3:] in TrainingConfig.__dataclass_fields__ else n for n in names}


def resumed_config(cfg: TrainingConfig, given: set[str]) -> tuple[TrainingConfig, dict | None]:
    """A resumed run goes on with the settings last.pt records; only flags given now override them.
    Returns that config and last.pt itself (None when there is none yet)."""
    path = Path(cfg.checkpoint_dir) / "last.pt"
    if not path.is_file():
        return cfg, None
    last = load_checkpoint(path)
    now = {k: getattr(cfg, k) for k in given | {"resume", "eval_only", "predict"} if k in TrainingConfig.__dataclass_fields__}
    saved = {k: v for k, v in last["config"].items() if k in TrainingConfig.__dataclass_fields__}
    return replace(TrainingConfig(), **{**saved, **now}), last


# Settings that change what the optimizer does from here on; a resume may change them, and says so.
APPLIED_ON_RESUME = ("epochs", "batch_size", "learning_rate", "weight_decay", "label_smoothing", "scheduler",
                     "warmup_fraction", "grad_clip", "early_stopping_patience", "grad_accum_steps", "use_amp",
                     "amp_dtype", "class_weight")


def apply_changed_settings(run: Run, saved: dict, epoch: int) -> None:
    """Flags given with --resume that differ from last.pt's: apply them from the resume point on."""
    changed = [f"{k} {saved.get(k)!r} -> {getattr(run.cfg, k)!r}" for k in APPLIED_ON_RESUME
               if saved.get(k) != getattr(run.cfg, k)]
    if not changed:
        return
    step = run.scheduler.last_epoch
    run.scheduler.base_lrs = [run.cfg.learning_rate for _ in run.optimizer.param_groups]
    for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas):
        group.update(initial_lr=run.cfg.learning_rate, lr=run.cfg.learning_rate * factor(step),
                     weight_decay=run.cfg.weight_decay)
    log.warning("resume: from epoch %d on, %s; the run is no longer identical to an uninterrupted one",
                epoch + 1, ", ".join(changed))


def resume(run: Run, checkpoint: dict | None) -> dict | None:
    """Restore everything last.pt (`checkpoint`) holds into the run and return its progress; None
    without a last.pt."""
    path = run.last_path
    if checkpoint is None:
        log.info("resume: no %s yet, starting fresh", path)
        return None
    check_same_data(checkpoint, path, run.cfg, run.data)
    load_weights(run.model, checkpoint, path)
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        run.scaler.load_state_dict(checkpoint["scaler"])
        if len(checkpoint["rng"]) == run.world:
            restore_rng_states(checkpoint["rng"][run.rank])
        else:
            log.warning("resume: saved by %d rank(s), now %d: random streams restart from the seed",
                        len(checkpoint["rng"]), run.world)
        progress = {**checkpoint["progress"], "history": json.loads(checkpoint["progress"]["history"])}
        position = checkpoint.get("position")
        if position is not None and len(position["loss_sum"]) == run.world:
            run.tally = {"loss_sum": position["loss_sum"][run.rank], "rows": position["rows"],
                         "steps": position["steps"], "norms": position["norms"]}
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        fail(f"{path} cannot be resumed from (incomplete, or saved with other settings): {first_line(e)}")
    if run.tally is not None:
        log.info("resumed from %s at %s", path, where(run, position["epoch"], position["steps"]))
    elif position is not None:  # each rank's share of the epoch was another: no way to go on mid-share
        log.warning("resume: %s was saved inside epoch %d by %d rank(s), now %d: that epoch restarts from its "
                    "first batch", path, position["epoch"], len(position["loss_sum"]), run.world)
    else:
        log.info("resumed from %s after epoch %d", path, progress["epoch"])
    apply_changed_settings(run, checkpoint["config"], progress["epoch"])
    return progress


def recorded_progress(run: Run) -> dict:
    """For --eval-only: the finished run as its files record it, with no epoch left to train."""
    if not run.best_path.is_file():
        fail(f"--eval-only: {run.best_path} does not exist; train first, or point --checkpoint-dir at a run")
    best = load_checkpoint(run.best_path)
    check_same_data(best, run.best_path, run.cfg, run.data)
    history = []
    with suppress(OSError, ValueError):
        history = json.loads((run.out / "history.json").read_text())
    return {"epoch": run.cfg.epochs, "best_loss": best["val_loss"], "best_epoch": best["epoch"], "stale": 0,
            "history": history, "run": best.get("run", "")}


def test(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split, touched once, by the best checkpoint, after every choice is made. Returns the
    model's outputs for this rank's share of the test rows, and which rows those are."""
    barrier()  # rank 0's best_model.pt is complete before any rank reads it
    best = load_checkpoint(run.best_path)
    if best.get("run") != run.progress["run"]:
        fail(f"{run.best_path} belongs to run {best.get('run')}, not to this run ({run.progress['run']}): "
             "a failed write, or another run in this --checkpoint-dir? Nothing was tested")
    check_same_data(best, run.best_path, run.cfg, run.data)
    load_weights(run.model, best, run.best_path)
    x_test = run.data["test"][0]
    rows = shard_rows(len(x_test), run.rank, run.world)
    return predict(run.eval_model, x_test[rows], run.cfg.batch_size, run.amp_dtype), rows


def run_title(run: Run) -> str:
    """What the plots say they show: the data, the label and the run."""
    return f"{Path(run.cfg.dataset).name}: {run.cfg.label_column}  (run {run.progress['run']})"


def report(run: Run, outputs: torch.Tensor, rows: torch.Tensor) -> dict:
    """test_report.json, the plots and the log's summary; returns what main() returns."""
    cfg, data, progress = run.cfg, run.data, run.progress
    y_test = data["test"][1][rows]
    result = {**test_report(outputs, y_test, data, cfg.label_column), "best_epoch": progress["best_epoch"],
              "diagnosis": diagnose(progress["history"], progress["best_epoch"], base_rate_loss(data), cfg)}
    diagnosis, title = result["diagnosis"], run_title(run)
    note = run_note(diagnosis, progress["history"], progress["best_epoch"], result, cfg, title)
    write_json(run.out / "test_report.json", result)
    save_file(run.out / "run_note.md", lambda f: f.write(note.encode()))
    figure_path = run.out / ("confusion_matrix.png" if data["task"] == "classification" else "predictions.png")
    if run.rank == 0:
        if progress["history"]:
            plot_history(progress["history"], progress["best_epoch"], title, run.out / "loss_curve.png",
                         (diagnosis["findings"] or [None])[0])
        if data["task"] == "classification":
            plot_confusion_matrix(result, title, figure_path)
        else:  # under DDP, the points are rank 0's share of the test rows
            unscale = lambda t: t.squeeze(-1).numpy() * data["target_std"] + data["target_mean"]  # noqa: E731
            plot_predictions(unscale(y_test), unscale(outputs), result, title, figure_path)
    log_report(result, outputs, y_test, data["splits"]["test"][rows.numpy()], data)
    written = [run.best_path, run.last_path, run.out / "history.json", run.out / "loss_curve.png", figure_path,
               run.out / "test_report.json", run.out / "run_note.md"]
    headline = f"test accuracy {result['accuracy']:.4f}" if "accuracy" in result else f"test r2 {result['r2']:.4f}"
    log.info("best epoch %d (val loss %.4f); %s", progress["best_epoch"], progress["best_loss"], headline)
    log.info("wrote %s", ", ".join(str(p) for p in written if p.exists()))
    for line in note.split("\n## ")[0].splitlines()[2:]:  # the note, up to its suggestions
        if line:
            log.info("%s", line.replace("**", ""))
    return {"best_epoch": progress["best_epoch"], "best_val_loss": progress["best_loss"], "report": result,
            "diagnosis": diagnosis, "test_accuracy": result.get("accuracy"), "history": progress["history"],
            "files": written}


# ============================================================================= machinery
# What follows makes the run robust and pleasant, and a first reading can skip it: the
# process group for torchrun, clean stops on signals, the progress bar and TensorBoard, and
# --predict on the command line.

@contextmanager
def distributed(cfg: TrainingConfig):
    """Under torchrun (RANK and WORLD_SIZE set): join the process group (nccl on CUDA, gloo
    otherwise), pin this rank to its local GPU, and leave the group however the run ends.
    Yields (device, rank, world size); outside torchrun, (the chosen device, 0, 1)."""
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
    finally:
        dist.destroy_process_group()


@contextmanager
def one_run_per_folder(folder: str, rank: int = 0):
    """Hold checkpoint_dir/.lock while the run lasts: a second run on the same folder is refused in
    one line instead of both overwriting each other's checkpoints."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: go on unguarded
        yield
        return
    if rank != 0:
        yield
        return
    path = Path(folder) / ".lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as e:
        fail(f"cannot create or write to the folder {folder}: {e.strerror or e}")
    with handle:
        try:
            # A POSIX lock, not flock: it belongs to this process alone, so a DataLoader worker (a fork)
            # that outlives a kill -9 for a few seconds does not hold the folder against the --resume.
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES, by platform
            handle.seek(0)
            fail(f"another run (pid {handle.read().strip() or '?'}) is using {folder}; wait for it to end, "
                 "or give this one another --checkpoint-dir")
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def stop_on_signals():
    """SIGINT (Ctrl-C), SIGTERM (schedulers, spot reclaim) and SIGHUP (a closed terminal) ask the
    loop to stop after the current optimizer step, and save it (see step_done). A second signal
    stops at once; the atomic writes keep every file whole. A signal the run was started with
    ignored (nohup ignores SIGHUP, a shell's background job SIGINT) stays ignored."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop["signal"] = signum
        log.warning("%s: finishing the current step, then stopping (send it again to stop at once)",
                    signal.Signals(signum).name)

    try:
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                    if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # not the main thread: leave signals to whoever owns them
        previous = {}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def training_batches(run: Run, epoch: int, tally: dict | None, view: dict):
    """This epoch's shuffled batches, from where `tally` stopped; a bar of their own on a long epoch."""
    start = tally["rows"] if tally else 0
    batches = epoch_batches(run.train_split, run.cfg, run.device, epoch, run.rank, run.world, start)
    total = batches_per_epoch(run.cfg, run.data, run.world)
    if view["bar"] is not None and total >= 100:
        from tqdm import tqdm

        batches = tqdm(batches, total=total, initial=start // run.cfg.batch_size, leave=False, unit="batch",
                       desc=f"epoch {epoch}")
    return batches


def stop_agreed(stop: dict, world: int) -> bool:
    """Whether to stop now. Under DDP a signal may reach one rank only: all stop if any was asked."""
    if world > 1:
        stop["signal"] = int(all_reduce(torch.tensor(stop["signal"] or 0), "max")) or None
    return stop["signal"] is not None


def exit_resumable(run: Run, stop: dict, argv: list[str]) -> None:
    """After a stop: plot what finished, say how to resume, exit 128 + the signal's number."""
    history = run.progress["history"]
    if history and run.rank == 0:
        plot_history(history, run.progress["best_epoch"], run_title(run) + ", stopped", run.out / "loss_curve.png")
    launcher = ["torchrun", f"--nproc_per_node={run.world}"] if run.world > 1 else ["python"]
    again = shlex.join([*launcher, "train.py", *[a for a in argv if a != "--resume"], "--resume"])
    signum, at = stop["signal"], stop.get("at") or f"the end of epoch {run.progress['epoch']}"
    log.warning("stopped by %s: %s holds %s. Resume with: %s", signal.Signals(signum).name, run.last_path, at, again)
    barrier()  # under torchrun a rank that exits first gets the others killed: rank 0 must have said all this
    raise SystemExit(128 + signum)


@contextmanager
def live_view(run: Run):
    """Where each epoch shows besides the log: a tqdm bar over epochs when stderr is a terminal, and
    TensorBoard scalars under runs/ with --tensorboard (never a hard dependency). Yields
    {"bar": ..., "writer": ...}; either may be None."""
    view, left = {"bar": None, "writer": None}, run.rank == 0 and run.progress["epoch"] < run.cfg.epochs
    with ExitStack() as stack:
        if left and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            view["bar"] = stack.enter_context(tqdm(total=run.cfg.epochs, initial=run.progress["epoch"], unit="epoch",
                                                   dynamic_ncols=True))
            stack.enter_context(logging_redirect_tqdm())  # log lines print above the bar
        if left and run.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("--tensorboard needs the tensorboard package: pip install tensorboard (going on without it)")
            else:
                folder = Path("runs") / f"{Path(run.cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
                log.info("TensorBoard: tensorboard --logdir runs  (this run: %s)", folder)
                view["writer"] = stack.enter_context(SummaryWriter(str(folder)))
        yield view


def show_epoch(run: Run, view: dict) -> None:
    """The epoch's log line (every log_every epochs), bar and TensorBoard scalars."""
    last, cfg = run.progress["history"][-1], run.cfg
    epoch = last["epoch"]
    if epoch == 1 or epoch % cfg.log_every == 0 or epoch == cfg.epochs:
        val_text = "  ".join(f"{k} {v:.4f}" if k.endswith("loss") else f"{k} {v:.4g}"
                             for k, v in last.items() if k.startswith("val_"))
        log.info("epoch %3d/%d  train_loss %.4f  %s  lr %.2e  %.2fs", epoch, cfg.epochs, last["train_loss"],
                 val_text, last["lr"], last["seconds"])
    if view["bar"] is not None:
        view["bar"].update(1)
        view["bar"].set_postfix(train_loss=f"{last['train_loss']:.4g}", val_loss=f"{last['val_loss']:.4g}")
    if view["writer"] is not None:
        for name, value in last.items():
            if name not in ("epoch", "seconds"):
                view["writer"].add_scalar(name.replace("_", "/", 1), value, epoch)


def is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # a name too long to be a file's: rows, then
        return False


def parse_rows(spec: str, features: list[str]) -> list[list[str]]:
    """Raw rows from "5.1,3.5;6.7,3.0" or from a CSV file, as cells in the order of `features`. A CSV
    may start with a header row naming the columns in any order (other columns are ignored)."""
    expected = f"expected {len(features)} values: {', '.join(features)}"
    if spec.lower().endswith(".csv") or is_file(spec):
        try:
            with open(spec, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a name
                records = [r for r in csv.reader(f) if r]
        except OSError as e:
            fail(f"--predict {spec}: {e.strerror or e}")
        except (UnicodeDecodeError, csv.Error) as e:
            fail(f"--predict {spec}: not a UTF-8 CSV file ({first_line(e)}); save it as UTF-8 text")
        if records and set(features) <= {c.strip() for c in records[0]}:  # a header row
            header = [c.strip() for c in records[0]]
            records = [[r[header.index(name)] for name in features] if len(r) == len(header) else r
                       for r in records[1:]]
    else:
        records = [r.split(",") for r in spec.split(";") if r.strip()]
    for i, record in enumerate(records, 1):
        if len(record) != len(features):
            fail(f"--predict row {i} has {len(record)} values; {expected}")
    if not records:
        fail(f"--predict: no rows given; {expected}")
    return [[cell.strip() for cell in record] for record in records]


def predict_from_cli(cfg: TrainingConfig) -> list[str]:
    """Print best_model.pt's prediction for each raw row in cfg.predict; train nothing."""
    path = Path(cfg.checkpoint_dir) / "best_model.pt"
    if not path.is_file():
        fail(f"{path} does not exist: train first (python train.py), or point --checkpoint-dir at a run")
    checkpoint = load_checkpoint(path)
    rows = parse_rows(cfg.predict, checkpoint["features"])
    for i, row in enumerate(rows, 1):
        for name, cell in zip(checkpoint["features"], row):
            number = parse_number(cell)
            literal = cell.strip().lower().lstrip("+-") in ("nan", "inf", "infinity")  # typed, not a blank cell
            if checkpoint["preprocess"][name]["kind"] == "numeric" and (number is None or math.isinf(number) or literal):
                fail(f"--predict row {i}: column {name!r} needs a finite number (or an empty cell), not {cell!r}")
    inputs, unseen = rows_to_inputs(rows, checkpoint)
    outputs = predict(model_from_checkpoint(checkpoint, path), inputs, batch_size=1024)
    bad = (~torch.isfinite(outputs)).any(dim=-1).nonzero().flatten().tolist()
    if bad:
        fail(f"--predict row {bad[0] + 1}: the model's output is not finite (values near float32's limit?)")
    for name, count in unseen.items():
        if count:
            log.warning("%d row(s) have a %r category training never saw: they use its 'other' slot", count, name)
    lines = [f"{', '.join(row)} -> {said}" for row, said in zip(rows, describe_predictions(outputs, checkpoint))]
    print("\n".join(lines))
    return lines


def stop_anywhere(signum, frame):
    """SIGTERM or SIGHUP outside the epoch loop (start-up, data preparation, the report): one line,
    exit 128 + the signal; every file is whole, being written atomically."""
    if not other_rank():
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    for s in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal or a dropped ssh session sends SIGHUP
        if signal.getsignal(s) is not signal.SIG_IGN:  # under nohup, SIGHUP stays ignored
            signal.signal(s, stop_anywhere)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the epoch loop
        if not other_rank():
            print("stopped by SIGINT", file=sys.stderr)
        raise SystemExit(130)
    except RuntimeError:
        if other_rank():  # the process group broke because rank 0 stopped, and rank 0 said why
            raise SystemExit(1)
        raise
