"""The UIs people use, in a real headless Chromium (Debian's `chromium` package) driven by Playwright, in a 1440x900
window: the experiment link we print opens MLflow's runs list, the run page shows its description, the loss chart,
the eval loss and the validation grid without scrolling, and the validation images; the Prefect UI's run form for
`flux2-lora/train` shows the flow's parameters, opened on params.yaml's values, the flavour as a plain choice.

Screenshots are kept in test-artifacts/ (or $TEST_ARTIFACTS_DIR): one per assertion and one of each test's page at
its end, also when it fails. Without Chromium the module is skipped, unless FLUX2LORA_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flux2lora import tracking
from flux2lora.tracking import EVAL_LOSS_METRIC, GRID_IMAGE_KEY, LOSS_METRIC
from helpers import REPO
from servers import PREFECT, api_get, mlflow_server, prefect_env, prefect_server

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# headless, and nothing that reaches out to Google's services from a machine without internet
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "test-artifacts"))
REAL_FLAVOURS = ["klein-4b", "klein-9b", "dev"]
WINDOW = {"width": 1440, "height": 900}  # a laptop's browser window


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
        if os.environ.get("FLUX2LORA_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport=WINDOW)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    try:
        page.screenshot(path=ARTIFACTS / f"{request.node.name}.png")
    finally:
        context.close()


# --- MLflow ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_ui(trained_project: Path, tmp_path_factory) -> dict:
    """An MLflow server on the tiny trained project's own store; the run page of its training run."""
    run = json.loads((trained_project / "outputs/train/mlflow_run.json").read_text())
    with mlflow_server(tmp_path_factory.mktemp("mlflow-ui"), f"sqlite:///{trained_project / 'mlflow.db'}",
                       str(trained_project / "mlartifacts")) as url:
        yield {"url": url, **run,
               "experiment_page": tracking.experiment_url(url, run["experiment_id"]),
               "run_page": tracking.run_url(url, run["experiment_id"], run["run_id"]),
               "metrics_page": tracking.run_url(url, run["experiment_id"], run["run_id"], "model-metrics")}


def chart_card(heading, holding: str):
    """The chart card around a chart's title: its nearest ancestor holding `holding` (an XPath step)."""
    return heading.locator(f"xpath=ancestor::div[.//{holding}][1]")


PLOT, IMAGE = "div[contains(@class, 'js-plotly-plot')]", "img"
# the grid's image on the page: MLflow stores a logged image as the artifact images/<key, / as ~>+step+<N>...
GRID_IMG = f"img[src*='get-artifact'][src*='{GRID_IMAGE_KEY.replace('/', '~')}']"


def chart_title(metric: str) -> str:
    """A metric chart's title on the run page: the key less its section (MLflow shows `training/loss` as `loss`)."""
    return metric.rsplit("/", 1)[-1]
IN_WINDOW = ("el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0 && r.left >= 0 && "
             "r.top >= 0 && r.right <= window.innerWidth && r.bottom <= window.innerHeight }")
# nothing opaque over the element's centre (MLflow lays a transparent card container over its image cards)
ON_TOP = ("el => { const r = el.getBoundingClientRect(); const hits = document.elementsFromPoint(r.x + r.width / 2, "
          "r.y + r.height / 2); const i = hits.indexOf(el); return i >= 0 && hits.slice(0, i).every(h => "
          "['rgba(0, 0, 0, 0)', 'transparent'].includes(getComputedStyle(h).backgroundColor)) }")


