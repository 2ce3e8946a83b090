"""The exit report: results, JSON round trip, and the page checked in headless Chromium.

The browser half needs Debian's `chromium` and `chromium-driver` and the `selenium`
package (`.ci/run` installs them); without them it skips with that reason, and CI turns
a skip into a failure.
"""

import json
import os
import re
import shutil

import keras
import numpy as np
import pytest

from tests.depth_dependent import make_depth_dependent
from toex_tf.analysis.report import (
    ReportSetting,
    collect_report,
    kl_strength_settings,
    load_results_json,
    save_results_json,
)
from toex_tf.analysis.report_html import layer_colour, render_report, write_report
from toex_tf.api import AdaptiveLM
from toex_tf.data.tokenizers import ByteTokenizer
from toex_tf.models import build_gpt, build_llama

NUM_LAYERS = 4
NEW_TOKENS = 8
PROMPTS = ["Hello", "<b>&x"]  # the same length in bytes (one trace per loop); HTML to escape


@pytest.fixture(scope="module")
def results():
    keras.utils.set_random_seed(0)
    model = build_gpt(
        "tiny", num_layers=NUM_LAYERS, exit_layers="all", max_length=32, vocab_size=260
    )
    model = make_depth_dependent(model, embedding_scale=8.0)
    lm = AdaptiveLM(model, ByteTokenizer())
    settings = kl_strength_settings(("unfrozen", "frozen", "lazy"), (1.0, 4.0), 0.9)
    calls = []
    results = collect_report(
        lm,
        PROMPTS,
        settings,
        max_new_tokens=NEW_TOKENS,
        timing_rounds=1,
        progress=lambda done, total, label: calls.append((done, total)),
    )
    assert calls[-1] == (len(PROMPTS) * 7, len(PROMPTS) * 7)
    return results


def test_results_hold_every_prompt_and_setting_with_consistent_stats(results):
    assert results["settings"][0]["mode"] == "full"
    assert [s["threshold"] for s in results["settings"][1:3]] == [0.9, round(0.9**0.25, 6)]
    assert len(results["runs"]) == len(PROMPTS) * len(results["settings"])
    early = 0
    for run in results["runs"]:
        layers = [token["exit_layer"] for token in run["tokens"]]
        stats = run["stats"]
        assert stats["tokens"] == len(layers) == NEW_TOKENS
        assert sum(stats["histogram"]) == len(layers)
        assert stats["avg_exit_layer"] == pytest.approx(np.mean(layers))
        assert stats["exit_rate"] == pytest.approx(np.mean(np.asarray(layers) < NUM_LAYERS))
        full = next(
            r for r in results["runs"] if r["prompt"] == run["prompt"] and r["setting"] == 0
        )
        same = np.mean([a["id"] == b["id"] for a, b in zip(run["tokens"], full["tokens"])])
        assert stats["agreement"] == pytest.approx(same)
        mode = results["settings"][run["setting"]]["mode"]
        if mode != "full":
            assert len(run["decision_layers"]) == NUM_LAYERS - 1
            for token in run["tokens"][1:]:  # the first token comes from the prompt pass
                assert len(token["confidences"]) == NUM_LAYERS - 1
                assert len(token["alternatives"]) == 5
        early += sum(layer < NUM_LAYERS for layer in layers)
        if mode in ("frozen", "lazy"):
            assert stats["ideal_speedup"] == pytest.approx(NUM_LAYERS / np.mean(layers))
    assert early > 0, "the fixture model must exit early somewhere"
    summary = results["summary"][1]
    rows = [r["stats"] for r in results["runs"] if r["setting"] == 1]
    assert summary["tokens"] == sum(r["tokens"] for r in rows)
    assert summary["histogram"] == list(np.sum([r["histogram"] for r in rows], axis=0))


def test_json_round_trip_rebuilds_the_same_page(results, tmp_path):
    path = save_results_json(results, str(tmp_path / "report.json"))
    loaded = load_results_json(path)
    assert loaded == json.loads(json.dumps(results))
    assert render_report(loaded) == render_report(results)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not toex_tf report results"),
        ('{"format": "toex_tf.report", "version": 99}', "version 99"),
        ('{"format": "toex_tf.report", "version": 1, "model": {}}', "lacks"),
    ],
)
def test_load_results_json_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_results_json(str(path))
    with pytest.raises(ValueError, match="do not exist"):
        load_results_json(str(tmp_path / "missing.json"))


def test_bad_report_arguments_are_named():
    with pytest.raises(ValueError, match="base_threshold"):
        kl_strength_settings(base_threshold=1.5)
    with pytest.raises(ValueError, match="KL strengths"):
        kl_strength_settings(strengths=(1.0, -2.0))
    with pytest.raises(ValueError, match="layer must be in"):
        layer_colour(5, 4)
    with pytest.raises(ValueError, match="prompts is empty"):
        collect_report(None, [], [ReportSetting("frozen", "kl", 0.5)])


