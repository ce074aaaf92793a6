"""The chat page: served without a key under a strict policy with its vendored libraries (packaged, with their
licences), wired to routes and element ids that exist, and its JavaScript (run under Node) turning a real server's
stream into coloured pieces and stats, finding each rendered character's source, and reading back a stored
conversation however it was left."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import httpx
import pytest
from test_registry import link_models
from test_server_models import make_app
from test_server_support import FIXED_DRAFTS, client, start, tiny_app

from tandem.server.serving import ServerThread
from tandem.server.web import CSP, PAGES

ROOT = Path(__file__).resolve().parents[1]
WEB = resources.files("tandem") / "web"
HTML = (WEB / "chat.html").read_text()
JS = (WEB / "chat.js").read_text()
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the page's JavaScript")


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[ServerThread]:
    """The tiny main with its close draft, behind an API key; no text shared across requests (the suffix cache):
    the same request sent twice must draft the same way, for the stream and the whole answer to agree."""
    srv = start(tiny_app(tiny, suffix_cache="request"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def registry_server(tiny, tmp_path_factory) -> Iterator[ServerThread]:
    """A registry server whose models folder holds compatible drafts and one of another vocabulary."""
    root = tmp_path_factory.mktemp("web")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_CACHE_DIR", str(root / "cache"))
        srv = start(make_app(link_models(tiny, root / "models")))
        yield srv
        srv.stop()


def js(fn: str, *args):
    """Call one of chat.js's exported functions under Node; "stream" feeds raw SSE text in small pieces."""
    driver = """
const c = require(process.argv[1]);
let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  const { fn, args } = JSON.parse(input);
  let out;
  if (fn === "stream") {  // as the network delivers it: arbitrary cuts, even inside an event
    const [raw, size] = args;
    const turn = c.newTurn();
    let buffer = "";
    for (let i = 0; i < raw.length && !turn.done; i += size) {
      const parsed = c.parseSSE(buffer + raw.slice(i, i + size));
      buffer = parsed.rest;
      for (const p of parsed.events) c.applyEvent(turn, p);
    }
    out = turn;
  } else {
    out = c[fn](...args);
  }
  process.stdout.write(JSON.stringify(out === undefined ? null : out));
});
"""
    r = subprocess.run([NODE, "-e", driver, str(WEB / "chat.js")], input=json.dumps({"fn": fn, "args": args}),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- the files and their wiring ---------------------------------------------------------------------------

def test_page_needs_no_key_and_comes_with_a_strict_policy(server):
    assert {"/", "/chat.js", "/vendor/marked.umd.js", "/vendor/purify.min.js", "/vendor/highlight.min.js",
            "/vendor/a11y-light.min.css"} == set(PAGES)
    for path, (name, kind) in PAGES.items():
        r = httpx.get(f"{server.url}{path}")  # no Authorization header: the page holds no data
        assert r.status_code == 200 and r.headers["content-type"] == kind, path
        assert r.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == WEB.joinpath(*name.split("/")).read_bytes()
    assert "style-src 'self' 'unsafe-inline'" in CSP  # the highlighting theme is a file of this server
    assert httpx.get(f"{server.url}/vendor/README.md").status_code == 404  # only the libraries are served
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # while the API still needs the key


def test_page_loads_nothing_from_other_hosts_and_has_no_inline_script():
    for text in (HTML, JS):
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)
    scripts = re.findall(r"<script[^>]*>", HTML)  # the policy blocks inline code
    assert scripts == ['<script src="/vendor/marked.umd.js">', '<script src="/vendor/purify.min.js">',
                       '<script src="/vendor/highlight.min.js">', '<script src="/chat.js">']
    loaded = re.findall(r'<script src="([^"]+)"', HTML) + re.findall(r'<link rel="stylesheet" href="([^"]+)"', HTML)
    assert len(loaded) == 5 and set(loaded) <= set(PAGES)  # each from this server


