"""Bad input gets one clear line and a non-zero exit, and leaves every file a user had alone."""

import errno
import os
import subprocess
import sys

import pytest
import torch

import train
from util import REPO, blobs_csv, cli, dirs, flags


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-epoch run, its command line, and the bytes of every file it wrote."""
    root = tmp_path_factory.mktemp("finished")
    args = flags(root, blobs_csv(root / "blobs.csv"), epochs=3)
    train.main(args)
    files = {p: p.read_bytes() for p in root.glob("*/*") if p.is_file() and "datasets" not in p.parts}
    return root, args, files


BAD_INPUTS = {
    "batch size -1": (["--batch-size", "-1"], "--batch-size must be at least 1"),
    "label smoothing 1": (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    "unknown class weight": (["--class-weight", "inverse"], "--class-weight: invalid choice: 'inverse'"),
    "epochs 0": (["--epochs", "0"], "--epochs must be at least 1"),
    "learning rate 0": (["--learning-rate", "0"], "--learning-rate must be above 0"),
    "fraction above 1": (["--val-fraction", "1.5"], "--val-fraction and --test-fraction must be above 0"),
    "fractions sum to 1": (["--val-fraction", "0.5", "--test-fraction", "0.5"], "their sum below 1"),
    "unknown device": (["--device", "tpu"], "--device 'tpu' is not a device of this machine"),
    "absent CUDA": (["--device", "cuda"], "--device 'cuda' is not a device of this machine"),
    "absent MPS": (["--device", "mps"], "--device 'mps' is not a device of this machine"),
    "unknown mode": (["--mode", "up"], "--mode: invalid choice: 'up'"),
    "unknown monitor": (["--best-metric", "val_auc"], "--best-metric val_auc is not a validation metric"),
    "unknown amp dtype": (["--amp-dtype", "fp8"], "--amp-dtype: invalid choice: 'fp8'"),
    "unknown scheduler": (["--scheduler", "step"], "--scheduler: invalid choice: 'step'"),
    "float16 on CPU": (["--device", "cpu", "--use-amp", "--amp-dtype", "float16"], "float16 needs a CUDA device"),
    "missing file": (["--dataset", "{tmp}/missing.csv"], "no such file"),
    "empty file": (["--dataset", "{empty}"], "the file is empty"),
    "header only": (["--dataset", "{header}", "--label-column", "y"], "has no rows"),
    "missing label column": (["--dataset", "{good}", "--label-column", "species"], "columns are: a, b, y"),
    "non-numeric value": (["--dataset", "{text}", "--label-column", "y"], "holds a word, 'abc', among numbers in row 2"),
    "missing value, strict": (["--dataset", "{hole}", "--label-column", "y", "--missing", "error"],
                              "column 'b' has a blank cell in row 2"),
    "infinite value": (["--dataset", "{inf}", "--label-column", "y"], "input 'b' holds infinite values"),
    "unknown missing policy": (["--missing", "drop"], "--missing: invalid choice: 'drop'"),
    "unknown categorical column": (["--categorical-columns", "colour"], "colour cannot be inputs"),
    "single class": (["--dataset", "{one_class}", "--label-column", "y"], "holds one class"),
    "uncached hub id offline": (["--dataset", "someone/not-cached"], "cannot be reached"),
    "resume with another seed": (["--resume", "--seed", "7"], "cannot change --seed (0 there, 7 now)"),
    "output dir is a file": (["--output-dir", "{empty}/out"], "cannot create or write to the folder"),
    "seed out of range": (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    "huge batch": (["--batch-size", "20000000000000000000"], "--batch-size must be at least 1"),
    "loss blows up": (["--learning-rate", "1e38", "--grad-clip", "0"], "epoch 1: the training loss is"),
    "a directory": (["--dataset", "{folder}"], "a directory; pass one of its files"),
    "latin-1 file": (["--dataset", "{latin}", "--label-column", "y"], "is not UTF-8 text"),
    "JSON by column": (["--dataset", "{by_column}", "--label-column", "y"], "holds lists or records"),
    "a label of lists": (["--dataset", "{lists}", "--label-column", "y"], "column 'y' holds lists or records"),
    "two rows to regress": (["--dataset", "{two}", "--label-column", "y", "--task", "regression"],
                            "the table has 2 labelled rows"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line_and_leaves_every_file_alone(finished_run, monkeypatch, case):
    if case == "absent CUDA" and torch.cuda.is_available() or case == "absent MPS" and torch.backends.mps.is_available():
        pytest.skip("this machine has that device")
    root, base, files = finished_run
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub that refuses at once
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    write = {"empty": "", "header": "a,b,y\n", "good": "a,b,y\n1,2,x\n3,4,z\n5,6,x\n7,8,z\n",
             "text": "a,b,y\n1,2,x\n3,abc,z\n" + "5,6,x\n" * 9, "hole": "a,b,y\n1,2,x\n3,,z\n" + "5,6,z\n" * 9,
             "inf": "a,b,y\n1,2,x\n3,inf,z\n" + "5,6,z\n4,5,x\n" * 9,
             "one_class": "a,b,y\n" + "".join(f"{i},{2 * i},x\n" for i in range(9)),
             "two": "a,y\n1,2.5\n2,3.5\n"}
    paths = {"tmp": root, "folder": str(root / "datasets")}
    for name, text in write.items():
        (root / f"{name}.csv").write_text(text)
        paths[name] = str(root / f"{name}.csv")
    (root / "columns.json").write_text('{"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "y": ["x", "z", "x", "z"]}')
    (root / "lists.jsonl").write_text("".join(f'{{"a": {i}, "y": [{i}, 1]}}\n' for i in range(12)))
    (root / "latin.csv").write_bytes("a,b,y\n1,caf\xe9,x\n".encode("latin-1") + b"2,3,z\n" * 9)
    paths.update(by_column=str(root / "columns.json"), lists=str(root / "lists.jsonl"), latin=str(root / "latin.csv"))
    args, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as stop:
        train.main(base + [a.format(**paths) for a in args])
    error = stop.value.code
    assert isinstance(error, str) and error.startswith("error: ") and "\n" not in error  # status 1, one line
    assert message in error
    for path, content in files.items():
        assert path.read_bytes() == content, f"{path} changed"


def test_bad_input_on_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = cli(*dirs(tmp_path), "--epochs", "0")
    assert result.returncode == 1 and result.stderr == "error: --epochs must be at least 1\n"


def test_a_second_run_on_the_same_checkpoint_dir_is_refused(tmp_path):
    source = blobs_csv(tmp_path / "blobs.csv")
    (tmp_path / "checkpoints").mkdir()
    hold = (f"import fcntl, sys; f = open({str(tmp_path / 'checkpoints/.lock')!r}, 'a+'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('held', flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as other:
        assert other.stdout.readline() == "held\n"
        with pytest.raises(SystemExit, match=r"another run \(pid 4242\) is using"):
            train.main(flags(tmp_path, source, epochs=1))
        other.stdin.close()
    assert not (tmp_path / "checkpoints/best_model.pt").exists()
    train.main(flags(tmp_path, source, epochs=1))  # once it has ended, the folder is free
    assert not (tmp_path / "checkpoints/.lock").exists()


def test_a_damaged_saved_copy_is_named(tmp_path):
    broken = tmp_path / "datasets" / "someone___blobs"  # as a disk fault might leave it
    broken.mkdir(parents=True)
    (broken / "state.json").write_text("{")
    with pytest.raises(SystemExit, match="someone___blobs is damaged .*delete it"):
        train.main(flags(tmp_path, "someone/blobs", epochs=1))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "old version", "other model"])
def test_a_damaged_checkpoint_is_refused_clearly(tmp_path, damage):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    last, best = tmp_path / "checkpoints/last.pt", tmp_path / "checkpoints/best_model.pt"
    best_bytes, content = best.read_bytes(), last.read_bytes()
    if damage == "truncated":
        last.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(len(content)))
    else:
        checkpoint = torch.load(last, weights_only=True)
        if damage == "old version":
            checkpoint["version"] = 0
        else:  # the same model's weights, built for more inputs
            checkpoint["model"] = train.build_model((7,), 3, {}, train.TrainingConfig()).state_dict()
        torch.save(checkpoint, last)
    expected = {"truncated": "not a readable checkpoint", "garbage": "not a readable checkpoint",
                "old version": "not of this train.py", "other model": "shaped for another model"}[damage]
    with pytest.raises(SystemExit, match=expected):
        train.main(flags(tmp_path, source, "--resume", epochs=2))
    assert best.read_bytes() == best_bytes


def test_a_loss_that_turns_nan_keeps_the_previous_best(tmp_path, monkeypatch):
    real, calls = train.train_one_epoch, []

    def blows_up_in_epoch_4(*args, **kwargs):
        calls.append(1)
        trained = real(*args, **kwargs)
        return {**trained, "loss": float("nan")} if len(calls) == 4 else trained

    monkeypatch.setattr(train, "train_one_epoch", blows_up_in_epoch_4)
    source = blobs_csv(tmp_path / "blobs.csv")
    with pytest.raises(SystemExit, match="epoch 4: the training loss is nan") as stop:
        train.main(flags(tmp_path, source, epochs=6))
    assert "learning rate" in stop.value.code
    best = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert best["epoch"] <= 3 and 1 <= last["epoch"] <= 3  # nothing of epoch 4


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64")])
def test_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, error):
    source = blobs_csv(tmp_path / "blobs.csv")
    train.main(flags(tmp_path, source, epochs=2))
    best_bytes = (tmp_path / "checkpoints/best_model.pt").read_bytes()

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # a real full disk fails part-way through a file
        if not hasattr(f, "name"):  # memory is not full
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        train.main(flags(tmp_path, source, epochs=2))
    message = stop.value.code
    assert message.startswith("error: could not write") and "best_model.pt" in message and "\n" not in message
    assert (tmp_path / "checkpoints/best_model.pt").read_bytes() == best_bytes
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # no half-written file left behind


def test_an_empty_predict_is_an_error_not_a_training_run(finished_run, tmp_path):
    root, _, _ = finished_run
    with pytest.raises(SystemExit, match="--predict was given an empty value"):
        train.main(["--checkpoint-dir", str(root / "checkpoints"), "--output-dir", str(tmp_path), "--predict", ""])
    assert not list(tmp_path.iterdir())


def test_a_predict_file_that_is_not_utf8_is_refused(finished_run, tmp_path):
    root, _, _ = finished_run
    latin = tmp_path / "latin.csv"
    latin.write_bytes("width,height,depth\n0,0,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="not a UTF-8 CSV file"):
        train.main(["--checkpoint-dir", str(root / "checkpoints"), "--predict", str(latin)])


def test_compile_without_a_compiler_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="--compile on CPU needs a C\\+\\+ compiler"):
        train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), "--compile", "--device", "cpu", epochs=1))


def test_meta_that_checkpoints_cannot_load_is_refused_at_the_start(tmp_path, monkeypatch):
    import numpy as np

    real = train.build_data
    monkeypatch.setattr(train, "build_data", lambda cfg: {**real(cfg), "meta": {"task": "x", "mean": np.zeros(3)}})
    with pytest.raises(SystemExit, match="build_data's meta may hold only tensors"):
        train.main(flags(tmp_path, blobs_csv(tmp_path / "blobs.csv"), epochs=1))
    assert not (tmp_path / "checkpoints/last.pt").exists()


def test_the_repository_runs_as_a_script_from_anywhere(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--label-column" in result.stdout
