"""The chat page in headless Chromium (Debian's chromium package), driven over the DevTools protocol.

Skipped where chromium is not installed. R1KIT_SCREENSHOT_DIR=docs keeps the screenshot.
"""

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_serve import CONTENT, REASONING, Server

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=900,560", "--remote-debugging-port=0"]


class Browser:
    """Just enough of the DevTools protocol: navigate, evaluate, screenshot."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            assert time.time() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws_url, self.ws = page["webSocketDebuggerUrl"], None
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_chat_page_streams_with_the_thinking_block_open(scripted_dir, tmp_path):
    from websockets.sync.client import connect

    server = Server(scripted_dir, api_key=None)
    browser = Browser(tmp_path / "profile")
    try:
        with connect(browser.ws_url, max_size=2**25) as browser.ws:
            browser.call("Page.navigate", url=server.url + "/?q=" + urllib.parse.quote("What is 2 + 2?"))
            answer = "document.querySelector('.assistant .text')?.textContent"
            deadline = time.time() + 60
            while browser.evaluate(answer) != CONTENT:
                assert time.time() < deadline, f"the answer never completed: {browser.evaluate(answer)!r}"
                time.sleep(0.1)
            assert browser.evaluate("document.querySelector('details.thinking').open") is True
            assert browser.evaluate("document.querySelector('details.thinking .trace').textContent") == REASONING
            summary = browser.evaluate("document.querySelector('details.thinking summary').textContent")
            assert summary.startswith("Thinking · 23 characters · ")
            header = browser.evaluate("document.getElementById('sha').textContent")
            assert header == "sha256 " + server.served.sha256
            png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
        server.stop()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (Path(os.environ.get("R1KIT_SCREENSHOT_DIR", tmp_path)) / "chat.png").write_bytes(png)
