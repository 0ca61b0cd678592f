"""The explorer page in a real headless Chromium, driven by playwright, against the test server:
load /, type a prompt, move the temperature slider and watch the bars change, click a token,
Generate, and continue from an alternative of a generated token; the controls built from the
server's description of the sampler, the stage order dragged and its presets, the logit lens of a
clicked token, the GLTR rank colours and the temperature sweep, each checked against the API."""
import json
import math

import httpx
import pytest

from browser import chromium

pytestmark = pytest.mark.slow  # a Chromium and a server


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def final_probs(page) -> list[float]:
    return [float(x) for x in page.eval_on_selector_all(
        "#dist tbody td.final .cell", "cells => cells.map(c => c.dataset.p)")]


def stage_names(page) -> list[str]:
    return page.eval_on_selector_all("#dist thead .stage-name", "s => s.map(x => x.textContent)")


def wait_for_render(page, after: int, element: str = "#dist") -> int:
    """Until a render newer than `after` shows the latest settings (no refresh still running: a
    render of a request sent before the last change does not count)."""
    page.wait_for_function(f"(d => Number(d.dataset.version) > {after} && d.dataset.busy === 'false')"
                           f"(document.querySelector('{element}'))")
    return int(page.get_attribute(element, "data-version"))


def settled(page, action, *elements: str) -> None:
    """Do `action`, then wait until each element re-rendered with the latest state."""
    versions = {e: int(page.get_attribute(e, "data-version")) for e in elements}
    action()
    for e, version in versions.items():
        wait_for_render(page, version, e)


def open_page(browser, server, errors: list):
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    for element in ("#dist", "#lens", "#sweep"):
        wait_for_render(page, 0, element)
    return page


def generate(page, tokens: int, seed: int) -> list[str]:
    page.fill("#max-tokens", str(tokens))
    page.fill("#seed", str(seed))
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]", timeout=30000)
    return page.locator("#output .gen").all_inner_texts()


def api(server, path: str, **body) -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_explorer_page(browser, server, tmp_path):
    errors = []
    page = open_page(browser, server, errors)
    version = int(page.get_attribute("#dist", "data-version"))
    assert page.locator("#dist tbody tr").count() == 20

    # type a prompt: the table follows
    page.fill("#prompt", "JULIET:\nAy")
    version = wait_for_render(page, version)
    assert page.inner_text("#prompt-info") == f"{len('JULIET:' + chr(10) + 'Ay')} tokens"
    assert stage_names(page) == ["model (T = 1)"]
    before = final_probs(page)

    # drag... well, click the temperature slider a quarter of the way along: T ~ 0.5
    box = page.locator("#ctl-temperature").bounding_box()
    page.mouse.click(box["x"] + 0.25 * box["width"], box["y"] + box["height"] / 2)
    version = wait_for_render(page, version)
    temperature = float(page.input_value("#ctl-temperature"))
    assert 0.3 < temperature < 0.7
    assert stage_names(page) == ["model (T = 1)", "temperature"]
    after = final_probs(page)
    assert after[0] > before[0] and after != before  # a lower temperature sharpens the top

    # the bars are the server's numbers for these settings
    table = api(server, "/v1/distribution", prompt="JULIET:\nAy", temperature=temperature)
    assert after == pytest.approx([t["probs"][-1] for t in table["tokens"]], abs=1e-12)

    # click the top token: it is appended to the prompt
    first = page.locator("#dist tbody tr").first
    token = table["tokens"][0]
    assert first.get_attribute("data-id") == str(token["id"])
    first.click()
    version = wait_for_render(page, version)
    assert page.input_value("#prompt") == "JULIET:\nAy" + token["text"]

    # Generate: streamed tokens, each coloured by its probability; the same text the API gives
    texts = generate(page, 12, 5)
    spans = page.locator("#output .gen")
    completion = api(server, "/v1/completions", prompt="JULIET:\nAy" + token["text"],
                     max_tokens=12, seed=5, temperature=temperature, logprobs=0)
    assert texts == completion["choices"][0]["logprobs"]["tokens"]
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


OWN_CONTROL = ("token_bias", "order")  # knobs with a control of their own (bias editor, order list)


