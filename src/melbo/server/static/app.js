// melbo serve: stream live generations and chat replies. Model text is only ever written with textContent.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

// POST JSON, then call onEvent for each line of the streamed NDJSON answer.
async function stream(url, body, onEvent, signal) {
  const response = await fetch(url, {
    method: "POST", signal, credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
    body: JSON.stringify(body),
  });
  if (!response.ok || !response.body) {
    let message = `request failed (${response.status})`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    onEvent({error: message});
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, {stream: true});
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (line.trim()) onEvent(JSON.parse(line));
    }
  }
}

function queueText(event) {
  if (event.queue === 0) return "generating…";
  return `waiting: ${event.queue} request${event.queue === 1 ? "" : "s"} ahead of you`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- Try it live: unsteered and steered columns side by side
function setUpLive(form) {
  const section = form.closest("section");
  const columnsBox = section.querySelector(".columns");
  const status = form.querySelector(".queue");
  const errorBox = section.querySelector(".live-error");
  let controller = null;
  form.addEventListener("submit", async (submitted) => {
    submitted.preventDefault();
    if (controller) controller.abort();  // a new request replaces the running one (the server cancels it)
    controller = new AbortController();
    const data = new FormData(form);
    const body = {
      prompt: data.get("prompt"),
      perturbations: data.getAll("perturbations").map(Number),
      scale: Number(data.get("scale")),
      max_new_tokens: Number(data.get("max_new_tokens")),
      random: data.get("random") === "on",
    };
    columnsBox.replaceChildren();
    errorBox.hidden = true;
    let texts = [];
    status.textContent = "sending…";
    try {
      await stream(form.dataset.stream, body, (event) => {
        if ("queue" in event) status.textContent = queueText(event);
        if ("status" in event) status.textContent = event.status;
        if ("columns" in event) {
          texts = event.columns.map((name) => {
            const column = el("div", "column");
            column.dataset.name = name;
            column.append(el("h3", "", name));
            const text = el("pre", "text", "");
            column.append(text);
            columnsBox.append(column);
            return text;
          });
        }
        if ("delta" in event) event.delta.forEach((piece, k) => { if (piece) texts[k].textContent += piece; });
        if ("done" in event) status.textContent = "done";
        if ("error" in event) { errorBox.textContent = event.error; errorBox.hidden = false; status.textContent = ""; }
      }, controller.signal);
    } catch (e) {
      if (e.name !== "AbortError") { errorBox.textContent = String(e); errorBox.hidden = false; }
    }
  });
}

// ---- Chat: the history stays in the page and goes with every turn
function setUpChat(form) {
  const log = form.querySelector(".chat-log");
  const status = form.querySelector(".queue");
  const errorBox = document.querySelector(".chat-error");
  let history = [];
  form.querySelector(".chat-reset").addEventListener("click", () => { history = []; log.replaceChildren(); });
  form.addEventListener("submit", async (submitted) => {
    submitted.preventDefault();
    const data = new FormData(form);
    const message = String(data.get("message") || "");
    if (!message.trim()) return;
    errorBox.hidden = true;
    const turns = history.concat([{role: "user", content: message}]);
    log.append(el("div", "turn user", message));
    const reply = el("div", "turn assistant", "");
    log.append(reply);
    form.elements.message.value = "";
    let text = "";
    let failed = false;
    await stream(form.dataset.stream, {
      messages: turns, perturbation: data.get("perturbation"),
      scale: Number(data.get("scale")), max_new_tokens: Number(data.get("max_new_tokens")),
    }, (event) => {
      if ("queue" in event) status.textContent = queueText(event);
      if ("status" in event) status.textContent = event.status;
      if ("columns" in event) reply.dataset.name = event.columns[0];
      if ("delta" in event) { text += event.delta[0]; reply.textContent = text; }
      if ("done" in event) status.textContent = "";
      if ("error" in event) { failed = true; errorBox.textContent = event.error; errorBox.hidden = false; }
    });
    if (failed) { reply.remove(); log.lastChild.remove(); return; }
    history = turns.concat([{role: "assistant", content: text}]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form.live-form").forEach(setUpLive);
  document.querySelectorAll("form.chat-form").forEach(setUpChat);
});
