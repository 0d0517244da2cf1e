"""A capture run as a user runs it: `moecache capture` in a child process."""

import signal
import subprocess
import sys
import time

from moecache.trace_io import parts_dir


def start_long_capture(model, tmp_path, prompts):
    """`moecache capture MODEL` over ``prompts`` (40 new tokens each) in a child process,
    returned once it has committed a block of steps: (the process, the trace path)."""
    many = tmp_path / "many.txt"
    many.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "long.parquet"
    cmd = [sys.executable, "-m", "moecache.cli", "capture", str(model), "--prompts", str(many),
           "--out", str(out), "--max-new-tokens", "40", "--device", "cpu"]
    # a background job inherits an ignored SIGINT (then Python never raises KeyboardInterrupt):
    # give the child the default disposition, as a terminal's foreground process has
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(parts_dir(out).glob("part-*.parquet")):  # wait for a committed block
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return proc, out
