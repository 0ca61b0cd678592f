"""The explorer page in a real headless Chromium, driven by playwright, against the test server:
load /, type a prompt, move the temperature slider and watch the bars change, click a token,
Generate, and continue from an alternative of a generated token."""
import httpx
import pytest

from browser import chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def final_probs(page) -> list[float]:
    return [float(x) for x in page.eval_on_selector_all(
        "#dist tbody td.final .cell", "cells => cells.map(c => c.dataset.p)")]


def wait_for_render(page, after: int) -> int:
    """Until a render newer than `after` shows the latest settings (no refresh still running: a
    render of a request sent before the last change does not count)."""
    page.wait_for_function(f"(d => Number(d.dataset.version) > {after} && d.dataset.busy === 'false')"
                           f"(document.querySelector('#dist'))")
    return int(page.get_attribute("#dist", "data-version"))


def test_explorer_page(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    version = wait_for_render(page, 0)
    assert page.locator("#dist tbody tr").count() == 20

    # type a prompt: the table follows
    page.fill("#prompt", "JULIET:\nAy")
    version = wait_for_render(page, version)
    assert page.inner_text("#prompt-info") == f"{len('JULIET:' + chr(10) + 'Ay')} tokens"
    stages = page.eval_on_selector_all("#dist thead .stage-name", "s => s.map(x => x.textContent)")
    assert stages == ["model (T = 1)"]
    before = final_probs(page)

    # drag... well, click the temperature slider a quarter of the way along: T ~ 0.5
    box = page.locator("#ctl-temperature").bounding_box()
    page.mouse.click(box["x"] + 0.25 * box["width"], box["y"] + box["height"] / 2)
    version = wait_for_render(page, version)
    temperature = float(page.input_value("#ctl-temperature"))
    assert 0.3 < temperature < 0.7
    stages = page.eval_on_selector_all("#dist thead .stage-name", "s => s.map(x => x.textContent)")
    assert stages == ["model (T = 1)", "temperature"]
    after = final_probs(page)
    assert after[0] > before[0] and after != before  # a lower temperature sharpens the top

    # the bars are the server's numbers for these settings
    table = httpx.post(f"{server.url}/v1/distribution",
                       json=dict(prompt="JULIET:\nAy", temperature=temperature)).json()
    assert after == pytest.approx([t["probs"][-1] for t in table["tokens"]], abs=1e-12)

    # click the top token: it is appended to the prompt
    first = page.locator("#dist tbody tr").first
    token = table["tokens"][0]
    assert first.get_attribute("data-id") == str(token["id"])
    first.click()
    version = wait_for_render(page, version)
    assert page.input_value("#prompt") == "JULIET:\nAy" + token["text"]

    # Generate: streamed tokens, each coloured by its probability; the same text the API gives
    page.fill("#max-tokens", "12")
    page.fill("#seed", "5")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]", timeout=30000)
    spans = page.locator("#output .gen")
    texts = spans.all_inner_texts()
    api = httpx.post(f"{server.url}/v1/completions", json=dict(
        prompt="JULIET:\nAy" + token["text"], max_tokens=12, seed=5, temperature=temperature,
        logprobs=0)).json()
    assert texts == api["choices"][0]["logprobs"]["tokens"]
    assert all(spans.nth(i).evaluate("s => s.style.background") for i in range(len(texts)))

    # hover a generated token: its alternatives; click another one to continue from there
    spans.nth(3).hover()
    page.wait_for_selector("#tooltip .alt")
    alternative = page.locator("#tooltip .alt:not(.chosen)").first
    alt_text = alternative.locator(".tok").inner_text()
    page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
    alternative.click()
    version = wait_for_render(page, version)
    page.wait_for_selector("#output[data-state=done]", timeout=30000)
    prompt = page.input_value("#prompt")
    expected = "JULIET:\nAy" + token["text"] + "".join(texts[:3])
    shown = alt_text.replace("␣", " ").replace("↵", "\n")
    assert prompt == expected + shown
    assert errors == []
    page.close()
