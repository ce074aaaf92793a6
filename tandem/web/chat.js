// Tandem's chat page: streams /v1/chat/completions with token sources and colours the tokens the draft got
// accepted. Answers are shown as Markdown (marked), code highlighted (highlight.js), with the draft's tokens still
// coloured; the conversation and its system prompt are kept in the browser's local storage. The pure functions at
// the top (SSE parsing, turn assembly, stats and draft lists, source alignment, the stored conversation) are
// exported for tests under Node; the DOM code at the bottom runs only in a browser.
//
// Model output never runs: the Markdown's HTML goes through DOMPurify, which returns a DOM fragment (this file
// never hands an element HTML to parse), raw HTML in an answer is shown as the text it is, and the page's content
// security policy admits no script but the server's own files.
"use strict";

/** Split an SSE buffer into complete `data:` payloads; `rest` is an unfinished event to keep. */
function parseSSE(buffer) {
  const parts = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const rest = parts.pop();
  const events = [];
  for (const part of parts) {
    const data = part.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
    if (data.length) events.push(data.join("\n"));
  }
  return { events, rest };
}

/** A new assistant turn: its coloured pieces, its text, and the stats and error once they arrive. */
function newTurn() {
  return { pieces: [], text: "", stats: null, usage: null, finish: null, error: null, done: false };
}

/** Fold one streamed payload (a chunk's JSON text or "[DONE]") into the turn. */
function applyEvent(turn, payload) {
  if (payload === "[DONE]") {
    turn.done = true;
    return turn;
  }
  const obj = JSON.parse(payload);
  if (obj.error) {
    turn.error = errorText(obj.error);
    turn.done = true;
    return turn;
  }
  const choice = (obj.choices || [])[0];
  if (choice) {
    const sources = choice.token_sources;
    const text = (choice.delta && choice.delta.content) || "";
    if (sources && sources.length) {
      for (const s of sources) addPiece(turn, s.text, s.source);
    } else if (text) {
      addPiece(turn, text, "main");
    }
    if (choice.finish_reason) turn.finish = choice.finish_reason;
  }
  if (obj.stats) turn.stats = obj.stats;
  if (obj.usage) turn.usage = obj.usage;
  return turn;
}

function addPiece(turn, text, source) {
  if (!text) return;
  const last = turn.pieces[turn.pieces.length - 1];
  if (last && last.source === source) last.text += text;  // one span per run of the same source
  else turn.pieces.push({ text, source });
  turn.text += text;
}

/** An OpenAI error body's message (Tandem's messages already name the cause and a fix). */
function errorText(err) {
  if (!err) return "unknown error";
  return err.message || String(err);
}

/** One line of a response's stats: speed, time to first token, and what the draft achieved. */
function statsLine(s) {
  if (!s) return "";
  const parts = [`${s.tokens_per_second.toFixed(1)} tok/s`, `first token ${(s.time_to_first_token * 1000).toFixed(0)} ms`,
    `${s.generated_tokens} tokens`];
  if (s.draft_model) {
    const rate = (100 * s.acceptance_rate).toFixed(0);
    parts.push(`draft ${s.draft_model}: ${s.accepted_draft_tokens_count} of ${s.total_draft_tokens_count} accepted ` +
      `(${rate}%), ${s.rejected_draft_tokens_count} rejected, ${s.ignored_draft_tokens_count} ignored`);
  } else {
    parts.push("no draft");
  }
  if (s.guessed_tokens_count) {
    parts.push(`guesses ${s.accepted_guessed_tokens_count} of ${s.guessed_tokens_count} right`);
  }
  if (s.draft_status) parts.push(`draft unavailable: ${s.draft_status}`);
  return parts.join(" · ");
}

/** The draft choices for a /v1/models entry: its default, none, and only the drafts compatible with it. */
function draftOptions(model) {
  if (!model) return [];
  const dflt = model.default_draft_model || model.draft_model;
  const opts = [{ value: "", label: `default (${dflt || "none"})` }, { value: "none", label: "none (no speculation)" }];
  const translated = model.translated_draft_models || {};
  for (const id of model.compatible_draft_models || []) {
    // a draft of another vocabulary drafts through text (the share of the main model's tokens it can write)
    const share = translated[id];
    opts.push({ value: id, label: share === undefined ? id : `${id} (through text, ${Math.round(share * 100)}%)` });
  }
  return opts;
}

