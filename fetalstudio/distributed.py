"""Several processes on one or more machines: each process's share of a run, and the part tables it
writes that the main process merges into the run's one table.

``accelerate launch --multi_gpu --num_processes N -m fetalstudio generate|analyze ...`` (or
``torchrun``) starts N copies of a command; they find each other through the environment the launcher
sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``; MPI's ``OMPI_COMM_WORLD_*``/``PMI_*`` too).
:func:`joined_processes` joins them (accelerate's ``PartialState`` over gloo, the CPU backend that
works beside any accelerator: only small Python objects and barriers go between the processes) and
gives the :class:`ProcessShare` and the device for this process's models. Started plainly, a command
is the one process of its run: ``ProcessShare()`` = (0, 1), nothing is imported or joined.

A run (dataset export, batch analysis) is then, in every process:

1. :meth:`ProcessShare.agree`: the main process alone prepares the output folder (holds its lock,
   checks or writes the settings, merges the part tables an interrupted run left into the table)
   and says what is left to do; an error there stops every process with the same message.
2. :meth:`ProcessShare.take`: every process takes its share of what is left (``items[index::count]``:
   disjoint, together complete, the same for the same inputs) and appends its rows to its own part
   table (:meth:`ProcessShare.part_path`, e.g. ``metadata.part-1-of-2.csv``), row by row, fsynced.
3. :meth:`ProcessShare.wait`, then the main process merges the parts into the table
   (:func:`merge_parts`: in plan order, one row per key) and writes the summaries.

A process that fails ends the launch (the launcher stops the others); the rows written stay in the
part tables, and the next run of the same command, with any number of processes, counts them done.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TypeVar

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import atomic_write_bytes

T = TypeVar("T")

#: Set by torchrun / accelerate launch (the first) or by MPI launchers: how many processes, and on this machine.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
#: How long a process waits for the others at a barrier: a share of a large set takes hours, and the
#: launcher ends every process at once when one of them fails, so a long wait never hangs a run.
WAIT_LIMIT = timedelta(days=7)


class Channel(Protocol):
    """How the processes of a run talk: the main process's value to every process, and a barrier."""

    def broadcast(self, value: object) -> object: ...

    def barrier(self) -> None: ...


class TorchChannel:
    """torch.distributed's process group (set up by accelerate's PartialState)."""

    def broadcast(self, value: object) -> object:
        import torch.distributed

        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        import torch.distributed

        torch.distributed.barrier()


@dataclass(frozen=True)
class ProcessShare:
    """Process ``index`` of ``count`` (``local_index`` of ``local_count`` on this machine)."""

    index: int = 0
    count: int = 1
    local_index: int = 0
    local_count: int = 1
    channel: Channel | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count or not 0 <= self.local_index < self.local_count:
            raise ValueError(f"process {self.index} of {self.count} (local {self.local_index} of {self.local_count}) does not exist")
        if self.count > 1 and self.channel is None:
            raise ValueError("several processes need a channel to talk through")

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def is_distributed(self) -> bool:
        return self.count > 1

    @property
    def prefix(self) -> str:
        """What this process's progress lines start with: "" alone, ``[process 2/4] `` with others."""
        return f"[process {self.index + 1}/{self.count}] " if self.is_distributed else ""

    def take(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``count``-th from ``index``."""
        return list(items[self.index::self.count])

    def part_path(self, table: Path) -> Path:
        """The part of ``table`` this process writes: ``report.csv`` -> ``report.part-2-of-4.csv``."""
        return table.with_name(f"{table.stem}.part-{self.index}-of-{self.count}{table.suffix}")

    def wait(self) -> None:
        """Wait until every process is here."""
        if self.is_distributed:
            self.channel.barrier()

    def agree(self, prepare: Callable[[], T]) -> T:
        """``prepare()`` on the main process; every process returns its result. When it raises, the main
        process raises that error and the others a FetalStudioError with its message, so that all stop."""
        if not self.is_distributed:
            return prepare()
        if not self.is_main:
            failure, value = self.channel.broadcast(None)
            if failure:
                raise FetalStudioError(value)
            return value
        try:
            value = prepare()
        except Exception as error:
            message = str(error) if isinstance(error, FetalStudioError) else f"{type(error).__name__}: {error}"
            self.channel.broadcast((True, message))
            raise
        self.channel.broadcast((False, value))
        return value


def _int_from_environment(names: Iterable[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def current_share() -> ProcessShare:
    """This process's share: from the launcher's environment when several processes were started, else (0, 1)."""
    count = _int_from_environment(WORLD_SIZE_VARIABLES, 1)
    if count <= 1:
        return ProcessShare()
    from accelerate import PartialState

    state = PartialState(cpu=True, timeout=WAIT_LIMIT)  # gloo: barriers and small objects, whatever the models run on
    local_count = _int_from_environment(LOCAL_SIZE_VARIABLES, state.num_processes)
    local_index = max(state.local_process_index, 0)
    return ProcessShare(state.process_index, state.num_processes, local_index, max(local_count, local_index + 1), TorchChannel())


def process_device(share: ProcessShare, requested: str | None = None) -> str | None:
    """The device for this process's models, as a ``--device`` value; None lets ``pick_device`` choose.

    One device named (``requested``, e.g. ``--device``, else $FETALSTUDIO_DEVICE: cpu, mps, cuda:N) is
    used by every process. Otherwise, with several processes and CUDA GPUs, each process takes the GPU
    of its local index (``cuda:local_index mod GPUs``): N processes on a machine with N GPUs, one each.
    """
    wanted = (requested or os.environ.get("FETALSTUDIO_DEVICE") or "").strip().lower()
    if not share.is_distributed or wanted not in ("", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    return f"cuda:{share.local_index % torch.cuda.device_count()}"


def cpu_threads(share: ProcessShare) -> int:
    """Torch threads for this process: the launcher's ``OMP_NUM_THREADS`` when above 1 (accelerate launch's
    ``--num_cpu_threads_per_process``; torchrun sets 1 by default), else this machine's cores shared out."""
    asked = _int_from_environment(("OMP_NUM_THREADS",), 0)
    if asked > 1:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // share.local_count)


