"""Does a check of test.py cry wolf? Runs test.py's checks of the users' own seams on correct loops:
fresh copies of train.py and test.py, on the built-in tables by flags (the bundled Iris and the
tables of bench_tables.py) with several selection metrics and seeds, and on every README example
with several seeds. Prints each run's result and, for the margins, the selection metric before and
after test.py's short fit and each held-out split's copies of training inputs against the count
allowed. Not part of CI (about 30 minutes on 2 cores; needs requirements-bench.txt).

    python .ci/false_failures.py [tables|examples]
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / ".ci"), str(REPO)]
import bench_tables  # noqa: E402
import examples  # noqa: E402

CHECKS = ["test_metrics_are_plain_numbers_the_run_and_the_report_can_store",
          "test_the_selection_metric_improves_the_way_the_run_reads_it",
          "test_evaluation_gives_the_same_outputs_twice",
          "test_held_out_rows_are_not_copies_of_training_rows",
          "test_the_schedule_runs_through_every_epoch_and_resumes_exactly"]
SEEDS = range(5)

# The margins, computed in the copy with test.py's own helpers.
MARGINS = r'''
import json, math, sys, torch
import train, test as t
cfg = t.replace(train.TrainingConfig(), checkpoint_dir="unused", output_dir="unused")
full = train.build_data(cfg)
data = {**full, **{s: t.cut(full[s], t.SLICE) for s in ("train", "val", "test")}}
objective = train.build_objective(data["meta"], cfg)
lower, _ = train.lower_is_better(cfg, objective)
_, out, x, y = t.fit_slice(data, objective, cfg)
start = t.starting_outputs(data, objective, cfg, x)
key = cfg.best_metric.removeprefix("val_")
def value(o):
    return objective.row_losses(o, y).mean().item() if key == "loss" else objective.metrics(o, y)[key]
seen = t.Counter(t.fingerprints(full["train"]))
twins = sum(c for c in seen.values() if c > 1) / sum(seen.values())
held = []
for split in ("val", "test"):
    rows = t.fingerprints(full[split])
    expected = twins * len(rows)
    held.append([sum(r in seen for r in rows), round(expected + 3 * math.sqrt(expected * (1 - twins)) + 2, 1)])
print(json.dumps({"before": value(start), "after": value(out), "lower": lower, "copies, allowed": held}))
'''


def check(label: str, source: str, tables: tuple = (), pretrain: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "train.py").write_text(source)
        (folder / "test.py").write_text((REPO / "test.py").read_text())
        (folder / "datasets").mkdir()
        (folder / "datasets" / "Iris.csv").write_bytes((REPO / "datasets" / "Iris.csv").read_bytes())
        examples.write_tables(folder)
        for table in tables:
            bench_tables.TABLES[table][0]().to_csv(folder / f"{table}.csv", index=False)
        if pretrain:
            subprocess.run([sys.executable, "-c", examples.PRETRAIN], cwd=folder, check=True)
        tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                                 "test.py", "-k", " or ".join(CHECKS)], cwd=folder, capture_output=True,
                                text=True, env={**os.environ, "COLUMNS": "300"})
        margins = subprocess.run([sys.executable, "-c", MARGINS], cwd=folder, capture_output=True, text=True)
        found = margins.stdout.strip().splitlines()[-1] if margins.returncode == 0 else margins.stderr[-300:]
        print(f"{label}: {tested.stdout.strip().splitlines()[-1]} | {found}", flush=True)
        for line in tested.stdout.splitlines():
            if line.startswith(("FAILED", "ERROR", "SKIPPED")):
                print("    ", line[:300], flush=True)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    base = (REPO / "train.py").read_text()
    if which in ("all", "tables"):
        tables = {"iris": ("", "classification", ())}
        for name, (_, label, task) in bench_tables.TABLES.items():
            if name != "synthetic_50k":  # 50,000 rows: minutes a run, and nothing the others lack
                tables[name] = (f'dataset="{name}.csv", label_column="{label}", ', task, (name,))
        for name, (setting, task, files) in tables.items():
            metrics = ["val_loss", "val_acc", "val_macro_f1"] if task == "classification" else \
                ["val_loss", "val_r2", "val_mae"]
            metrics += ["val_auc"] if name == "breast_cancer" else []
            for metric in metrics:
                for seed in SEEDS:
                    source = examples.set_defaults(base, f'{setting}best_metric="{metric}", seed={seed}')
                    check(f"{name} {metric} seed {seed}", source, files)
    if which in ("all", "examples"):
        for name, code in examples.examples().items():
            applied = examples.apply(base, code)
            line = re.search(r"^# TrainingConfig defaults: (.*)$", code, re.M)
            for seed in SEEDS:
                settings = (line[1] + ", " if line else "") + f"seed={seed}"
                check(f"example {name} seed {seed}", examples.set_defaults(applied, settings),
                      pretrain="def backbone(" in code)


if __name__ == "__main__":
    main()