/** The request body for a conversation. `draft` "" keeps the model's default draft. */
function requestBody(model, draft, messages, temperature, maxTokens) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true }, return_token_sources: true,
    temperature };
  if (maxTokens) body.max_tokens = maxTokens;
  if (draft) body.draft_model = draft;
  return body;
}

/** The status bar for a /health body: its text and a level (ok, warn, error). */
function healthLine(h) {
  if (!h) return { text: "server unreachable", level: "error" };
  const m = h.model;
  const name = m ? `${m.id}${m.draft_model ? ` + draft ${m.draft_model}` : ", no draft"}${m.exact ? ", exact" : ""}` : "";
  if (h.status === "ready" && m && m.draft_paused) {
    return { text: `ready: ${m.id}, decoding as draft none by default: ${m.draft_paused}`, level: "warn" };
  }
  if (h.status === "ready" && m && m.draft_payoff != null && m.draft_payoff < 1) {
    return { text: `ready: ${name}; this draft cannot make the model faster here (at most ${m.draft_payoff.toFixed(2)}x ` +
      "if every draft token were accepted): choose draft none", level: "warn" };
  }
  if (h.status === "ready") return { text: `ready: ${name}`, level: "ok" };
  if (h.status === "degraded") return { text: `serving WITHOUT its draft: ${h.reason}`, level: "warn" };
  if (h.status === "loading") return { text: `loading${name ? " " + name : ""}…`, level: "warn" };
  return { text: `${h.status}: ${h.reason || "see the server's log"}`, level: "error" };
}

/**
 * Where each piece of rendered text came from. `pieces` are the answer's runs ({text, source}) and `segments` the
 * text nodes of its Markdown rendering, in document order; the result holds, per segment, its runs of one source.
 *
 * Rendering drops Markdown's syntax (fences, `*`, `#`, list markers, link targets) but keeps the words in order, so
 * each rendered character is matched to the next equal character of the answer (looking at most WINDOW ahead: a
 * character the answer does not have, such as an entity's, takes the source before it and matches nothing).
 * Whitespace matches the answer's next whitespace, past Markdown's marks only. One pass over both texts, so the
 * answer can be re-rendered whole on every frame while it streams: robust where a rendering of pieces one by one is
 * not (a fence or an emphasis that spans several pieces).
 */
function alignRuns(pieces, segments) {
  const WINDOW = 512;
  const MARKS = "*_`~#>|-+=.)]";
  const text = pieces.map((p) => p.text).join("");
  let j = 0;  // the next character of the answer not yet matched
  let k = 0;  // the piece holding answer position `end - 1`
  let end = pieces.length ? pieces[0].text.length : 0;
  let last = "main";
  const sourceAt = (pos) => {  // positions only grow
    while (k < pieces.length - 1 && pos >= end) end += pieces[++k].text.length;
    return pieces.length ? pieces[k].source : "main";
  };
  const space = (c) => c === " " || c === "\n" || c === "\t" || c === "\r" || c === "\u00a0";
  return segments.map((seg) => {
    const runs = [];
    for (const c of seg) {  // by code point: a character outside the BMP is one match
      let source = last;
      if (space(c)) {  // the answer's next space, past Markdown's marks only (the `**` that closes a bold word)
        let at = j;
        while (at < text.length && at - j < 8 && MARKS.includes(text[at])) at++;
        if (at < text.length && space(text[at])) {
          source = sourceAt(at);
          j = at + 1;
        }
      } else {
        const at = text.indexOf(c, j);
        if (at >= 0 && at - j <= WINDOW) {
          source = sourceAt(at);
          j = at + c.length;
        }
      }
      last = source;
      const run = runs[runs.length - 1];
      if (run && run.source === source) run.text += c;
      else runs.push({ text: c, source });
    }
    return runs;
  });
}

