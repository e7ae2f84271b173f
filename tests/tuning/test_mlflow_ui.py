"""The MLflow UI as a new user meets it: a real sweep logged to a real `mlflow server` on 127.0.0.1, opened in
headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) at the address the sweep prints.

Assertions read the page's DOM text: the experiment opens on its runs table (not MLflow 3's GenAI overview of traces
and tokens), with the experiment's description, and the sweep's parent row expands into its trials.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sweep_helpers import spec_for

from comic.tracking.store import experiment_link, run_link
from comic.tuning.sweep import EXPERIMENT_NOTE, run_sweep

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency (pip install -e '.[dev]')")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.ray,
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                              ".ci/run installs them)"),
]
# Flags a sandboxed root machine with no network needs (no sandbox, no background fetches to Google's hosts).
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000")
GENAI_ONLY = ("Token Usage", "Tokens per Trace", "Evaluation runs")  # the GenAI overview's panels and tabs
WAIT_S = 60


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _wait_for_text(driver, *needles: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: all(n in _text(d) for n in needles))
    return _text(driver)


def test_a_sweep_opens_on_its_runs_table_and_the_parent_expands_into_trials(ray_local, mlflow_server, browser,
                                                                             smoke_overrides, tmp_path):
    from selenium.webdriver.common.by import By

    spec = spec_for(tmp_path, smoke_overrides, num_samples=3, tracking_uri=mlflow_server)
    result = run_sweep(spec)
    trials = sorted(row["trial"] for row in result.trials)
    browser.get(experiment_link(mlflow_server, result.experiment_id))
    page = _wait_for_text(browser, result.name, "Run Name")
    assert "Runs" in page and EXPERIMENT_NOTE[:60] in page  # the runs table, under the experiment's description
    assert not [panel for panel in GENAI_ONLY if panel in page], page[:2000]
    assert not [t for t in trials if t in page]  # the parent row starts collapsed
    parent_cell = browser.find_element(By.XPATH, f"//*[@role='gridcell'][.//*[text()='{result.name}']]")
    parent_cell.find_element(By.TAG_NAME, "button").click()  # the +/- expander beside the parent's name
    page = _wait_for_text(browser, *trials)
    assert f"{len(trials) + 1} matching runs" in page
    # the Dataset column names the benchmark on every row: the parent's and each trial's
    dataset = MlflowClient(mlflow_server).get_run(result.parent_run_id).inputs.dataset_inputs[0].dataset.name
    assert page.count(dataset) >= len(trials) + 1, page[:3000]
    # the parent's page: its description says what ran and the command that made it
    browser.get(run_link(mlflow_server, result.experiment_id, result.parent_run_id))
    page = _wait_for_text(browser, "Description", "Made by:")
    assert f"Sweep `{result.name}`" in page or f"Sweep {result.name}" in page
    assert not [panel for panel in GENAI_ONLY if panel in page]
    Path(tmp_path / "seen.txt").write_text(page)
