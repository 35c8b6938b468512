"""``keep_freed_memory``: freed large blocks stay in the process, so reallocating them does not page-fault."""
import ctypes
import platform

import pytest
import torch

from pdenet import allocator, cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and newer): byte counts of the allocator's state."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("this glibc has no mallinfo2 (before 2.33)")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds exist only in glibc on Linux")
def test_a_64_mib_block_comes_from_the_heap_and_stays_there_when_freed():
    assert allocator.keep_freed_memory()
    nbytes = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped by default
    before = mallinfo()
    block = torch.ones(nbytes // 4)
    during = mallinfo()
    del block
    after = mallinfo()
    assert during.hblkhd - before.hblkhd < nbytes  # not a fresh mmap (freed with munmap, faulted in anew)
    assert during.uordblks - before.uordblks >= nbytes  # but heap memory in use
    assert after.arena >= during.arena  # and the heap is not trimmed when the block is freed


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called on a non-glibc system"))
    assert allocator.keep_freed_memory() is False


def test_the_command_line_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert calls == []  # --help exits while parsing, before any work
    cli.main(["cost", "--config", "lean-resnet20", "--input-shape", "1", "8", "8", "--batch-size", "2",
              "--repeats", "1"])
    assert calls == [True]