/** The most characters of a stored conversation the page reads back or writes (local storage holds about 5 MB). */
const STORE_LIMIT = 2000000;

/** A conversation as kept in local storage: the system prompt and the messages, assistant ones with their coloured
 * pieces, stats line and error. Returns {chat, problem}: an empty chat and why when the text is too long, not JSON
 * or not a conversation; messages that are not well-formed are left out (and said so). */
function parseStoredChat(raw, limit = STORE_LIMIT) {
  const empty = { system: "", messages: [] };
  if (raw === null || raw === undefined || raw === "") return { chat: empty, problem: null };
  if (typeof raw !== "string" || raw.length > limit) {
    return { chat: empty, problem: `the stored conversation is too large to read back (${raw.length} characters)` };
  }
  let obj;
  try {
    obj = JSON.parse(raw);
  } catch (e) {
    return { chat: empty, problem: "the stored conversation is not readable (not JSON)" };
  }
  if (!obj || typeof obj !== "object" || !Array.isArray(obj.messages)) {
    return { chat: empty, problem: "the stored conversation is not readable (no messages)" };
  }
  const chat = { system: typeof obj.system === "string" ? obj.system : "", messages: [] };
  let dropped = 0;
  for (const m of obj.messages) {
    if (!m || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") {
      dropped++;
      continue;
    }
    const msg = { role: m.role, content: m.content };
    if (m.role === "assistant") {
      const ok = Array.isArray(m.pieces) && m.pieces.every((p) => p && typeof p.text === "string" &&
        typeof p.source === "string" && /^[a-z]{1,16}$/.test(p.source)) &&
        m.pieces.map((p) => p.text).join("") === m.content;
      msg.pieces = ok ? m.pieces.map((p) => ({ text: p.text, source: p.source }))
        : [{ text: m.content, source: "main" }];
      msg.meta = typeof m.meta === "string" ? m.meta : "";
      msg.error = typeof m.error === "string" ? m.error : null;
    }
    chat.messages.push(msg);
  }
  return { chat, problem: dropped ? `${dropped} stored message(s) were not readable and are left out` : null };
}

/** The messages a request sends: the system prompt first (when there is one), then the conversation. */
function requestMessages(system, messages) {
  const out = system.trim() ? [{ role: "system", content: system }] : [];
  return out.concat(messages.map((m) => ({ role: m.role, content: m.content })));
}

if (typeof module !== "undefined") {
  module.exports = { parseSSE, newTurn, applyEvent, statsLine, draftOptions, requestBody, healthLine, alignRuns,
    parseStoredChat, requestMessages };
}

// -- the page ------------------------------------------------------------------------------------------------

