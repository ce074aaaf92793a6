// Tandem's chat page: streams /v1/chat/completions with token sources and colours the tokens the draft got
// accepted. The pure functions at the top (SSE parsing, turn assembly, stats and draft lists) are exported
// for tests under Node; the DOM code at the bottom runs only in a browser. Model output is only ever set
// with textContent, never parsed as HTML.
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
  for (const id of model.compatible_draft_models || []) opts.push({ value: id, label: id });
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

if (typeof module !== "undefined") {
  module.exports = { parseSSE, newTurn, applyEvent, statsLine, draftOptions, requestBody, healthLine };
}

// -- the page ------------------------------------------------------------------------------------------------

if (typeof document !== "undefined") {
  const $ = (id) => document.getElementById(id);
  const history = [];  // {role, content} of the conversation so far
  let models = [];
  let controller = null;
  let health = null;  // the last /health body

  const headers = () => {
    const h = { "Content-Type": "application/json" };
    const key = localStorage.getItem("tandem.key");
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

  function render(turn, view) {
    // Only what changed: the last span (a run of one source grows) and the spans after it, not the whole answer
    // on every chunk.
    const spans = view.body.getElementsByTagName("span");
    for (let i = Math.max(spans.length - 1, 0); i < turn.pieces.length; i++) {
      const span = spans[i] || view.body.appendChild(document.createElement("span"));
      span.className = turn.pieces[i].source;
      span.textContent = turn.pieces[i].text;
    }
    view.meta.textContent = turn.error ? "" : statsLine(turn.stats);
    if (turn.error && !view.body.querySelector(".error")) {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = turn.error;
      view.body.append(err);
    }
    view.div.scrollIntoView({ block: "end" });
  }

  async function send(ev) {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    history.push({ role: "user", content: text });
    bubble("user").body.textContent = text;
    const view = bubble("assistant");
    const turn = newTurn();
    const temperature = parseFloat($("temperature").value);
    const maxTokens = parseInt($("max_tokens").value, 10) || null;
    const body = requestBody($("model").value, $("draft").value, history,
      Number.isFinite(temperature) ? temperature : 0, maxTokens);
    controller = new AbortController();
    $("stop").disabled = false;
    $("log").setAttribute("aria-busy", "true");  // screen readers read the answer once, when it is complete
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
          render(turn, view);
        }
      }
    } catch (e) {
      turn.error = e.name === "AbortError" ? "stopped" : `request failed: ${e.message}`;
    } finally {
      controller = null;
      $("stop").disabled = true;
      $("log").removeAttribute("aria-busy");
    }
    render(turn, view);
    if (turn.text) history.push({ role: "assistant", content: turn.text });
    else history.pop();  // nothing came back: the question may be asked again
    loadModels();  // a model loaded on demand is now listed as loaded
  }

  $("form").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);  // not while an input method composes
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("model").addEventListener("change", fillDrafts);
  $("clear").addEventListener("click", () => {
    history.length = 0;
    $("log").replaceChildren();
  });
  $("keybox").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem("tandem.key", $("key").value.trim());
    $("keybox").hidden = true;
    loadModels();
  });
  refreshHealth();
}
