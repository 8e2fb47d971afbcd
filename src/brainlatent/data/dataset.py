"""Read access to a processed folder (written by ``prepare``) and the torch dataset on top of it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from brainlatent.data.layout import SPLITS, SUBJECT_COLUMNS
from brainlatent.grid import Grid

log = logging.getLogger(__name__)

REQUIRED_FILES: tuple[str, ...] = ("volumes.npy", "subjects.csv", "grid.json")


@dataclass(frozen=True)
class ProcessedData:
    """A processed folder: memory-mapped volumes, the subjects table, the reference grid."""

    root: Path
    volumes: np.ndarray  # (N, X, Y, Z) float16 memmap, values in [0, 1]
    subjects: pd.DataFrame  # contract columns (SUBJECT_COLUMNS) + given covariates, row i describes volumes[i]
    grid: Grid

    @classmethod
    def open(cls, processed_dir: str | Path) -> "ProcessedData":
        """Open ``processed_dir``; ValueError naming what is missing or inconsistent."""
        root = Path(processed_dir)
        if not root.is_dir():
            raise ValueError(f"processed data folder not found: {root} (run `brainlatent prepare`)")
        missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        if missing:
            raise ValueError(f"{root}: incomplete processed folder, missing {missing} (re-run `brainlatent prepare`)")
        volumes = np.load(root / "volumes.npy", mmap_mode="r")
        subjects = pd.read_csv(root / "subjects.csv", dtype={"subject_id": str})
        grid = Grid.load(root / "grid.json")
        absent = [c for c in SUBJECT_COLUMNS if c not in subjects.columns]
        if absent:
            raise ValueError(
                f"{root / 'subjects.csv'}: missing column(s) {absent}: written by an older `prepare` (the native "
                "mask volume is now brain_mask_volume_mm3, with etiv_mm3 beside it); re-run `brainlatent prepare` "
                "(or `dvc repro prepare`)"
            )
        if volumes.ndim != 4 or volumes.shape[0] != len(subjects) or tuple(volumes.shape[1:]) != grid.shape:
            raise ValueError(
                f"{root}: volumes.npy has shape {volumes.shape}, expected ({len(subjects)}, *{grid.shape}) "
                "from subjects.csv and grid.json"
            )
        if not np.array_equal(subjects["index"].to_numpy(), np.arange(len(subjects))):
            raise ValueError(f"{root / 'subjects.csv'}: column 'index' must be 0..N-1 in order")
        return cls(root, volumes, subjects, grid)

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def ground_truth_dir(self) -> Path | None:
        """``<processed>/ground_truth`` for a synthetic cohort or a positive control, else None."""
        path = self.root / "ground_truth"
        return path if path.is_dir() else None

    def split_indices(self, split: str) -> np.ndarray:
        """Row indices (into ``volumes`` and ``subjects``) of ``split`` (train, val or test), ascending."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return np.flatnonzero(self.subjects["split"].to_numpy() == split)

    def load_split(self, split: str) -> torch.Tensor:
        """The whole split as one (n, 1, X, Y, Z) float32 tensor: tiny data trains fastest from memory."""
        idx = self.split_indices(split)
        return torch.from_numpy(np.asarray(self.volumes[idx], dtype=np.float32)).unsqueeze(1)


class VolumeDataset(Dataset):
    """Items ``(volume (1, X, Y, Z) float32, row index)`` of one split, read lazily from the memmap."""

    def __init__(self, data: ProcessedData, split: str) -> None:
        self.data = data
        self.indices = data.split_indices(split)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[i])
        volume = torch.from_numpy(np.asarray(self.data.volumes[row], dtype=np.float32))
        return volume.unsqueeze(0), row


# -- streaming (issue 17) ------------------------------------------------------------------------------------
# How training holds a split: "auto" (stream when the float32 split would not fit comfortably in memory),
# "always" or "never". The environment variable overrides the default (TrainConfig has no field for it yet).
STREAM_ENV = "BRAINLATENT_STREAM"
STREAM_MODES = ("auto", "always", "never")
# "Comfortably": the float32 split takes at most this share of the memory available now (the model, its
# activations, the validation split and the other processes need the rest).
STREAM_MEMORY_SHARE = 0.25
# DataLoader workers reading the memmap (one per core is enough to hide the reads: see docs/research_scale.md).
STREAM_WORKERS_ENV = "BRAINLATENT_STREAM_WORKERS"


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil when installed, else /proc via sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of MLflow's system metrics
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def stream_mode(mode: str | None = None) -> str:
    """``mode``, else $BRAINLATENT_STREAM, else auto; ValueError for anything else."""
    mode = mode or os.environ.get(STREAM_ENV) or "auto"
    if mode not in STREAM_MODES:
        raise ValueError(f"stream mode {mode!r} ({STREAM_ENV}): expected one of {list(STREAM_MODES)}")
    return mode