def test_mlflow_experiment_link_opens_the_runs_list(page, mlflow_ui: dict) -> None:
    """The experiment link we print (workflowType=machine_learning) lands on the runs list, not MLflow 3's GenAI
    overview; the run's name there opens its page, whose description names flavour, steps and final loss."""
    page.goto(mlflow_ui["experiment_page"], wait_until="load")
    run_link = page.get_by_role("link", name=mlflow_ui["run_name"], exact=True).first
    run_link.wait_for()
    assert f"/experiments/{mlflow_ui['experiment_id']}/runs" in page.url, page.url
    assert page.get_by_role("heading", name="Runs", exact=True).first.is_visible()
    assert page.get_by_text("Traces 0").count() == 0  # the GenAI overview's usage page
    page.screenshot(path=ARTIFACTS / "mlflow-experiment-runs-list.png")
    run_link.click()
    page.wait_for_url(f"**/runs/{mlflow_ui['run_id']}**")
    description = page.get_by_text("final loss", exact=False).first
    description.wait_for()
    assert "tiny-klein-4b" in description.inner_text()
    page.screenshot(path=ARTIFACTS / "mlflow-run-overview.png")


# MLflow 3.17's UI picks an experiment's pages by its workflow type: the URL's `workflowType`, else what this browser
# chose last with the sidebar's GenAI / Model training switch (localStorage, JSON), else GenAI. Nothing on the server
# (flag, environment variable, experiment tag) takes part: the switch is client-side only.
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"


def test_mlflow_experiment_list_opens_the_runs_list_once_the_browser_chose_model_training(page, mlflow_ui: dict):
    """MLflow's own experiment list (no workflowType in its link) opens `flux2-lora` on the GenAI overview in a
    fresh browser, although the experiment is tagged mlflow.experimentKind=custom_model_development; once the
    browser chose Model training (the sidebar switch stores it), the same click opens the runs list."""
    def open_from_the_experiment_list() -> str:
        page.goto("about:blank")  # a new document: the UI reads the stored switch when it starts
        page.goto(f"{mlflow_ui['url']}/#/experiments", wait_until="load")
        page.get_by_role("link", name="flux2-lora", exact=True).first.click()
        # MLflow sends /experiments/<id> on to the workflow type's first page, with workflowType in its URL
        page.wait_for_url(lambda url: f"/experiments/{mlflow_ui['experiment_id']}/" in url and "workflowType=" in url)
        return page.url

    assert "workflowType=genai" in open_from_the_experiment_list(), page.url
    page.screenshot(path=ARTIFACTS / "mlflow-experiment-list-fresh-browser.png")
    page.evaluate(f"localStorage.setItem('{WORKFLOW_STORAGE_KEY}', JSON.stringify('machine_learning'))")
    url = open_from_the_experiment_list()
    assert f"/experiments/{mlflow_ui['experiment_id']}/runs" in url and "workflowType=machine_learning" in url, url
    page.get_by_role("link", name=mlflow_ui["run_name"], exact=True).first.wait_for()


def test_mlflow_run_page_shows_the_loss_and_the_validation_grid_without_scrolling(page, mlflow_ui: dict) -> None:
    """The Model metrics tab, as opened in a 1440x900 window, before any scrolling: the `training` section first, one
    row of the training loss chart drawing its line, the mean eval loss and the validation grid (its card headed by
    the compact run params), all inside the window, the grid's image loaded and not covered."""
    page.goto(mlflow_ui["metrics_page"], wait_until="load")
    image = page.locator(GRID_IMG).first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    # the cards settle (params text, slider) after the image loads: wait for a layout in which it is on top
    try:
        page.wait_for_function(f"el => ({IN_WINDOW})(el) && ({ON_TOP})(el)", arg=image.element_handle(),
                               timeout=60_000)  # a loaded machine (xdist workers beside it) settles slowly
    except Exception:
        where = image.evaluate("el => { const r = el.getBoundingClientRect(); const hs = document.elementsFromPoint("
                               "r.x + r.width / 2, r.y + r.height / 2); return [r.x, r.y, r.width, r.height, "
                               "getComputedStyle(el).pointerEvents, getComputedStyle(el).visibility, "
                               f"document.querySelectorAll(\"{GRID_IMG}\").length, "
                               "hs.slice(0, 4).map(h => h.tagName + '.' + h.className + ' ' + getComputedStyle(h).pointerEvents)] }")
        raise AssertionError(f"the validation grid is not inside the window, on top: {where}") from None
    assert image.evaluate("img => img.naturalWidth") > 0
    for metric in (LOSS_METRIC, EVAL_LOSS_METRIC):
        card = chart_card(page.get_by_role("heading", name=chart_title(metric), exact=True).first, PLOT)
        card.locator("path.js-line").first.wait_for()  # drawn where it is: nothing was scrolled
        plot = card.locator(".js-plotly-plot").first
        assert plot.evaluate(IN_WINDOW), (metric, plot.bounding_box())
    assert page.evaluate("document.scrollingElement.scrollTop") == 0
    page.screenshot(path=ARTIFACTS / "mlflow-run-page-window.png")


