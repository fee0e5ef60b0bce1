"""The README's worked examples, as a user would follow them. For each ```python block of the README
whose first line is "# example: NAME", copy only train.py and test.py into an empty folder, apply
the block there (each function or class it defines replaces the one of that name in train.py, or
joins them before build_data), set the TrainingConfig defaults its "# TrainingConfig defaults:"
line names (adding the new fields), write the example's data, then run `python train.py` and
`python -m pytest -q test.py`. Both must pass, and the suite must have run the swapped seam. Then
a run stopped by SIGTERM inside epoch 2 (with --num-workers 2) and resumed must end with the same
weights and history as the run never stopped; and a "# predict: TEXT" line must print a
prediction for each of TEXT's inputs. A "# delete blocks: A, B" line deletes those optional blocks
of train.py whole first (the table pipeline, the run note, ...), as README's "make it yours" says
a user may: the copy must still train, pass test.py, stop and resume.

    python .ci/examples.py [NAME ...]
"""

import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
# The tests that run each seam: all of them must pass in every example's folder.
SEAM_TESTS = ("test_the_model_returns_raw_outputs_shaped_for_the_objective",
              "test_the_objective_scores_whole_splits_in_any_row_order",
              "test_your_optimizer_and_scheduler_go_on_exactly_from_their_state",
              "test_gradients_are_zeroed_before_every_step",
              "test_a_stop_mid_epoch_resumes_to_the_same_weights_as_a_run_never_stopped",
              "test_the_best_checkpoint_is_the_best_monitored_epoch_not_the_last",
              "test_metrics_are_plain_numbers_the_run_and_the_report_can_store",
              "test_evaluation_gives_the_same_outputs_twice",
              "test_the_schedule_runs_through_every_epoch_and_resumes_exactly")


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


# The finetune example's backbone.pt: pretrained on a source task of the same kind as grades.csv
# (another draw of its recipe), as a backbone from elsewhere would be.
PRETRAIN = """
import numpy as np, torch, train
rng = np.random.default_rng(11)
y = rng.integers(0, 4, 2000)
x = rng.normal(np.array([(0, 0, 0, 0), (3, 0, 3, 0), (0, 3, 0, 3), (3, 3, 3, 3)])[y], 1.0)
x, y = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32), torch.tensor(y)
torch.manual_seed(0)
net, head = train.backbone(4), torch.nn.Linear(32, 4)
optimizer = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=0.01)
for _ in range(300):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(head(net(x)), y).backward()
    optimizer.step()
torch.save(net.state_dict(), "backbone.pt")
"""

# train.main, sent SIGTERM as last.pt saves epoch 2, step 2: the loop stops after the next step.
STOP = """
import os, signal, sys
import train

real_save = train.save_checkpoint

def save_then_stop(path, state):
    real_save(path, state)
    position = state.get("position")
    if position and (position["epoch"], position["steps"]) == (2, 2):
        os.kill(os.getpid(), signal.SIGTERM)

train.save_checkpoint = save_then_stop
train.main(sys.argv[1:])
"""


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


def delete_blocks(source: str, names: str) -> str:
    """train.py without the optional blocks named: each from its "# ===... NAME" line to the next
    block's, or to the `if __name__` line."""
    for name in (n.strip() for n in names.split(",")):
        block = re.search(rf"^# =+ {re.escape(name)}\n.*?(?=^# =+ |^if __name__)", source, re.M | re.S)
        if not block:
            raise SystemExit(f"train.py has no optional block named {name!r}")
        source = source[:block.start()] + source[block.end():]
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


def command(folder: Path, name: str, *args: str, expect: int = 0) -> str:
    result = subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=900)
    tail = (result.stdout + result.stderr).strip().splitlines()
    shown = "-c PRETRAIN (writes backbone.pt)" if args[0] == "-c" else " ".join(args)
    print("$", shown, "->", tail[-1] if tail else "", flush=True)
    if result.returncode != expect:
        raise SystemExit(f"example {name}: {' '.join(args)} exited {result.returncode}, not {expect}:\n"
                         f"{result.stdout}{result.stderr}")
    return result.stdout


def same_end(folder: Path, name: str) -> None:
    """The stopped and resumed run ended where the run never stopped did: weights and history."""
    ends = [torch.load(folder / d / "last.pt", weights_only=True) for d in ("checkpoints", "stopped/checkpoints")]
    different = [k for k in ends[0]["model"] if not torch.equal(ends[0]["model"][k], ends[1]["model"][k])]
    histories = [[{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(e["progress"]["history"])]
                 for e in ends]
    if different or histories[0] != histories[1]:
        raise SystemExit(f"example {name}: stopped and resumed, the run ended elsewhere: "
                         f"{', '.join(different) or 'the history differs'}")
    print(f"stopped in epoch 2 and resumed: {len(ends[0]['model'])} tensors and {len(histories[0])} epochs "
          "of history identical to the run never stopped", flush=True)


def run(name: str, code: str) -> None:
    settings = re.search(r"^# TrainingConfig defaults: (.*)$", code, re.M)
    to_predict = re.search(r"^# predict: (.*)$", code, re.M)
    deleted = re.search(r"^# delete blocks: (.*)$", code, re.M)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = (REPO / "train.py").read_text()
        source = apply(delete_blocks(source, deleted[1]) if deleted else source, code)
        (folder / "train.py").write_text(set_defaults(source, settings[1]) if settings else source)
        (folder / "test.py").write_text((REPO / "test.py").read_text())
        write_tables(folder)
        print(f"example {name}: {folder}" + (f" (deleted: {deleted[1]})" if deleted else ""), flush=True)
        if "def backbone(" in code:
            command(folder, name, "-c", PRETRAIN)
        command(folder, name, "train.py")
        tested = command(folder, name, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test.py")
        passed = set(re.findall(r"^PASSED test\.py::(\w+)", tested, re.M))
        missing = [test for test in SEAM_TESTS if test not in passed]
        if missing:
            raise SystemExit(f"example {name}: the suite did not run {', '.join(missing)}")
        (folder / "stop.py").write_text(STOP)
        elsewhere = ["--checkpoint-dir", "stopped/checkpoints", "--output-dir", "stopped/training-loop",
                     "--num-workers", "2"]
        command(folder, name, "stop.py", *elsewhere, "--save-every-steps", "1", expect=143)
        command(folder, name, "train.py", *elsewhere, "--resume")
        same_end(folder, name)
        if to_predict:
            text = to_predict[1].strip().strip('"')
            lines = command(folder, name, "train.py", "--predict", text).strip().splitlines()
            if len(lines) != len(text.split(";")):
                raise SystemExit(f"example {name}: --predict {text!r} printed {lines}")


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