def test_the_controls_are_the_servers_description_of_the_sampler(browser, server):
    """Every knob GET /v1/sampler_settings describes is a control with its slider span; the stage
    list is the default order; a stage's parameters show while it is on; a new stage's effect is
    the server's."""
    schema = httpx.get(f"{server.url}/v1/sampler_settings").json()
    errors = []
    page = open_page(browser, server, errors)
    controls = page.eval_on_selector_all("#knobs .knob", "ks => ks.map(k => k.dataset.knob)")
    knobs = [k for k in schema["knobs"] if k["type"] not in OWN_CONTROL]
    assert sorted(controls) == sorted(k["name"] for k in knobs)
    for k in knobs:
        control = page.locator(f"#ctl-{k['name']}")
        if k["ui"]:
            span = control.evaluate("c => [c.type, Number(c.min), Number(c.max), Number(c.step)]")
            assert span == ["range", k["ui"]["min"], k["ui"]["max"], k["ui"]["step"]]
        assert page.locator(f"[data-knob={k['name']}]").get_attribute("title") == k["help"]
        assert page.is_visible(f"[data-knob={k['name']}]") == k["switch"]  # all stages are off
    order = page.eval_on_selector_all("#stage-order li", "li => li.map(x => x.dataset.stage)")
    assert order == schema["orders"]["default"]
    pinned = page.eval_on_selector_all("#stage-order li[draggable=false]",
                                       "li => li.map(x => x.dataset.stage)")
    assert pinned == [schema["first_stage"], schema["last_stage"]]

    # XTC on: its threshold shows; top-nσ on: a stage of the table, with the server's numbers
    settled(page, lambda: page.fill("#ctl-xtc_probability", "0.5"), "#dist")
    assert page.is_visible("[data-knob=xtc_threshold]")
    settled(page, lambda: page.fill("#ctl-xtc_probability", "0"), "#dist")
    assert page.is_hidden("[data-knob=xtc_threshold]")
    settled(page, lambda: page.fill("#ctl-top_n_sigma", "1"), "#dist")
    assert stage_names(page) == ["model (T = 1)", "top_n_sigma"]
    table = api(server, "/v1/distribution", prompt="ROMEO:", top_n_sigma=1.0)
    assert final_probs(page) == pytest.approx([t["probs"][-1] for t in table["tokens"]],
                                              abs=1e-12)
    assert errors == []
    page.close()


def test_a_new_stage_in_the_servers_description_becomes_a_control(browser, server):
    """The page holds no copy of the knobs: whatever the server describes is a control, its value
    goes into every request and its stage into the order."""
    schema = httpx.get(f"{server.url}/v1/sampler_settings").json()
    schema["knobs"] += [
        dict(name="wobble_strength", type="number", default=0, stage="wobble", switch=True,
             off=dict(equals=0), help="a stage the page has never heard of",
             ui=dict(min=0, max=3, step=0.5)),
        dict(name="wobble_mode", type="choice", default=0, choices=[0, 1], stage="wobble",
             switch=False, off=None, help="its parameter", ui=None)]
    schema["stages"].insert(-1, "wobble")
    for order in schema["orders"].values():
        order.insert(-1, "wobble")  # before the last stage, which stays last
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    page.route("**/v1/sampler_settings", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(schema)))
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/distribution") else None)
    page.goto(server.url + "/")
    version = wait_for_render(page, 0)

    controls = page.eval_on_selector_all("#knobs .knob", "ks => ks.map(k => k.dataset.knob)")
    assert controls[-2:] == ["wobble_strength", "wobble_mode"]
    assert page.locator("[data-knob=wobble_strength]").get_attribute("title") == \
        "a stage the page has never heard of"
    assert page.is_hidden("[data-knob=wobble_mode]")  # a parameter shows while its stage is on
    order = page.eval_on_selector_all("#stage-order li", "li => li.map(x => x.dataset.stage)")
    assert order == schema["orders"]["default"]

    page.fill("#ctl-wobble_strength", "1.5")  # the real server ignores a field it does not know
    wait_for_render(page, version)
    assert page.is_visible("[data-knob=wobble_mode]")
    assert page.inner_text("#out-wobble_strength") == "1.5"
    assert sent[-1]["wobble_strength"] == 1.5 and sent[-1]["wobble_mode"] == 0
    assert sent[-1]["order"] == "default"  # a preset goes by its name
    assert "wobble" in page.inner_text("#chain")
    page.close()


