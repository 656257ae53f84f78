"""The Dagster UI in a real headless browser (Chromium driven by Selenium) over planted-gemma's chain at two
layers: a plot and the report open whole at a readable width, the Partitions tab tells the two SAEs apart
(their keys differ only in the layer, which the partition list's truncation hides), and the feature browser
named in ``feature_classes``' metadata shows a planted feature's tokens. Every page is screenshotted into the
module's temporary folder (its path is printed; pytest keeps the last three runs)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from assets.plots import UI_PLOT_WIDTH  # noqa: E402
from core.report.plots import PLOT_FILES  # noqa: E402
from orchestration.resources import StoreResource  # noqa: E402
from tests.test_webserver import Served, graphql, served_chain  # noqa: E402

pytestmark = pytest.mark.system

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)

VIEWPORT = (1440, 900)  # a laptop screen
WAIT_S = 90  # the first page load compiles the asset graph on a busy machine
KEYS = [f"planted-gemma:layer_{layer}/width_512/average_l0_32" for layer in (0, 1)]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """The webserver over planted-gemma's layers 0 and 1, its one-off community sign-up dialog dismissed
    (Dagster shows it once per instance on localhost, over whatever page opens first)."""
    with served_chain(tmp_path_factory, [0, 1]) as server:
        graphql(server.port, "mutation { setNuxSeen }")
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a laptop-sized window."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """The folder the screenshots land in (printed with ``-s``)."""
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


def open_page(browser: webdriver.Chrome, url: str, ready: str) -> WebElement:
    """Load ``url`` and wait for the element at XPath ``ready``."""
    browser.get(url)
    return WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.XPATH, ready))


def metadata_row(label: str) -> str:
    """XPath of the metadata table row labelled ``label``."""
    return f"//tr[td[1][normalize-space()='{label}']]"


def open_markdown(browser: webdriver.Chrome, url: str, label: str) -> WebElement:
    """Open the ``[Show Markdown]`` dialog of metadata entry ``label`` on the asset page ``url``; the dialog once
    every image in it has loaded and it has finished opening (Blueprint's ``bp5-overlay-enter-done``)."""
    open_page(browser, url, f"{metadata_row(label)}//a[normalize-space()='[Show Markdown]']").click()
    image = WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.CSS_SELECTOR, ".bp5-dialog img"))
    dialog = image.find_element(By.XPATH, "ancestor::div[contains(@class, 'bp5-dialog')]")
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.execute_script(  # loaded, and the opening animation over
            """return [...arguments[0].querySelectorAll('img')].every((i) => i.complete)
                  && arguments[0].closest('.bp5-overlay-content').classList.contains('bp5-overlay-enter-done')""",
            dialog,
        )
    )
    return dialog


def image_geometry(browser: webdriver.Chrome, image: WebElement) -> dict:
    """The image's natural width, its box on screen, its dialog's box and the window's width."""
    return browser.execute_script(
        """const image = arguments[0], box = image.getBoundingClientRect();
        const dialog = image.closest('.bp5-dialog').getBoundingClientRect();
        return {natural: image.naturalWidth, left: box.left, right: box.right, width: box.width,
                dialog_left: dialog.left, dialog_right: dialog.right, window: window.innerWidth};""",
        image,
    )


def assert_whole_and_readable(geometry: dict) -> None:
    """The image (``image_geometry``) is shown at no more than ``UI_PLOT_WIDTH`` pixels, unscaled, inside its
    dialog, which fits the window."""
    assert 0 < geometry["natural"] <= UI_PLOT_WIDTH
    assert geometry["width"] == geometry["natural"]  # drawn at its pixel size: nothing scaled down to illegible
    assert (
        geometry["dialog_left"] <= geometry["left"]
        and geometry["right"] <= geometry["dialog_right"] <= geometry["window"]
    )


