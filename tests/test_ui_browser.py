"""The review, checked as a person would: the MLflow UI in headless Chromium.

Runs the influence flow into a temporary SQLite MLflow store, starts ``mlflow ui`` on 127.0.0.1
(one worker, no job runner), opens the influence run's Artifacts tab in Debian's Chromium driven
by selenium through /usr/bin/chromedriver (never a browser download), waits for the artifact
list and asserts the review artifacts are listed, opens report.md and takes a screenshot.
Skipped only when Chromium, ChromeDriver or selenium is absent; ``.ci/run`` installs them.
Set ``MIRRORINF_UI_SCREENSHOT=path.png`` to keep the screenshot (docs/review-run.png), with
``MIRRORINF_UI_PROJECT=/an/empty/neutral/folder`` so that no temporary path shows in it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import base_params, merge

from mirrorinf.params import params_from_dict
from mirrorinf.review import PLOTS, TABLES

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MODEL = "ui-demo"
UI_DEMO = {"n_train": 200, "n_val": 100, "n_query": 10, "flip_fraction": 0.1, "n_leaks": 2,
           "seed": 1}  # fmt: skip
WAIT_S = 45  # bound of every wait on the server or the page

_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
if _missing:
    pytest.skip(
        f"{' and '.join(_missing)} not installed (apt-get install chromium chromium-driver; "
        ".ci/run does)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (dev extra)")


@pytest.fixture(scope="module")
def ui_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Path]]:
    """(InfluenceResult, project) of one flow run in a fresh store."""
    from mirrorinf.flows.influence import run_influence

    # MIRRORINF_UI_PROJECT: a neutral, empty folder for the README screenshot (the UI shows
    # artifact paths); a fresh temporary folder otherwise
    neutral = os.environ.get("MIRRORINF_UI_PROJECT")
    project = Path(neutral) if neutral else tmp_path_factory.mktemp("ui-project")
    if neutral:
        assert not project.exists() or not any(project.iterdir()), f"{project} is not empty"
        project.mkdir(parents=True, exist_ok=True)
    params = params_from_dict(
        merge(base_params(project), demo=UI_DEMO, model={"name": MODEL},
              mlflow={"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "ui"}),
        root=project,
    )  # fmt: skip
    with ExitStack() as stack:
        try:  # the session's Prefect harness, wherever the suite defines it
            request.getfixturevalue("prefect_harness")
        except pytest.FixtureLookupError:
            from prefect.testing.utilities import prefect_test_harness

            stack.enter_context(prefect_test_harness(server_startup_timeout=90))
        yield run_influence(params), project


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_server(ui_run: tuple[Any, Path]) -> Iterator[str]:
    """``mlflow ui`` over the run's store; its base URL. Killed (process group) at the end."""
    _, project = ui_run
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    log = (project / "mlflow-ui.log").open("wb")
    cmd = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", f"sqlite:///{project}/mlruns/mlflow.db",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (project / "mlflow-ui.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow ui did not become healthy in {WAIT_S} s:\n{tail}")
            time.sleep(0.3)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Debian Chromium; flags keep it off the network (closed network here)."""
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _item(driver: Any, name: str, *, click: bool = False) -> Any:
    """Wait for the element whose whole text is ``name`` (an artifact tree entry); click it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    locator = (By.XPATH, f"//*[normalize-space(text())='{name}']")
    wait = WebDriverWait(driver, WAIT_S)
    if not click:
        return wait.until(ec.presence_of_element_located(locator))
    element = wait.until(ec.element_to_be_clickable(locator))
    element.click()
    return element


def _body(driver: Any) -> str:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.TAG_NAME, "body").text)
    except WebDriverException:  # the page is re-rendering: read it again on the next poll
        return ""


def _open_until(driver: Any, name: str, text: str) -> None:
    """Click the tree entry ``name`` until its preview shows ``text``. A click that lands while
    the UI re-renders the tree (seen under load in CI) opens nothing: click the entry again,
    every 10 s, within WAIT_S. On a timeout the message carries what the page showed."""
    deadline = time.monotonic() + WAIT_S
    while True:
        _item(driver, name, click=True)
        retry = min(deadline, time.monotonic() + 10)
        while time.monotonic() < retry:
            if text in _body(driver):
                return
            time.sleep(0.5)
        if time.monotonic() >= deadline:
            pytest.fail(f"{text!r} not shown in {WAIT_S} s after opening {name}; the page "
                        f"showed:\n{_body(driver)[:3000]}")  # fmt: skip


def test_run_page_lists_review_artifacts(
    ui_run: tuple[Any, Path], ui_server: str, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mirrorinf.tasks.tracking import get_client

    result, project = ui_run
    client = get_client(f"sqlite:///{project}/mlruns/mlflow.db")
    exp_id = client.get_run(result.run_id).info.experiment_id
    # the model version leads to the run
    mv = client.get_model_version(MODEL, result.model["version"])
    assert mv.tags["mirrorinf.report"] == f"#/experiments/{exp_id}/runs/{result.run_id}"
    assert result.run_id in (mv.description or "")

    browser.get(f"{ui_server}/#/experiments/{exp_id}/runs/{result.run_id}/artifacts")
    # MLflow 3's UI opens in its GenAI workflow; the influence run belongs with model training
    _item(browser, "Model training", click=True)
    browser.get(f"{ui_server}/#/experiments/{exp_id}/runs/{result.run_id}/artifacts")
    for name in ("checks", "plots", "scores", "tables", "report.md", "summary.json"):
        _item(browser, name)
    _item(browser, "plots", click=True)
    for name in PLOTS:
        _item(browser, name)
    _item(browser, "tables", click=True)
    for path in TABLES.values():
        _item(browser, Path(path).name)
    gate = f"Gate: {result.verdict.upper()}"
    _open_until(browser, "report.md", gate)
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # the UI's assistant side panel: more room for the report
    WebDriverWait(browser, WAIT_S).until(lambda d: gate in d.find_element(By.TAG_NAME, "body").text)
    shot = tmp_path / "review-run.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("MIRRORINF_UI_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
