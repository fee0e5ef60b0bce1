"""A PyTorch training loop you can trust and copy.

`python train.py` trains a small MLP on Iris, offline, in seconds: it keeps the
best checkpoint by validation loss, tests it once on rows it never saw, and
writes history, a plot and a test report. Every knob is a TrainingConfig field
and a command-line flag (`python train.py --help`).

The file reads top to bottom in the order the work happens:
config -> device -> data -> model -> step/epoch -> checkpoint -> report -> main.
The two places you are expected to swap are marked "SWAP HERE".
"""

import argparse
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- config

@dataclass
class TrainingConfig:
    # data
    dataset: str = "scikit-learn/iris"  # Hugging Face hub id, or a local .csv/.json/.jsonl/.parquet file
    label_column: str = "Species"  # the column to predict
    datasets_dir: str = "datasets"  # dataset cache; once a dataset is here, runs load it offline
    val_fraction: float = 0.15  # share of each class held out to pick the best epoch
    test_fraction: float = 0.15  # share of each class held out for one final test
    seed: int = 42  # seeds the splits, the initial weights, dropout and shuffling
    # optimization
    epochs: int = 50  # passes over the training split
    batch_size: int = 16  # rows per optimizer step
    learning_rate: float = 1e-2  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    scheduler: str = "cosine"  # "cosine" (linear warmup, then cosine decay to zero) or "none"
    warmup_fraction: float = 0.05  # share of all steps spent warming up when scheduler is "cosine"
    grad_clip: float = 1.0  # largest gradient norm allowed; 0 turns clipping off
    early_stopping_patience: int = 0  # stop after this many epochs without a better val loss; 0 never stops
    # hardware
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU), or a torch device such as "cuda:1" or "cpu"
    use_amp: bool = False  # mixed precision through torch.autocast
    amp_dtype: str = "auto"  # "auto" (bfloat16 where supported, else float16), "bfloat16" or "float16"
    # outputs
    checkpoint_dir: str = "checkpoints"  # best_model.pt and last.pt go here
    output_dir: str = "training-loop"  # history.json, loss_curve.png and test_report.json go here
    resume: bool = False  # continue from checkpoint_dir/last.pt
    log_every: int = 10  # log every N epochs (the first and last are always logged)


def field_help() -> dict[str, str]:
    """Each field's trailing comment above, so the dataclass is the only place its doc lives."""
    try:
        source = inspect.getsource(TrainingConfig)
    except (OSError, TypeError):  # no source at hand (frozen app): flags still work, without help
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M))


def parse_config(argv: list[str] | None = None) -> TrainingConfig:
    """Every TrainingConfig field becomes a flag: `batch_size` is `--batch-size` (or `--batch_size`)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_help()
    for f in fields(TrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=docs.get(f.name, ""))
        else:
            parser.add_argument(flag, type=kind, default=f.default, metavar=kind.__name__.upper(),
                                help=docs.get(f.name, ""))
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [re.sub(r"^--[^=]+", lambda m: m[0].replace("_", "-"), a) for a in argv]
    return TrainingConfig(**vars(parser.parse_args(argv)))


def fail(message: str):
    """Stop with one clear line on stderr and exit status 1: bad input is not a crash."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- device

def get_best_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def load_table(cfg: TrainingConfig):
    """Load the raw table through Hugging Face `datasets`, offline whenever a local copy exists.

    A local file is read directly. A hub id is saved under datasets_dir the first time
    (from the bundled copy for Iris, from the hub otherwise) and loaded from there after.
    """
    source = cfg.dataset
    suffix = Path(source).suffix.lower()
    saved = Path(cfg.datasets_dir) / source.replace("/", "___")
    if suffix in LOADERS or saved.exists() or source in BUNDLED:
        # huggingface_hub reads this once, at import: setting it any later has no effect.
        os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    hf_cache = str(Path(cfg.datasets_dir) / "hf_cache")
    if suffix in LOADERS:
        return datasets.load_dataset(LOADERS[suffix], data_files=source, split="train", cache_dir=hf_cache)
    if saved.exists():
        return datasets.load_from_disk(str(saved))
    if source in BUNDLED:
        table = datasets.load_dataset("csv", data_files=str(BUNDLED[source]), split="train", cache_dir=hf_cache)
    else:
        log.info("downloading %s from the Hugging Face hub (once; later runs load %s offline)", source, saved)
        table = datasets.load_dataset(source, split="train", cache_dir=hf_cache)
    table.save_to_disk(str(saved))
    return table


def is_id_like(name: str) -> bool:
    name = name.lower()
    return name in ("id", "index") or name.endswith("_id") or name.startswith("unnamed:")


def table_to_arrays(table, label_column: str) -> tuple[np.ndarray, list, list[str]]:
    """Features (every numeric column but the label and id-like ones), labels, feature names."""
    numeric = ("int", "uint", "float", "double")
    features = [name for name, kind in table.features.items()
                if name != label_column and not is_id_like(name)
                and getattr(kind, "dtype", "").startswith(numeric)]
    columns = table.with_format("numpy")
    x = np.stack([np.asarray(columns[name], dtype=np.float32) for name in features], axis=1)
    return x, list(table[label_column]), features