def test_the_stage_order_drags_and_its_presets_are_one_click(browser, server):
    errors = []
    page = open_page(browser, server, errors)
    settled(page, lambda: page.fill("#ctl-temperature", "0.5"), "#dist")
    settled(page, lambda: page.fill("#ctl-top_k", "5"), "#dist")
    assert stage_names(page) == ["model (T = 1)", "temperature", "top_k"]
    assert page.get_attribute("#stage-order", "data-preset") == "default"
    used = page.eval_on_selector_all("#stage-order li.used", "li => li.map(x => x.dataset.stage)")
    assert used == ["temperature", "top_k"]

    # drag top_k above temperature: the sampler runs them in that order
    top_k = page.locator("#stage-order li[data-stage=top_k]")
    temperature = page.locator("#stage-order li[data-stage=temperature]")
    settled(page, lambda: top_k.drag_to(temperature, target_position=dict(x=10, y=2)), "#dist")
    assert stage_names(page) == ["model (T = 1)", "top_k", "temperature"]
    assert page.get_attribute("#stage-order", "data-preset") == "custom"
    order = page.eval_on_selector_all("#stage-order li", "li => li.map(x => x.dataset.stage)")
    assert order.index("top_k") == order.index("temperature") - 1
    table = api(server, "/v1/distribution", prompt="ROMEO:", temperature=0.5, top_k=5,
                order=order)
    assert final_probs(page) == pytest.approx([t["probs"][-1] for t in table["tokens"]],
                                              abs=1e-12)

    # the presets: one click each
    settled(page, lambda: page.click("#order-presets button[data-order='default']"), "#dist")
    assert stage_names(page) == ["model (T = 1)", "temperature", "top_k"]
    settled(page, lambda: page.click("#order-presets button[data-order='llama.cpp']"), "#dist")
    assert stage_names(page) == ["model (T = 1)", "top_k", "temperature"]
    assert page.get_attribute("#stage-order", "data-preset") == "llama.cpp"
    llama = page.eval_on_selector_all("#stage-order li", "li => li.map(x => x.dataset.stage)")
    schema = httpx.get(f"{server.url}/v1/sampler_settings").json()
    assert llama == schema["orders"]["llama.cpp"]

    # and without a mouse: Alt + arrow keys
    page.focus("#stage-order li[data-stage=temperature]")
    settled(page, lambda: page.keyboard.press("Alt+ArrowUp"), "#dist")
    order = page.eval_on_selector_all("#stage-order li", "li => li.map(x => x.dataset.stage)")
    i = llama.index("temperature")
    assert order == llama[:i - 1] + ["temperature", llama[i - 1]] + llama[i + 1:]
    assert errors == []
    page.close()


def lens_grid(page) -> list[dict]:
    return page.eval_on_selector_all("#lens tbody tr", """rows => rows.map(r => ({
        name: r.querySelector('th').textContent,
        rank: Number(r.querySelectorAll('td.num')[1].textContent),
        ids: [...r.querySelectorAll('.lens-cell')].map(c => Number(c.dataset.id)),
        probs: [...r.querySelectorAll('.lens-cell')].map(c => Number(c.dataset.p)),
        choice: [...r.querySelectorAll('.lens-cell.choice')].map(c => Number(c.dataset.id)),
        chosen: [...r.querySelectorAll('.lens-cell.chosen')].map(c => Number(c.dataset.id))}))""")


def assert_grid_is(grid: list[dict], lens: dict, chosen: int | None = None) -> None:
    assert [row["name"] for row in grid] == [layer["name"] for layer in lens["layers"]]
    for row, layer in zip(grid, lens["layers"]):
        assert row["ids"] == [t["id"] for t in layer["top"]]
        assert row["probs"] == pytest.approx([math.exp(t["logprob"]) for t in layer["top"]],
                                             abs=1e-12)
        assert row["rank"] == layer["rank"]
        assert row["choice"] == [lens["choice"]["id"]] * (lens["choice"]["id"] in row["ids"])
        assert row["chosen"] == [chosen] * (chosen in row["ids"])


def test_the_lens_of_the_prompt_and_of_a_clicked_token(browser, server):
    errors = []
    page = open_page(browser, server, errors)
    lens = api(server, "/v1/lens", prompt="ROMEO:", top_n=8)
    assert len(lens["layers"]) == 3  # the test model: 2 blocks
    assert_grid_is(lens_grid(page), lens)
    assert "the prompt's next token" in page.inner_text("#lens-where")

    texts = generate(page, 10, 4)
    completion = api(server, "/v1/completions", prompt="ROMEO:", max_tokens=10, seed=4,
                     return_token_ids=True)
    ids = completion["choices"][0]["token_ids"]
    prompt = api(server, "/v1/lens", prompt="ROMEO:")["prompt_token_ids"]
    settled(page, lambda: page.locator("#output .gen").nth(4).click(), "#lens", "#sweep")
    lens = api(server, "/v1/lens", prompt=prompt + ids[:4], top_n=8)
    assert_grid_is(lens_grid(page), lens, chosen=ids[4])
    shown = texts[4].replace(" ", "␣").replace("\n", "↵")
    assert f"generated token 5 ({shown})" in page.inner_text("#lens-where")
    assert page.locator("#output .gen.selected").count() == 1

    settled(page, lambda: page.click("#lens-where button"), "#lens")
    assert_grid_is(lens_grid(page), api(server, "/v1/lens", prompt="ROMEO:", top_n=8))
    assert errors == []
    page.close()


