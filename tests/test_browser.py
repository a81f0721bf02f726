"""The lessons' widgets as a student meets them: JupyterLab in headless Chromium.

One JupyterLab server on 127.0.0.1 (a token, a folder of its own) serves the student editions of 02
and 03 with ``interactive = True`` under the smoke preset. Playwright drives Debian's ``chromium``
(``executable_path``: no browser download): open the notebook, Run All Cells, wait for the widget's
picture, move a slider with the keyboard and wait for a different picture. A screenshot of each
widget after the move lands in ``test-artifacts/`` (ignored by git; ``FPNLIB_ARTIFACTS`` names
another folder). Where Chromium, Playwright or JupyterLab is missing the test skips, except in CI
(``CI`` set), where ``.ci/run`` installs them and a missing piece fails.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fpnlib.lesson import SCRATCH_ENV
from fpnlib.provenance import REPO_ROOT
from fpnlib.reproduce import lesson_notebooks
from fpnlib.student import student_notebook

pytestmark = pytest.mark.notebook  # a heavy file: scheduled first (tests/conftest.py)

CHROMIUM = os.environ.get("FPNLIB_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FPNLIB_ARTIFACTS") or REPO_ROOT / "test-artifacts")
WIDGET = ".widget-interact"
PICTURE = f"{WIDGET} .widget-output img"
# the slider each test moves: 02's level slider, 03's image slider (both the widget's first)
SLIDER = f"{WIDGET} .noUi-handle"


def _missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: .ci/run installs it")
    pytest.skip(f"{what} is missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interactive_lesson(notebook: Path, out: Path, parameters: dict) -> Path:
    """The student edition of ``notebook`` with its parameters cell set as a student would (the
    assignments appended to the cell), written to ``out``."""
    nb = student_notebook(json.loads(notebook.read_text()))
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = "".join(cell["source"]).rstrip("\n") + "\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    out.write_text(json.dumps(nb, indent=1))
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory, smoke_root):
    """``(url, token)`` of a JupyterLab serving 02 and 03, interactive, under smoke."""
    if not Path(CHROMIUM).exists():
        _missing(f"Chromium ({CHROMIUM})")
    for module in ("playwright", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"the Python package {module}")
    root = tmp_path_factory.mktemp("lab")
    folder = root / "notebooks"
    folder.mkdir()
    for nb in lesson_notebooks():
        if nb.name[:2] in ("02", "03"):
            interactive_lesson(nb, folder / nb.name, {"preset": "smoke", "data_root": str(smoke_root), "interactive": True})
    # a student's settings: the notebook's kernel starts without asking, no news pop-up over the page
    for plugin, settings in {"notebook-extension/tracker": {"autoStartDefaultKernel": True},
                             "apputils-extension/notification": {"fetchNews": "false"}}.items():
        path = root / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    token, port = secrets.token_hex(16), _free_port()
    env = dict(os.environ, **{SCRATCH_ENV: str(root / "scratch"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
                              "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
                              "JUPYTERLAB_SETTINGS_DIR": str(root / "settings")})
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={folder}", "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
               "jupyterlab.NeverCheckForUpdate"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = (root / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def wait_for_idle_kernel(lab, notebook: str, timeout_s: float = 90) -> None:
    """Until the server's session of ``notebook`` has a kernel that is idle (started, connected)."""
    url, token = lab
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sessions = json.loads(urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=5).read())
        if any(s["path"].endswith(notebook) and s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        time.sleep(0.5)
    pytest.fail(f"no idle kernel for {notebook} after {timeout_s:.0f} s")


def run_all_and_move_a_slider(browser, lab, notebook: str, screenshot: Path) -> tuple[str, str]:
    """Open ``notebook`` in JupyterLab, Run All Cells, move the widget's first slider one step;
    returns the ``src`` of the widget's picture before and after the move."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        page.goto(f"{url}/lab/tree/{notebook}?token={token}&reset")  # reset: no tab of an earlier page reopens
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        wait_for_idle_kernel(lab, notebook)
        for attempt in range(3):  # a Run All sent while the page still connects to the kernel is lost
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            try:
                page.wait_for_selector(".jp-InputPrompt:text-matches('\\[(\\*|\\d+)\\]')", timeout=15_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    raise
        picture = page.wait_for_selector(PICTURE, timeout=int(os.environ.get('FPNLIB_BROWSER_WAIT_S', '180')) * 1000)
        before = picture.get_attribute("src")
        page.locator(SLIDER).first.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function("([sel, old]) => { const i = document.querySelector(sel); return i && i.src !== old; }",
                               arg=[PICTURE, before], timeout=60_000)
        after = page.locator(PICTURE).get_attribute("src")
        page.locator(WIDGET).first.screenshot(path=str(screenshot))
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
        assert not [e for e in errors if "Traceback" in e or "Error" in e], errors
        return before, after
    except Exception:
        page.screenshot(path=str(screenshot.with_name(screenshot.stem + "_failed_page.png")), full_page=True)
        raise
    finally:
        page.close()


@pytest.mark.parametrize("notebook", ["02_top_down_lateral.ipynb", "03_anchors.ipynb"])
def test_widget_draws_a_new_picture_when_a_slider_moves(browser, lab, notebook):
    shot = ARTIFACTS / f"{Path(notebook).stem}_widget_after_slider.png"
    before, after = run_all_and_move_a_slider(browser, lab, notebook, shot)
    assert before.startswith("data:image/png;base64,") and after.startswith("data:image/png;base64,")
    assert after != before, "moving the slider drew the same picture"
    assert shot.stat().st_size > 5_000, "the screenshot of the widget is empty"
