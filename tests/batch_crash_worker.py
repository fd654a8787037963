"""`python -m batch_crash_worker ...`: rapiddiff's CLI, with a fault injected by monkeypatching for test_batch's crash
test. Worker 0 dies (os._exit, as a preempted node would) in the middle of writing its second chunk: after one of its
images is renamed into place and while the next is still a temporary file."""

from __future__ import annotations

import os
import sys

from rapiddiff import cli
from rapiddiff.batch import files, run


def die_in_second_chunk() -> None:
    original_run_chunk, original_replace = run.ChunkRunner.run_chunk, os.replace
    renamed = []

    def replace(src, dst):  # os.replace as batch/files.py sees it
        if dying:
            if renamed:
                os._exit(1)
            renamed.append(dst)
        original_replace(src, dst)

    dying = False

    def run_chunk(self, chunk):
        nonlocal dying
        dying = self.worker["name"].split("/")[0] == "0" and self.committed_here == 1
        return original_run_chunk(self, chunk)

    run.ChunkRunner.run_chunk = run_chunk
    files.os = type(sys)("os_with_a_fault")
    files.os.__dict__.update(os.__dict__, replace=replace)


if __name__ == "__main__":
    die_in_second_chunk()
    sys.exit(cli.main(sys.argv[1:]))
