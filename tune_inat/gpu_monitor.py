"""What the GPUs did during a search: each GPU's utilisation and memory, sampled once a second into gpus.parquet.

The driver samples the GPUs of its own node through NVML (`nvidia-ml-py`), the counters
`nvidia-smi` shows, in a thread beside Ray's loop; the rows go to `results/<name>/gpus.parquet`
with the same append-only rule as the other tables (immutable parts, a failed write kept for the
next one: a full disk costs one warning, never the search). On a machine without an NVIDIA driver
there is nothing to sample and no table. `analyze` turns the samples into the GPU busy share of the
search and of each trial (`gpu_busy`). Trials on other nodes of a cluster are not sampled.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from tune_inat.results import TIMESTAMP, resolve_folder, utc, write_part

log = logging.getLogger(__name__)

GPUS_FILE = "gpus.parquet"
GPU_COLUMNS = [
    ("timestamp", TIMESTAMP, "when the sample was taken (UTC)"),
    ("node_host", pa.string(), "the host whose GPU it is (the driver's)"),
    ("gpu_index", pa.int64(), "the GPU's NVML index on that host"),
    ("gpu_uuid", pa.string(), "the GPU's UUID (trials.parquet's gpu_uuid names the GPU a trial ran on)"),
    ("gpu_name", pa.string(), "the GPU model"),
    ("utilization", pa.float64(), "share of the last sample period in which a kernel ran on the GPU, 0..1"),
    ("memory_used_mib", pa.float64(), "GPU memory in use, MiB (every process)"),
    ("memory_total_mib", pa.float64(), "the GPU's memory, MiB"),
]
GPUS_SCHEMA = pa.schema([pa.field(name, kind) for name, kind, _ in GPU_COLUMNS])
Sample = dict[str, Any]


class NvmlReader:
    """One sample of every GPU of this host, through NVML."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.host = socket.gethostname()
        count = pynvml.nvmlDeviceGetCount()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
        self.facts = [(pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetName(h)) for h in self.handles]

    def __call__(self) -> list[Sample]:
        now, samples = time.time(), []
        for index, (handle, (uuid, name)) in enumerate(zip(self.handles, self.facts)):
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            samples.append(
                {
                    "timestamp": now,
                    "node_host": self.host,
                    "gpu_index": index,
                    "gpu_uuid": _text(uuid),
                    "gpu_name": _text(name),
                    "utilization": self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                    "memory_used_mib": memory.used / 2**20,
                    "memory_total_mib": memory.total / 2**20,
                }
            )
        return samples


def nvml_reader() -> NvmlReader | None:
    """NVML's reader when this host has NVIDIA GPUs and a driver; None otherwise (nothing to sample)."""
    try:
        reader = NvmlReader()
    except Exception:  # no pynvml, no driver (NVMLError_LibraryNotFound), no permission: no samples
        return None
    return reader if reader.handles else None


class GpuSampler:
    """Samples `read()` every `interval_s` in a thread; appends the samples to gpus.parquet every `flush_s`."""

    def __init__(
        self, read: Callable[[], list[Sample]], results: str, interval_s: float = 1.0, flush_s: float = 10.0
    ) -> None:
        self.read, self.results = read, results
        self.interval_s, self.flush_s = interval_s, flush_s
        self.waiting: list[Sample] = []
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._warned = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and write what waits (a failure here is the same one warning)."""
        self._stop.set()
        self._thread.join()
        self.flush()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self.waiting.extend(self.read())
            except Exception as err:  # a GPU that fell off the bus: the search goes on
                self._warn(f"warning: GPU sampling stopped ({type(err).__name__}: {err}); the search goes on")
                return
            if time.monotonic() - last_flush >= self.flush_s:
                self.flush()
                last_flush = time.monotonic()

    def flush(self) -> bool:
        """Write the waiting samples as one part; on failure keep them for the next flush. True when none wait."""
        if not self.waiting:
            return True
        rows, self.waiting = self.waiting, []
        try:
            filesystem, folder = resolve_folder(self.results)
            write_part([{**row, "timestamp": utc(row["timestamp"])} for row in rows], GPUS_SCHEMA, filesystem,
                       f"{folder}/{GPUS_FILE}")  # fmt: skip
        except OSError as err:
            self.waiting = rows + self.waiting
            self._warn(
                f"warning: GPU samples cannot be written to {self.results}/{GPUS_FILE} now ({err.strerror or err}); "
                f"they are kept and written when it can"
            )
            return False
        self.written += len(rows)
        return True

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True


@contextmanager
def sampling_gpus(results: str, read: Callable[[], list[Sample]] | None = None) -> Iterator[GpuSampler | None]:
    """Sample this host's GPUs while the block runs (nothing to sample: yields None)."""
    read = read or nvml_reader()
    if read is None:
        yield None
        return
    sampler = GpuSampler(read, results)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