def test_vendored_libraries_are_packaged_with_their_licences_and_versions():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    vendor = WEB / "vendor"
    files = sorted(f.name for f in vendor.iterdir())
    for name in files:  # every file goes into the wheel (setuptools' "web/*" does not take a subfolder: its `*`
        # stops at a slash)
        assert any(re.fullmatch(re.escape(pattern).replace(r"\*", "[^/]*"), f"web/vendor/{name}")
                   for pattern in package_data["tandem"]), name
    readme = (vendor / "README.md").read_text()
    banners = {"marked.umd.js": r"marked v([\d.]+)", "purify.min.js": r"DOMPurify ([\d.]+)",
               "highlight.min.js": r"Highlight\.js v([\d.]+)"}
    for name, banner in banners.items():
        version = re.search(banner, (vendor / name).read_text()[:400]).group(1)
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert f"| {version} |" in row, (name, version, row)  # the README says which version is here
        licences = re.findall(r"`([\w.-]+LICENSE[\w-]*)`", row)
        assert licences and all(lic in files for lic in licences), row
    assert {"marked.LICENSE", "dompurify.LICENSE", "dompurify.LICENSE-MPL", "highlight.js.LICENSE"} <= set(files)


def test_every_element_the_script_uses_exists():
    used = set(re.findall(r'\$\("([\w-]+)"\)', JS))
    ids = set(re.findall(r'id="([\w-]+)"', HTML))
    assert used and used <= ids, used - ids


def test_every_path_the_script_requests_is_served(server):
    paths = set(re.findall(r'(?:fetch|api)\("(/[^"]*)"', JS))
    assert paths == {"/health", "/v1/models", "/v1/chat/completions"}
    with client(server) as c:
        for path in paths:
            r = c.post(path, json={}) if "completions" in path else c.get(path)
            assert r.status_code != 404, path


def test_model_output_is_parsed_as_html_only_by_the_sanitiser():
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser",
                 "createContextualFragment", "srcdoc", "eval(", "Function("):
        assert sink not in JS, sink
    # the one place HTML is made: marked's output, straight into DOMPurify, out as a DOM fragment
    parsed = re.findall(r"[\w.]*\.parser?\([^)]*\)", JS)
    assert parsed == ["JSON.parse(payload)", "JSON.parse(raw)", "parser.parser([token])"]
    assert "DOMPurify.sanitize(parser.parser([token]), purify)" in JS and "RETURN_DOM_FRAGMENT: true" in JS


# -- the script's logic, under Node, against the real server ----------------------------------------------

@needs_node
def test_draft_selector_lists_only_compatible_drafts(registry_server):
    with client(registry_server) as c:
        listing = c.get("/v1/models").json()["data"]
    assert "different_vocab" in {m["id"] for m in listing}
    main = next(m for m in listing if m["id"] == "main")
    options = js("draftOptions", main)
    values = [o["value"] for o in options]
    assert values[:2] == ["", "none"] and options[0]["label"].startswith("default (")
    assert values[2:] == main["compatible_draft_models"] and "draft_small" in values
    assert "different_vocab" not in values  # the vocabulary check, as served


@needs_node
def test_draft_selector_names_a_draft_of_another_vocabulary_as_such():
    model = {"id": "qwen", "default_draft_model": "smol", "compatible_draft_models": ["qwen-0.5b", "smol"],
             "translated_draft_models": {"smol": 0.9999}}
    labels = {o["value"]: o["label"] for o in js("draftOptions", model)}
    assert labels["qwen-0.5b"] == "qwen-0.5b" and labels["smol"] == "smol (through text, 100%)"


