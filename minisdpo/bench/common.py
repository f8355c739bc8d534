"""What the benchmarks share: dtypes, timing by medians, peak memory, the machine, a synthetic
tokenizer, writing the JSON results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import statistics
import time
from typing import Callable

import torch

from minisdpo import ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _seconds(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, device: str,
                        warmup: int = 2, samples: dict[str, list[float]] | None = None) -> dict[str, float]:
    """The median time of each function over `repeats` rounds, each round running every function
    once in turn (after `warmup` such rounds untimed): all of them see the same load, which on a
    shared machine moves by the minute. Each timed round runs them in its own order (shuffled,
    with a fixed seed), so that no function always runs right after the same one: what one
    leaves behind (on a VM, freed memory that the next one's fresh buffer is slow to fault back
    in) is spread over all of them. `samples`, when given, receives every timed run's seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    order = list(fns)
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            times[name].append(_seconds(fns[name], device))
    if samples is not None:
        samples.update(times)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn: Callable[[], None], repeats: int, device: str, warmup: int = 2) -> float:
    return interleaved_medians({"fn": fn}, repeats, device, warmup)["fn"]


def peak_rss() -> int:
    """Peak resident set of this process in bytes: VmHWM on Linux (ru_maxrss would carry the
    parent's peak over into a child started by fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def clear_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux: "5" into /proc/self/clear_refs), so the
    next peak_rss() is the peak of what runs after; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    except (OSError, StopIteration):
        return peak_rss()


def machine() -> dict[str, str]:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "arch": platform.machine(),
        # The row kernels' copy (minisdpo.ops.cpu_capability) and ATen's own (torch.exp, the
        # eager reference), each capped by its environment variable (MINISDPO_CPU_CAPABILITY,
        # ATEN_CPU_CAPABILITY).
        "cpu_capability": ops.cpu_capability(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class WordTokenizer:
    """A synthetic tokenizer: one token per whitespace-separated word, its id a hash of the word
    (ids 0 pad, 1 bos, 2 eos). Enough for timing: the token counts are what matter."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        import zlib
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        raise NotImplementedError("WordTokenizer only encodes")

    def prompt_ids(self, text: str) -> list[int]:
        return self.encode(text, bos=True)

    def prompt_pieces(self, text: str, sep: str | None = None) -> list[list[int]]:
        """``prompt_ids`` cut at every ``sep`` (minisdpo.tokenizer.Tokenizer.prompt_pieces)."""
        pieces = [text] if sep is None else text.split(sep)
        return [self.encode(piece, bos=i == 0) for i, piece in enumerate(pieces)]


def write_json(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")