def test_rank_colours_are_the_servers_ranks(browser, server):
    errors = []
    page = open_page(browser, server, errors)
    buckets = page.evaluate("[1, 10, 11, 100, 101, 1000, 1001].map(r => rankBucket(r).label)")
    assert buckets == ["top 10", "top 10", "top 100", "top 100", "top 1000", "top 1000", "beyond"]
    settled(page, lambda: page.fill("#ctl-temperature", "1.8"), "#dist")  # unlikely tokens too
    generate(page, 30, 11)
    page.select_option("#colour-mode", "rank")
    page.wait_for_selector("#output[data-state=done]")
    spans = page.eval_on_selector_all("#output .gen", "s => s.map(x => [x.dataset.rank, "
                                      "getComputedStyle(x).backgroundColor])")
    completion = api(server, "/v1/completions", prompt="ROMEO:", max_tokens=30, seed=11,
                     temperature=1.8, return_token_ids=True)
    ids = completion["choices"][0]["token_ids"]
    prompt = api(server, "/v1/lens", prompt="ROMEO:")["prompt_token_ids"]
    scores = api(server, "/v1/score", prompt=prompt + ids)["tokens"][len(prompt) - 1:]
    assert [int(rank) for rank, _ in spans] == [t["rank"] for t in scores]
    colours = {"top 10": "rgb(185, 245, 166)", "top 100": "rgb(255, 233, 138)"}
    assert {rank_label(t["rank"]) for t in scores} == set(colours)  # both seen (vocabulary 62)
    assert [colour for _, colour in spans] == [colours[rank_label(t["rank"])] for t in scores]
    assert "top 1000" in page.inner_text("#legend")

    page.select_option("#colour-mode", "raw")  # back to probabilities: today's colours
    backgrounds = page.eval_on_selector_all("#output .gen", "s => s.map(x => x.style.background)")
    assert all(b.startswith("rgb") and b not in colours.values() for b in backgrounds)
    assert errors == []
    page.close()


def rank_label(rank: int) -> str:
    return next(label for top, label in ((10, "top 10"), (100, "top 100"), (1000, "top 1000"),
                                         (math.inf, "beyond")) if rank <= top)


def test_the_temperature_sweep_chart(browser, server):
    errors = []
    page = open_page(browser, server, errors)
    points = page.eval_on_selector_all("#sweep circle.pt", "cs => cs.map(c => [c.classList[1], "
                                       "Number(c.dataset.t), Number(c.dataset.v), "
                                       "Number(c.getAttribute('cy'))])")
    sweep = api(server, "/v1/temperature_sweep", prompt="ROMEO:")
    entropy = [(t, v, cy) for kind, t, v, cy in points if kind == "entropy"]
    top = [(t, v, cy) for kind, t, v, cy in points if kind == "top"]
    assert [t for t, _, _ in entropy] == sweep["temperatures"] == [t for t, _, _ in top]
    assert [v for _, v, _ in entropy] == pytest.approx(sweep["entropy"], abs=1e-12)
    assert [v for _, v, _ in top] == pytest.approx(sweep["top_prob"], abs=1e-12)
    h_max = float(page.get_attribute("#sweep", "data-h-max"))
    assert h_max >= max(sweep["entropy"])
    for (_, h, cy_h), (_, p, cy_p) in zip(entropy, top):  # drawn where the values say
        assert cy_h == pytest.approx(168 - 156 * h / h_max, abs=0.06)
        assert cy_p == pytest.approx(168 - 156 * p, abs=0.06)

    settled(page, lambda: page.fill("#ctl-temperature", "0.37"), "#sweep")
    at = api(server, "/v1/temperature_sweep", prompt="ROMEO:", temperatures=[0.37])
    readout = page.inner_text("#sweep-readout")
    assert f"at T = 0.37: H = {at['entropy'][0]:.3f} nats, top p = {at['top_prob'][0]:.3f}" in readout
    assert float(page.get_attribute("#sweep line.now", "x1")) == pytest.approx(36 + 248 * 0.37 / 2)
    settled(page, lambda: page.fill("#ctl-temperature", "0"), "#sweep")
    assert "T = 0 (greedy)" in page.inner_text("#sweep-readout")
    assert errors == []
    page.close()
