"""How fast train.py's loop runs, side by side with the loops it is measured against.

    python bench.py            # a few minutes on 2 CPU cores; adds CUDA rows when a GPU is present

Part 1, one process, synthetic tabular data at several sizes, three loops doing the same work
(forward, cross-entropy, backward, AdamW step; no clipping, no scheduler):
  (a) train.py's own train_one_epoch over iterate_batches, with the optimizer train.py builds;
  (b) an article-style loop: DataLoader(TensorDataset) fetching row by row, .item() every step,
      the loss averaged per batch, plain AdamW, batches moved to the device one by one;
  (c) a minimal hand-written loop slicing tensors by a shuffled index: the practical limit.
Loops are interleaved epoch by epoch and each one's fastest epoch is reported: on a shared
machine noise only ever adds time, and interleaving spreads it over all three alike.

Part 2, end to end in subprocesses: the default `python train.py` (warm dataset cache) against a
bare script doing the same job (import, train, one save) and an article-style script (datasets,
DataLoader, pyplot). Several runs each, interleaved; median wall time and peak RSS.

Part 3, the price of mid-epoch checkpoints: `python train.py` on a large generated table
(1.2M rows, so epochs of over 1,000 steps at the default batch), at the default
--save-every-steps against --save-every-steps 0. Runs interleaved; the fastest epoch of each.
The difference is below the noise, so the cost is also computed from its parts: the time of
one mid-epoch save_last (median of 20, on the same run's state) x saves per epoch / epoch time.

Part 4, a Dataset split (per-item reads, collated), in one process: train_one_epoch over
train.py's iterate_batches, whose training passes seed each batch's random draws, against the
same over a plain DataLoader. A cheap TensorDataset shows the seeding's cost at its largest; an
augmenting image Dataset with a small CNN shows it in a typical case.

The last line printed is a one-line summary of the ratios.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import train

HERE = Path(__file__).resolve().parent
SIZES = [(10_000, 8, 32), (100_000, 16, 64), (300_000, 32, 256)]  # rows, features, batch size
CLASSES = 10


# ----------------------------------------------------------------------------- part 1: the loops

def loop_train_py(model, optimizer, x, y, batch_size, seed, device):
    rows = train.shard_rows(len(x), shuffle_seed=seed)
    return train.train_one_epoch(model, train.iterate_batches((x, y), batch_size, rows), optimizer,
                                 F.cross_entropy, count=len(train.batch_rows(rows, batch_size)))


def loop_article(model, optimizer, x, y, batch_size, seed, device):
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    total = 0.0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / len(loader)


def loop_minimal(model, optimizer, x, y, batch_size, seed, device):
    model.train()
    for rows in torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device).split(batch_size):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()


LOOPS = {"a": loop_train_py, "b": loop_article, "c": loop_minimal}


def setup(name: str, features: int, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    model = train.build_model((features,), CLASSES, {}, train.TrainingConfig()).to(device)
    if name == "b":  # what the article does: default AdamW
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:  # what train.py does, so (c) isolates the loop's own overhead
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    return model, optimizer


def synthetic(rows: int, features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    y = (x[:, :CLASSES] if features >= CLASSES else x.repeat(1, CLASSES)[:, :CLASSES]).argmax(1)
    return x, y


@contextmanager
def peak_memory(device: torch.device):
    """Peak memory above the starting level while the block runs: allocator stats on CUDA,
    resident set size sampled every 5 ms on CPU."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["mb"] = (max(peak[0], rss()) - start) / 2**20


