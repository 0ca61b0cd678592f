"""docs/explorer.png: the explorer page on a checkpoint, in headless Chromium (playwright).

    python scripts/explorer_screenshot.py --ckpt out/shakespeare_char [--out docs/explorer.png]

Starts minilm-serve on the checkpoint, types a prompt, sets temperature 0.8, top-k 12 and top-p
0.9, generates 100 tokens with seed 7, hovers one of them (its alternatives), and saves the page.
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

            def settle(action) -> None:
                version = int(page.get_attribute("#dist", "data-version"))
                action()
                page.wait_for_function(  # a render of the latest settings (see the page test)
                    f"(d => Number(d.dataset.version) > {version} && d.dataset.busy === 'false')"
                    "(document.querySelector('#dist'))")

            settle(lambda: page.fill("#prompt", args.prompt))
            for name, value in (("temperature", "0.8"), ("top_k", "12"), ("top_p", "0.9")):
                settle(lambda: page.fill(f"#ctl-{name}", value))
            page.fill("#max-tokens", "100")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_selector("#output[data-state=done]", timeout=120000)
            page.locator("#output .gen").nth(22).hover()
            page.wait_for_selector("#tooltip .alt")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
