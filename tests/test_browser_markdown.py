"""The chat page's Markdown view in a real browser (the distribution's Chromium, driven by Playwright, as in
tests/test_browser.py): answers render as Markdown with highlighted code and a working copy button, model output
never runs as script, the draft's tokens stay coloured, the conversation and its system prompt survive a reload
(and a corrupt stored one does not break the page), and axe-core finds nothing to fix.

The page talks to a live `tandem serve` on the tiny models, but the answers under test are canned: Playwright
answers the page's POST /v1/chat/completions with a stream the server's own response builder wrote, so that an
answer can hold exactly the Markdown, the hostile HTML and the token sources a test needs. The page is what is
tested here; tests/test_browser.py compares its answers with the API's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from test_browser import CHROMIUM, api, axe, axe_source, browser, open_page, root, server, wait_for_models

from tandem.server.responses import Builder, Piece
from tandem.server.schemas import TokenSource
from tandem.spec.generate import Done
from tandem.spec.stats import SpecStats

__all__ = ["axe_source", "browser", "root", "server"]  # fixtures, shared with tests/test_browser.py

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the distribution's Chromium: `make test` installs it "
                                                         "from apt as root (apt-get install chromium)")

CODE = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"
RICH = [  # (text, source): a coding model's answer, the draft's tokens among the model's own
    ("## Adding ", "main"), ("numbers", "draft"), ("\n\nUse **", "main"), ("sorted", "draft"), ("** and `", "main"),
    ("key=", "draft"), ("` when you need:\n\n- a list\n- ", "main"), ("a tuple", "draft"),
    ("\n\n> a quote\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\n", "main"), ("def", "draft"),
    (CODE[3:CODE.index("return")], "main"), ("return", "draft"), (CODE[CODE.index("return") + 6:], "guess"),
    ("\n```\n\nSee [the docs](https://docs.python.org/3/).", "main"),
]
HOSTILE = ("Careful: <script>window.pwned = 'script'</script> and <img src=x onerror=\"window.pwned = 'img'\"> "
           "and <svg onload=\"window.pwned = 'svg'\"></svg> and "
           "[a link](javascript:window.pwned='link') and ![an image](x \"t\")\n\n"
           "<iframe srcdoc=\"<script>parent.pwned = 'iframe'</script>\"></iframe>\n\n"
           "<details open ontoggle=\"window.pwned = 'details'\"><summary>x</summary></details>\n")


def stream(pieces: list[tuple[str, str]], draft: str = "draft_close") -> str:
    """The SSE body `tandem serve` sends for an answer of these pieces, written by its own response builder."""
    b = Builder("chat", "main", token_sources=True)
    accepted = sum(len(t) for t, s in pieces if s == "draft")
    stats = SpecStats(draft_model=draft, drafted=accepted + 3, accepted=accepted, rejected=3, stop_reason="eos",
                      generated_tokens=len(pieces), prompt_tokens=12, prompt_time=0.05, generation_time=0.5)
    out: list[str] = []
    for i, (text, source) in enumerate(pieces):
        piece = Piece(text, [TokenSource(text=text, source=source)])
        if i == len(pieces) - 1:
            piece.done = Done(stats)
        out += b.stream(piece, first=i == 0, include_usage=True)
    return "".join(out)


def answer_with(page, pieces: list[tuple[str, str]]) -> list[dict]:
    """From now on the page's questions get this canned answer; returns the list their request bodies go to."""
    sent: list[dict] = []

    def fulfil(route) -> None:
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                      body=stream(pieces))

    page.route("**/v1/chat/completions", fulfil)
    return sent


def ask(page, text: str) -> None:
    """Send `text` as the user would and wait for the (canned) answer to be complete."""
    n = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant').length > {n} && "
                           "document.getElementById('stop').disabled && "
                           "[...document.querySelectorAll('.msg.assistant .meta')].pop().textContent")


@pytest.fixture
def page(browser, server) -> Iterator:
    """The page in its default view (Markdown), with the clipboard as a user allows it; every request it makes
    is collected in page.requests."""
    page = open_page(browser, server.url, markdown=True, permissions=["clipboard-read", "clipboard-write"])
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.reload()  # to see its first requests too
    wait_for_models(page)
    yield page
    errors = page.errors
    page.context.close()
    assert errors == []


