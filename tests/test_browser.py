"""The chat page in a real browser: the distribution's Chromium, driven by Playwright, against a live `tandem serve`
on the tiny models (behind an API key, in exact mode so that a draft never changes the text). The answer streams,
the draft's accepted tokens are coloured, the stats line and the draft selector say what the API says, `none`
switches speculation off, errors show their message, the page's text is the API's, axe-core finds nothing to fix,
and CORS lets exactly the origins `--cors` names call the API from a browser.

These tests read answers in the page's plain view (one span per run of one source, as the API's token sources);
tests/test_browser_markdown.py tests its Markdown view, the default, which the accessibility check and the
screenshot here show too.

`make test` installs Chromium (and npm, which fetches axe-core) from apt; without them these tests skip.
TANDEM_UPDATE_SCREENSHOT=1 also refreshes docs/chat.png, from the default model pair (see test_screenshot).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import platformdirs
import pytest
from test_registry import link_models

playwright = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install -e '.[test]'")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the distribution's Chromium: `make test` installs it "
                                                         "from apt as root (apt-get install chromium)")
KEY = "browser-key-42"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "chat.png"
SERVE = [sys.executable, "-m", "tandem", "serve"]
TINY = ["--model", "main", "--draft", "draft_close", "--ctx-size", "512", "--threads", "1", "--exact",
        "--no-pause-slow-draft", "--draft-policy", "fixed", "--draft-max", "8", "--parallel", "1",
        "--suffix-cache", "request"]
"""The tiny main with its close draft, by name from a models folder that also holds drafts of other sizes and one
of another vocabulary; drafts of fixed length (on the tiny models drafting never pays, so the adaptive policy
would rarely draft) and exact decoding (output with a draft is bit-for-bit output without one). One sequence:
the page is one conversation, and with four sharing 512 positions a request whose pages sit above free ones
could not grow into them (its pages stay in position order) and ended early. No text shared across requests (the
suffix cache): a request sent again must draft as it did the first time, for the page and the API to agree."""


class Served:
    """A `tandem serve` subprocess: its URL once it says it is ready, and its output so far."""

    def __init__(self, args: list[str], env: dict[str, str], timeout: float = 120):
        self.proc = subprocess.Popen([*SERVE, *args, "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        self.output: list[str] = []
        self.url: str | None = None
        while not self.output or not self.output[-1].startswith(("ready:", "NOT SERVING")):
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                break
            if line is None:  # it exited
                break
            self.output.append(line)
        found = re.search(r"serving on (http://\S+)", "".join(self.output))
        if found and self.output[-1].startswith("ready:"):
            self.url = found.group(1)

    def _read(self, lines: queue.Queue[str | None]) -> None:
        for line in self.proc.stdout:
            lines.put(line)
        lines.put(None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TANDEM_MODELS_DIR": str(root / "models"), "TANDEM_CONFIG": str(root / "models.toml"),
            "TANDEM_CACHE_DIR": str(root / "cache"), **extra}


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory) -> Path:
    """A models folder with the tiny models under friendly names (main, draft_close, different_vocab, ...)."""
    root = tmp_path_factory.mktemp("browser")
    link_models(tiny, root / "models")
    return root


@pytest.fixture(scope="module")
def server(root) -> Iterator[Served]:
    srv = Served([*TINY, "--api-key", KEY], serve_env(root))
    try:
        assert srv.url, "".join(srv.output)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def open_page(browser, url: str, *, key: str | None = KEY, markdown: bool = False, **context):
    """A fresh browser context (its own localStorage) on the page; `key` is stored as if the user had entered it.
    Without `markdown` the page starts with its Markdown view off, answers as plain text in one span per run of one
    source (what these tests compare with the API's text; tests/test_browser_markdown.py tests the Markdown view).
    Script errors are collected in page.errors."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 640}, **context)
    if key:
        ctx.add_init_script(f"localStorage.setItem('tandem.key', {json.dumps(key)})")
    if not markdown:
        ctx.add_init_script("localStorage.getItem('tandem.markdown') === null && "
                            "localStorage.setItem('tandem.markdown', '0')")
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    return page


@pytest.fixture
def page(browser, server) -> Iterator:
    page = open_page(browser, server.url)
    wait_for_models(page)
    yield page
    errors = page.errors
    page.context.close()
    assert errors == []


def wait_for_models(page) -> None:
    page.wait_for_function("() => document.querySelectorAll('#draft option').length > 1")


def api(server: Served, path: str, body: dict | None = None) -> dict:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        r = c.post(path, json=body) if body is not None else c.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def ask(page, text: str, *, max_tokens: int = 48, timeout: float = 120) -> dict:
    """Send `text` as the user would and wait for the answer; returns the request body the page posted and what
    the new answer shows: its text, its coloured runs, its stats line and its error."""
    page.fill("#max_tokens", str(max_tokens))
    n = page.locator(".msg.assistant").count()
    with page.expect_request("**/v1/chat/completions") as req:
        page.fill("#input", text)
        page.press("#input", "Enter")
    page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant').length > {n} && "
                           "document.getElementById('stop').disabled", timeout=timeout * 1000)
    answer = page.locator(".msg.assistant").last
    return {"request": req.value.post_data_json,
            "text": answer.locator(".body > span").evaluate_all("ss => ss.map(s => s.textContent).join('')"),
            "runs": answer.locator(".body > span").evaluate_all(
                "ss => ss.map(s => ({text: s.textContent, source: s.className}))"),
            "meta": answer.locator(".meta").text_content(),
            "error": answer.locator(".error").all_text_contents()}


