"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol with websocket-client (a
kfp dependency): open a page, wait until a JavaScript condition holds, run some JavaScript, take a
screenshot; and `serving`, a local server (mlflow ui, mlflow models serve) for the time a page is
looked at. For the scripts that retake the README's pictures (readme_walk.py,
mlflow_compare_screenshot.py).

`offline=True` sends every http(s) request to a closed port on loopback (a proxy that refuses), so
a page that still loads something from the network shows it as missing: what a user without a
network would see. Pages on 127.0.0.1 (a local MLflow server) still load.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import websocket

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Page:
    """One browser tab: `open`, `js`, `wait_for`, `shot`."""

    def __init__(self, ws: websocket.WebSocket):
        self.ws = ws
        self.ids = iter(range(1, 1_000_000))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                return dict(msg.get("result", {}))

    def js(self, expr: str) -> Any:
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

    def open(self, url: str, width: int = 1400, height: int = 1000) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)

    def wait_for(self, condition: str, timeout_s: float, what: str) -> None:
        """Wait until the JavaScript expression `condition` is true; SystemExit naming `what` if not."""
        deadline = time.monotonic() + timeout_s
        while not self.js(condition):
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not happen within {timeout_s:.0f} s")
            time.sleep(0.5)

    def shot(self, out: Path, width: int, height: int | None = None) -> Path:
        """A PNG of the page from the top, `height` px high (default: the whole page)."""
        height = height or int(self.js("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"))
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(1)
        data = self.call("Page.captureScreenshot", format="png",
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out


@contextmanager
def serving(cmd: list[str], ready: str, log_path: Path, cwd: Path, env: dict[str, str] | None = None,
            timeout_s: float = 300) -> Iterator[float]:
    """Run the server `cmd` (its own process group, output to `log_path`) until the block ends;
    yields the seconds until the URL `ready` answered."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        start = time.monotonic()
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{cmd[0]} exited: see {log_path}")
                try:
                    urllib.request.urlopen(ready, timeout=2)
                    break
                except OSError:
                    if time.monotonic() - start > timeout_s:
                        raise SystemExit(f"{' '.join(cmd[:3])} did not answer within {timeout_s:.0f} s") from None
                    time.sleep(0.5)
            yield time.monotonic() - start
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def browser(width: int = 1400, offline: bool = False) -> Iterator[Page]:
    """A headless Chromium with one tab; closed (and its profile removed) on exit."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install chromium")
    port = free_port()
    extra = [f"--proxy-server=http://127.0.0.1:{free_port()}"] if offline else []  # loopback bypasses proxies
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.Popen(
            [chromium, *FLAGS, *extra, f"--user-data-dir={profile}", f"--window-size={width},1000",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("chromium's DevTools endpoint did not answer") from None
                    time.sleep(0.3)
            target = next(t for t in targets if t["type"] == "page")
            ws = websocket.create_connection(target["webSocketDebuggerUrl"], suppress_origin=True, timeout=120)
            try:
                yield Page(ws)
            finally:
                ws.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
