"""What every training command shares: accelerate, seeding, a loss/time log, resumable state.

Resuming: the full training state (model, optimizer, LR scheduler, RNG states) is saved with
``Accelerator.save_state`` into ``OUT/state/`` every ``--save-every`` steps, written to a temporary
folder and renamed, so a kill at any moment leaves the last complete state. Running the same
command again continues from it (``--no-resume`` starts over).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fetalstudio.cli_args import at_least_one, output_folder

STATE_DIR = "state"
LOG_NAME = "train_log.csv"


def add_common_arguments(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float) -> None:
    group = parser.add_argument_group("training loop (shared by every train command)")
    group.add_argument("--out", type=output_folder, required=True, help="output folder: checkpoint, model card, log, resumable state")
    group.add_argument("--steps", type=int, default=steps, help="optimizer steps in total")
    group.add_argument("--batch-size", type=at_least_one, default=batch_size, help="images per step (per device)")
    group.add_argument("--lr", type=float, default=lr, help="learning rate")
    group.add_argument("--seed", type=int, default=1234, help="seed for every random number generator")
    group.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast on GPUs")
    group.add_argument("--save-every", type=int, default=200, help="save resumable state every N steps")
    group.add_argument("--log-every", type=int, default=10, help="log loss and time every N steps")
    group.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    group.add_argument("--no-resume", action="store_true", help="start over even if OUT/state exists")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    return accelerator


@dataclass
class TrainingLog:
    """Appends one CSV row per logged step and prints it; the file survives restarts."""

    path: Path
    started: float = 0.0
    running: list[float] = field(default_factory=list)  # losses since the last logged row

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(["step", "loss", "lr", "elapsed_s", "extra"])

    def log(self, step: int, loss: float, lr: float, **extra) -> None:
        elapsed = time.perf_counter() - self.started
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([step, f"{loss:.6f}", f"{lr:.3g}", f"{elapsed:.1f}", json.dumps(extra) if extra else ""])
        details = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        print(f"step {step} loss {loss:.5f} lr {lr:.3g} {elapsed:.0f}s {details}".rstrip(), flush=True)

    def add(self, step: int, loss: float, lr: float, due: bool, **extra) -> None:
        """Collect one step's loss; when ``due``, log the mean since the last row (``extra`` as given now)."""
        self.running.append(loss)
        if due:
            self.log(step, sum(self.running) / len(self.running), lr, **extra)
            self.running = []


class ResumableState:
    """Saves/loads the accelerate state in OUT/state with an atomic rename; remembers the step."""

    def __init__(self, accelerator, out_dir: Path) -> None:
        self.accelerator = accelerator
        self.folder = out_dir / STATE_DIR

    def load(self) -> int:
        """The step to continue from (0 when there is no saved state)."""
        progress = self.folder / "progress.json"
        if not progress.exists():
            return 0
        self.accelerator.load_state(str(self.folder))
        return int(json.loads(progress.read_text())["step"])

    def save(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        temporary = self.folder.with_name(STATE_DIR + ".tmp")
        if temporary.exists():
            shutil.rmtree(temporary)
        self.accelerator.save_state(str(temporary), safe_serialization=True)
        (temporary / "progress.json").write_text(json.dumps({"step": step}))
        previous = self.folder.with_name(STATE_DIR + ".old")
        if self.folder.exists():
            os.replace(self.folder, previous)
        os.replace(temporary, self.folder)
        if previous.exists():
            shutil.rmtree(previous)


def open_run(accelerator, out: Path, settings: dict) -> tuple[ResumableState, int]:
    """The run's resumable state and the step to continue from (0 for a new run, said when resuming);
    ``settings`` are recorded in ``out/run.json`` for the next resume's check."""
    state = ResumableState(accelerator, out)
    start = state.load()
    if start:
        print(f"resuming from step {start} (saved state in {out / STATE_DIR})", flush=True)
    write_json(out / "run.json", settings)
    return state, start


def check_resume_settings(out: Path, settings: dict, fixed: tuple[str, ...]) -> list[str]:
    """Refuse to resume a run in ``out`` whose ``fixed`` settings differ from ``settings``.

    Returns the other settings that changed (allowed, e.g. more steps), for a note to the user.
    """
    run_file = out / "run.json"
    if not (out / STATE_DIR).exists() or not run_file.is_file():
        return []
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    changed = [key for key in fixed if saved.get(key) != settings.get(key)]
    if changed:
        from fetalstudio.errors import FetalStudioError

        raise FetalStudioError(
            f"{out} holds a run with other settings: "
            f"{', '.join(f'{k}={saved.get(k)}' for k in changed)}. Resume with the same settings, "
            "add --no-resume to start over, or pick another --out."
        )
    return [key for key in settings if key not in fixed and saved.get(key) != settings.get(key)]


class StepBatchesBase:
    """A map-style dataset whose item ``i`` is the whole batch of step ``start + i``, up to step ``end``.

    Subclasses build a step's batch in ``batch(step)`` from generators seeded by (seed, step, ...), so
    the batches do not depend on where a run was interrupted and resumed.
    """

    def __init__(self, seed: int, start: int, end: int, batch_size: int) -> None:
        self.seed, self.start, self.end, self.batch_size = seed, start, end, batch_size

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, index: int):
        return self.batch(self.start + index)

    def batch(self, step: int):
        raise NotImplementedError


def optimizer_step(accelerator, loss, optimizer, scheduler) -> float:
    """Backward pass, optimizer and LR-scheduler step, gradients cleared; returns the loss as a float."""
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def infinite(loader):
    """Cycle a data loader forever (epochs are implicit; steps count the work)."""
    while True:
        yield from loader


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    temporary.replace(path)


def finish_run(out: Path, summary: dict, summary_name: str, card_name: str, card: str, step: int, total: int,
               selected: dict) -> None:
    """Write the run's summary JSON and model card, say how to continue an unfinished run, and print the
    one-line JSON result (checkpoint, step, steps, wall time and the ``selected`` entries) for scripts."""
    write_json(out / summary_name, summary)
    (out / card_name).write_text(card, encoding="utf-8")
    if step < total:
        print(f"stopped at step {step} of {total}; run the same command again to continue.", flush=True)
    print(json.dumps({"checkpoint": summary["checkpoint"], "step": step, "steps": total, "wall_time_s": summary["wall_time_s"],
                      **selected}), flush=True)


def device_description(accelerator) -> str:
    device = accelerator.device
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def previous_seconds_of(out: Path, start: int) -> float:
    """Training seconds an interrupted run had spent before ``start`` (from ``out/time.json``; 0 for a
    new run or when the record belongs to another step), so a resumed run reports the whole time."""
    if not start:
        return 0.0
    try:
        data = json.loads((out / "time.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0.0
    return float(data.get("seconds", 0.0)) if int(data.get("step", -1)) == start else 0.0


def remove_run_files(out: Path, names: tuple[str, ...]) -> None:
    """``--no-resume``: delete an earlier run's state, logs and records (files or folders) in ``out``."""
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
