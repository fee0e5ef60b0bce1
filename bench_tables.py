"""train.py by flags alone on real tables, against scikit-learn on the same rows.

    pip install -r requirements-bench.txt
    python bench_tables.py                 # a few minutes on 2 CPU cores
    python bench_tables.py penguins wine   # only the tables whose name contains a word

Each table is written to a CSV file as it comes (text columns and blank cells kept), and
`python train.py --dataset T.csv --label-column L --task K` trains on it, with no other flag.
The baselines, scikit-learn's linear model (LogisticRegression or Ridge), MLP and
HistGradientBoosting, are fit on the same training rows and scored on the same test rows:
the split is train.py's own (build_data's "rows"). Their inputs: numbers with blanks filled by the
training median and standardized, text one-hot (HistGradientBoosting takes categories and
blanks natively). Scores are accuracy (classification) or R² (regression) on the test rows.
The last line is a one-line summary against the targets: within 0.02 accuracy (0.03 R²) of
the best baseline on every table, and at most 2x the MLP's wall time on the 50k-row table.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import datasets as sk_datasets
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

import train

HERE = Path(__file__).resolve().parent


def synthetic(rows: int = 50_000, seed: int = 0) -> pd.DataFrame:
    """Three text columns (one with blanks), five numbers (two with blanks), a 3-class label
    that depends on both, through interactions a linear model cannot express."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 5))
    region = rng.choice([f"region-{c}" for c in "ABCDEFGH"], size=rows)
    device = rng.choice(["phone", "tablet", "desktop", "tv"], size=rows, p=[0.5, 0.2, 0.25, 0.05])
    tier = rng.choice(["free", "plus", "pro"], size=rows, p=[0.6, 0.3, 0.1])
    region_effect = {f"region-{c}": e for c, e in zip("ABCDEFGH", np.linspace(-1.5, 1.5, 8))}
    score = (x[:, 0] + np.vectorize(region_effect.get)(region) + 0.8 * x[:, 1] * (device == "phone")
             - 0.8 * x[:, 1] * (device != "phone") + np.abs(x[:, 2]) + 1.2 * (tier == "pro") - 0.5 * x[:, 3] ** 2
             + rng.normal(scale=0.5, size=rows))
    label = np.digitize(score, np.quantile(score, [0.4, 0.8]))
    frame = pd.DataFrame({f"x{i}": x[:, i].round(4) for i in range(5)})
    frame["region"], frame["device"], frame["tier"] = region, device, tier
    for column, share in (("x1", 0.1), ("x3", 0.05)):
        frame.loc[rng.random(rows) < share, column] = np.nan
    frame.loc[rng.random(rows) < 0.08, "tier"] = None
    frame["outcome"] = np.array(["low", "mid", "high"])[label]
    return frame


def sklearn_table(name: str) -> pd.DataFrame:
    return getattr(sk_datasets, f"load_{name}")(as_frame=True).frame


TABLES = {  # name: (frame maker, label column, task)
    "digits": (lambda: sklearn_table("digits"), "target", "classification"),
    "breast_cancer": (lambda: sklearn_table("breast_cancer"), "target", "classification"),
    "wine": (lambda: sklearn_table("wine"), "target", "classification"),
    "diabetes": (lambda: sklearn_table("diabetes"), "target", "regression"),
    "penguins": (lambda: __import__("palmerpenguins").load_penguins(), "species", "classification"),
    "synthetic_50k": (synthetic, "outcome", "classification"),
}


def run_template(csv: Path, label: str, task: str, folder: Path) -> tuple[dict, float]:
    """python train.py by flags alone; its test report and wall time."""
    command = [sys.executable, str(HERE / "train.py"), "--dataset", str(csv), "--label-column", label,
               "--task", task]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads((folder / "training-loop" / "test_report.json").read_text()), seconds


