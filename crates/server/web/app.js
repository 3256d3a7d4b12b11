// camelid's chat page: talks to the server's OpenAI API (/v1/models, /v1/chat/completions with
// stream: true), keeps the conversation and settings in localStorage. No dependencies.
"use strict";

const STORE = "camelid-chat";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), model = $("model"), temperature = $("temperature");
const maxTokens = $("max-tokens"), system = $("system"), status = $("status"), apiKey = $("api-key");
const sendButton = $("send"), stopButton = $("stop"), clearButton = $("clear");

let state = load();
let controller = null; // the AbortController of the reply being streamed
let epoch = 0; // bumped by "clear conversation", so a reply cut off by it is not kept

function load() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE) || "{}");
    return {
      messages: Array.isArray(s.messages) ? s.messages.filter((m) => m && typeof m.content === "string") : [],
      system: typeof s.system === "string" ? s.system : "",
      temperature: typeof s.temperature === "string" ? s.temperature : temperature.value,
      maxTokens: typeof s.maxTokens === "string" ? s.maxTokens : maxTokens.value,
      model: typeof s.model === "string" ? s.model : "",
      apiKey: typeof s.apiKey === "string" ? s.apiKey : "",
    };
  } catch {
    return { messages: [], system: "", temperature: temperature.value, maxTokens: maxTokens.value, model: "", apiKey: "" };
  }
}

function save() {
  state.system = system.value;
  state.temperature = temperature.value;
  state.maxTokens = maxTokens.value;
  state.model = model.value || state.model;
  state.apiKey = apiKey.value;
  try {
    localStorage.setItem(STORE, JSON.stringify(state));
  } catch (e) {
    setStatus(`could not save the conversation: ${e.message}`);
  }
}

function setStatus(text) {
  status.textContent = text;
}

// One message bubble; its text goes in as text, never as HTML.
function bubble(role, content) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = content;
  div.append(who, body);
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return body;
}

function render() {
  log.replaceChildren();
  for (const m of state.messages) bubble(m.role, m.content);
}

function busy(on) {
  sendButton.disabled = on;
  stopButton.disabled = !on;
  model.disabled = on;
}

// Headers for the API: the key, when one is set (servers started with --api-key need it).
function apiHeaders(extra = {}) {
  const key = apiKey.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: apiHeaders() });
    if (r.status === 401) {
      model.replaceChildren();
      setStatus(apiKey.value.trim() ? "the server refused this API key" : "this server needs an API key: enter it above");
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const ids = (await r.json()).data.map((m) => m.id);
    model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(state.model)) model.value = state.model;
    setStatus(ids.length === 0 ? "the server lists no models" : "");
  } catch (e) {
    setStatus(`could not list models: ${e.message}`);
  }
}

// The error message of an OpenAI-shaped error body, else the HTTP status.
async function errorOf(response) {
  try {
    const j = await response.json();
    if (j && j.error && j.error.message) return j.error.message;
  } catch {}
  return `HTTP ${response.status}`;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  bubble("user", text);
  save();
  const messages = [];
  if (system.value.trim()) messages.push({ role: "system", content: system.value });
  messages.push(...state.messages.map(({ role, content }) => ({ role, content })));
  const body = { model: model.value, messages, stream: true };
  const t = parseFloat(temperature.value);
  if (Number.isFinite(t)) body.temperature = t;
  const n = parseInt(maxTokens.value, 10);
  if (Number.isFinite(n) && n > 0) body.max_tokens = n;

  const reply = { role: "assistant", content: "" };
  const started = epoch;
  const out = bubble("assistant", "");
  out.parentElement.setAttribute("aria-busy", "true");
  controller = new AbortController();
  busy(true);
  setStatus("generating…");
  let ending = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorOf(r));
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += chunk.value;
      let end;
      while (!done && (end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || "server error");
          const c = j.choices && j.choices[0];
          if (!c) continue;
          if (c.delta && typeof c.delta.content === "string" && c.delta.content) {
            reply.content += c.delta.content;
            out.textContent = reply.content;
            log.scrollTop = log.scrollHeight;
          }
          if (c.finish_reason) ending = c.finish_reason === "length" ? "stopped at max tokens" : "";
        }
      }
    }
    setStatus(ending);
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("stopped");
    } else {
      out.parentElement.classList.add("error");
      setStatus(`error: ${e.message}`);
    }
  } finally {
    controller = null;
    out.parentElement.removeAttribute("aria-busy");
    if (started !== epoch) {
      // The conversation was cleared meanwhile.
    } else if (reply.content) {
      state.messages.push(reply);
    } else {
      out.parentElement.remove();
    }
    save();
    busy(false);
    input.focus();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value;
  if (!text.trim() || controller) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

stopButton.addEventListener("click", () => {
  if (controller) controller.abort();
});

clearButton.addEventListener("click", () => {
  if (controller) controller.abort();
  epoch += 1;
  state.messages = [];
  save();
  render();
  setStatus("conversation cleared");
});

for (const el of [system, temperature, maxTokens, model]) el.addEventListener("change", save);
apiKey.addEventListener("change", () => {
  save();
  loadModels();
});

system.value = state.system;
apiKey.value = state.apiKey;
temperature.value = state.temperature;
maxTokens.value = state.maxTokens;
render();
busy(false);
loadModels();