def test_mlflow_ui_shows_the_loss_chart(page, mlflow_ui: dict) -> None:
    """The run's Model metrics tab has a `loss/train` chart drawing the run's loss at every training step."""
    history = api_get(mlflow_ui["url"], f"api/2.0/mlflow/metrics/get-history?run_id={mlflow_ui['run_id']}"
                                        f"&metric_key={LOSS_METRIC.replace('/', '%2F')}&max_results=1000")["metrics"]
    assert len(history) > 1
    page.goto(mlflow_ui["metrics_page"], wait_until="load")
    page.get_by_placeholder("Search metric charts").wait_for()
    title = page.get_by_role("heading", name=chart_title(LOSS_METRIC), exact=True).first
    card = chart_card(title, PLOT)
    line = card.locator("path.js-line").first
    line.wait_for()  # the first chart of the page: in view as it opens (MLflow draws only the charts in view)
    # what plotly draws: the chart's traces (x = step, y = loss)
    traces = card.locator(".js-plotly-plot").first.evaluate(
        "plot => plot.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}))")
    steps = sorted(history, key=lambda m: m["step"])
    drawn = [t for t in traces if mlflow_ui["run_name"] in (t["name"] or "") and t["x"] == [m["step"] for m in steps]]
    assert drawn, traces
    assert drawn[0]["y"] == pytest.approx([m["value"] for m in steps])
    assert f"{mlflow_ui['run_name']} ({LOSS_METRIC})" in card.inner_text()
    card.screenshot(path=ARTIFACTS / "mlflow-loss-chart.png")


def test_mlflow_ui_shows_the_validation_images(page, mlflow_ui: dict) -> None:
    """The validation grid and the per-prompt images are image charts on the same tab, loaded from the server."""
    page.goto(mlflow_ui["metrics_page"], wait_until="load")
    for key in (GRID_IMAGE_KEY, "validation/base"):
        page.get_by_text(key, exact=True).first.wait_for()
    image = page.locator(GRID_IMG).first
    # the image sits below the run's parameters in its card: scrolled into view, it must have loaded
    image.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") >= 64
    on_top = "img => { const r = img.getBoundingClientRect(); return document.elementFromPoint(r.x + r.width / 2, " \
             "r.y + r.height / 2) === img }"
    assert image.evaluate(on_top), "the validation image is covered or outside the window"
    image.screenshot(path=ARTIFACTS / "mlflow-validation-grid.png")
    chart_card(page.get_by_role("heading", name=GRID_IMAGE_KEY, exact=True), IMAGE).screenshot(
        path=ARTIFACTS / "mlflow-validation-card.png")
    shown = page.locator(f"{GRID_IMG}, img[src*='get-artifact'][src*='validation~']")
    assert shown.count() >= 3, "expected the grid and per-prompt validation images"


# --- Prefect ---------------------------------------------------------------------------------------------------


