"""Does test.py catch the broken edits users make? Applies each edit below to a copy of
train.py, runs the suite there (stopping at the first failure), and counts the edits caught.

    python .ci/mutants.py              # all edits, ~10 minutes on 2 cores
    python .ci/mutants.py softmax      # the edits whose name contains a word
    python .ci/mutants.py --all shuffl # run the whole suite per edit: every test that catches it

Not part of CI (it runs the suite once per edit); run it after changing train.py or test.py.
An edit whose text no longer matches train.py is reported as stale, so the list stays honest.
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name: [(text in train.py, what a user's edit makes of it), ...]
EDITS = {
    "softmax inside the model before cross_entropy": [
        ("        return self.net(x)\n", "        return self.net(x).softmax(dim=-1)\n")],
    "scheduler stepped once an epoch, not once a step": [
        ("        if scheduler is not None:\n            scheduler.step()", "        pass"),
        ("            if trained is None:\n", "            run.scheduler.step()\n            if trained is None:\n")],
    "training loss accumulated without detach()": [
        ("loss_sum += loss.detach().float() * len(yb)", "loss_sum = loss_sum + loss.float() * len(yb)")],
    "shuffling turned off": [
        ("epoch_batches(run.train_split, run.cfg, run.device, epoch,", "epoch_batches(run.train_split, run.cfg, run.device, None,")],
    "the same shuffle every epoch": [
        ("seed = None if epoch is None else cfg.seed + epoch", "seed = None if epoch is None else cfg.seed")],
    "no model.train()": [
        ("    model.train()\n", "")],
    "no model.eval() in evaluate": [
        ("    model.eval()\n    device = next(model.parameters()).device\n    sums", "    device = next(model.parameters()).device\n    sums")],
    "no inference_mode in evaluate": [
        ("@torch.inference_mode()\ndef evaluate(", "def evaluate(")],
    "gradients not zeroed": [
        ("            optimizer.zero_grad(set_to_none=True)\n", "            pass\n")],
    "training loss averaged per batch": [
        ("loss_sum += loss.detach().float() * len(yb)", "loss_sum += loss.detach().float()"),
        ("        rows += len(yb)\n        if not step_now:", "        rows += 1\n        if not step_now:")],
    "validation loss averaged per batch": [
        ("        sums += batch_sums(out, yb, task)\n        rows += len(yb)",
         "        sums += batch_sums(out, yb, task) / len(yb)\n        rows += 1")],
    "normalization statistics from all rows": [
        ('train_x = x[splits["train"]]', "train_x = x")],
    "best checkpoint = last epoch": [
        ('if val["loss"] < progress["best_loss"]:', "if True:")],
    "best checkpoint chosen by training loss": [
        ('if val["loss"] < progress["best_loss"]:', 'if trained["loss"] < progress["best_loss"]:'),
        ('progress.update(best_loss=val["loss"],', 'progress.update(best_loss=trained["loss"],')],
    "test rows used for selection": [
        ("epoch_batches(run.val_split, cfg,", 'epoch_batches(run.data["test"], cfg,')],
    "clipping before backward()": [
        ("            scaler.scale(loss / accum_steps).backward()",
         "            if grad_clip > 0:\n                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n"
         "            scaler.scale(loss / accum_steps).backward()"),
        ("            norms[steps] = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n        scaler.step",
         "        scaler.step")],
    "validation rows shuffled into training": [
        ('train_split, val_split = data["train"], data["val"]',
         'train_split, val_split = tuple(torch.cat(p) for p in zip(data["train"], data["val"])), data["val"]')],
    "validation rows left in the training split": [
        ('parts["train"].append(rows[n_test + n_val:])', 'parts["train"].append(rows[n_test:])')],
    "float16 scaler skipped: plain backward()": [
        ("scaler.scale(loss / accum_steps).backward()", "(loss / accum_steps).backward()")],
    "float16 scaler skipped: plain optimizer.step()": [
        ("        scaler.step(optimizer)\n", "        optimizer.step()\n")],
    "float16 scaler skipped: never enabled": [
        ("enabled=amp_dtype == torch.float16)", "enabled=False)")],
    "float16 scaler skipped: clipping the scaled gradients": [
        ("            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones\n", "")],
    "accumulated loss not divided by the micro-batch count": [
        ("scaler.scale(loss / accum_steps).backward()", "scaler.scale(loss).backward()")],
    "checkpoint without normalization statistics": [
        ('"mean": data["mean"], "std": data["std"],', "")],
    "a stop drops the unfinished epoch instead of saving its step": [
        ("    if stopping or (every and steps % every == 0):", "    if every and steps % every == 0:")],
    "a mid-epoch resume replays the epoch from its first batch": [
        ('start = tally["rows"] if tally else 0', "start = 0")],
    "a mid-epoch resume forgets the epoch's partial loss": [
        ('run.tally = {"loss_sum": position["loss_sum"][run.rank],', 'run.tally = {"loss_sum": torch.zeros(()),')],
    "random streams not restored on resume": [
        ("            restore_rng_states(checkpoint[\"rng\"][run.rank])\n", "            pass\n")],
    "gradient norm recorded after clipping": [
        ("            norms[steps] = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n",
         "            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n"
         "            norms[steps] = nn.utils.get_total_norm([p.grad for p in model.parameters()])\n")],
    "the verdict ignores a best epoch at the end": [
        ("    if last - b < stretch:", "    if False:")],
    "not learning judged against zero loss, not the base rates": [
        ('    if val[b] >= limits["chance"] * base_loss:', '    if val[b] >= limits["chance"] * 0 + 1e9:')],
    "hub offline mode not set": [
        ('        os.environ["HF_HUB_OFFLINE"] = "1"\n', "        pass\n")],
}


def run_suite(folder: Path, every_test: bool) -> tuple[bool, str, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "test.py",
                             *([] if every_test else ["-x"])], cwd=folder, capture_output=True, text=True, timeout=900)
    failed = [line.split()[1].split("::")[-1] for line in result.stdout.splitlines() if line.startswith("FAILED")]
    detail = ", ".join(failed) if failed else result.stdout.strip().splitlines()[-1]
    return result.returncode != 0, detail, time.perf_counter() - started


def main() -> None:
    every_test = "--all" in sys.argv
    words = [w for w in sys.argv[1:] if w != "--all"]
    source = (REPO / "train.py").read_text()
    chosen = {name: edits for name, edits in EDITS.items() if not words or any(w in name for w in words)}
    caught, missed, stale = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("test.py", "README.md", "bench.py", "datasets/Iris.csv"):
            if (REPO / name).is_file():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / name, folder / name)
        for name, edits in chosen.items():
            mutated = source
            if any(mutated.count(old) != 1 for old, _ in edits):
                stale.append(name)
                print(f"STALE   {name}: its text is not in train.py exactly once", flush=True)
                continue
            for old, new in edits:
                mutated = mutated.replace(old, new)
            (folder / "train.py").write_text(mutated)
            shutil.rmtree(folder / "__pycache__", ignore_errors=True)
            failed, detail, seconds = run_suite(folder, every_test)
            (caught if failed else missed).append(name)
            print(f"{'caught' if failed else 'MISSED'}  {name}  ({seconds:.0f} s; {detail})", flush=True)
    print(f"\n{len(caught)} of {len(caught) + len(missed)} broken edits caught"
          + (f"; missed: {', '.join(missed)}" if missed else "") + (f"; {len(stale)} stale" if stale else ""))
    raise SystemExit(1 if missed or stale else 0)


if __name__ == "__main__":
    main()
