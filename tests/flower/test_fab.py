"""FABs built the way ``flwr build`` does, from several threads of one process at once."""

from __future__ import annotations

import sys
import threading

from fedmed.flower.fab import fab_from_files, shim_files
from fedmed.runsettings.settings import RunSettings


def test_sites_started_in_threads_build_the_same_fab_without_a_warning():
    # pytest turns warnings into errors: a thread that saw another thread's restored filters
    # mid-build raised flwr's pathspec DeprecationWarning (two sites of the deployment e2e)
    files = shim_files(RunSettings().to_run_config())
    start = threading.Barrier(6)
    hashes: list[str] = []
    errors: list[BaseException] = []

    def build() -> None:
        start.wait(timeout=30)
        try:
            for _ in range(5):
                hashes.append(fab_from_files(files).hash_str)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(6)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave inside the build, as loaded sites do
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)

    assert errors == []
    assert len(hashes) == 30 and len(set(hashes)) == 1