def split_indices(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Disjoint train/val/test row indices, stratified by class, reproducible from seed."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, round(len(rows) * test_fraction))
        n_val = max(1, round(len(rows) * val_fraction))
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test:n_test + n_val])
        parts["train"].append(rows[n_test + n_val:])
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


def prepare_data(cfg: TrainingConfig) -> dict:
    """Everything the loop needs, as plain tensors and values:

    features, classes: names, in model input / output order
    mean, std: normalization statistics of the training split, applied to every split
    train, val, test: (x, y) tensors, x normalized float32, y class ids
    splits: the row indices of each split in the source table
    """
    x, labels, features = table_to_arrays(load_table(cfg), cfg.label_column)
    classes = sorted(set(labels))
    class_id = {c: i for i, c in enumerate(classes)}
    y = np.array([class_id[v] for v in labels], dtype=np.int64)
    splits = split_indices(y, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    mean = x[splits["train"]].mean(axis=0)
    std = x[splits["train"]].std(axis=0)
    std[std == 0] = 1.0  # a constant feature stays 0 instead of dividing by zero
    data = {"features": features, "classes": classes, "splits": splits,
            "mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}
    for name, rows in splits.items():
        data[name] = (torch.from_numpy((x[rows] - mean) / std), torch.from_numpy(y[rows]))
    return data


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Batches cut straight from in-memory tensors: one shuffle per epoch, no per-row collate."""
    if generator is not None:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        x, y = x[order], y[order]
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


# ----------------------------------------------------------------------------- model

class TinyMLP(nn.Module):
    """SWAP HERE for your model. Returns raw logits: cross_entropy applies the softmax."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- step and epoch

def make_scheduler(optimizer, cfg: TrainingConfig, steps_per_epoch: int):
    """Per-step LR factor: linear warmup then cosine decay to zero, or constant."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_fraction * total) if cfg.scheduler == "cosine" else 0

    def factor(step: int) -> float:
        if cfg.scheduler == "none":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, batches, optimizer, scheduler=None, scaler=None,
                    amp_dtype=None, grad_clip: float = 0.0, loss_fn=F.cross_entropy) -> float:
    """One pass over `batches`; returns the training loss averaged over rows, not batches."""
    model.train()
    device = next(model.parameters()).device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    loss_sum = torch.zeros((), device=device)  # stays on the device: no host sync per step
    rows = 0
    for xb, yb in batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            loss = loss_fn(model(xb), yb)
        scaler.scale(loss).backward()  # float16 needs the scaler; for anything else it is a no-op
        if grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * len(yb)
        rows += len(yb)
    return (loss_sum / max(rows, 1)).item()


@torch.inference_mode()
def evaluate(model, batches, amp_dtype=None, loss_fn=F.cross_entropy) -> dict:
    """Loss and accuracy over every row of `batches`, whatever the batch sizes."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    rows = 0
    for xb, yb in batches:
        with autocast(device, amp_dtype):
            out = model(xb).float()
        loss_sum += loss_fn(out, yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
        rows += len(yb)
    loss, acc = (torch.stack([loss_sum, correct]) / max(rows, 1)).tolist()
    return {"loss": loss, "acc": acc}


@torch.inference_mode()
def predict(model, x: torch.Tensor, batch_size: int, amp_dtype=None) -> torch.Tensor:
    """Raw model outputs (logits) for every row of x, as float32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    with autocast(device, amp_dtype):
        return torch.cat([model(xb.to(device)).float().cpu() for xb in x.split(batch_size)])


# ----------------------------------------------------------------------------- checkpoint

CHECKPOINT_VERSION = 1


def save_file(path: Path, write) -> None:
    """Every output goes through here: `write(path)` does the actual writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)


def save_checkpoint(path: Path, state: dict) -> None:
    save_file(path, lambda p: torch.save(state, p))


def write_json(path: Path, obj) -> None:
    save_file(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def best_model_state(model, data: dict, cfg: TrainingConfig, epoch: int, val: dict) -> dict:
    """The weights plus everything needed to predict on raw, unnormalized rows."""
    return {
        "version": CHECKPOINT_VERSION, "model": model.state_dict(), "epoch": epoch,
        "val_loss": val["loss"], "val_acc": val["acc"],
        "mean": data["mean"], "std": data["std"],
        "features": data["features"], "classes": data["classes"], "config": asdict(cfg),
    }


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is data, never code to run
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- report

def classification_report(logits: torch.Tensor, y: torch.Tensor, classes: list) -> dict:
    """Accuracy, confusion matrix (rows = true class) and per-class precision / recall / F1."""
    n = len(classes)
    pred = logits.argmax(1)
    cm = torch.bincount(y * n + pred, minlength=n * n).reshape(n, n)
    per_class = {}
    for i, name in enumerate(classes):
        tp, predicted, actual = cm[i, i].item(), cm[:, i].sum().item(), cm[i].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(name)] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        "accuracy": (pred == y).float().mean().item(),
        "loss": F.cross_entropy(logits, y).item(),
        "rows": len(y), "classes": classes, "confusion_matrix": cm.tolist(), "per_class": per_class,
    }


def log_report(report: dict, logits: torch.Tensor, y: torch.Tensor, raw_x: torch.Tensor, shown: int = 5) -> None:
    classes = report["classes"]
    width = max(len(str(c)) for c in classes)
    log.info("test: accuracy %.4f, loss %.4f on %d rows", report["accuracy"], report["loss"], report["rows"])
    log.info("confusion matrix (rows = true, columns = predicted):")
    for name, row in zip(classes, report["confusion_matrix"]):
        log.info("  %*s  %s", width, name, " ".join(f"{v:4d}" for v in row))
    for name, m in report["per_class"].items():
        log.info("  %*s  precision %.3f  recall %.3f  f1 %.3f  support %d",
                 width, name, m["precision"], m["recall"], m["f1"], m["support"])
    probs = logits.softmax(1)
    for row, p, true in list(zip(raw_x, probs, y))[:shown]:
        values = ", ".join(f"{v:g}" for v in row.tolist())
        log.info("  [%s] -> %s (%.2f), true %s", values, classes[p.argmax()], p.max(), classes[true])


def plot_history(history: list[dict], best_epoch: int, path: Path) -> None:
    """Loss curves and validation accuracy, best epoch marked."""
    from matplotlib.figure import Figure  # imported here: only plotting pays for it; no GUI backend

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.plot(epochs, [h["val_acc"] for h in history], color="tab:green")
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.axvline(best_epoch, color="gray", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    save_file(path, fig.savefig)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    seed_everything(cfg.seed)
    device = get_best_device(cfg.device)
    amp_dtype = resolve_amp_dtype(cfg, device)
    checkpoint_dir, output_dir = Path(cfg.checkpoint_dir), Path(cfg.output_dir)
    best_path, last_path = checkpoint_dir / "best_model.pt", checkpoint_dir / "last.pt"

    data = prepare_data(cfg)
    # Tabular data fits in memory: put it on the device once, not batch by batch.
    (x_train, y_train), (x_val, y_val) = [(x.to(device), y.to(device)) for x, y in (data["train"], data["val"])]
    log.info("data: %s, %d features, %d classes; %d train / %d val / %d test rows",
             cfg.dataset, len(data["features"]), len(data["classes"]),
             len(x_train), len(x_val), len(data["test"][0]))

    model = TinyMLP(len(data["features"]), len(data["classes"])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=math.ceil(len(x_train) / cfg.batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    log.info("device: %s, amp: %s, %d parameters", device, amp_dtype or "off",
             sum(p.numel() for p in model.parameters()))

    history: list[dict] = []
    best_loss, best_epoch, stale = math.inf, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        train_loss = train_one_epoch(model, iterate_batches(x_train, y_train, cfg.batch_size, shuffle),
                                     optimizer, scheduler, scaler, amp_dtype, cfg.grad_clip)
        val = evaluate(model, iterate_batches(x_val, y_val, cfg.batch_size), amp_dtype)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_acc": val["acc"],
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started})
        if val["loss"] < best_loss:  # selection by held-out loss, never by the last epoch
            best_loss, best_epoch, stale = val["loss"], epoch, 0
            save_checkpoint(best_path, best_model_state(model, data, cfg, epoch, val))
        else:
            stale += 1
        save_checkpoint(last_path, {
            "version": CHECKPOINT_VERSION, "model": model.state_dict(), "epoch": epoch,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "best_loss": best_loss, "best_epoch": best_epoch,
            "history": history, "config": asdict(cfg)})
        write_json(output_dir / "history.json", history)
        if epoch == 1 or epoch % cfg.log_every == 0 or epoch == cfg.epochs:
            log.info("epoch %3d/%d  train loss %.4f  val loss %.4f  val acc %.3f  lr %.2e  %.2fs",
                     epoch, cfg.epochs, train_loss, val["loss"], val["acc"], history[-1]["lr"],
                     history[-1]["seconds"])
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            log.info("early stop: no better val loss in %d epochs", stale)
            break

    plot_history(history, best_epoch, output_dir / "loss_curve.png")

    # The test split is touched once, by the best checkpoint, after all choices are made.
    best = load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    x_test, y_test = data["test"]
    logits = predict(model, x_test, cfg.batch_size, amp_dtype)
    report = classification_report(logits, y_test, data["classes"])
    report["best_epoch"] = best_epoch
    write_json(output_dir / "test_report.json", report)
    log_report(report, logits, y_test, x_test * data["std"] + data["mean"])

    written = [best_path, last_path] + [output_dir / n for n in ("history.json", "loss_curve.png", "test_report.json")]
    log.info("best epoch %d (val loss %.4f); test accuracy %.4f", best_epoch, best_loss, report["accuracy"])
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return {"best_epoch": best_epoch, "best_val_loss": best_loss, "test_accuracy": report["accuracy"],
            "history": history, "files": written}


if __name__ == "__main__":
    main()