@contextmanager
def joined_processes(requested_device: str | None = None) -> Iterator[tuple[ProcessShare, str | None]]:
    """This process's share and its models' device (see :func:`process_device`); with several processes,
    torch's threads limited to :func:`cpu_threads`, and the process group closed at the end."""
    share = current_share()
    if not share.is_distributed:
        yield share, requested_device
        return
    import torch

    torch.set_num_threads(cpu_threads(share))
    try:
        yield share, process_device(share, requested_device)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --- part tables ----------------------------------------------------------------------------------

def part_tables(table: Path) -> list[Path]:
    """The part tables of ``table`` left in its folder, by any number of processes."""
    return sorted(table.parent.glob(f"{table.stem}.part-*-of-*{table.suffix}"))


def complete_rows(path: Path, columns: Sequence[str]) -> list[dict]:
    """The rows of a CSV table appended row by row: none when its header is not ``columns``; a last row
    cut short by a crash (no newline yet) and a row with too few or too many cells are left out."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        text = handle.read()
    text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or list(reader.fieldnames) != list(columns):
        return []
    return [row for row in reader if None not in row and None not in row.values()]


def table_text(columns: Sequence[str], rows: Iterable[dict], lineterminator: str = "\n") -> str:
    """``rows`` as CSV text under a header of ``columns``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(columns), lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def merge_parts(table: Path, columns: Sequence[str], key: str, order: Sequence[str],
                keep: Callable[[dict], bool] = lambda row: True, lineterminator: str = "\n") -> list[dict]:
    """Merge ``table`` and its part tables into ``table`` and remove the parts; returns the rows.

    Rows are the complete ones that ``keep`` accepts, one per ``key`` value (the table's row first, then
    the parts' in file order), sorted by the position of their key in ``order`` (keys not in ``order``
    after those, as found). ``table`` is written (atomically, with its header even when there is no
    row) before any part is removed, so a crash in between leaves rows twice, never none; the next
    merge drops the copies.
    """
    parts = part_tables(table)
    rows: dict[str, dict] = {}
    for path in [table, *parts]:
        for row in complete_rows(path, columns):
            if keep(row):
                rows.setdefault(row[key], row)
    position = {name: number for number, name in enumerate(order)}
    merged = sorted(rows.values(), key=lambda row: position.get(row[key], len(position)))
    atomic_write_bytes(table, table_text(columns, merged, lineterminator).encode("utf-8"))
    for path in parts:
        path.unlink()
    return merged
