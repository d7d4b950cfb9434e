"""What a command will need in memory, estimated from its options before any work starts, and
what the process can have. A command that cannot fit is refused in one line (exit 2) instead of
being killed by the kernel an hour in, or leaving behind an output recorded with options that
never worked.

    needs = [Need("--batch-size 64", "activations of 64 images at 256 px", 211e9), ...]
    check_memory(needs, device="cpu", max_memory=cfg.max_memory)      # MemoryRefusal or nothing

Estimates of models come from the models themselves, built and run on torch's "meta" device
(shapes only, no storage): `model_bytes` counts parameters, `saved_bytes` the tensors a forward
keeps for backward (the activations of a training step), `forward_peak` the largest input + output
of one module in an inference forward. They cost a forward's bookkeeping, never its memory, so a
depth-200 transformer is sized in a fraction of a second. They leave out allocator slack and
library workspaces: a refusal is certain to be right, a pass is a good sign, not a promise.

The memory the process can have is the least of: MemAvailable, the cgroup's limit less its
usage (containers, Slurm, Kubernetes), and RLIMIT_AS less the address space in use (ulimit -v);
on CUDA, the device's free memory. `--max-memory SIZE` replaces it (e.g. a node bigger than the
one the command is started on), and `--max-memory off` skips the check.
"""
from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

from .errors import ConfigError
from .options import opt

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class MemoryRefusal(ConfigError):
    """The options ask for more memory than the process can have; str names the option."""


def memory_opt():
    """The --max-memory option of every command that checks its memory (one definition)."""
    return opt(None, "memory this command may use, e.g. 64G (default: what this machine or GPU has free now); "
                     "'off' skips the check", metavar="SIZE")


def parse_size(text: str, option: str = "--max-memory") -> int:
    """'64G', '512M', '1.5T', '1000000' -> bytes (binary units); ConfigError naming the option."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r}: expected a size such as 64G, 512M or 'off'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def check_max_memory(value: Optional[str]) -> None:
    """For configs' __post_init__: a --max-memory that does not parse is refused at once."""
    if value is not None and str(value).lower() != "off":
        parse_size(value)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_kb(path: str, key: str) -> Optional[int]:
    """Bytes of the "key:  N kB" line of a /proc file (/proc/meminfo, /proc/self/status); None
    where the file or the line is missing or unreadable."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_available() -> Tuple[int, str]:
    """(bytes, where the number comes from) this process can still allocate on the host."""
    found = []
    avail = _proc_kb("/proc/meminfo", "MemAvailable")
    if avail is not None:
        found.append((avail, "MemAvailable"))
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, used = _read_int(limit), _read_int(usage)
        if lim is not None and used is not None and lim < (1 << 60):
            found.append((max(0, lim - used), "the cgroup's memory limit less its usage"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        vm = _proc_kb("/proc/self/status", "VmSize") or 0
        found.append((max(0, soft - vm), "ulimit -v less the address space in use"))
    if not found:
        return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory")
    return min(found)


def available(device: str = "cpu") -> Tuple[int, str]:
    """(bytes, source) free for this command's tensors on `device` ('cpu', 'cuda', 'cuda:1')."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return free, f"free memory of {device}"
    return host_available()


@dataclass(frozen=True)
class Need:
    """One part of an estimate: the option that sets it ('--batch-size 64'), what it is, bytes."""

    option: str
    what: str
    bytes: float


def check_memory(needs: Iterable[Need], *, device: str = "cpu", max_memory: Optional[str] = None,
                 per: str = "") -> None:
    """MemoryRefusal, one line, when the needs add up to more than the process can have. The
    line names the option of the largest part, the estimate and what is available. `per`
    qualifies the estimate ('per worker')."""
    needs = [n for n in needs if n.bytes > 0]
    if not needs or (max_memory is not None and str(max_memory).lower() == "off"):
        return
    total = sum(n.bytes for n in needs)
    if max_memory is not None:
        limit, source = parse_size(max_memory), "--max-memory"
    else:
        limit, source = available(device)
    if total <= limit:
        return
    worst = max(needs, key=lambda n: n.bytes)
    parts = "; ".join(f"{n.what} {human(n.bytes)}" for n in sorted(needs, key=lambda n: -n.bytes)[:3])
    flag = worst.option.split()[0]
    raise MemoryRefusal(f"{worst.option}: needs about {human(total)}{' ' + per if per else ''} ({parts}); "
                        f"this process can have {human(limit)} ({source}); lower {flag}, or pass --max-memory "
                        f"SIZE if more is free where it runs")


# ----------------------------------------------------------------------------- model estimates

def on_meta(build: Callable[[], object]):
    """`build()` with torch's default device set to meta: modules and tensors without storage."""
    import torch

    with torch.device("meta"):
        return build()


def model_bytes(module) -> int:
    """Bytes of the module's parameters and buffers (as they are, e.g. float32)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def saved_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the tensors that `forward()` keeps for backward: a training step's activations.
    Run it on meta tensors (on_meta) to size a step without allocating it."""
    import torch

    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (id(t), tuple(t.shape))
        if t.is_leaf and t.requires_grad:     # a parameter: counted with the weights
            return t
        if key not in seen:           # one tensor saved by two ops is one allocation
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def forward_peak(module, forward: Callable[[], object]) -> int:
    """The most tensor bytes alive at once while `forward()` runs (no grad), beyond the weights:
    at the end of each submodule call, its output plus the inputs of every call still open
    around it (a residual block keeps its input for the skip; a decoder keeps its input while its
    blocks run), e.g. a decoder's last block at full resolution."""
    import torch

    peak = 0
    open_inputs: list = []          # input bytes of the calls in progress, outermost first

    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        return 0

    def enter(_, inputs):
        open_inputs.append(size(inputs))

    def leave(_, inputs, output):
        nonlocal peak
        peak = max(peak, sum(open_inputs) + size(output))
        open_inputs.pop()

    handles = [h for m in module.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            out = forward()
        peak = max(peak, size(out))
    finally:
        for h in handles:
            h.remove()
    return peak


def adamw_state_bytes(params: int) -> int:
    """Weights, gradients and AdamW's two moments, float32: 16 bytes per parameter."""
    return 16 * params