if (typeof document !== "undefined") {
  const $ = (id) => document.getElementById(id);
  const CHAT = "tandem.chat";  // local storage: the conversation (parseStoredChat)
  const chat = { system: "", messages: [] };  // {role, content} (+ pieces, meta, error for answers)
  const views = [];  // the answers on the page: {div, body, meta, msg, blocks (the Markdown drawn), ...}
  let models = [];
  let controller = null;
  let epoch = 0;  // a new chat during an answer: that answer belongs to the old one
  let health = null;  // the last /health body
  let storageOff = false;  // said once

  // Local storage may be off (a private window's policy): the page then works without it.
  const stored = (key) => {
    try {
      return localStorage.getItem(key);
    } catch (e) {
      return null;
    }
  };
  const store = (key, value) => {
    try {
      localStorage.setItem(key, value);
      return true;
    } catch (e) {
      return false;  // over the quota, or storage off
    }
  };

  const headers = () => {
    const h = { "Content-Type": "application/json" };
    const key = stored("tandem.key");
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  };

  async function api(path, init = {}) {
    const r = await fetch(path, { ...init, headers: headers() });
    if (r.status === 401) $("keybox").hidden = false;
    return r;
  }

  async function failure(r) {
    try {
      return `${r.status}: ${errorText((await r.json()).error)}`;
    } catch (e) {
      return `${r.status} ${r.statusText}`;
    }
  }

  function setStatus(text, level) {
    const el = $("status");
    el.textContent = text;
    el.className = level;
  }

  function showHealth() {
    const line = healthLine(health);
    setStatus(line.text, line.level);
  }

  async function refreshHealth() {
    health = null;
    try {
      health = await (await fetch("/health")).json();
    } catch (e) { /* unreachable: healthLine says so */ }
    const serving = health && (health.status === "ready" || health.status === "degraded");
    if (serving && !models.length) await loadModels();
    else showHealth();
    setTimeout(refreshHealth, health && health.status === "loading" ? 1000 : 10000);
  }

  async function loadModels() {
    const r = await api("/v1/models");
    if (!r.ok) {
      setStatus(`cannot list models: ${await failure(r)}`, "error");
      return;
    }
    models = (await r.json()).data;
    showHealth();
    const sel = $("model");
    const chosen = sel.value;  // the list is refreshed after every answer: keep the user's choice
    sel.replaceChildren(...models.map((m) => new Option(`${m.id}${m.state === "loaded" ? "" : " (loads on first use)"}`, m.id)));
    if (models.some((m) => m.id === chosen)) sel.value = chosen;
    fillDrafts();
  }

  function fillDrafts() {
    const m = models.find((x) => x.id === $("model").value);
    const sel = $("draft");
    const chosen = sel.value;
    const opts = draftOptions(m);
    sel.replaceChildren(...opts.map((o) => new Option(o.label, o.value)));
    if (opts.some((o) => o.value === chosen)) sel.value = chosen;  // kept while the new model can use it
  }

  // -- Markdown ------------------------------------------------------------------------------------------------

  const markdown = typeof marked !== "undefined" && typeof DOMPurify !== "undefined" && DOMPurify.isSupported
    ? markdownRenderer() : null;  // without the vendored libraries, answers show as plain text

  /** A function that draws an answer ({content, pieces}) as sanitised DOM nodes: Markdown, code highlighted, the
   * draft's tokens coloured, a copy button on each code block. It returns the answer's top-level blocks, each
   * {key, nodes, level}; given the blocks it returned last time, it keeps those that have not changed (the same
   * text from the same sources, after the same blocks), so that a streaming answer costs per frame about its last
   * block, not its whole length. `final`: the answer is complete. */
  function markdownRenderer() {
    const esc = (t) => String(t).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
      "'": "&#39;" })[c]);
    const highlighter = typeof hljs !== "undefined" ? hljs : null;
    let guessLanguage = false;  // auto-detection tries every language: only on blocks that are complete
    let headingLevel = 1;  // of the last heading drawn: the page's h1 before an answer's first
    const parser = new marked.Marked({ gfm: true });
    parser.use({
      renderer: {
        // Raw HTML in an answer is shown as the text it is: a coding model writes tags it means literally.
        html({ text, block }) {
          return block ? `<p class="raw">${esc(text.replace(/\n+$/, ""))}</p>\n` : esc(text);
        },
        // An image is shown as a link: the page loads nothing an answer names.
        image({ href, text }) {
          return `<a href="${esc(href)}">${esc(text || href)}</a>`;
        },
        // A task list's box as text: a disabled checkbox would be a form field without a label.
        checkbox({ checked }) {
          return checked ? "\u2611 " : "\u2610 ";
        },
        // The page's title is its h1: an answer's headings sit below it (# is an h2), and a level the answer skips
        // is not skipped on the page (at most one level deeper than the heading before).
        heading({ tokens, depth }) {
          const h = Math.min(depth + 1, headingLevel + 1, 6);
          headingLevel = h;
          return `<h${h}>${this.parser.parseInline(tokens)}</h${h}>\n`;
        },
        code({ text, lang }) {
          const language = ((lang || "").trim().split(/\s+/)[0] || "").toLowerCase();
          let html = esc(text);
          if (highlighter && language && highlighter.getLanguage(language)) {
            html = highlighter.highlight(text, { language, ignoreIllegals: true }).value;
          } else if (highlighter && !language && guessLanguage) {
            html = highlighter.highlightAuto(text).value;
          }
          const cls = language ? ` language-${esc(language)}` : "";
          return `<pre><code class="hljs${cls}">${html}</code></pre>\n`;
        },
      },
    });
    const purify = {
      ALLOWED_TAGS: ["a", "blockquote", "br", "code", "del", "em", "h2", "h3", "h4", "h5", "h6", "hr", "li", "ol", "p",
        "pre", "span", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"],
      ALLOWED_ATTR: ["href", "title", "class", "start", "align"],
      RETURN_DOM_FRAGMENT: true,
    };
    DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {  // links open beside the chat, without access to it
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
    return (msg, final, before) => {
      const tokens = parser.lexer(msg.content);  // the whole answer: a late line can change an earlier block
      const links = JSON.stringify(tokens.links || {});  // reference links: defined anywhere, used anywhere
      const pieces = msg.pieces;
      let p = 0;  // the piece at answer offset `pAt`
      let pAt = 0;
      const sourcesOf = (a, b) => {  // the pieces' runs within [a, b): offsets only grow
        while (p < pieces.length && pAt + pieces[p].text.length <= a) pAt += pieces[p++].text.length;
        const runs = [];
        for (let i = p, at = pAt; i < pieces.length && at < b; at += pieces[i++].text.length) {
          const text = pieces[i].text.slice(Math.max(a - at, 0), Math.min(b - at, pieces[i].text.length));
          if (text) runs.push({ text, source: pieces[i].source });
        }
        return runs;
      };
      const blocks = [];
      let offset = 0;
      headingLevel = 1;
      let reusing = true;
      tokens.forEach((token, i) => {
        const runs = sourcesOf(offset, offset + token.raw.length);
        offset += token.raw.length;
        guessLanguage = final || i < tokens.length - 1;  // the last block may still grow
        const key = [links, headingLevel, guessLanguage, ...runs.map((r) => `${r.source}:${r.text}`)].join("\u0000");
        const old = before[i];
        if (reusing && old && old.key === key) {
          headingLevel = old.level;
          blocks.push(old);
          return;
        }
        reusing = false;
        const frag = DOMPurify.sanitize(parser.parser([token]), purify);
        colourSources(frag, runs);
        for (const pre of frag.querySelectorAll("pre")) addCopyButton(pre);
        blocks.push({ key, nodes: [...frag.childNodes], level: headingLevel });
      });
      return blocks;
    };
  }

  /** Wraps the rendered text that came from the draft (or from a guess) in spans of its source's class. */
  function colourSources(frag, pieces) {
    const nodes = [];
    const walk = document.createTreeWalker(frag, NodeFilter.SHOW_TEXT);
    while (walk.nextNode()) nodes.push(walk.currentNode);
    const runs = alignRuns(pieces, nodes.map((n) => n.data));
    nodes.forEach((node, i) => {
      if (runs[i].every((r) => r.source === "main")) return;
      // whitespace between blocks (a list's items, a table's rows) is layout, and may hold no element there
      if (!node.data.trim() && !node.parentNode.closest?.("pre")) return;
      node.replaceWith(...runs[i].map((r) => {
        if (r.source === "main") return document.createTextNode(r.text);
        const span = document.createElement("span");
        span.className = r.source;
        span.textContent = r.text;
        return span;
      }));
    });
  }

  function addCopyButton(pre) {
    const code = pre.querySelector("code");
    const lang = [...code.classList].find((c) => c.startsWith("language-"));
    const bar = document.createElement("div");
    bar.className = "codebar";
    const name = document.createElement("span");
    name.textContent = lang ? lang.slice(9) : "code";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.setAttribute("aria-label", `Copy ${lang ? lang.slice(9) + " " : ""}code`);
    bar.append(name, button);
    code.tabIndex = 0;  // it scrolls sideways: keyboards must reach it
    const box = document.createElement("div");
    box.className = "code";
    pre.replaceWith(box);
    box.append(bar, pre);
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Served over http to another host than this one, a page has no Clipboard API: copy a selection instead.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) throw new Error("the browser refused to copy");
  }

  async function copyCode(button) {
    const code = button.closest(".code").querySelector("pre code");
    const label = button.getAttribute("aria-label");
    let said;
    try {
      await copyText(code.textContent);
      said = "Copied";
    } catch (e) {
      said = "Copy failed: select the code and press Ctrl+C";
    }
    button.focus();
    button.textContent = said;  // in the log, a live region: read out too
    button.setAttribute("aria-label", said);
    button.classList.add("done");
    setTimeout(() => {
      button.textContent = "Copy";
      button.setAttribute("aria-label", label);
      button.classList.remove("done");
    }, 2000);
  }

  // -- the conversation on the page ----------------------------------------------------------------------------

  const rendered = () => markdown !== null && $("markdown").checked;

  function bubble(role) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const body = document.createElement("div");
    body.className = "body";
    const meta = document.createElement("div");
    meta.className = "meta";
    div.append(body, meta);
    $("log").append(div);
    div.scrollIntoView({ block: "end" });
    return { div, body, meta };
  }

  function userBubble(text) {
    bubble("user").body.textContent = text;
  }

  function answerBubble(msg) {
    const view = { ...bubble("assistant"), msg, blocks: [], timer: null, cost: 0, last: 0 };
    views.push(view);
    return view;
  }

  /** Shows an answer as it is now. `final`: the answer is complete (its last block's code, when it names no
   * language, is then guessed too). */
  function draw(view, final = false) {
    const msg = view.msg;
    if (rendered()) {
      // The whole answer is parsed again (Markdown is not local: a fence opened early closes late), the blocks
      // that changed are drawn again, at most once a frame (see drawSoon).
      const start = performance.now();
      if (!view.body.classList.contains("md")) {
        view.body.className = "body md";
        view.body.replaceChildren();
        view.blocks = [];
      }
      const blocks = markdown(msg, final, view.blocks);
      let same = 0;
      while (same < blocks.length && blocks[same] === view.blocks[same]) same++;
      for (const block of view.blocks.slice(same)) for (const node of block.nodes) node.remove();
      view.body.append(...blocks.slice(same).flatMap((block) => block.nodes));
      view.blocks = blocks;
      view.cost = performance.now() - start;
    } else {
      // Plain text, one span per run of one source; only what changed: the last span (a run of one source grows)
      // and the spans after it.
      if (!view.body.classList.contains("raw")) {
        view.body.className = "body raw";
        view.body.replaceChildren();
      }
      const spans = view.body.getElementsByTagName("span");
      for (let i = Math.max(spans.length - 1, 0); i < msg.pieces.length; i++) {
        const span = spans[i] || view.body.appendChild(document.createElement("span"));
        span.className = msg.pieces[i].source;
        span.textContent = msg.pieces[i].text;
      }
    }
    view.last = performance.now();
    view.meta.textContent = msg.error ? "" : msg.meta;
    let error = view.div.querySelector(".error");
    if (msg.error && !error) {
      error = document.createElement("div");
      error.className = "error";
      view.meta.before(error);
    }
    if (error) error.textContent = msg.error || "";
    if (error && !msg.error) error.remove();
    view.div.scrollIntoView({ block: "end" });
  }

  /** Draws a streaming answer on a coming animation frame, not per chunk; and, when drawing is slow (a long
   * answer), at most a quarter of the time: the next drawing waits three times the last one's cost. */
  function drawSoon(view) {
    if (view.timer !== null) return;
    const wait = Math.max(0, view.last + 3 * view.cost - performance.now());
    view.timer = setTimeout(() => requestAnimationFrame(() => {
      view.timer = null;
      if (!view.final) draw(view);
    }), wait);
  }

  function notice(text) {
    const p = document.createElement("p");
    p.className = "notice";
    p.textContent = text;
    $("log").append(p);
  }

  /** Keeps the conversation in local storage; when it does not fit, the oldest turns are left out of the copy. */
  function save() {
    let messages = chat.messages;
    for (;;) {
      const text = JSON.stringify({ version: 1, system: chat.system, messages });
      if (text.length <= STORE_LIMIT && store(CHAT, text)) break;
      if (!messages.length) {
        if (!storageOff) notice("this browser keeps nothing for this page (local storage is off or full): a reload " +
          "starts a new chat");
        storageOff = true;
        return false;
      }
      messages = messages.slice(messages[0].role === "user" && messages.length > 1 ? 2 : 1);
    }
    if (messages.length < chat.messages.length) {
      notice(`the conversation is too long to keep in this browser: a reload keeps only its last ${messages.length} ` +
        "messages");
    }
    return true;
  }

  function restore() {
    const { chat: found, problem } = parseStoredChat(stored(CHAT));
    chat.system = found.system;
    chat.messages = found.messages;
    $("system").value = chat.system;
    $("systembox").open = chat.system.trim() !== "";  // a system prompt in use is in sight
    for (const m of chat.messages) {
      if (m.role === "user") userBubble(m.content);
      else draw(answerBubble(m), true);
    }
    if (problem) notice(chat.messages.length ? problem : `${problem}; this is a new chat`);
  }

  function newChat() {
    epoch++;
    if (controller) controller.abort();
    chat.messages = [];
    views.length = 0;
    $("log").replaceChildren();
    save();
  }

  async function send(ev) {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    const mine = epoch;
    const question = { role: "user", content: text };
    chat.system = $("system").value;
    const messages = requestMessages(chat.system, [...chat.messages, question]);
    userBubble(text);
    const turn = newTurn();
    const msg = { role: "assistant", content: "", pieces: turn.pieces, meta: "", error: null };
    const view = answerBubble(msg);
    const temperature = parseFloat($("temperature").value);
    const maxTokens = parseInt($("max_tokens").value, 10) || null;
    const body = requestBody($("model").value, $("draft").value, messages,
      Number.isFinite(temperature) ? temperature : 0, maxTokens);
    controller = new AbortController();
    $("stop").disabled = false;
    $("log").setAttribute("aria-busy", "true");  // screen readers read the answer once, when it is complete
    const update = () => {
      msg.content = turn.text;
      msg.meta = turn.error ? "" : statsLine(turn.stats);
      msg.error = turn.error;
    };
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
        signal: controller.signal });
      if (r.status === 401) $("keybox").hidden = false;
      if (!r.ok) {
        turn.error = await failure(r);
      } else {
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        while (!turn.done) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          const parsed = parseSSE(buffer);
          buffer = parsed.rest;
          for (const payload of parsed.events) applyEvent(turn, payload);
          update();
          if (rendered()) drawSoon(view);
          else draw(view);
        }
      }
    } catch (e) {
      turn.error = e.name === "AbortError" ? "stopped" : `request failed: ${e.message}`;
    } finally {
      controller = null;
      $("stop").disabled = true;
      $("log").removeAttribute("aria-busy");
    }
    update();
    view.final = true;
    draw(view, true);
    if (mine === epoch && turn.text) {  // nothing came back: the question may be asked again
      chat.messages.push(question, msg);
      save();
    }
    loadModels();  // a model loaded on demand is now listed as loaded
  }

  $("form").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);  // not while an input method composes
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("model").addEventListener("change", fillDrafts);
  $("clear").addEventListener("click", newChat);
  let typing = null;
  $("system").addEventListener("input", () => {  // kept as it is typed (a reload may come before a send)
    clearTimeout(typing);
    typing = setTimeout(() => {
      chat.system = $("system").value;
      save();
    }, 300);
  });
  $("log").addEventListener("click", (e) => {
    const button = e.target.closest("button.copy");
    if (button) copyCode(button);
  });
  $("markdown").checked = markdown !== null && stored("tandem.markdown") !== "0";
  $("markdown").disabled = markdown === null;
  $("markdown").addEventListener("change", () => {
    store("tandem.markdown", $("markdown").checked ? "1" : "0");
    for (const view of views) draw(view, true);
  });
  $("keybox").addEventListener("submit", (e) => {
    e.preventDefault();
    store("tandem.key", $("key").value.trim());
    $("keybox").hidden = true;
    loadModels();
  });
  restore();
  refreshHealth();
}
