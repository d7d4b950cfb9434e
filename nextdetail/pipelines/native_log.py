"""Ray's C++ core worker logs straight to the process's stderr (file descriptor 2), past Python's
logging. One of its lines is printed on every Ray Data run with an actor pool and is known to be
harmless here:

    [...] E ... core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(DecomposeWorker))'
    ... has constructor arguments in the object store and max_restarts > 0 ...

Ray Data itself puts each pool's map transformer and DataContext in the object store
(ray-project/ray#57733), whatever the job passes, and the driver holds both for the whole run,
so a restarted actor always finds them. The only ways to silence it at the source are to give up
actor restarts (which the attempt journal relies on) or to turn every C++ error log off
(RAY_BACKEND_LOG_LEVEL), which would hide real failures. So, while a job runs, the driver's fd 2
goes through a pipe that drops the lines matching KNOWN_HARMLESS and passes everything else on
at once (progress bars included). A newcomer reads an `E` line as a failure.
"""
from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager

KNOWN_HARMLESS = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
               rb"store and max_restarts > 0"),
)


def _harmless(line: bytes) -> bool:
    return any(p.search(line) for p in KNOWN_HARMLESS)


def _pump(read_fd: int, out_fd: int) -> None:
    """Copy read_fd to out_fd, holding back only a line that starts like a C++ log line ('[')
    until it is whole, then dropping it if it is known to be harmless."""
    held = b""
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        data, out = held + chunk, []
        held = b""
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            if data[start:start + 1] == b"[":
                if nl < 0:                       # a log line still being written: wait for the rest
                    held = data[start:]
                    break
                line = data[start:nl + 1]
                if not _harmless(line):
                    out.append(line)
                start = nl + 1
            else:                                # anything else (a bar's \r updates) passes at once
                end = len(data) if nl < 0 else nl + 1
                out.append(data[start:end])
                start = end
        if out:
            os.write(out_fd, b"".join(out))
    if held:
        os.write(out_fd, held)


@contextmanager
def quiet_known_native_lines():
    """For the block, drop KNOWN_HARMLESS lines from what this process writes to fd 2. Only this
    process's own writes pass through the pipe (processes started earlier, like Ray's raylet,
    keep the original stderr); when the block ends fd 2 is put back and the pipe drained."""
    try:
        saved = os.dup(2)
    except OSError:                              # no stderr at all: nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    pump = threading.Thread(target=_pump, args=(read_fd, saved), daemon=True, name="native-stderr")
    pump.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        os.dup2(saved, 2)                        # closes the pipe's last write end: the pump sees EOF
        pump.join(timeout=5)
        if not pump.is_alive():                  # else a child still holds the pipe: leave the pump be
            os.close(read_fd)
            os.close(saved)
