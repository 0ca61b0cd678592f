"""docs/explorer.png: the explorer page on a checkpoint, in headless Chromium (playwright).

    python scripts/explorer_screenshot.py --ckpt out/shakespeare_char [--out docs/explorer.png]

Starts minilm-serve on the checkpoint, types a prompt, sets temperature 0.8, top-k 12 and top-p
0.9, drags top-k below top-p (a custom order), generates 100 tokens with seed 7 coloured by rank
(GLTR), clicks one of them (its logit lens and temperature sweep), and saves the page.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from browser import ARGS, find_chromium  # noqa: E402  (the page tests' Chromium finder)
from server_process import ServerProcess  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", default=str(ROOT / "docs" / "explorer.png"))
    p.add_argument("--prompt", default="ROMEO:\nWhat say you, my lord? ")
    p.add_argument("--token", type=int, default=22, help="the generated token to select")
    p.add_argument("--chromium", default=find_chromium())
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    server = ServerProcess(args.ckpt, "--log_level", "warning")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 900},
                                    device_scale_factor=1)
            page.goto(server.url + "/")
            page.wait_for_selector("#dist tbody tr")

            def settle(action, *elements: str) -> None:
                """Do `action`, then wait for a render of the latest state (see the page test)."""
                elements = elements or ("#dist",)
                versions = [int(page.get_attribute(e, "data-version")) for e in elements]
                action()
                for e, version in zip(elements, versions):
                    page.wait_for_function(
                        f"(d => Number(d.dataset.version) > {version} && d.dataset.busy === 'false')"
                        f"(document.querySelector('{e}'))")

            settle(lambda: page.fill("#prompt", args.prompt))
            for name, value in (("temperature", "0.8"), ("top_k", "12"), ("top_p", "0.9")):
                settle(lambda: page.fill(f"#ctl-{name}", value))
            top_k, top_p = (page.locator(f"#stage-order li[data-stage={s}]") for s in ("top_k", "top_p"))
            settle(lambda: top_k.drag_to(top_p, target_position=dict(x=10, y=18)))
            page.fill("#max-tokens", "100")
            page.fill("#seed", "7")
            page.select_option("#colour-mode", "rank")
            page.click("#generate")
            page.wait_for_selector("#output[data-state=done]", timeout=120000)
            settle(lambda: page.locator("#output .gen").nth(args.token).click(), "#lens", "#sweep")
            page.mouse.move(0, 0)  # the click hovered the token: let its alternatives go
            page.wait_for_selector("#tooltip", state="hidden")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
