"""The README's worked examples, as a user would follow them. For each ```python block of the README
whose first line is "# example: NAME", copy only train.py and test.py into an empty folder, apply
the block there (each function or class it defines replaces the one of that name in train.py, or
joins them before build_data), set the TrainingConfig defaults its "# TrainingConfig defaults:"
line names (adding the new fields), write the example's data, then run `python train.py` and
`python -m pytest -q test.py`. Both must pass, and the suite must have run the swapped seam.

    python .ci/examples.py [NAME ...]
"""

import ast
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The tests that run each seam: all of them must pass in every example's folder.
SEAM_TESTS = ("test_the_model_returns_raw_outputs_shaped_for_the_objective",
              "test_the_objective_scores_whole_splits_in_any_row_order",
              "test_your_optimizer_and_scheduler_go_on_exactly_from_their_state",
              "test_gradients_are_zeroed_before_every_step",
              "test_a_stop_mid_epoch_resumes_to_the_same_weights_as_a_run_never_stopped",
              "test_the_best_checkpoint_is_the_best_monitored_epoch_not_the_last")


def write_tables(folder: Path) -> None:
    """The examples' data: a binary table with a rare positive class, a regression table, a
    four-class table."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3000, 4))
    fraud = (x[:, 0] + 0.8 * x[:, 1] + 0.3 * rng.normal(size=3000)) > 2.0  # about 5% positive
    (folder / "transactions.csv").write_text("amount,hour,distance,age,fraud\n" + "".join(
        ",".join(f"{v:.3f}" for v in row) + f",{'yes' if f else 'no'}\n" for row, f in zip(x, fraud)))
    area, rooms = rng.uniform(30, 200, 800), rng.integers(1, 7, 800)
    price = 2500 * area + 12000 * rooms + rng.normal(0, 20000, 800)
    (folder / "houses.csv").write_text("area,rooms,price\n" + "".join(
        f"{a:.1f},{r},{p:.0f}\n" for a, r, p in zip(area, rooms, price)))
    rows = []
    for grade, centre in zip("ABCD", ((0, 0, 0, 0), (3, 0, 3, 0), (0, 3, 0, 3), (3, 3, 3, 3))):
        rows += [",".join(f"{v:.3f}" for v in row) + f",{grade}\n" for row in rng.normal(centre, 1.0, size=(60, 4))]
    (folder / "grades.csv").write_text("length,width,height,weight,grade\n" + "".join(rows))


def examples() -> dict[str, str]:
    blocks = re.findall(r"```python\n(# example: (\w+)\n.*?)```", (REPO / "README.md").read_text(), re.S)
    return {name: code for code, name in blocks}


def set_defaults(source: str, settings: str) -> str:
    """TrainingConfig's defaults as the example's line says; fields it names that are not there are added."""
    body_end = source.index("\n\n\n", source.index("class TrainingConfig:"))
    for name, value in re.findall(r"(\w+)=((?:\"[^\"]*\")|[^,\s]+)", settings):
        found = re.subn(rf"^(    {name}: [^=]+= )[^#\n]*?(  #)", rf"\g<1>{value}\g<2>", source, flags=re.M)
        if found[1] == 0:  # a new field, with the type its value has
            kind = type(ast.literal_eval(value)).__name__
            source = source[:body_end] + f"\n    {name}: {kind} = {value}  # added by the example" + source[body_end:]
        else:
            source = found[0]
        body_end = source.index("\n\n\n", source.index("class TrainingConfig:"))
    return source


def apply(source: str, code: str) -> str:
    """train.py with each function and class of `code` in place of its namesake, or before build_data."""
    lines = code.splitlines()
    for node in ast.parse(code).body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        start = node.lineno - 1 - len(node.decorator_list)
        text = "\n".join(lines[start:node.end_lineno]) + "\n"
        keyword = "class" if isinstance(node, ast.ClassDef) else "def"
        old = re.search(rf"^{keyword} {node.name}\b.*?(?=^\S)", source, re.M | re.S)
        if old:
            source = source[:old.start()] + text + "\n\n" + source[old.end():]
        else:
            at = source.index("def build_data(")
            source = source[:at] + text + "\n\n" + source[at:]
    return source


def run(name: str, code: str) -> None:
    settings = re.search(r"^# TrainingConfig defaults: (.*)$", code, re.M)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = apply((REPO / "train.py").read_text(), code)
        (folder / "train.py").write_text(set_defaults(source, settings[1]) if settings else source)
        (folder / "test.py").write_text((REPO / "test.py").read_text())
        write_tables(folder)
        print(f"example {name}: {folder}", flush=True)
        for command in ([sys.executable, "train.py"],
                        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test.py"]):
            result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=900)
            tail = (result.stdout + result.stderr).strip().splitlines()
            print("$", " ".join(command[1:]), "->", tail[-1] if tail else "", flush=True)
            if result.returncode != 0:
                raise SystemExit(f"example {name}: {' '.join(command[1:])} failed:\n{result.stdout}{result.stderr}")
        passed = set(re.findall(r"^PASSED test\.py::(\w+)", result.stdout, re.M))
        missing = [test for test in SEAM_TESTS if test not in passed]
        if missing:
            raise SystemExit(f"example {name}: the suite did not run {', '.join(missing)}")


def main() -> None:
    found = examples()
    chosen = sys.argv[1:] or list(found)
    unknown = [name for name in chosen if name not in found]
    if unknown or not found:
        raise SystemExit(f"no README example named {', '.join(unknown) or 'at all'}; there are: {', '.join(found)}")
    for name in chosen:
        run(name, found[name])


if __name__ == "__main__":
    main()