@needs_node
@pytest.mark.parametrize("size", [7, 1000])
def test_stream_becomes_coloured_pieces_equal_to_the_whole_answer(server, size):
    messages = [{"role": "user", "content": "Write a poem about the sea."}]
    with client(server) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        body = js("requestBody", model, "", messages, 0, 40)  # "": the model's default draft (draft_close)
        assert body["stream"] and body["return_token_sources"] and "draft_model" not in body
        raw = c.post("/v1/chat/completions", json={**body, **FIXED_DRAFTS}).text
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        whole = c.post("/v1/chat/completions", json={**plain, **FIXED_DRAFTS}).json()
    assert "choices" in whole, whole
    turn = js("stream", raw, size)
    assert turn["done"] and turn["error"] is None and turn["finish"] == "length", (turn, raw[-300:])
    assert turn["text"] == whole["choices"][0]["message"]["content"]
    # the same provenance as the non-streamed answer, runs of one source merged into one span
    expected: list[dict] = []
    for s in whole["choices"][0]["token_sources"]:
        if s["text"] and expected and expected[-1]["source"] == s["source"]:
            expected[-1]["text"] += s["text"]
        elif s["text"]:
            expected.append(dict(s))
    assert turn["pieces"] == expected and any(p["source"] == "draft" for p in expected)
    stats = turn["stats"]
    assert stats["accepted_draft_tokens_count"] == whole["stats"]["accepted_draft_tokens_count"] > 0
    line = js("statsLine", stats)
    assert (f"draft {stats['draft_model']}: {stats['accepted_draft_tokens_count']} of {stats['total_draft_tokens_count']} "
            f"accepted") in line and "tok/s" in line


@needs_node
def test_errors_reach_the_turn_with_their_cause(registry_server):
    with client(registry_server) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "draft_model": "different_vocab", "stream": True})
    assert r.status_code == 422
    assert js("applyEvent", js("newTurn"), json.dumps(r.json()))["error"] == r.json()["error"]["message"]
    turn = js("stream", 'data: {"error": {"message": "llama_decode failed: the KV cache is full"}}\n\n', 5)
    assert turn["done"] and turn["error"] == "llama_decode failed: the KV cache is full"


@needs_node
def test_status_bar_says_when_the_draft_is_missing(server):
    health = httpx.get(f"{server.url}/health").json()
    assert "draft_payoff" in health["model"]  # the field the page reads is served
    ready = {**health, "model": {**health["model"], "draft_payoff": 1.9}}  # (the tiny draft cannot pay: < 1)
    line = js("healthLine", ready)
    assert line["level"] == "ok" and health["model"]["id"] in line["text"]
    degraded = {**health, "status": "degraded", "reason": "draft needs 7.0 GiB, 2.1 GiB free"}
    assert js("healthLine", degraded) == {"text": "serving WITHOUT its draft: draft needs 7.0 GiB, 2.1 GiB free",
                                          "level": "warn"}
    assert js("healthLine", None)["level"] == "error"
    hopeless = {**health, "model": {**health["model"], "draft_payoff": 0.76}}
    line = js("healthLine", hopeless)
    assert line["level"] == "warn" and "at most 0.76x" in line["text"] and "draft none" in line["text"]
    no_draft = {"draft_model": None, "status": "degraded", "draft_status": "draft failed to load: out of memory"}
    stats = {"tokens_per_second": 30.0, "time_to_first_token": 0.05, "generated_tokens": 10, **no_draft}
    assert js("statsLine", stats).endswith("no draft · draft unavailable: draft failed to load: out of memory")



@needs_node
def test_stats_line_counts_spare_row_guesses():
    stats = {"tokens_per_second": 50.0, "time_to_first_token": 0.02, "generated_tokens": 40, "draft_model": None,
             "guessed_tokens_count": 5, "accepted_guessed_tokens_count": 3}
    assert js("statsLine", stats) == "50.0 tok/s · first token 20 ms · 40 tokens · no draft · guesses 3 of 5 right"
    turn = js("stream", 'data: {"choices": [{"delta": {"content": "ab"}, "token_sources": [{"text": "a", "source": '
                        '"main"}, {"text": "b", "source": "guess"}]}]}\n\ndata: [DONE]\n\n', 9)
    assert turn["pieces"] == [{"text": "a", "source": "main"}, {"text": "b", "source": "guess"}] and turn["done"]


