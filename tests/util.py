"""Inputs the deep suite builds, and ways to run train.py: in this process, or in others."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
IRIS_CSV = REPO / "datasets" / "Iris.csv"


def blobs_csv(path: Path, rows_per_class: int = 40, seed: int = 1) -> Path:
    """Three separable blobs, the label first and as text, an id column the model must ignore."""
    rng = np.random.default_rng(seed)
    lines = ["kind,sample_id,width,height,depth"]
    for kind, centre in (("small", (0, 0, 0)), ("medium", (4, 4, 0)), ("large", (0, 4, 4))):
        for point in rng.normal(centre, 0.8, size=(rows_per_class, 3)):
            lines.append(f"{kind},{len(lines)},{point[0]:.4f},{point[1]:.4f},{point[2]:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def linear_csv(path: Path, rows: int = 600) -> Path:
    """target = 3a - 2b + 0.5c + 10, plus noise of sd 0.3; the label is the last column."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(rows, 3))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] + 10 + rng.normal(scale=0.3, size=rows)
    path.write_text("a,b,c,target\n" + "".join(f"{r[0]:.5f},{r[1]:.5f},{r[2]:.5f},{t:.5f}\n" for r, t in zip(x, y)))
    return path


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


def dirs(root: Path) -> list[str]:
    """Flags that keep every file a run reads or writes under root."""
    return ["--datasets-dir", str(root / "datasets"), "--checkpoint-dir", str(root / "checkpoints"),
            "--output-dir", str(root / "training-loop")]


def flags(root: Path, source, *extra: str, label: str = "kind", epochs: int = 20) -> list[str]:
    """A full command line: every setting a test depends on is given, so TrainingConfig's defaults
    do not matter. Later flags in `extra` override these."""
    return [*dirs(root), "--dataset", str(source), "--label-column", label, "--feature-columns", "",
            "--task", "auto", "--epochs", str(epochs), "--batch-size", "16", "--learning-rate", "0.01",
            "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "0", "--scheduler", "cosine",
            "--grad-clip", "1.0", "--grad-accum-steps", "1", "--early-stopping-patience", "0", "--loader", "auto",
            "--best-metric", "val_loss", "--mode", "auto", "--no-use-amp", "--no-compile", "--no-resume",
            "--log-every", "1", "--save-every-steps", "1000", *extra]


# train.main in a process of its own, with two hooks: SIGNAL_AT ("EPOCH,STEP,SIGNAL[,RANK]") makes
# the process send itself that signal as it saves that step of that epoch (a SIGKILL loses the
# save), and RECORD_WEIGHTS names a folder for each rank's final weights.
TRAIN_MAIN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import train

real_save_checkpoint, real_load_weights = train.save_checkpoint, train.load_weights
signal_at, record = os.environ.get("SIGNAL_AT"), os.environ.get("RECORD_WEIGHTS")

def save_or_signal(path, state):
    position = state.get("position")
    if signal_at and position:
        epoch, step, name, *ranks = signal_at.split(",")
        here = [position["epoch"], position["steps"]] == [int(epoch), int(step)]
        if here and os.environ.get("RANK", "0") in (ranks or ["0"]):
            os.kill(os.getpid(), getattr(signal, name))
    real_save_checkpoint(path, state)

def record_then_load(model, checkpoint, path):
    if record and path.name == "best_model.pt":  # training is over: this rank's final weights
        torch.save(dict(model.named_parameters()), os.path.join(record, f"rank{{os.environ.get('RANK', 0)}}.pt"))
    real_load_weights(model, checkpoint, path)

train.save_checkpoint, train.load_weights = save_or_signal, record_then_load
train.main(sys.argv[1:])
"""


def run_train(tmp_path: Path, *args: str, signal_at: str = "", record: Path | None = None,
              launcher: tuple = (), timeout: int = 300) -> subprocess.CompletedProcess:
    """train.main in a process of its own (or several, under a launcher such as torchrun)."""
    script = tmp_path / "train_main.py"
    script.write_text(TRAIN_MAIN.format(repo=str(REPO)))
    env = {**os.environ, "SIGNAL_AT": signal_at, "RECORD_WEIGHTS": str(record or "")}
    # Output to files, not pipes: a killed run's DataLoader worker holds a pipe open for seconds.
    with open(tmp_path / "stdout.txt", "w+") as out, open(tmp_path / "stderr.txt", "w+") as err:
        run = subprocess.run([sys.executable, *launcher, str(script), *args], stdout=out, stderr=err, env=env,
                             timeout=timeout)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(run.args, run.returncode, out.read(), err.read())


def torchrun(tmp_path: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """train.main under torchrun: 2 CPU processes (gloo)."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    return run_train(tmp_path, *args, "--device", "cpu", launcher=launcher, timeout=600, **kwargs)


def cli(*args: str, cwd: Path | None = None, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user types it."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def after_each_epoch(patch, fn):
    """fn(run, epoch) after each epoch's validation and save, on every rank."""
    import train

    runs, set_up, log_epoch = [], train.set_up, train.log_epoch
    patch.setattr(train, "set_up", lambda *a, **k: runs.append(set_up(*a, **k)) or runs[-1])
    patch.setattr(train, "log_epoch", lambda entry, cfg: (fn(runs[-1], entry["epoch"]), log_epoch(entry, cfg)))

