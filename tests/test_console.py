"""`sand run`'s console: a person sees one line per finished stage; what the libraries, Dagster and child
processes write (Python logging, C-level writes, subprocesses) goes to the log file, and nothing of it is lost."""
import subprocess
import sys

SCRIPT = """
import logging, os, subprocess, sys
from pathlib import Path
from dagster import Definitions, DagsterInstance, MaterializeResult, asset, define_asset_job
from jobs.console import progress_hooks, quiet

logging.basicConfig(level=logging.INFO)  # a library's handler on the process's own stderr

@asset
def noisy():
    print("python print from the step")
    logging.getLogger("somelib").warning("library warning")
    os.write(2, b"c-level write to fd 2\\n")
    subprocess.run(["echo", "child process output"], check=True)
    return MaterializeResult(metadata={"dagster/row_count": 3})

job = Definitions(assets=[noisy], jobs=[define_asset_job("j")]).resolve_job_def("j")
with quiet(Path(sys.argv[1])) as out:
    result = job.with_hooks(progress_hooks(out, 1)).execute_in_process(instance=DagsterInstance.ephemeral())
print("after the run:", result.success)
"""


def test_the_console_shows_stage_lines_and_the_log_file_gets_everything_else(tmp_path):
    log = tmp_path / "logs" / "run.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "after the run: True", done.stdout
    assert lines[0].startswith("[ 1/1] noisy: done in ") and lines[0].endswith(" min, wrote noisy (3 rows)")
    assert done.stderr == ""
    written = log.read_text()
    for noise in ("python print from the step", "library warning", "c-level write to fd 2", "child process output",
                  "STEP_SUCCESS"):
        assert noise in written, noise
