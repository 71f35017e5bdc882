"""The Dagster UI in a real browser: `dagster dev` on 127.0.0.1 over a SAND_HOME built here with the tiny model,
driven by headless Chromium (the system's `chromium`, through Playwright: no browser download). Screenshots land
in test-artifacts/ui/; with SAND_DOCS_IMAGES=1 the asset graph and the scoreboard also replace the documentation's
pictures in docs/images/."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter, materialize

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand.config import DAGSTER_YAML
from sand.experiment import load_experiments
from sand.models.registry import tiny_model
from sand_assets.models import build_model_assets
from sand_assets.scoreboard import build_scoreboard_asset
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts" / "ui"
DOCS_IMAGES = REPO / "docs" / "images"
TINY = """
train_data: {alfworld: null}
evaluation:
  pool_size: 1
  max_new_tokens: 16
  envs: {alfworld: {splits: [valid_seen], tasks_per_split: 2, max_steps: 2}}
sand: {iterations: 1}
"""

sync_api = pytest.importorskip("playwright.sync_api", reason="the UI test needs playwright (pip install -e .[dev])")
if CHROMIUM is None:
    pytest.skip("the UI test needs Debian's chromium (scripts/setup.sh installs it when run as root)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(url, instance) of `dagster dev` over a SAND_HOME whose tiny experiment has its base model evaluated and
    its scoreboard built."""
    root = tmp_path_factory.mktemp("ui")
    home, dagster_home, experiments = root / "sand_home", root / "sand_home" / "dagster", root / "experiments"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)  # as `sand ui` writes it: no first-visit dialog
    experiments.mkdir()
    (experiments / "tiny.yaml").write_text(f"base_model: {tiny_model()}\n{TINY}")
    env = {**os.environ, "SAND_HOME": str(home), "DAGSTER_HOME": str(dagster_home),
           "SAND_EXPERIMENTS": str(experiments)}
    [exp] = load_experiments(experiments)
    base_model, _, _, base_evaluation, _ = build_model_assets(exp)
    resources = {"store": StoreResource(home=str(home)), "alfworld": AlfWorldResource(),
                 "sciworld": SciWorldResource(), "compute": ComputeResource(torch_threads=1)}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("SAND_HOME", "DAGSTER_HOME", "SAND_EXPERIMENTS"):
            patch.setenv(name, env[name])
        with DagsterInstance.get() as instance:
            assert materialize([base_model, base_evaluation, build_scoreboard_asset(exp)], resources=resources,
                               instance=instance).success
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-m", "sand_assets.definitions",
                                       "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)  # its webserver and daemon go with it
            url = f"http://127.0.0.1:{port}"

            def serving():
                try:
                    with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                        return response.status == 200
                except OSError:
                    return False

            try:
                wait_for(serving, 180, f"dagster dev on {url}")
                yield url, instance
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
                with contextlib.suppress(ProcessLookupError):  # a child slower to stop than dagster dev
                    os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def page(ui):
    url, _ = ui
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(90_000)  # the code location loads the experiment's assets first
        page.goto(f"{url}/locations/sand_assets.definitions/asset-groups/tiny/lineage")
        yield page
        browser.close()


def settled(page) -> None:
    """Wait for the page's finite animations and CSS transitions to end (a dialog fades in; spinners never end), so
    a screenshot shows the page as a user sees it."""
    page.wait_for_function("() => document.getAnimations().every("
                           "a => a.playState !== 'running' || a.effect.getTiming().iterations === Infinity)")


def shoot(page, name: str, docs: bool = False) -> None:
    page.screenshot(path=ARTIFACTS / name)
    if docs and os.environ.get("SAND_DOCS_IMAGES") == "1":
        DOCS_IMAGES.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / name, DOCS_IMAGES / name)


def test_asset_graph_shows_the_loop(ui, page):
    url, _ = ui
    page.goto(f"{url}/locations/sand_assets.definitions/asset-groups/tiny/lineage")
    for name in ("base_model", "d0", "sft_checkpoint", "candidate_samples", "rollouts", "action_critiques",
                 "deliberations", "scoreboard"):
        page.get_by_text(name, exact=True).first.wait_for()
    shoot(page, "asset_graph.png", docs=True)


def test_scoreboard_renders_and_materializes_from_the_ui(ui, page):
    url, instance = ui
    page.goto(f"{url}/assets/tiny/scoreboard")
    page.get_by_text("base/alfworld/valid_seen/avg_reward", exact=True).first.wait_for()
    page.get_by_text("[Show Markdown]").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("tiny: average reward x100 [95% bootstrap interval]").wait_for()
    chart = dialog.locator("img[src^='data:image/png']")
    chart.wait_for()
    assert chart.evaluate("img => img.naturalWidth") > 100  # the embedded PNG decoded
    settled(page)
    shoot(page, "scoreboard.png", docs=True)
    dialog.get_by_role("button", name="Close").click()

    from_ui = RunsFilter(tags={"dagster/from_ui": "true"})
    before = {r.dagster_run.run_id for r in instance.get_run_records(from_ui)}
    page.get_by_role("button", name="Materialize").first.click()
    page.get_by_role("button", name="Confirm").click()  # the SFT and SAND agents were never evaluated here

    def finished():
        runs = [r.dagster_run for r in instance.get_run_records(from_ui) if r.dagster_run.run_id not in before]
        return runs if runs and all(r.is_finished for r in runs) else None

    # The run starts in its own process, which loads the code location first: slow on a busy machine.
    [run] = wait_for(finished, 300, "the scoreboard run launched from the UI")
    assert run.status == DagsterRunStatus.SUCCESS and run.asset_selection == {AssetKey(["tiny", "scoreboard"])}
    page.goto(f"{url}/runs/{run.run_id}")
    page.get_by_text("Success", exact=False).first.wait_for()
    shoot(page, "materialized_from_ui.png")