def bench_loops(device: torch.device, rows: int, features: int, batch_size: int, epochs: int) -> dict:
    x, y = synthetic(rows, features)
    on_device = (x.to(device), y.to(device))
    state = {}
    for name in LOOPS:
        model, optimizer = setup(name, features, device)
        data = (x, y) if name == "b" else on_device  # the article keeps data on the host
        LOOPS[name](model, optimizer, *data, batch_size, 0, device)  # warm-up
        state[name] = {"args": (model, optimizer, *data, batch_size), "seconds": [], "mb": 0.0}
    for epoch in range(1, epochs + 1):
        for name, s in state.items():
            with peak_memory(device) as memory:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                LOOPS[name](*s["args"], epoch, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                s["seconds"].append(time.perf_counter() - started)
            s["mb"] = max(s["mb"], memory["mb"])
    return {name: {"rows_per_s": rows / min(s["seconds"]), "mb": s["mb"]} for name, s in state.items()}


def part_loops(device: torch.device, epochs: int) -> list[dict]:
    print(f"\n(1) epoch loops on {device_name(device)}: fastest of {epochs} epochs, interleaved")
    print(f"{'rows':>9} {'feat':>4} {'batch':>5} | {'(a) train.py':>13} {'(b) article':>12} {'(c) minimal':>12}"
          f" | {'a/c':>5} {'a/b':>6} | peak MB a / b / c")
    results = []
    for rows, features, batch_size in SIZES:
        r = bench_loops(device, rows, features, batch_size, epochs)
        a, b, c = (r[k]["rows_per_s"] for k in "abc")
        results.append({"rows": rows, "a/c": a / c, "a/b": a / b})
        print(f"{rows:>9,} {features:>4} {batch_size:>5} | {a:>10,.0f}/s {b:>10,.0f}/s {c:>10,.0f}/s"
              f" | {a / c:>4.2f}x {a / b:>5.1f}x | {r['a']['mb']:.0f} / {r['b']['mb']:.0f} / {r['c']['mb']:.0f}")
    return results


# ----------------------------------------------------------------------------- part 2: end to end

BARE = '''
import csv, torch, torch.nn as nn, torch.nn.functional as F
rows = list(csv.reader(open({csv!r})))[1:]
classes = sorted({{r[-1] for r in rows}})
x = torch.tensor([[float(v) for v in r[1:5]] for r in rows])
y = torch.tensor([classes.index(r[-1]) for r in rows])
torch.manual_seed(0)
order = torch.randperm(len(x))
train_rows = order[:102]
mean, std = x[train_rows].mean(0), x[train_rows].std(0)
x = (x - mean) / std
model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for epoch in range(50):
    for rows_ in train_rows[torch.randperm(len(train_rows))].split(16):
        opt.zero_grad()
        F.cross_entropy(model(x[rows_]), y[rows_]).backward()
        opt.step()
torch.save(model.state_dict(), "model.pt")
'''

ARTICLE = '''
import torch, torch.nn as nn, torch.nn.functional as F
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from datasets import load_dataset
from torch.utils.data import DataLoader, TensorDataset
frame = load_dataset("csv", data_files={csv!r}, split="train", cache_dir="hf").to_pandas()
classes = sorted(frame["Species"].unique())
x = torch.tensor(frame.drop(columns=["Id", "Species"]).values, dtype=torch.float32)
y = torch.tensor(frame["Species"].map({{c: i for i, c in enumerate(classes)}}).values)
x = (x - x.mean(0)) / x.std(0)
torch.manual_seed(0)
order = torch.randperm(len(x))
train_set = TensorDataset(x[order[:120]], y[order[:120]])
val_set = TensorDataset(x[order[120:]], y[order[120:]])
train_loader = DataLoader(train_set, batch_size=16, shuffle=True)
val_loader = DataLoader(val_set, batch_size=16)
model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(),
                      nn.Dropout(0.1), nn.Linear(32, 3))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
train_losses, val_losses, best = [], [], float("inf")
for epoch in range(50):
    model.train()
    total = 0.0
    for xb, yb in train_loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        total += loss.item()
    train_losses.append(total / len(train_loader))
    model.eval()
    total = 0.0
    with torch.no_grad():
        for xb, yb in val_loader:
            total += F.cross_entropy(model(xb), yb).item()
    val_losses.append(total / len(val_loader))
    if val_losses[-1] < best:
        best = val_losses[-1]
        torch.save(model.state_dict(), "best_model.pt")
plt.plot(train_losses, label="train")
plt.plot(val_losses, label="val")
plt.legend()
plt.savefig("loss_curve.png")
'''


def run_timed(command: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{child.stderr.read().decode()}")
    child.stderr.close()
    return seconds, usage.ru_maxrss / 1024


def part_end_to_end(runs: int) -> dict:
    print(f"\n(2) end to end, default Iris job: median of {runs} runs each, interleaved")
    iris = str(HERE / "datasets" / "Iris.csv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the article's script needs it to run offline at all
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = {}
        for name, source in (("bare", BARE), ("article", ARTICLE)):
            (tmp / name).mkdir()
            (tmp / name / "job.py").write_text(textwrap.dedent(source.format(csv=iris)))
            jobs[name] = ([sys.executable, "job.py"], tmp / name)
        (tmp / "train").mkdir()
        jobs["train.py"] = ([sys.executable, str(HERE / "train.py")], tmp / "train")
        for command, cwd in jobs.values():  # warm-up: builds train.py's dataset cache, the article's HF cache
            run_timed(command, cwd, env)
        samples = {name: [] for name in jobs}
        for _ in range(runs):
            for name, (command, cwd) in jobs.items():
                samples[name].append(run_timed(command, cwd, env))
    result = {name: (statistics.median(s for s, _ in v), max(m for _, m in v)) for name, v in samples.items()}
    for name, (seconds, mb) in result.items():
        print(f"  {name:9s} {seconds:5.2f} s   peak RSS {mb:4.0f} MB")
    t, b, a = result["train.py"], result["bare"], result["article"]
    ratios = {"e2e/bare": t[0] / b[0], "e2e/article": t[0] / a[0], "rss/article": t[1] / a[1]}
    print(f"  train.py / bare {ratios['e2e/bare']:.2f}x (target <= 1.3x), train.py / article "
          f"{ratios['e2e/article']:.2f}x (target <= 0.7x), peak RSS train.py / article {ratios['rss/article']:.2f}x"
          " (target <= 1x)")
    return ratios


# ----------------------------------------------------------------------------- part 3: mid-epoch saves

def part_save_cost(runs: int, rows: int = 1_200_000, features: int = 16, epochs: int = 3) -> float:
    every = train.TrainingConfig().save_every_steps
    print(f"\n(3) --save-every-steps {every} (the default) against 0, {rows:,} rows: fastest epoch of {runs} x "
          f"{epochs}, interleaved")
    import pyarrow as pa  # a dependency of datasets
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x, y = synthetic(rows, features)
        pq.write_table(pa.table({**{f"f{i}": x[:, i].numpy() for i in range(features)}, "label": y.numpy()}),
                       tmp / "large.parquet")
        base = [sys.executable, str(HERE / "train.py"), "--dataset", str(tmp / "large.parquet"), "--label-column",
                "label", "--datasets-dir", str(tmp / "datasets"), "--epochs", str(epochs), "--device", "cpu"]
        settings = {"default": ["--save-every-steps", str(every)], "off": ["--save-every-steps", "0"]}
        seconds, saves = {name: [] for name in settings}, {}
        for run in range(runs + 1):  # the first builds the dataset cache and is not counted
            for name, flags in settings.items():
                out = tmp / name
                run_timed([*base, *flags, "--checkpoint-dir", str(out), "--output-dir", str(out)], tmp, os.environ)
                if run:
                    seconds[name] += [h["seconds"] for h in json.loads((out / "history.json").read_text())]
        # One save, timed on its own: train.py's set_up and save_last on the same table and settings.
        run = train.set_up(train.parse_config([*base[2:], "--checkpoint-dir", str(tmp / "timed"),
                                               "--output-dir", str(tmp / "timed")]), torch.device("cpu"))
        steps = run.steps
        position = {"epoch": 1, "steps": every, "rows": every * run.cfg.batch_size, "loss_sum": [torch.tensor(1.0)],
                    "norms": torch.zeros(every)}
        save_seconds = []
        for _ in range(20):
            started = time.perf_counter()
            train.save_last(run, position)
            save_seconds.append(time.perf_counter() - started)
    saves = (steps - 1) // every if every else 0  # none at the epoch's last step: the epoch end saves anyway
    best = {name: min(v) for name, v in seconds.items()}
    measured = best["default"] / best["off"] - 1
    noise = max(seconds["off"]) / best["off"] - 1
    computed = saves * statistics.median(save_seconds) / best["off"]
    print(f"  {steps} steps an epoch (batch {run.cfg.batch_size}), {saves} mid-epoch save(s) each, "
          f"{statistics.median(save_seconds) * 1000:.1f} ms a save")
    print(f"  epoch {best['off']:.3f} s without, {best['default']:.3f} s with: {measured:+.2%} measured "
          f"(epochs without it spread over {noise:.1%}); {computed:+.3%} from the parts (target well under +1%)")
    return computed


# ----------------------------------------------------------------------------- part 4: Datasets

class Shifted(torch.utils.data.Dataset):
    """1 x 8 x 8 images, each moved by up to a pixel as it is read: augmentation, as torchvision's
    transforms do it, drawing from torch's global stream."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple:
        return self.x[i].roll(tuple(torch.randint(-1, 2, (2,)).tolist()), (1, 2)), self.y[i]


def part_datasets(epochs: int, rows: int = 20_000) -> list[float]:
    """An epoch of train_one_epoch over a Dataset split: (a) train.py's iterate_batches, as a
    training pass makes it (each batch's draws seeded, the model's stream put back), against (b)
    a plain DataLoader over the same rows (what a hand-written loop does). One process, no
    workers: where the seeding shows most."""
    print(f"\n(4) a Dataset split, {rows:,} rows, batch 32, no workers: fastest of {epochs} epochs, "
          "interleaved")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, CLASSES, (rows,), generator=g)
    cases = {"TensorDataset, 8 features, MLP": (TensorDataset(torch.randn(rows, 8, generator=g), y), (8,)),
             "augmenting 1x8x8 images, CNN": (Shifted(torch.randn(rows, 1, 8, 8, generator=g), y), (1, 8, 8))}
    ratios = []
    for name, (dataset, shape) in cases.items():
        def model():
            torch.manual_seed(0)
            if len(shape) == 1:
                return train.build_model(shape, CLASSES, {}, train.TrainingConfig())
            return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, CLASSES))

        def train_py(epoch, net, optimizer):
            rows_ = train.shard_rows(rows, shuffle_seed=epoch)
            batches = train.iterate_batches(dataset, 32, rows_, torch.device("cpu"), seed=(0, epoch, 0))
            train.train_one_epoch(net, batches, optimizer, F.cross_entropy, count=len(train.batch_rows(rows_, 32)))

        def plain(epoch, net, optimizer):
            rows_ = train.shard_rows(rows, shuffle_seed=epoch).tolist()
            train.train_one_epoch(net, DataLoader(dataset, batch_size=32, sampler=rows_), optimizer, F.cross_entropy)

        loops = {"a": train_py, "b": plain}
        nets = {k: model() for k in loops}
        optimizers = {k: torch.optim.AdamW(nets[k].parameters(), lr=1e-3, fused=True) for k in loops}
        seconds = {k: [] for k in loops}
        for epoch in range(epochs + 1):  # the first is a warm-up
            for k, loop in loops.items():
                started = time.perf_counter()
                loop(epoch, nets[k], optimizers[k])
                if epoch:
                    seconds[k].append(time.perf_counter() - started)
        a, b = (rows / min(seconds[k]) for k in loops)
        ratios.append(a / b)
        print(f"  {name:<32} (a) train.py {a:>9,.0f} rows/s   (b) plain DataLoader {b:>9,.0f} rows/s   a/b {a / b:.2f}x")
    return ratios


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per loop and size")
    parser.add_argument("--runs", type=int, default=7, help="end-to-end runs per script")
    parser.add_argument("--save-runs", type=int, default=3, help="runs per setting in part 3")
    parser.add_argument("--only", choices=["1", "2", "3", "4"], help="run one part alone")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs")
    summary = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices if args.only in (None, "1") else ():
        at_scale = [r for r in part_loops(device, args.epochs) if r["rows"] >= 100_000]
        summary.append(f"{device.type} a/c {min(r['a/c'] for r in at_scale):.2f}x"
                       f" a/b {min(r['a/b'] for r in at_scale):.1f}x")
    if args.only in (None, "2"):
        e2e = part_end_to_end(args.runs)
        summary.append(f"e2e train.py/bare {e2e['e2e/bare']:.2f}x train.py/article {e2e['e2e/article']:.2f}x"
                       f" rss train.py/article {e2e['rss/article']:.2f}x")
    if args.only in (None, "3"):
        summary.append(f"mid-epoch saves {part_save_cost(args.save_runs):+.3%} epoch time")
    if args.only in (None, "4"):
        summary.append(f"Dataset splits a/b {min(part_datasets(args.epochs)):.2f}x")
    print("\nsummary (worst case at 100k+ rows): " + "; ".join(summary))


if __name__ == "__main__":
    main()