def png_width(path: Path) -> int:
    """A PNG's width in pixels, from its IHDR chunk."""
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_plot_opens_whole_at_a_readable_width(served, browser, shots):
    base = f"http://127.0.0.1:{served.port}/assets"
    dialog = open_markdown(browser, f"{base}/plot_depth_profiles", "planted-gemma/plot")
    browser.save_screenshot(str(shots / "plot_depth_profiles.png"))
    image = dialog.find_element(By.CSS_SELECTOR, "img[alt^='planted-gemma']")
    geometry = image_geometry(browser, image)
    assert_whole_and_readable(geometry)
    drawn = served.data / "reports" / "planted-gemma" / PLOT_FILES["depth_profiles"]
    assert geometry["natural"] == UI_PLOT_WIDTH and png_width(drawn) > UI_PLOT_WIDTH  # the file keeps its resolution

    dialog = open_markdown(browser, f"{base}/claims_report", "planted-gemma/report")
    images = dialog.find_elements(By.CSS_SELECTOR, "img")
    assert len(images) >= 3  # the report's plots, inline between its paragraphs
    for image in images:
        assert_whole_and_readable(image_geometry(browser, image))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", images[0])
    browser.save_screenshot(str(shots / "claims_report.png"))


@pytest.mark.parametrize("layer", [0, 1])
def test_partition_detail_names_the_layer(served, browser, shots, layer):
    key = KEYS[layer]
    url = f"http://127.0.0.1:{served.port}/assets/lens_tables?view=partitions&partition={quote(key, safe='')}"
    row = open_page(browser, url, metadata_row("sae/layer"))
    assert row.find_element(By.XPATH, "td[2]").text == str(layer)
    assert browser.find_element(By.XPATH, f"{metadata_row('sae/sae_id')}/td[2]").text == key.partition(":")[2]
    labels = browser.find_elements(By.CSS_SELECTOR, "[data-tooltip^='planted-gemma:']")
    listed = {label.get_attribute("data-tooltip") for label in labels}
    assert set(KEYS) <= listed  # the truncated list labels carry the whole key as their hover tooltip
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    browser.save_screenshot(str(shots / f"partition_layer_{layer}.png"))


def shown_tokens(cell: WebElement) -> list[str]:
    """The token chips of a feature browser cell, as drawn (JSON-escaped, spaces kept)."""
    return [chip.get_attribute("textContent") for chip in cell.find_elements(By.CSS_SELECTOR, ".tok")]


def test_feature_lookup_shows_a_planted_features_tokens(served, browser, shots):
    key = KEYS[0]
    url = f"http://127.0.0.1:{served.port}/assets/feature_classes?view=partitions&partition={quote(key, safe='')}"
    path = Path(open_page(browser, url, f"{metadata_row('feature_browser')}/td[2]").text.strip())
    assert path.is_file() and path.resolve().is_relative_to((served.data / "browser").resolve())

    planted = served.truth["saes"][key.partition(":")[2]]["semantic_features"][0]
    group = served.truth["token_groups"][planted["output_group"]]
    vocabulary = StoreResource(data_dir=str(served.data)).tables().read("vocabulary", key)
    expected = {
        json.dumps(token, ensure_ascii=False)[1:-1]
        for token in vocabulary.loc[vocabulary["token_id"].isin(group["token_ids"]), "token"]
    }
    row = open_page(browser, f"{path.as_uri()}#{planted['index']}", f"//tr[@data-feature='{planted['index']}']")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rows tr")) == 1
    assert "output_predicting" in row.find_element(By.XPATH, "td[2]").text
    top = shown_tokens(row.find_element(By.XPATH, "td[4]"))[:5]
    assert sum(token in expected for token in top) >= 4, (top, sorted(expected))
    browser.save_screenshot(str(shots / "feature_browser_lookup.png"))

    search = browser.find_element(By.ID, "lookup")
    search.clear()
    search.send_keys(group["stem"])  # the planted group's stem: a token search lists the feature among others
    searched = "return decodeURIComponent(location.hash.slice(1))"  # the page records its query in the URL
    WebDriverWait(browser, WAIT_S).until(lambda b: b.execute_script(searched) == group["stem"])
    rows = browser.find_elements(By.CSS_SELECTOR, "#rows tr")
    assert str(planted["index"]) in {r.get_attribute("data-feature") for r in rows}
    assert all(any(group["stem"] in t.lower() for t in shown_tokens(r)) for r in rows)
    browser.save_screenshot(str(shots / "feature_browser_search.png"))