def test_a_llama_report_too():
    """Any family: the report reads only the `AdaptiveLM` interface."""
    model = build_llama("llama-tiny", vocab_size=260, capacity=1.0)
    lm = AdaptiveLM(model, ByteTokenizer())
    setting = ReportSetting("frozen", "max_prob", 0.0)  # every token leaves at layer 1
    results = collect_report(lm, ["Hi"], [setting], max_new_tokens=4, timing_rounds=1)
    frozen = results["runs"][1]
    assert [token["exit_layer"] for token in frozen["tokens"]] == [2, 1, 1, 1]
    assert frozen["decision_layers"] == [1] and results["model"]["name"] == "HierarchicalLlama"
    assert render_report(results).count('class="tok"') == 8


def test_page_is_self_contained_and_escapes_text(results):
    page = render_report(results)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<b>&x" not in page and "&lt;b&gt;&amp;x" in page
    # Colour is never the only cue: every token carries its layer in its label.
    assert page.count('aria-label="token ') == sum(len(r["tokens"]) for r in results["runs"])


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install ...)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (test extra)")
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1600",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_report_in_headless_chromium(results, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import Select  # noqa: PLC0415

    output_dir = tmp_path / "report"
    output_dir.mkdir()
    page = write_report(results, str(output_dir / "report.html"))
    browser.get(f"file://{page}")

    # Every generated token is on the page, in order, coloured by its exit layer.
    tokens = browser.execute_script(
        "return Array.from(document.querySelectorAll('.tok')).map(e => "
        "[+e.dataset.run, +e.dataset.token, +e.dataset.layer, "
        "getComputedStyle(e).backgroundColor]);"
    )
    expected = [
        (r, t, token["exit_layer"])
        for r, run in enumerate(results["runs"])
        for t, token in enumerate(run["tokens"])
    ]
    assert [tuple(row[:3]) for row in tokens] == expected
    for run, token, layer, colour in tokens:
        assert colour == "rgb({}, {}, {})".format(*layer_colour(layer, NUM_LAYERS)), (run, token)
    assert len({row[3] for row in tokens}) > 1, "tokens at different layers, different colours"

    # Hovering a token that exited early shows its layer, confidences and alternatives.
    details = browser.find_element(By.ID, "details")
    assert not details.is_displayed()
    r, t = next((r, t) for r, t, layer, _ in tokens if layer < NUM_LAYERS and t > 0)
    element = browser.find_element(By.CSS_SELECTOR, f'.tok[data-run="{r}"][data-token="{t}"]')
    ActionChains(browser).move_to_element(element).perform()
    assert details.is_displayed()
    token = results["runs"][r]["tokens"][t]
    assert details.find_element(By.CLASS_NAME, "exit-layer").text == str(token["exit_layer"])
    cells = details.find_elements(By.CSS_SELECTOR, "table.conf td")
    decided = results["runs"][r]["decision_layers"].index(token["exit_layer"])
    assert cells[2 * decided + 1].text == f"{token['confidences'][decided]:.4f}"
    assert len(details.find_elements(By.CSS_SELECTOR, "ol.alts li")) == 5
    # Keyboard: focusing another token shows that one.
    other = browser.find_element(By.CSS_SELECTOR, '.tok[data-run="0"][data-token="0"]')
    browser.execute_script("arguments[0].focus();", other)
    layer = str(results["runs"][0]["tokens"][0]["exit_layer"])
    assert details.find_element(By.CLASS_NAME, "exit-layer").text == layer

    # The comparison grid sorts, both ways, and switches between all prompts and one.
    column = 7  # avg layer

    def shown_values():
        return browser.execute_script(
            f"return Array.from(document.querySelectorAll('#grid tbody tr'))"
            f".filter(r => !r.hidden).map(r => parseFloat(r.cells[{column}].dataset.sort));"
        )

    before = shown_values()
    assert len(before) == len(results["settings"])
    assert before != sorted(before), "full depth (the deepest) comes first unsorted"
    button = browser.find_element(By.CSS_SELECTOR, f'#grid th button[data-column="{column}"]')
    button.click()
    ascending = shown_values()
    assert ascending == sorted(before)
    button.click()
    assert shown_values() == sorted(before, reverse=True)
    Select(browser.find_element(By.ID, "prompt-filter")).select_by_value("1")
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('#grid tbody tr'))"
        ".filter(r => !r.hidden).map(r => r.dataset.prompt);"
    )
    assert rows == ["1"] * len(results["settings"])

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    screenshot = output_dir / "report.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(screenshot) > 10_000
