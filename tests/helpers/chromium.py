"""Headless Chromium over the DevTools protocol, for tests that must see a page load for real:
every image decoded, every <audio> loaded its file, no console error or uncaught exception.
Without Chromium the ``browser`` fixture skips locally and fails under CI (CI set)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

CHECK_JS = """(async () => {
  const wait = (el, ok, events) => ok(el) ? null : new Promise(res => {
    for (const e of events) el.addEventListener(e, res, {once: true});
    setTimeout(res, 5000);
  });
  const audios = [...document.querySelectorAll('audio')], images = [...document.images];
  await Promise.all(audios.map(a => wait(a, a => a.readyState >= 1 || a.error, ['loadedmetadata', 'error'])));
  await Promise.all(images.map(i => wait(i, i => i.complete, ['load', 'error'])));
  return {
    title: document.title, text: document.body.innerText,
    images: images.map(i => ({src: i.getAttribute('src'), width: i.naturalWidth})),
    audios: audios.map(a => ({src: a.getAttribute('src'), readyState: a.readyState,
                              duration: a.duration, error: a.error && a.error.code})),
  };
})()"""


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (NUL-separated JSON on fds 3/4).

    file:// <audio> loads its metadata (readyState 4) without --allow-file-access-from-files or an
    autoplay policy: nothing is played, so neither is passed.
    """

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--mute-audio",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-dev-shm-usage"]

    def __init__(self, binary: str, profile: Path):
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads fd 3
        self._evt_r, evt_w = os.pipe()  # Chromium writes replies/events to fd 4

        def fds():  # runs in the child before exec
            os.dup2(cmd_r, 3)
            os.dup2(evt_w, 4)

        self.log = profile / "chromium.log"  # its stderr, quoted when it stops answering
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                         stdout=log, stderr=log, pass_fds=(3, 4), preexec_fn=fds)
        os.close(cmd_r)
        os.close(evt_w)
        self._next_id, self._inbox = 0, queue.Queue()
        self._events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        with os.fdopen(self._evt_r, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                buf += chunk
                *msgs, buf = buf.split(b"\0")
                for m in msgs:
                    self._inbox.put(json.loads(m))

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 15.0) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(self._trouble(f"exited before {method}")) from None
        while True:
            reply = self._pump(timeout, f"{method} reply")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _pump(self, timeout: float, waiting_for: str) -> dict:
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(self._trouble(f"no {waiting_for} within {timeout:.0f} s")) from None
        if "method" in msg:
            self._events.append(msg)
        return msg

    def _trouble(self, what: str) -> str:
        tail = self.log.read_text(errors="replace")[-2000:]
        return f"Chromium (exit code {self.proc.poll()}): {what}; its log ends:\n{tail}"

    def check_page(self, html: Path) -> dict:
        """Load ``html`` in a fresh tab; return CHECK_JS's findings plus ``console_errors``."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Runtime", "Log", "Page"):
                self.call(f"{domain}.enable", session=session)
            self.call("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
            while not any(e["method"] == "Page.loadEventFired" and e.get("sessionId") == session
                          for e in self._events):
                self._pump(15.0, "load event")
            found = self.call("Runtime.evaluate", {"expression": CHECK_JS, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)
            if "exceptionDetails" in found:
                raise RuntimeError(f"check script failed: {found['exceptionDetails']}")
            result = found["result"]["value"]
            result["console_errors"] = [_console_error(e) for e in self._events
                                        if e.get("sessionId") == session and _console_error(e)]
            return result
        finally:
            self.call("Target.closeTarget", {"targetId": target})

    def close(self):
        try:
            self.call("Browser.close", timeout=5.0)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


def _console_error(event: dict) -> str | None:
    """Text of a console.error/assert, an uncaught exception or an error log entry; else None."""
    method, p = event["method"], event.get("params", {})
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        return "console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
    if method == "Runtime.exceptionThrown":
        d = p["exceptionDetails"]
        return "exception: " + d.get("exception", {}).get("description", d.get("text", ""))
    if method == "Log.entryAdded" and p["entry"]["level"] == "error":
        return f"log: {p['entry']['text']} {p['entry'].get('url', '')}".strip()
    return None


def page_problems(found: dict) -> list[str]:
    """Everything that did not load, as readable lines; [] for a good page."""
    problems = [f"image not loaded: {i['src']}" for i in found["images"] if not i["width"]]
    problems += [f"audio not loaded: {a['src']} (error={a['error']}, readyState={a['readyState']}, "
                 f"duration={a['duration']})" for a in found["audios"]
                 if a["error"] or a["readyState"] < 1 or not (a["duration"] or 0) > 0]
    return problems + found["console_errors"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        reason = "chromium is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the browser checks may not be skipped")
        pytest.skip(reason)
    b = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


