"""`sand run` and the processes behind runs: a second run of a job is refused while one runs, and a run whose
process was SIGKILLed is marked failed (not left started forever). Real processes, a real Dagster instance."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from jobs.cli import _fail_abandoned_runs, main
from sand.config import apply_defaults
from sand.store import Store
from tests.conftest import REPO

HOLDER = textwrap.dedent("""
    import sys, time
    from sand.store import Store
    with Store().lock("run/expert_data", holder="`sand run expert_data` runs in pid 4242"):
        print("held", flush=True)
        time.sleep(120)
""")

# A job run the way `sand run` runs one (in process, with its tags) whose only step outlives the test.
SLOW_RUN = textwrap.dedent("""
    import time
    from dagster import DagsterInstance, job, op
    from jobs.cli import LAUNCHED_BY, PID
    import os

    @op
    def wait():
        time.sleep(300)

    @job
    def slow():
        wait()

    with DagsterInstance.get() as instance:
        slow.execute_in_process(instance=instance, tags={LAUNCHED_BY: "sand run", PID: str(os.getpid())})
""")


def start(script):
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_a_second_run_of_a_job_is_refused_at_once(sand_home, capsys):
    holder = start(HOLDER)
    try:
        assert holder.stdout.readline().strip() == "held"
        began = time.monotonic()
        with pytest.raises(SystemExit) as exit_:
            main(["run", "expert_data"])
        assert exit_.value.code == 2 and time.monotonic() - began < 30
        assert "'run/expert_data' is held by another process: `sand run expert_data` runs in pid 4242" in \
            capsys.readouterr().err
        # Refused before any run was recorded.
        assert Store(sand_home).sql("select count(*) from run_failures").item() == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_runs_run_is_marked_failed_by_the_next(sand_home):
    apply_defaults()  # DAGSTER_HOME and its dagster.yaml, as the CLI makes them
    runner = start(SLOW_RUN)
    try:
        with DagsterInstance.get() as instance:
            deadline = time.monotonic() + 120
            while not instance.get_runs() or instance.get_runs()[0].status != DagsterRunStatus.STARTED:
                assert time.monotonic() < deadline and runner.poll() is None, "the slow run never started"
                time.sleep(0.5)
            runner.send_signal(signal.SIGKILL)
            runner.wait()
            [run] = instance.get_runs()
            assert run.status == DagsterRunStatus.STARTED  # nothing else would ever end it
            _fail_abandoned_runs(instance, Store(sand_home), "slow")
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        failures = Store(sand_home).sql("select run_id, error from run_failures")
        assert failures["run_id"].to_list() == [run.run_id]
        assert f"pid {runner.pid}) ended before the run did" in failures["error"][0]
    finally:
        runner.kill()