def baselines(frame: pd.DataFrame, label: str, task: str, splits: dict, seed: int = 0) -> dict:
    """Each baseline's test score and fit + predict wall time, on train.py's split."""
    y = frame[label]  # splits["train"] and ["test"] number the rows of the source table
    x = frame.drop(columns=[label])
    numbers = [c for c in x.columns if pd.api.types.is_numeric_dtype(x[c])]
    text = [c for c in x.columns if c not in numbers]
    x[text] = x[text].astype(object).where(x[text].notna(), "(missing)")
    encode = ColumnTransformer([("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numbers),
                                ("txt", OneHotEncoder(handle_unknown="ignore"), text)])
    hgb_x = x.copy()
    hgb_x[text] = hgb_x[text].astype("category")
    classify = task == "classification"
    models = {
        "linear": (make_pipeline(encode, LogisticRegression(max_iter=5000) if classify else Ridge()), x),
        "mlp": (make_pipeline(encode, (MLPClassifier if classify else MLPRegressor)(max_iter=500, random_state=seed)),
                x),
        "hgb": ((HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor)(
            categorical_features="from_dtype", random_state=seed), hgb_x),
    }
    scores = {}
    for name, (model, inputs) in models.items():
        started = time.perf_counter()
        model.fit(inputs.iloc[splits["train"]], y.iloc[splits["train"]])
        score = model.score(inputs.iloc[splits["test"]], y.iloc[splits["test"]])  # accuracy or R²
        scores[name] = (score, time.perf_counter() - started)
    return scores


def verdict(report: dict) -> str:
    """The run note's verdict, and the evidence it rests on: the rise of the validation loss from
    the best epoch to the end, ± two standard errors, against what would be material."""
    diagnosis, evidence = report["diagnosis"], report["diagnosis"]["evidence"]
    rise, se = evidence["rise"]
    return (f"{diagnosis['verdict']} (best epoch {report['best_epoch']}; rise {rise:+.3g} ± {2 * se:.2g},"
            f" material {evidence['material']:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="*", help="only the tables whose name contains one of these words")
    args = parser.parse_args()
    print(f"torch {train.torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{platform.machine()}")
    print(f"{'table':14} {'rows':>6} {'task':>5} | {'train.py':>8} {'linear':>7} {'mlp':>7} {'hgb':>7} | "
          f"{'gap':>6} | {'train.py s':>10} {'mlp s':>6} {'hgb s':>6} | ok  | run note's verdict")
    failures, worst = [], 0.0
    for name, (make, label, task) in TABLES.items():
        if args.tables and not any(word in name for word in args.tables):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            frame = make()
            csv = folder / f"{name}.csv"
            frame.to_csv(csv, index=False)
            report, seconds = run_template(csv, label, task, folder)
            cfg = train.parse_config(["--dataset", str(csv), "--label-column", label, "--task", task,
                                      "--datasets-dir", str(folder / "datasets")])
            splits = train.build_data(cfg)["rows"]
        scores = baselines(frame, label, task, splits)
        ours = report["acc"] if task == "classification" else report["r2"]
        best = max(score for score, _ in scores.values())
        gap = best - ours
        allowed = 0.02 if task == "classification" else 0.03
        ok = gap <= allowed
        if name.startswith("synthetic"):
            ok = ok and seconds <= 2 * scores["mlp"][1]
        worst = max(worst, gap)
        failures += [] if ok else [name]
        print(f"{name:14} {len(frame):>6} {task[:5]:>5} | {ours:8.4f} {scores['linear'][0]:7.4f} {scores['mlp'][0]:7.4f} "
              f"{scores['hgb'][0]:7.4f} | {gap:+6.3f} | {seconds:10.1f} {scores['mlp'][1]:6.1f} {scores['hgb'][1]:6.1f} "
              f"| {'yes' if ok else 'NO ':3} | {verdict(report)}", flush=True)
    print(f"summary: {'every table meets' if not failures else 'missed on ' + ', '.join(failures) + ';'} the targets; "
          f"worst gap to the best baseline {worst:+.3f} (allowed 0.02 accuracy / 0.03 R²)")


if __name__ == "__main__":
    main()
