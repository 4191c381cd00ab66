"""engine.heap: the memory a forward pass frees is kept for the next, not faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHURN = """if 1:
    import resource, numpy as np
    from gptcpu.engine import heap
    tuned = heap.keep_temporaries()
    def churn():   # temporaries of a pass's sizes, each written and freed
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for mb in (1, 2, 4, 8, 16, 3, 6, 12, 24):
            a = np.empty(mb << 20, np.uint8); a[::4096] = 1; del a
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    churn()
    print(tuned, churn())
"""


def churn(**env) -> tuple[bool, int]:
    """-> (whether keep_temporaries took effect, page faults in a second round of temporaries)."""
    r = subprocess.run([sys.executable, "-c", CHURN], env={**os.environ, **env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tuned, faults = r.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_temporaries_are_kept_unless_the_environment_tunes_malloc():
    tuned, faults = churn()
    assert tuned and faults < 100, faults   # 77 MB of temporaries written again: kept
    # glibc's own thresholds (the environment sets a tunable, so gptcpu leaves them alone):
    # each round maps its temporaries afresh
    tuned, faults = churn(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert not tuned and faults > 300, faults   # (1028 here)
    assert not churn(MALLOC_TRIM_THRESHOLD_="131072")[0]
