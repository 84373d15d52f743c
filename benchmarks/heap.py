"""The C heap's bytes in use, sampled while a call runs (the benchmarks' memory figures)."""

from __future__ import annotations

import ctypes
import threading


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]  # noqa: E501


class HeapSampler:
    """Peak bytes in use on the C heap (glibc's ``mallinfo2``: where CPU tensors live) while a call runs.

    Heap bytes in use, not RSS: glibc keeps freed memory mapped, so RSS would not fall between
    calls and a mode measured after another would look free. Sampled every 2 ms.
    """

    def __init__(self) -> None:
        self._mallinfo2 = ctypes.CDLL(None).mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self.peak = self.current()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def current(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.current())

    def reset(self) -> int:
        self.peak = self.current()
        return self.peak
