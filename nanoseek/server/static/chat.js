"use strict";
// The nanoseek chat page: the conversation is kept in this page (an array of messages) and each reply is
// streamed from /v1/chat/completions as server-sent events. No external scripts, so it works offline.

const $ = (id) => document.getElementById(id);
const conversation = []; // [{role, content}] sent back to the server each turn
let modelId = null;
let controller = null; // AbortController of the reply being streamed

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  const body = await response.json().catch(() => null);
  return body && body.error ? body.error.message : "HTTP " + response.status;
}

// The model loads in the background after the server starts: poll /health until it is ready.
async function waitReady() {
  try {
    const r = await fetch("/health");
    if (r.ok) {
      await loadModel();
      return;
    }
    const msg = await errorText(r);
    setStatus(msg.includes("failed") ? "error" : "loading", msg);
  } catch (e) {
    setStatus("error", "server unreachable");
  }
  setTimeout(waitReady, 1000);
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) {
    setStatus("error", await errorText(r));
    return;
  }
  const models = (await r.json()).data;
  modelId = models[0].id;
  $("model").textContent = modelId + " · context " + models[0].max_model_len;
  setStatus("ready", "ready");
}

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  if (role === "assistant") {
    el.innerHTML = '<details class="reasoning" hidden><summary>Reasoning</summary><div class="text"></div></details>' +
      '<div class="content"></div><div class="meta"></div>';
  } else {
    el.textContent = text;
  }
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

// Split an SSE byte stream into the JSON payloads of its `data:` lines; stops at [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const system = $("system").value.trim();
  const maxTokens = parseInt($("max-tokens").value, 10);
  const body = {
    model: modelId,
    messages: (system ? [{ role: "system", content: system }] : []).concat(conversation,
      [{ role: "user", content: text }]),
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature; // empty field: the server's default
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if ($("thinking").checked) body.thinking = { type: "enabled" };

  addMessage("user", text);
  const el = addMessage("assistant");
  const reasoningBox = el.querySelector(".reasoning");
  const reasoningText = el.querySelector(".reasoning .text");
  const contentEl = el.querySelector(".content");
  el.dataset.state = "streaming";
  el.dataset.chunks = "0";
  let content = "", reasoning = "", finish = null, usage = null;
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  const started = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const event of sseEvents(r)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) {
          reasoning += delta.reasoning_content;
          reasoningBox.hidden = false;
          if (!content) reasoningBox.open = true; // collapsible: open while thinking, closed once answering
          reasoningText.textContent = reasoning;
        }
        if (delta.content) {
          if (!content && reasoning) reasoningBox.open = false;
          content += delta.content;
          contentEl.textContent = content;
        }
        if (delta.content || delta.reasoning_content) el.dataset.chunks = String(+el.dataset.chunks + 1);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      el.scrollIntoView({ block: "end" });
    }
    el.dataset.state = "done";
    conversation.push({ role: "user", content: text }, { role: "assistant", content: content });
  } catch (e) {
    if (e.name === "AbortError") {
      el.dataset.state = "done";
      finish = "stopped";
      conversation.push({ role: "user", content: text }, { role: "assistant", content: content });
    } else {
      el.dataset.state = "error";
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = "Error: " + e.message;
      el.appendChild(err);
    }
  } finally {
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
  const secs = (performance.now() - started) / 1000;
  const parts = [finish ? "finish: " + finish : null, secs.toFixed(1) + " s"];
  if (usage) parts.push(usage.completion_tokens + " tokens", (usage.completion_tokens / secs).toFixed(1) + " tok/s");
  el.querySelector(".meta").textContent = parts.filter(Boolean).join(" · ");
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  if (!modelId) {
    setStatus($("status").dataset.state, "not ready yet: " + $("status").textContent);
    return;
  }
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller && controller.abort());

$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").textContent = "";
});

$("api-key").value = sessionStorage.getItem("nanoseek-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("nanoseek-api-key", $("api-key").value.trim());
  if ($("status").dataset.state !== "loading") loadModel();
});

waitReady();