# -- Markdown's sources and the stored conversation, under Node -------------------------------------------------

@needs_node
def test_rendered_text_finds_its_sources():
    pieces = [{"text": "Use **", "source": "main"}, {"text": "sorted", "source": "draft"},
              {"text": "** and `key=` :\n\n```python\n", "source": "main"}, {"text": "return", "source": "draft"},
              {"text": " sorted(x)\n```\n", "source": "guess"}]
    # the text nodes marked gives: "Use ", "sorted" (in <strong>), " and ", "key=" (in <code>), " :", "\n", code
    segments = ["Use ", "sorted", " and ", "key=", " :", "\n", "return sorted(x)", "\n"]
    assert js("alignRuns", pieces, segments) == [
        [{"text": "Use ", "source": "main"}], [{"text": "sorted", "source": "draft"}],
        [{"text": " and ", "source": "main"}], [{"text": "key=", "source": "main"}], [{"text": " :", "source": "main"}], [{"text": "\n", "source": "main"}],
        [{"text": "return", "source": "draft"}, {"text": " sorted(x)", "source": "guess"}],
        [{"text": "\n", "source": "guess"}]]
    # text the answer does not have (an entity's character) takes the source before it and skips nothing
    got = js("alignRuns", [{"text": "a &copy; ", "source": "main"}, {"text": "b", "source": "draft"}], ["a \u00a9 b"])
    assert got == [[{"text": "a \u00a9 ", "source": "main"}, {"text": "b", "source": "draft"}]]
    assert js("alignRuns", [], ["x"]) == [[{"text": "x", "source": "main"}]]


@needs_node
def test_stored_conversation_is_read_back_or_refused_whole():
    good = {"version": 1, "system": "Be brief.", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "pieces": [{"text": "hel", "source": "main"},
                                                             {"text": "lo", "source": "draft"}],
         "meta": "9.0 tok/s", "error": None}]}
    got = js("parseStoredChat", json.dumps(good))
    assert got["problem"] is None and got["chat"]["system"] == "Be brief."
    assert got["chat"]["messages"] == [good["messages"][0], {**good["messages"][1], "error": None}]
    assert js("parseStoredChat", None) == {"chat": {"system": "", "messages": []}, "problem": None}
    for raw, why in (("{not json", "not JSON"), ("[1, 2]", "no messages"), ('"text"', "no messages"),
                     ("null", "no messages"), ("x" * 101, "too large")):
        got = js("parseStoredChat", raw, 100)
        assert got["chat"] == {"system": "", "messages": []} and why in got["problem"], (raw[:20], got)
    # well-formed messages are kept; pieces that do not spell the text, or name a strange source, are replaced
    odd = {"messages": [{"role": "tool", "content": "x"}, {"role": "user"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "ab", "pieces": [{"text": "a", "source": "draft"}]},
                        {"role": "assistant", "content": "c", "pieces": [{"text": "c", "source": "x y"}], "meta": 5}]}
    got = js("parseStoredChat", json.dumps(odd))
    assert "2 stored message(s)" in got["problem"]
    assert got["chat"]["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ab", "pieces": [{"text": "ab", "source": "main"}], "meta": "", "error": None},
        {"role": "assistant", "content": "c", "pieces": [{"text": "c", "source": "main"}], "meta": "", "error": None}]


@needs_node
def test_system_prompt_goes_first():
    messages = [{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a", "pieces": []}]
    assert js("requestMessages", "You write Python.", messages) == [
        {"role": "system", "content": "You write Python."}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"}]
    assert js("requestMessages", "  ", messages[:1]) == [{"role": "user", "content": "q"}]
