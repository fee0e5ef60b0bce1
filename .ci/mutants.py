"""Do the suites catch the broken edits users make? Applies each edit below to a copy of train.py,
runs the suite that must catch it (stopping at the first failure), and counts the edits caught.
The loop's discipline must be caught by test.py alone, which a user copies; the rest by tests/.

    python .ci/mutants.py              # every edit, ~15 minutes on 2 cores
    python .ci/mutants.py softmax      # the edits whose name holds a word
    python .ci/mutants.py --all shuffl # the whole suite per edit: every test that catches it

Not part of CI (it runs a suite per edit): run it after changing train.py, test.py or tests/. An
edit whose text is no longer in train.py exactly once is reported as stale, so the list stays honest.
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOP, DEEP, SEAMS, EDGES = ["test.py"], ["tests"], ["tests/test_seams.py"], ["tests/test_edges.py"]

# name: (the suite that must catch it, [(text in train.py, what the broken edit makes of it), ...])
EDITS = {
    "softmax inside the model before the loss": (LOOP, [
        ("        return self.net(x)\n", "        return self.net(x).softmax(dim=-1)\n")]),
    "scheduler stepped once an epoch, not once a step": (LOOP, [
        ("        if scheduler is not None:\n            scheduler.step()\n", ""),
        ("    elif run.when == \"epoch\" and run.scheduler is not None:", "    elif run.scheduler is not None:")]),
    "training loss summed without detach()": (LOOP, [
        ("loss_sum += loss.detach().float() * n", "loss_sum = loss_sum + loss.float() * n")]),
    "shuffling turned off": (LOOP, [
        ("    cfg, seed = run.cfg, None if epoch is None else run.cfg.seed + epoch\n", "    cfg, seed = run.cfg, None\n")]),
    "the same shuffle every epoch": (LOOP, [
        ("    cfg, seed = run.cfg, None if epoch is None else run.cfg.seed + epoch\n",
         "    cfg, seed = run.cfg, None if epoch is None else run.cfg.seed\n")]),
    "no model.train()": (LOOP, [("    model.train()\n", "")]),
    "no model.eval() in evaluate": (LOOP, [
        ("    model.eval()\n    device = next(model.parameters()).device\n    outputs, targets",
         "    device = next(model.parameters()).device\n    outputs, targets")]),
    "no inference_mode in evaluate": (LOOP, [("@torch.inference_mode()\ndef evaluate(", "def evaluate(")]),
    "gradients not zeroed": (LOOP, [("            optimizer.zero_grad(set_to_none=True)\n", "            pass\n")]),
    "training loss averaged per batch": (LOOP, [
        ("loss_sum += loss.detach().float() * n", "loss_sum += loss.detach().float()"),
        ("        rows += n\n        if not step_now:", "        rows += 1\n        if not step_now:")]),
    "validation loss averaged per batch": (LOOP, [
        ('    return {"loss": rows.mean().item(), **metrics}, rows, y',
         '    per_batch = [objective.row_losses(o, t).mean() for o, t in zip(outputs, targets)]\n'
         '    return {"loss": torch.stack(per_batch).mean().item(), **metrics}, rows, y')]),
    "normalization statistics from all rows": (LOOP, [
        ("    mean, std = x[train].mean(axis=0), x[train].std(axis=0)", "    mean, std = x.mean(axis=0), x.std(axis=0)")]),
    "best checkpoint = last epoch": (LOOP, [
        ("            if better and not math.isnan(value):", "            if True:")]),
    "best checkpoint chosen by training loss": (LOOP, [
        ('    value, best = entry[cfg.best_metric], progress["best"]', '    value, best = entry["train_loss"], progress["best"]')]),
    "test rows used for selection": (LOOP, [
        ('val, last_rows, _ = evaluate(run.eval_model, split_batches(run, "val")',
         'val, last_rows, _ = evaluate(run.eval_model, split_batches(run, "test")')]),
    "clipping before backward()": (LOOP, [
        ("            scaler.scale(loss / accum_steps).backward()",
         "            if grad_clip > 0:\n                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n"
         "            scaler.scale(loss / accum_steps).backward()"),
        ("            norms[steps] = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n        scaler.step",
         "        scaler.step")]),
    "validation rows left in the training split": (LOOP, [
        ('parts["train"].append(rows[n_test + n_val:])', 'parts["train"].append(rows[n_test:])')]),
    "float16 scaler skipped: plain backward()": (LOOP, [
        ("scaler.scale(loss / accum_steps).backward()", "(loss / accum_steps).backward()")]),
    "float16 scaler skipped: plain optimizer.step()": (LOOP, [("        scaler.step(optimizer)\n", "        optimizer.step()\n")]),
    "float16 scaler skipped: clipping the scaled gradients": (LOOP, [
        ("            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones\n", "")]),
    "accumulated loss not divided by the micro-batch count": (LOOP, [
        ("scaler.scale(loss / accum_steps).backward()", "scaler.scale(loss).backward()")]),
    "gradient norm recorded after clipping": (LOOP, [
        ("            norms[steps] = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n",
         "            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n"
         "            norms[steps] = nn.utils.get_total_norm([p.grad for p in model.parameters()])\n")]),
    "a stop drops the unfinished epoch instead of saving its step": (LOOP, [
        ('        if stopping or (every and tally["steps"] % every == 0):',
         '        if every and tally["steps"] % every == 0:')]),
    "a mid-epoch resume replays the epoch from its first batch": (LOOP, [
        ('split_batches(run, "train", epoch, tally["rows"] if tally else 0)', 'split_batches(run, "train", epoch, 0)')]),
    "a mid-epoch resume forgets the epoch's partial loss": (LOOP, [
        ('run.tally = {**position, "loss_sum": position["loss_sum"][run.rank]}',
         'run.tally = {**position, "loss_sum": torch.zeros(())}')]),
    "validation rows that are training rows": (LOOP, [
        ('    return {**{name: (x[part], y[part]) for name, part in splits.items()}, "meta": meta,',
         '    splits["val"] = splits["train"][: len(splits["val"])]\n'
         '    return {**{name: (x[part], y[part]) for name, part in splits.items()}, "meta": meta,')]),
    "val_loss read as higher is better": (LOOP, [('        return True, "a loss"', '        return False, "a loss"')]),
    "randomness left in the model's eval mode": (LOOP, [
        ("        return self.net(x)\n", "        return self.net(x + 0.1 * torch.randn_like(x) * (not self.training))\n")]),
    "a built-in metric returned as a tensor": (LOOP, [
        ('    return {"acc": (hits.sum() / cm.sum()).item(),', '    return {"acc": hits.sum() / cm.sum(),')]),
    "an end-of-epoch last.pt without the scheduler's state": (LOOP, [
        ('"scheduler": run.scheduler.state_dict() if run.scheduler else None, "position": position,',
         '"scheduler": run.scheduler.state_dict() if run.scheduler and position else None, "position": position,')]),
    "a built-in metric declared the wrong way": (SEAMS, [
        ('    higher = {"acc": True, "balanced_acc": True,', '    higher = {"acc": False, "balanced_acc": True,')]),
    "a tensor metric let through to the report": (SEAMS, [
        ("    if odd:  # a 0-d tensor would be left out of the log", "    if False:  # a 0-d tensor would be left out of the log")]),
    "any history key accepted as --best-metric": (SEAMS, [
        ("    if cfg.best_metric not in metrics:  # not train_loss", "    if cfg.best_metric not in entry:  # not train_loss")]),
    "the best metric's direction ignored": (DEEP, [
        ('        return cfg.mode == "min", f"--mode {cfg.mode}"', '        pass')]),
    "checkpoint without the data seam's meta": (DEEP, [
        ('"model_args": run.model_args, "meta": run.data["meta"],', '"model_args": run.model_args, "meta": {},')]),
    "random streams not restored on resume": (DEEP, [("        restore_rng_states(last[\"rng\"][run.rank])\n", "")]),
    "a resume applies a changed setting instead of refusing it": (DEEP, [
        ("    if changed:\n        fail(f\"--resume goes on", "    if False:\n        fail(f\"--resume goes on")]),
    "class weights that also weigh the label smoothing": (DEEP, [
        ("        return rows.mean() if weights is None else (rows * weights.to(rows.device)[y]).mean()",
         "        return rows.mean() if weights is None or binary else F.cross_entropy(\n"
         "            out, y, weight=weights.to(out.device), label_smoothing=cfg.label_smoothing)")]),
    "label cells read with the feature cells' blanks": (DEEP, [
        ('[not (v is None or v != v or str(v).strip() == "") for v in values]',
         '[not (v is None or v != v or str(v).strip().lower() in BLANKS) for v in values]')]),
    "the prepared cache ignores the settings it was built with": (DEEP, [
        ('all(getattr(cfg, k) == v for k, v in columns["read"].items())', "True")]),
    "hub offline mode not set": (DEEP, [
        ('        os.environ["HF_HUB_OFFLINE"] = "1"', "        pass")]),
    "the verdict ignores a run still improving at its end": (DEEP, [
        ('    if rows["reference"] is not None and not stopped_early', '    if False and not stopped_early')]),
    "not learning judged without the base rates": (DEEP, [
        ('    learnt = "gain" not in evidence or gain[0] > z * gain[1]', "    learnt = True")]),
    "a training batch's random draws not seeded by its place": (SEAMS, [
        ("    key = None if epoch is None else (cfg.seed, epoch, run.rank)", "    key = None")]),
    "a batch's seeded draws leave the model's stream reseeded": (SEAMS, [
        ("            torch.set_rng_state(model_stream)\n", "            pass\n")]),
    "where a batch was fetched shows in Python's and NumPy's streams": (SEAMS, [
        ("            seed_streams((*key, -1), torch_too=False)", "            pass")]),
    "a Dataset's collate_fn ignored": (SEAMS, [
        ('    return getattr(split, "collate_fn", None) or default_collate', "    return default_collate")]),
    "a Subset hides its dataset's collate_fn": (SEAMS, [
        ('    while isinstance(split, Subset) and not hasattr(split, "collate_fn"):\n        split = split.dataset\n', "")]),
    "a resume forgets which parameters start_epoch froze": (SEAMS, [
        ("            parameter.requires_grad_(trains)  # as start_epoch left them", "            pass")]),
    "start_epoch run again for an epoch resumed part-way": (SEAMS, [
        ("            if tally is None:  # an epoch resumed part-way", "            if True:  # an epoch resumed part-way")]),
    "DDP not made anew when what trains changes": (SEAMS, [
        ("        run.train_model = data_parallel(run.eval_model, run.device, run.world)\n", "        pass\n")]),
    "only parameter group 0's rate recorded": (SEAMS, [
        ('"lr": rates[0], **{f"lr_{i}": rate for i, rate in enumerate(rates[1:], 1)},', '"lr": rates[0],')]),
    "constant columns left out again": (SEAMS, [
        ("    return {\"kind\": \"numeric\", \"values\": torch.from_numpy(numbers)}",
         "    if np.nanmin(numbers) == np.nanmax(numbers):\n        return {\"kind\": \"left out\", \"why\": \"constant\"}\n"
         "    return {\"kind\": \"numeric\", \"values\": torch.from_numpy(numbers)}")]),
    "the bundled copy assumed present": (SEAMS, [
        ("    bundled = BUNDLED[source] if source in BUNDLED and BUNDLED[source].is_file() else None",
         "    bundled = BUNDLED.get(source)")]),
    "overfitting called on any rise, noise or not": (DEEP, [
        ('    rose = rise[0] > z * rise[1] and rise[0] > evidence["material"]', "    rose = rise[0] > 0")]),
    # issue 26's rows, each undone
    "a NaN first metric kept as the best": (EDGES, [
        ("            if better and not math.isnan(value):", "            if better:")]),
    "another loop's checkpoints overwritten": (EDGES, [
        ("        except Exception:  # unreadable, or no dict of ours: another program's file\n            ours = False",
         "        except Exception:  # unreadable, or no dict of ours: another program's file\n            ours = True"),
        ('            ours = saved["version"] == CHECKPOINT_VERSION\n', "            ours = True\n")]),
    "a swapped optimizer resumed": (EDGES, [("    if last[\"made_by\"] != made_by or groups[0] != groups[1]:", "    if False:")]),
    "a lone last row trained alone": (LOOP, [("    if len(parts) > 1 and len(parts[-1]) == 1:", "    if False:")]),
    "a plateau schedule's mode unchecked": (EDGES, [
        ('    if when == "metric" and mode in ("min", "max") and mode != wanted:', "    if False:")]),
    "the lock written through a link": (EDGES, [('getattr(os, "O_NOFOLLOW", 0)', "0")]),
    "a semicolon file read as one column": (EDGES, [('    return max(",;\\t", key=header.count)', '    return ","')]),
    "a training loss far above chance unread": (EDGES, [("    if above.size:", "    if False:")]),
    "the end of a schedule judged by its epochs": (EDGES, [
        ('gained[0] > evidence["material"] * min(1.0, pace)', 'gained[0] > evidence["material"]')]),
    "a memorizing fit read as not learning": (EDGES, [
        ("    if (rose or lost or doubled) and fell:", "    if (rose or lost) and fell and learnt:")]),
}


def run_suite(folder: Path, targets: list[str], every_test: bool) -> tuple[bool, str, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *targets,
                             *([] if every_test else ["-x"])], cwd=folder, capture_output=True, text=True, timeout=3600)
    failed = [line.split()[1].split("::")[-1] for line in result.stdout.splitlines() if line.startswith("FAILED")]
    detail = ", ".join(failed) if failed else result.stdout.strip().splitlines()[-1]
    return result.returncode != 0, detail, time.perf_counter() - started


def main() -> None:
    every_test = "--all" in sys.argv
    words = [w for w in sys.argv[1:] if w != "--all"]
    source = (REPO / "train.py").read_text()
    chosen = {name: edit for name, edit in EDITS.items() if not words or any(w in name for w in words)}
    caught, missed, stale = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("test.py", "bench.py", "README.md", "requirements.txt", "datasets/Iris.csv"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, folder / name)
        shutil.copytree(REPO / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        for name, (targets, edits) in chosen.items():
            if any(source.count(old) != 1 for old, _ in edits):
                stale.append(name)
                print(f"STALE   {name}: its text is not in train.py exactly once", flush=True)
                continue
            mutated = source
            for old, new in edits:
                mutated = mutated.replace(old, new)
            (folder / "train.py").write_text(mutated)
            for cache in folder.rglob("__pycache__"):
                shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(folder / "datasets" / "prepared", ignore_errors=True)
            failed, detail, seconds = run_suite(folder, targets, every_test)
            (caught if failed else missed).append(name)
            print(f"{'caught' if failed else 'MISSED'}  {name}  [{' '.join(targets)}, {seconds:.0f} s; {detail}]",
                  flush=True)
    print(f"\n{len(caught)} of {len(caught) + len(missed)} broken edits caught"
          + (f"; missed: {', '.join(missed)}" if missed else "") + (f"; {len(stale)} stale" if stale else ""))
    raise SystemExit(1 if missed or stale else 0)


if __name__ == "__main__":
    main()