FORM_STEPS, FORM_FLAVOUR = 1234, "tiny-dev"  # the project's params.yaml, edited: not the repository's values


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory) -> dict:
    """A Prefect server with the deployment flux2-lora/train registered from the repository's prefect.yaml and flow,
    in a project whose params.yaml has steps FORM_STEPS and flavour FORM_FLAVOUR (no worker: the form is what is
    tested, nothing is run)."""
    from flux2lora.params_file import write_overrides

    base = tmp_path_factory.mktemp("prefect-ui")
    project = base / "project"
    project.mkdir()
    shutil.copy2(REPO / "prefect.yaml", project / "prefect.yaml")
    shutil.copy2(REPO / "params.yaml", project / "params.yaml")
    write_overrides(project / "params.yaml", {"train.max_train_steps": FORM_STEPS, "model.model_flavour": FORM_FLAVOUR,
                                              "model.pretrained_model_name_or_path": None})
    for folder in ("flows", "tasks"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with prefect_server(base / "home") as api_url:
        env = dict(prefect_env(base / "home", api_url), PWD=str(project))
        for cmd in (["work-pool", "create", "flux2lora-local", "--type", "process"],
                    ["--no-prompt", "deploy", "-n", "train"]):
            proc = subprocess.run([PREFECT, *cmd], cwd=project, env=env, capture_output=True, text=True,
                                  timeout=240)
            assert proc.returncode == 0, f"prefect {' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        deployment = api_get(api_url, "deployments/name/flux2-lora/train")
        yield {"url": api_url.removesuffix("/api"), "deployment": deployment,
               "form": f"{api_url.removesuffix('/api')}/deployments/deployment/{deployment['id']}/run"}


def form_property(page, title: str):
    """One parameter of the run form, found by its label ("title" or "title (Optional)")."""
    label = page.locator(".schema-form-property__label").filter(has_text=title)
    return page.locator(".schema-form-property").filter(has=label).first


def test_prefect_run_form_lists_the_flow_parameters(page, prefect_ui: dict) -> None:
    """The deployment's Run form shows one field per parameter of the flow's signature."""
    schema = prefect_ui["deployment"]["parameter_openapi_schema"]
    assert schema.get("properties"), schema
    page.goto(prefect_ui["form"], wait_until="load")
    page.get_by_text("Parameters", exact=True).wait_for()
    labels = [t.split(" (")[0] for t in page.locator(".schema-form-property__label").all_inner_texts()]
    assert labels == sorted(schema["properties"], key=lambda k: schema["properties"][k].get("position", 0)), labels
    page.screenshot(path=ARTIFACTS / "prefect-run-form.png", full_page=True)


def test_prefect_run_form_offers_the_flavour_choice(page, prefect_ui: dict) -> None:
    """`flavour` is a plain choice in the form: a select (no None/type toggle) showing params.yaml's flavour and
    listing klein-4b, klein-9b and dev (and the tiny test models); `steps` shows params.yaml's steps."""
    flavour = prefect_ui["deployment"]["parameter_openapi_schema"].get("properties", {}).get("flavour")
    assert flavour, "the flow has no `flavour` parameter (flows/train.py)"
    choices = flavour.get("enum")
    assert choices and set(REAL_FLAVOURS) <= set(choices) and flavour.get("default") == FORM_FLAVOUR, flavour

    page.goto(prefect_ui["form"], wait_until="load")
    page.get_by_text("Parameters", exact=True).wait_for()
    steps = form_property(page, "steps").locator("input").first
    steps.wait_for()
    assert steps.input_value() == str(FORM_STEPS)
    field = form_property(page, "flavour")
    field.wait_for()
    assert field.get_by_role("button", name="None", exact=True).count() == 0  # no type toggle
    select = field.locator(".p-select-button__control")
    select.first.wait_for()
    assert FORM_FLAVOUR in select.first.inner_text()
    page.screenshot(path=ARTIFACTS / "prefect-run-form-defaults.png", full_page=True)
    select.first.click()
    options = page.get_by_role("option")
    if options.count() == 0:  # the select opens on the keyboard when the click only focused it
        select.first.press("ArrowDown")
    options.first.wait_for()
    assert options.all_inner_texts() == choices
    page.screenshot(path=ARTIFACTS / "prefect-flavour-choice.png", full_page=True)