def runs(token_sources: list[dict]) -> list[dict]:
    """The API's token sources as the page shows them: one run per stretch of one source."""
    out: list[dict] = []
    for s in token_sources:
        if s["text"] and out and out[-1]["source"] == s["source"]:
            out[-1]["text"] += s["text"]
        elif s["text"]:
            out.append(dict(s))
    return out


def whole(server: Served, body: dict) -> dict:
    """The page's request, not streamed, through the API."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return api(server, "/v1/chat/completions", plain)


# -- the API key -------------------------------------------------------------------------------------------------

def test_keyed_server_asks_for_the_key_and_keeps_it(browser, server):
    page = open_page(browser, server.url, key=None)
    try:
        page.wait_for_selector("#keybox", state="visible")
        page.wait_for_function("() => document.getElementById('status').className === 'error'")
        assert "API key" in page.text_content("#status") and page.locator("#model option").count() == 0
        page.fill("#key", "not-the-key")
        page.click("#keybox button[type=submit]")
        page.wait_for_selector("#keybox", state="visible")  # a wrong key: asked again
        page.fill("#key", KEY)
        page.click("#keybox button[type=submit]")
        wait_for_models(page)
        assert page.is_hidden("#keybox") and page.text_content("#status").startswith("ready: main + draft draft_close")
        page.reload()  # the key is remembered
        wait_for_models(page)
        assert page.is_hidden("#keybox") and page.evaluate("localStorage.getItem('tandem.key')") == KEY
        assert page.errors == []
    finally:
        page.context.close()


# -- answers ------------------------------------------------------------------------------------------------------

def test_answer_streams_with_the_drafts_tokens_coloured_and_equals_the_api(page, server):
    # Every render of the answer, as the page makes it: the text must grow in pieces while the request runs.
    page.evaluate("""() => {
      window.renders = [];
      new MutationObserver(() => {
        const a = [...document.querySelectorAll('.msg.assistant .body')].pop();
        if (a) window.renders.push([a.textContent, document.getElementById('stop').disabled]);
      }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    got = ask(page, "Write a poem about the sea.", max_tokens=200)
    body = got["request"]
    assert body["model"] == "main" and body["stream"] and body["return_token_sources"] and "draft_model" not in body
    assert body["messages"] == [{"role": "user", "content": "Write a poem about the sea."}]
    api_answer = whole(server, body)
    assert got["error"] == [] and got["text"] == api_answer["choices"][0]["message"]["content"] != ""
    assert got["runs"] == runs(api_answer["choices"][0]["token_sources"])
    partial = {text for text, stop_disabled in page.evaluate("window.renders")
               if not stop_disabled and text and text != got["text"]}
    assert len(partial) >= 2 and all(got["text"].startswith(t) for t in partial), partial  # streamed

    # the draft's accepted tokens in green, the model's own in the text colour
    draft = page.locator(".msg.assistant .body > span.draft").first
    assert draft.evaluate("s => [getComputedStyle(s).color, getComputedStyle(s).backgroundColor]") == \
        ["rgb(26, 127, 55)", "rgb(218, 251, 225)"]
    main = page.locator(".msg.assistant .body > span.main").first
    assert main.evaluate("s => getComputedStyle(s).backgroundColor") == "rgba(0, 0, 0, 0)"

    stats = api_answer["stats"]
    assert stats["draft_model"] == "draft_close" and stats["accepted_draft_tokens_count"] > 0
    assert re.fullmatch(r"[\d.]+ tok/s · first token \d+ ms · 200 tokens · draft draft_close: \d+ of \d+ accepted "
                        r"\(\d+%\), \d+ rejected, \d+ ignored", got["meta"]), got["meta"]
    assert (f"draft draft_close: {stats['accepted_draft_tokens_count']} of {stats['total_draft_tokens_count']} "
            f"accepted") in got["meta"]  # the same drafting as the API's (fixed draft lengths)

    # a second turn carries the first: still the API's text for the same conversation
    second = ask(page, "Now a shorter one.", max_tokens=24)
    assert [m["role"] for m in second["request"]["messages"]] == ["user", "assistant", "user"]
    assert second["request"]["messages"][1]["content"] == got["text"]
    assert second["text"] == whole(server, second["request"])["choices"][0]["message"]["content"]


def test_draft_selector_lists_only_compatible_drafts(page, server):
    listing = api(server, "/v1/models")["data"]
    assert "different_vocab" in {m["id"] for m in listing}  # in the models folder, and served
    main = next(m for m in listing if m["id"] == "main")
    options = page.locator("#draft option").evaluate_all("os => os.map(o => [o.value, o.textContent])")
    assert options[:2] == [["", "default (draft_close)"], ["none", "none (no speculation)"]]
    assert [v for v, _ in options[2:]] == main["compatible_draft_models"] and "draft_small" in main[
        "compatible_draft_models"]
    assert "different_vocab" not in {v for v, _ in options}
    assert page.locator("#model option").evaluate_all("os => os.map(o => o.value)")[0] == "main"


def test_draft_none_switches_speculation_off_and_stays_chosen(page, server):
    page.select_option("#draft", "none")
    page.evaluate("() => document.querySelectorAll('#draft option').forEach((o) => (o.dataset.before = '1'))")
    got = ask(page, "Explain speculative decoding.")
    assert got["request"]["draft_model"] == "none"
    api_answer = whole(server, got["request"])
    assert api_answer["stats"]["draft_model"] is None and api_answer["stats"]["total_draft_tokens_count"] == 0
    assert "draft" not in {r["source"] for r in got["runs"]} and " · no draft" in got["meta"]
    assert got["text"] == api_answer["choices"][0]["message"]["content"]
    # exact mode: with the draft, the same text
    assert got["text"] == whole(server, {**got["request"], "draft_model": "draft_close"})["choices"][0]["message"][
        "content"]
    # the choice survives the model list's refresh after the answer, and the next message is sent with it
    page.wait_for_function("() => !document.querySelector('#draft option[data-before]')")  # refreshed
    assert page.input_value("#draft") == "none"
    assert ask(page, "And again?", max_tokens=8)["request"]["draft_model"] == "none"
    page.select_option("#draft", "draft_small")
    got = ask(page, "With the small draft.", max_tokens=16)
    assert got["request"]["draft_model"] == "draft_small" and "draft draft_small: " in got["meta"]


def test_errors_show_their_message_and_the_chat_goes_on(page, server):
    got = ask(page, "word " * 600)  # more tokens than the 512 the context holds
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=got["request"])
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "context holds 512" in message and got["error"] == [f"400: {message}"]
    assert got["text"] == "" and got["meta"] == ""
    # the failed question is not part of the conversation any more
    after = ask(page, "Hello, who are you?", max_tokens=8)
    assert after["error"] == [] and after["request"]["messages"] == [{"role": "user", "content": "Hello, who are you?"}]


def test_stop_ends_the_answer_where_it_is(page, server):
    page.fill("#max_tokens", "400")
    page.fill("#input", "Tell me a long story.")
    page.press("#input", "Enter")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .body') || {}).textContent")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .error")
    assert page.text_content(".msg.assistant .error") == "stopped" and page.is_disabled("#stop")
    assert page.text_content(".msg.assistant .body")  # what came before the stop stays
    after = ask(page, "Hello?", max_tokens=4)  # the server is free again
    assert after["error"] == [] and after["text"]


# -- accessibility ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def axe_source() -> str:
    """axe-core's axe.min.js, installed with npm into Tandem's cache folder once."""
    prefix = Path(platformdirs.user_cache_dir("tandem")) / "npm"
    path = prefix / "node_modules" / "axe-core" / "axe.min.js"
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("needs npm to fetch axe-core: `make test` installs it from apt as root")
        r = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent",
                            "axe-core@4"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not path.exists():
            pytest.skip(f"npm could not fetch axe-core: {r.stderr.strip()[-300:]}")
    return path.read_text()


def axe(page, source: str) -> list[str]:
    """axe-core's violations on the page as it is now: rule, impact, and the elements."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.add_script_tag(content=source)
    found = page.evaluate("axe.run().then(r => r.violations.map(v => `${v.id} (${v.impact}): ${v.help}: ` + "
                          "v.nodes.map(n => n.target.join(' ')).join(', ')))")
    return found


def test_axe_finds_no_violations(browser, server, axe_source):
    # bypass_csp: the page's policy admits no script but its own, and axe is injected
    page = open_page(browser, server.url, key=None, markdown=True, bypass_csp=True)
    try:
        page.wait_for_selector("#keybox", state="visible")
        page.wait_for_function("() => document.getElementById('status').className === 'error'")
        found = {"asking for the key": axe(page, axe_source)}
        page.fill("#key", KEY)
        page.click("#keybox button[type=submit]")
        wait_for_models(page)
        found["ready"] = axe(page, axe_source)
        # the draft's colours (the guesses' are the legend's), an answer without a draft, an error
        ask(page, "Write a poem about the sea.", max_tokens=24)
        page.select_option("#draft", "none")
        ask(page, "1 2 3 4 1 2 3 4 1 2 3 4", max_tokens=24)
        ask(page, "word " * 600)
        assert page.locator(".body.md .draft").count() and page.locator(".msg .error").count()
        found["answers and an error"] = axe(page, axe_source)
        assert found == {state: [] for state in found}
        assert page.errors == []
    finally:
        page.context.close()


# -- the screenshot ----------------------------------------------------------------------------------------------

SHOT_PROMPT = "Explain the Pythagorean theorem in three sentences."


def test_screenshot(browser, server, root, tmp_path):
    """The page with an answer, shot at the README's size into the test's folder. With TANDEM_UPDATE_SCREENSHOT=1
    the shot is of the default model pair (real words; an exact `tandem serve` without arguments, which derives the
    main model on first use) and replaces docs/chat.png."""
    update = os.environ.get("TANDEM_UPDATE_SCREENSHOT") == "1"
    real = Served(["--exact"], {**os.environ, "TANDEM_MODELS_DIR": str(root / "empty"),
                                "TANDEM_CONFIG": str(root / "models.toml")}, timeout=600) if update else None
    try:
        if real is not None:
            assert real.url, "".join(real.output)
        page = open_page(browser, real.url if real else server.url, key=None if real else KEY, markdown=True)
        wait_for_models(page)
        if real is not None:  # a first answer warms the models up: the shot's stats are then the usual ones
            ask(page, "Hello!", max_tokens=8, timeout=600)
            page.click("#clear")
        got = ask(page, SHOT_PROMPT, max_tokens=120 if real else 60, timeout=600 if real else 120)
        assert got["error"] == [] and page.locator(".body.md .draft").count()
        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot))
        page.context.close()
    finally:
        if real is not None:
            real.stop()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") == 1000
    if update:
        shutil.copyfile(shot, SCREENSHOT)


# -- CORS --------------------------------------------------------------------------------------------------------

ELSEWHERE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>another site</title></head><body>
<main><h1>another site</h1></main>
<script>
// What a web app on another origin does with Tandem's API: list the models and ask for an answer.
async function callTandem(base, key) {
  const headers = { "Content-Type": "application/json", Authorization: `Bearer ${key}` };
  try {
    const models = await (await fetch(`${base}/v1/models`, { headers })).json();
    const r = await fetch(`${base}/v1/chat/completions`, { method: "POST", headers, body: JSON.stringify(
      { model: models.data[0].id, messages: [{ role: "user", content: "Hello" }], max_tokens: 4, temperature: 0 }) });
    return { ok: true, status: r.status, text: (await r.json()).choices[0].message.content };
  } catch (e) {
    return { ok: false, error: String(e) };
  }
}
</script></body></html>"""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args) -> None:
        pass


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Iterator[str]:
    """A static page on another origin (another port) whose script calls the Tandem API."""
    site = tmp_path_factory.mktemp("elsewhere")
    (site / "index.html").write_text(ELSEWHERE)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_cors_lets_only_the_named_origins_call_the_api(browser, server, root, elsewhere):
    cors = Served([*TINY, "--api-key", KEY, "--cors", elsewhere], serve_env(root))
    try:
        if cors.url is None and "unrecognized arguments: --cors" in "".join(cors.output):
            pytest.skip("this build of `tandem serve` has no --cors option")
        assert cors.url, "".join(cors.output)
        page = open_page(browser, f"{elsewhere}/index.html", key=None)
        try:
            allowed = page.evaluate("([base, key]) => callTandem(base, key)", [cors.url, KEY])
            assert allowed["ok"] and allowed["status"] == 200 and allowed["text"], allowed
            expected = api(cors, "/v1/chat/completions", {"model": "main", "max_tokens": 4, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "Hello"}]})
            assert allowed["text"] == expected["choices"][0]["message"]["content"]
            # the same call to a server started without --cors: the browser blocks it
            blocked = page.evaluate("([base, key]) => callTandem(base, key)", [server.url, KEY])
            assert not blocked["ok"] and "Failed to fetch" in blocked["error"], blocked
        finally:
            page.context.close()
    finally:
        cors.stop()