def test_answer_renders_as_markdown_with_highlighted_code_and_a_copy_button(page, server):
    answer_with(page, RICH)
    ask(page, "How do I add numbers?")
    md = page.locator(".msg.assistant .body.md")
    assert md.locator("h2").text_content() == "Adding numbers"  # below the page's h1, no level skipped
    assert md.locator("strong").text_content() == "sorted" and md.locator("p > code").text_content() == "key="
    assert md.locator("ul > li").all_text_contents() == ["a list", "a tuple"]
    assert md.locator("blockquote").text_content().strip() == "a quote" and md.locator("table td").count() == 2
    link = md.locator("a")
    assert link.get_attribute("href") == "https://docs.python.org/3/" and link.get_attribute("rel") == \
        "noopener noreferrer"
    # the code block: the Python highlighted, its language named, the code exactly the answer's
    code = md.locator(".code pre code.hljs.language-python")
    assert code.text_content() == CODE
    assert set(code.locator(".hljs-keyword").all_text_contents()) >= {"def", "return"}
    assert code.locator(".hljs-title").first.text_content() == "add"
    assert code.locator(".hljs-keyword").first.evaluate("e => getComputedStyle(e).color") != \
        code.evaluate("e => getComputedStyle(e).color")  # a theme colours it
    assert md.locator(".codebar span").text_content() == "python"
    # Copy: the code's text, no more, on the clipboard, and the button says so
    button = md.locator(".code button.copy")
    assert button.get_attribute("aria-label") == "Copy python code" and button.text_content() == "Copy"
    page.evaluate("navigator.clipboard.writeText('something else')")
    button.click()
    page.wait_for_function("() => document.querySelector('.code button.copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    assert button.get_attribute("aria-label") == "Copied"
    page.wait_for_function("() => document.querySelector('.code button.copy').textContent === 'Copy'", timeout=5000)
    assert button.get_attribute("aria-label") == "Copy python code"
    # nothing came from another host (the libraries are the server's own files)
    assert page.requests and all(u.startswith(server.url) for u in page.requests), page.requests
    assert {f"{server.url}/vendor/{f}" for f in ("marked.umd.js", "purify.min.js", "highlight.min.js",
                                                 "a11y-light.min.css")} <= set(page.requests)


def test_drafted_tokens_stay_coloured_in_the_rendered_answer(page):
    answer_with(page, RICH)
    ask(page, "How do I add numbers?")
    md = page.locator(".msg.assistant .body.md")
    # each drafted run, wherever Markdown put it: a heading, bold, inline code, a list item, code
    assert md.locator(".draft").all_text_contents() == ["numbers", "sorted", "key=", "a tuple", "def", "return"]
    assert md.locator("h2 .draft").text_content() == "numbers" and md.locator("strong .draft").count() == 1
    assert md.locator("p > code .draft").text_content() == "key=" and md.locator("li .draft").count() == 1
    assert "".join(md.locator("pre .guess").all_text_contents()) == CODE[CODE.index("return") + 6:]
    # in text: green on green, as in the plain view
    prose = md.locator("strong .draft")
    assert prose.evaluate("s => [getComputedStyle(s).color, getComputedStyle(s).backgroundColor]") == \
        ["rgb(26, 127, 55)", "rgb(218, 251, 225)"]
    # in code: the syntax keeps its colour (the keyword's), the draft underlines in green
    kw = md.locator("pre .hljs-keyword", has=page.locator(".draft")).first
    drafted = kw.locator(".draft")
    assert drafted.evaluate("s => getComputedStyle(s).color") == kw.evaluate("k => getComputedStyle(k).color")
    assert drafted.evaluate("s => [getComputedStyle(s).textDecorationLine, getComputedStyle(s).textDecorationColor]") \
        == ["underline", "rgb(26, 127, 55)"]
    # the plain view shows the same runs, one span each, and the switch is remembered
    page.uncheck("#markdown")
    body = page.locator(".msg.assistant .body.raw")
    assert body.locator("> span").evaluate_all("ss => ss.map(s => [s.textContent, s.className])") == \
        [list(p) for p in RICH]
    page.reload()
    wait_for_models(page)
    assert not page.is_checked("#markdown") and page.locator(".msg.assistant .body.raw > span.draft").count() == 6
    page.check("#markdown")
    assert page.locator(".msg.assistant .body.md .draft").count() == 6


def test_model_output_never_runs(browser, server):
    # Without the page's content security policy: the sanitising alone must stop it.
    page = open_page(browser, server.url, markdown=True, bypass_csp=True)
    try:
        wait_for_models(page)
        answer_with(page, [(HOSTILE[:40], "main"), (HOSTILE[40:90], "draft"), (HOSTILE[90:], "main")])
        ask(page, "Show me some HTML.")
        md = page.locator(".msg.assistant .body.md")
        assert md.locator("script, img, svg, iframe, details, [onerror], [onload], [ontoggle], [srcdoc]").count() == 0
        assert md.locator("a[href^='javascript']").count() == 0
        # raw HTML is shown as the text it is
        text = md.text_content()
        assert "<script>window.pwned = 'script'</script>" in text and '<img src=x onerror="window.pwned' in text
        assert "a link" in text and md.locator("a", has_text="an image").get_attribute("href") == "x"
        page.wait_for_timeout(300)  # an onerror, onload or ontoggle would have run by now
        assert page.evaluate("window.pwned") is None
        assert page.errors == []
    finally:
        page.context.close()


def test_conversation_and_system_prompt_survive_a_reload(page):
    sent = answer_with(page, RICH)
    page.click("#systembox summary")
    page.fill("#system", "You are a terse Python expert.")
    ask(page, "How do I add numbers?")
    assert sent[0]["messages"] == [{"role": "system", "content": "You are a terse Python expert."},
                                   {"role": "user", "content": "How do I add numbers?"}]
    meta = page.text_content(".msg.assistant .meta")
    accepted = sum(len(t) for t, s in RICH if s == "draft")
    assert f"draft draft_close: {accepted} of {accepted + 3} accepted" in meta
    page.reload()
    wait_for_models(page)
    assert page.input_value("#system") == "You are a terse Python expert." and page.is_visible("#system")
    assert page.locator(".msg.user .body").all_text_contents() == ["How do I add numbers?"]
    md = page.locator(".msg.assistant .body.md")
    assert md.locator("pre code.hljs").text_content() == CODE and md.locator(".draft").count() == 6
    assert page.text_content(".msg.assistant .meta") == meta
    # the next question carries the conversation, after the system prompt
    sent = answer_with(page, [("Yes.", "main")])
    ask(page, "Anything else?")
    assert [(m["role"], m["content"]) for m in sent[0]["messages"]] == [
        ("system", "You are a terse Python expert."), ("user", "How do I add numbers?"),
        ("assistant", "".join(t for t, _ in RICH)), ("user", "Anything else?")]
    # the system prompt alone, typed and kept before anything is sent
    page.fill("#system", "Answer in French.")
    page.wait_for_function("() => JSON.parse(localStorage.getItem('tandem.chat')).system === 'Answer in French.'")
    # a new chat: the conversation goes, here and after a reload; the system prompt stays
    page.click("#clear")
    assert page.locator("#log > *").count() == 0
    page.reload()
    wait_for_models(page)
    assert page.locator("#log > *").count() == 0 and page.input_value("#system") == "Answer in French."


@pytest.mark.parametrize("stored", ["{not json", json.dumps({"messages": "none"}),
                                    json.dumps({"messages": [{"role": "user", "content": "x" * 2_100_000}]}),
                                    json.dumps({"system": 5, "messages": [{"role": "user", "content": 7}, None]})])
def test_a_broken_stored_conversation_does_not_break_the_page(browser, server, stored):
    page = open_page(browser, server.url, markdown=True)
    try:
        page.evaluate("s => localStorage.setItem('tandem.chat', s)", stored)
        page.reload()
        wait_for_models(page)
        assert "this is a new chat" in page.text_content(".notice")
        assert page.input_value("#system") == "" and page.locator(".msg").count() == 0
        sent = answer_with(page, [("Fine.", "main")])
        ask(page, "Still there?")
        assert sent[0]["messages"] == [{"role": "user", "content": "Still there?"}]
        assert json.loads(page.evaluate("localStorage.getItem('tandem.chat')"))["messages"][0]["content"] == \
            "Still there?"  # the broken value is replaced
        assert page.errors == []
    finally:
        page.context.close()


def test_axe_finds_no_violations_in_the_markdown_view(browser, server, axe_source):
    page = open_page(browser, server.url, markdown=True, bypass_csp=True,  # axe is injected
                     permissions=["clipboard-read", "clipboard-write"])
    try:
        wait_for_models(page)
        page.click("#systembox summary")
        page.fill("#system", "You are a terse Python expert.")
        answer_with(page, RICH)
        ask(page, "How do I add numbers?")
        answer_with(page, [(HOSTILE, "main"), ("\n```\n" + "x = 1  # a long line " * 20 + "\n```\n", "draft")])
        ask(page, "Show me some HTML.")
        assert page.locator(".body.md pre .draft").count() and page.locator(".body.md pre .guess").count()
        found = {"answers": axe(page, axe_source)}
        page.locator(".code button.copy").first.click()
        page.wait_for_selector(".code button.copy.done")
        found["copied"] = axe(page, axe_source)
        page.evaluate("localStorage.setItem('tandem.chat', '{not json')")
        page.reload()
        wait_for_models(page)
        page.wait_for_selector(".notice")
        found["a notice"] = axe(page, axe_source)
        assert found == {state: [] for state in found}
        assert page.errors == []
    finally:
        page.context.close()


LONG = ("Some text with **bold** and `code`, then a list:\n\n- one\n- two\n\n```python\n" +
        "def f(x):\n    return [i * 2 for i in range(x)]  # twice\n" * 6 + "```\n\n") * 12


def test_a_long_answer_is_drawn_on_animation_frames_and_only_where_it_changed(page):
    """The answer arrives in hundreds of chunks over time (a stream the page's fetch gets from a generator): it is
    drawn at most once a frame, not once a chunk, each drawing renders again only its last blocks, and what the
    stream left is what the whole answer renders to."""
    pieces = [(LONG[i:i + 9], "draft" if i % 27 == 0 else "main") for i in range(0, len(LONG), 9)]
    events = [e + "\n\n" for e in stream(pieces).split("\n\n") if e]
    page.evaluate("""(events) => {
      const fetched = window.fetch;
      window.fetch = async (url, init) => {
        if (!String(url).endsWith('/v1/chat/completions')) return fetched(url, init);
        const bytes = new TextEncoder();
        const body = new ReadableStream({ async start(c) {
          for (const ev of events) { c.enqueue(bytes.encode(ev)); await new Promise((r) => setTimeout(r, 2)); }
          c.close();
        } });
        return new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
      };
      const sanitize = DOMPurify.sanitize.bind(DOMPurify);
      window.blocksRendered = 0;
      DOMPurify.sanitize = (...args) => (window.blocksRendered++, sanitize(...args));
      window.draws = 0;
      new MutationObserver(() => window.draws++).observe(document.getElementById('log'),
                                                          { childList: true, subtree: true });
    }""", events)
    ask(page, "Something long, please.")
    draws, rendered = page.evaluate("[window.draws, window.blocksRendered]")
    blocks = page.evaluate("() => document.querySelector('.body.md').children.length")
    assert blocks >= 36 and len(events) > 400
    assert 3 <= draws < len(events) / 2, (draws, len(events))  # several frames, each of several chunks
    assert rendered < 4 * draws, (rendered, draws)  # not the whole answer per drawing: that is `blocks` each
    streamed = page.inner_html(".body.md")
    page.uncheck("#markdown")
    page.check("#markdown")  # drawn again from scratch, whole
    assert page.inner_html(".body.md") == streamed
    assert page.locator(".body.md .draft").count() > 100 and page.locator(".body.md pre").count() == 12


def test_plain_answer_streams_in_the_markdown_view(page, server):
    """A real answer from the tiny models: drawn in pieces while it streams (on animation frames), and the same
    text and draft runs as the API's once complete."""
    page.evaluate("""() => {
      window.renders = [];
      new MutationObserver(() => {
        const a = [...document.querySelectorAll('.msg.assistant .body')].pop();
        if (a && !document.getElementById('stop').disabled) window.renders.push(a.textContent);
      }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#max_tokens", "200")
    with page.expect_request("**/v1/chat/completions") as req:
        page.fill("#input", "Write a poem about the sea.")
        page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta').textContent", timeout=120_000)
    assert len(set(page.evaluate("window.renders"))) >= 2  # streamed, not drawn once at the end
    assert page.locator(".msg.assistant .body.md .draft").count()
    body = req.value.post_data_json
    whole = api(server, "/v1/chat/completions", {k: v for k, v in body.items() if k not in ("stream",
                                                                                             "stream_options")})
    page.uncheck("#markdown")
    runs = page.locator(".msg.assistant .body.raw > span").evaluate_all(
        "ss => ss.map(s => ({text: s.textContent, source: s.className}))")
    assert "".join(r["text"] for r in runs) == whole["choices"][0]["message"]["content"]