def should_stream(n_volumes: int, shape: tuple[int, ...], mode: str | None = None,
                  available: int | None = None) -> bool:
    """Whether a split of ``n_volumes`` of ``shape`` is streamed: always / never, or (auto) when its float32
    size exceeds STREAM_MEMORY_SHARE of ``available`` (default: :func:`available_memory`)."""
    mode = stream_mode(mode)
    if mode != "auto":
        return mode == "always"
    nbytes = n_volumes * int(np.prod(shape)) * 4
    return nbytes > STREAM_MEMORY_SHARE * (available_memory() if available is None else available)


def stream_workers() -> int:
    """DataLoader workers for a streamed split: $BRAINLATENT_STREAM_WORKERS, else one per core (shared by the
    processes torchrun starts on this node), at least 1, at most 4."""
    env = os.environ.get(STREAM_WORKERS_ENV)
    if env is not None:
        return max(0, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


class StreamedSplit:
    """One split read from volumes.npy on demand: the operations the loop and the tasks use on a split tensor.

    ``len``, ``shape`` / ``ndim`` / ``dtype``, ``x[i:j]`` and ``x[index_tensor]`` (float32 (b, 1, X, Y, Z),
    read from the float16 file), ``x.float()`` (itself) and ``x.mean(0, keepdim)`` (accumulated in float64
    over batches). Training draws its batches through :meth:`epoch_loader`: a DataLoader whose workers read
    the loop's own index batches (same order, same drop rule), pinned on CUDA. Only the rows being read are
    in the process's memory; what was read stays in the kernel's page cache, which it drops at will.
    """

    dtype = torch.float32
    ndim = 5
    read_batch = 16  # volumes per read in mean()

    def __init__(self, volumes_path: str | Path, rows: np.ndarray, volume_shape: tuple[int, ...]) -> None:
        self.path = Path(volumes_path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = torch.Size((len(self.rows), 1, *volume_shape))
        self._layout: tuple[int, int, np.dtype] | None = None  # (pid, offset, dtype) of the open file
        self._fd: int | None = None
        self._buf: np.ndarray | None = None  # reused float16 read buffer
        self._loader = None

    @classmethod
    def of(cls, data: "ProcessedData", split: str) -> "StreamedSplit":
        return cls(data.root / "volumes.npy", data.split_indices(split), data.grid.shape)

    # -- pickling (DataLoader workers under spawn): reopen the file, never copy the volumes ---------------
    def __getstate__(self) -> dict:
        return {"path": self.path, "rows": self.rows, "shape": self.shape}

    def __setstate__(self, state: dict) -> None:
        self.path, self.rows, self.shape = state["path"], state["rows"], state["shape"]
        self._layout, self._fd, self._buf, self._loader = None, None, None, None

    def _open(self) -> tuple[int, int, np.dtype]:
        """(file descriptor, byte offset of row 0, dtype) of volumes.npy, opened once per process (a forked
        worker reopens it: a shared descriptor is safe with pread, but not across exec)."""
        if self._layout is None or self._layout[0] != os.getpid():
            mm = np.load(self.path, mmap_mode="r")  # reads the header only
            if not mm.flags.c_contiguous or tuple(mm.shape[1:]) != tuple(self.shape[2:]):
                raise ValueError(f"{self.path}: expected C-ordered volumes of shape (N, *{tuple(self.shape[2:])})")
            self._fd = os.open(self.path, os.O_RDONLY)
            self._layout = (os.getpid(), int(mm.offset), mm.dtype)
        return self._fd, self._layout[1], self._layout[2]

    def __len__(self) -> int:
        return len(self.rows)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    max_run = 16  # rows per pread: bounds the reused float16 buffer

    def read(self, positions) -> torch.Tensor:
        """Volumes at ``positions`` (into this split) as float32 (b, 1, X, Y, Z), in the order given. The file
        is read in ascending row order, one pread per run of consecutive rows (sequential on disk), into a
        reused float16 buffer converted straight into place. pread, not the memmap: the pages read stay in the
        kernel's page cache instead of this process's RSS."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        rows = self.rows[pos]
        order = np.argsort(rows, kind="stable")
        rows_sorted = rows[order]
        out = torch.empty((len(rows), 1, *self.shape[2:]), dtype=torch.float32)
        fd, offset, dtype = self._open()
        row_bytes = int(np.prod(self.shape[2:])) * dtype.itemsize
        k = 0
        while k < len(rows_sorted):
            run = 1
            while (k + run < len(rows_sorted) and run < self.max_run
                   and rows_sorted[k + run] == rows_sorted[k] + run):
                run += 1
            if self._buf is None or len(self._buf) < run or self._buf.dtype != dtype:
                self._buf = np.empty((max(run, 1), *self.shape[2:]), dtype=dtype)
            view, got, nbytes = memoryview(self._buf).cast("B"), 0, run * row_bytes
            while got < nbytes:
                n = os.preadv(fd, [view[got:nbytes]], offset + int(rows_sorted[k]) * row_bytes + got)
                if n == 0:
                    raise ValueError(f"{self.path}: file ends before row {rows_sorted[k] + run - 1}")
                got += n
            block = torch.from_numpy(self._buf[:run])
            for j in range(run):
                out[int(order[k + j]), 0].copy_(block[j])
            k += run
        return out

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        if isinstance(key, int):
            return self.read([key])[0]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self.read(key)

    def float(self) -> "StreamedSplit":
        return self

    def mean(self, dim: int = 0, keepdim: bool = False) -> torch.Tensor:
        """Voxel-wise mean over the volumes (dim 0 only), summed in float64 batch by batch."""
        if dim != 0:
            raise NotImplementedError("StreamedSplit.mean: only over the volumes (dim 0)")
        total = np.zeros(self.shape[2:], dtype=np.float64)
        for i in range(0, len(self), self.read_batch):
            total += self.read(np.arange(i, min(i + self.read_batch, len(self))))[:, 0].numpy().sum(0, dtype=np.float64)
        mean = torch.from_numpy((total / max(len(self), 1)).astype(np.float32)).unsqueeze(0)
        return mean.unsqueeze(0) if keepdim else mean

    # -- the training loader ------------------------------------------------------------------------------
    def epoch_loader(self, batches: list[torch.Tensor], pin_memory: bool = False, num_workers: int | None = None):
        """A DataLoader yielding ``batches`` (this epoch's index batches, each read as one float32 tensor),
        in their order. Kept for the next epoch (persistent workers) until :meth:`close`. Its base seed comes
        from its own generator, so iterating it never touches the global torch RNG that training and its
        checkpoint use."""
        if self._loader is None:
            from torch.utils.data import DataLoader

            workers = stream_workers() if num_workers is None else num_workers
            self._sampler = EpochBatches()
            self._loader = DataLoader(
                _BatchReader(self), batch_size=None, sampler=self._sampler, num_workers=workers,
                pin_memory=pin_memory, persistent_workers=workers > 0,
                prefetch_factor=2 if workers > 0 else None, generator=torch.Generator().manual_seed(0),
            )
        self._sampler.batches = list(batches)
        return self._loader

    def close(self) -> None:
        """Stop the loader's workers (they would otherwise live until the process exits) and close the file."""
        if self._layout is not None and self._layout[0] == os.getpid() and self._fd is not None:
            os.close(self._fd)
        self._layout, self._fd = None, None
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __repr__(self) -> str:
        return f"StreamedSplit({self.path}, n={len(self)}, shape={tuple(self.shape)})"


class EpochBatches(torch.utils.data.Sampler):
    """The loop's index batches of the current epoch, yielded as they are (no reshuffle, no drop): the
    DataLoader's sampler, re-read at every epoch by its persistent workers' iterator."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __iter__(self):
        return iter([b.tolist() for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


class _BatchReader(Dataset):
    """``reader[list of positions]`` -> the batch (b, 1, X, Y, Z): one DataLoader item is one whole batch."""

    def __init__(self, split: StreamedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, positions) -> torch.Tensor:
        return self.split.read(positions)


def open_split(data: "ProcessedData", split: str, mode: str | None = None,
               available: int | None = None) -> torch.Tensor | StreamedSplit:
    """``split`` in memory (:meth:`ProcessedData.load_split`) or streamed (:class:`StreamedSplit`), by
    :func:`should_stream`. Tiny cohorts stay in memory: same tensors, same speed as before."""
    n = len(data.split_indices(split))
    if should_stream(n, data.grid.shape, mode, available):
        log.info("%s split: %d volumes of %s streamed from %s", split, n, data.grid.shape, data.root)
        return StreamedSplit.of(data, split)
    return data.load_split(split)
