"""keep_freed_memory: a freed 64 MB tensor's memory is reused instead of mapped and faulted in again."""
import os
import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from scnet.utils.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
for _ in range(10):  # 64 MB, allocated, touched and freed (aligned blocks settle after a few)
    torch.empty(2**24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(2**24).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode, env=None):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused():
    applied, faults_on = _faults("on")
    _, faults_off = _faults("off")
    pages = 10 * 2**26 // 4096
    assert applied
    assert faults_off > pages // 2, faults_off  # default glibc: every 64 MB block is mapped and faulted anew
    assert faults_on < pages // 10, faults_on  # kept: freed heap blocks serve the allocations


def test_opt_out():
    env = dict(os.environ, SCNET_KEEP_FREED_MEMORY="0")
    applied, _ = _faults("on", env)
    assert not applied
