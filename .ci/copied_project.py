"""The user's loop, as CI runs it: copy train.py and test.py into an empty folder, point
TrainingConfig's defaults at another table, swap the model, then run `python train.py` and the
suite there. Everything must pass: test.py checks the loop wherever the file goes.

    python .ci/copied_project.py [--model NAME]    # NAME: layernorm (default) or batchnorm

"batchnorm" swaps in a model whose training-mode outputs depend on the batch; the suite then
fails only in the tests that need batch-independent outputs, and they say so.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

MODELS = {
    # Same call shape as TinyMLP (in_features, num_classes), another body: no dropout argument,
    # LayerNorm, GELU, a residual block.
    "layernorm": '''class TinyMLP(nn.Module):
    """A user's model: a residual MLP."""

    def __init__(self, in_features: int, num_classes: int, width: int = 48):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(in_features, width), nn.LayerNorm(width), nn.GELU())
        self.block = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.block(h))


''',
    "batchnorm": '''class TinyMLP(nn.Module):
    """A user's model with BatchNorm."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


''',
}

DEFAULTS = {"dataset": '"measurements.csv"', "label_column": '"grade"', "epochs": "12", "learning_rate": "3e-3",
            "batch_size": "32"}


def user_table(path: Path) -> None:
    """The user's own data: four numeric columns and a text label with four classes."""
    rng = np.random.default_rng(7)
    lines = ["length,width,height,weight,grade"]
    for grade, centre in zip("ABCD", ((0, 0, 0, 0), (3, 0, 3, 0), (0, 3, 0, 3), (3, 3, 3, 3))):
        for row in rng.normal(centre, 1.0, size=(60, 4)):
            lines.append(",".join(f"{v:.3f}" for v in row) + f",{grade}")
    path.write_text("\n".join(lines) + "\n")


def copy_project(folder: Path, model: str) -> None:
    source = (REPO / "train.py").read_text()
    for name, value in DEFAULTS.items():
        source, count = re.subn(rf"^(    {name}: \w+ = )[^#\n]*?(  #)", rf"\g<1>{value}\g<2>", source, flags=re.M)
        assert count == 1, f"TrainingConfig.{name} not found"
    start = source.index("class TinyMLP(nn.Module):")
    end = source.index("def build_model(")
    (folder / "train.py").write_text(source[:start] + MODELS[model] + source[end:])
    (folder / "test.py").write_text((REPO / "test.py").read_text())
    user_table(folder / "measurements.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="layernorm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        copy_project(folder, args.model)
        print(f"copied project in {folder}: defaults {DEFAULTS}, model {args.model}", flush=True)
        for command in ([sys.executable, "train.py"], [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                          "test.py"]):
            print("$", " ".join(command[1:]), flush=True)
            status = subprocess.run(command, cwd=folder).returncode
            if status != 0:
                raise SystemExit(f"copied project: {' '.join(command[1:])} failed (exit {status})")


if __name__ == "__main__":
    main()
