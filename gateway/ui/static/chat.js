// The Chat area: a streamed conversation with a chat model, kept in localStorage.

import { ApiError, apiFetch, errorOf, messageOf, readEvents, readStored, writeStored } from "./api.js";
import { copyText, el, fillModelSelect, showMessage } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const STORAGE = "hearth.chat";
const DEFAULTS = { model: "", system: "", temperature: 0.7, maxTokens: 512 };
// Each draw parses the whole answer: past this size, at most one draw per THROTTLE_MS.
const BIG_ANSWER = 8192;
const THROTTLE_MS = 150;
const TOO_LONG = "This conversation is too long to keep in the browser; it will be lost on reload.";

const section = document.getElementById("chat");
const modelSelect = document.getElementById("chat-model");
const systemBox = document.getElementById("chat-system");
const temperatureInput = document.getElementById("chat-temperature");
const maxTokensInput = document.getElementById("chat-max-tokens");
const conversation = section.querySelector("ol.conversation");
const noteBox = document.getElementById("chat-note");
const errorBox = document.getElementById("chat-error");
const announcer = document.getElementById("chat-announce");
const form = document.getElementById("chat-form");
const messageBox = document.getElementById("chat-message");
const sendButton = document.getElementById("chat-send");
const stopButton = document.getElementById("chat-stop");
const newChatButton = document.getElementById("chat-new");

// messages: [{role: "user" | "assistant", content, stats?}], one item each in `conversation`.
let chat = { ...DEFAULTS, messages: [] };
let streaming = null; // {controller, userStopped} while an answer streams
let storageFull = false;

// One button, moved to the last message: Regenerate an answer, or Retry a question whose
// answer was stopped before its first word.
const regenerateButton = el("button", { type: "button", class: "quiet small", onclick: regenerate });

function showSettings() {
  systemBox.value = chat.system || "";
  temperatureInput.value = String(chat.temperature ?? DEFAULTS.temperature);
  maxTokensInput.value = String(chat.maxTokens ?? DEFAULTS.maxTokens);
}

function load() {
  try {
    const saved = JSON.parse(readStored(STORAGE) || "null");
    if (saved && Array.isArray(saved.messages)) {
      chat = { ...chat, ...saved };
      chat.messages = saved.messages.filter(
        (message) =>
          ["user", "assistant"].includes(message?.role) && typeof message.content === "string" && message.content,
      );
    }
  } catch {
    // A broken saved chat starts a new one.
  }
  showSettings();
}

function save() {
  chat.model = modelSelect.value || chat.model;
  chat.system = systemBox.value;
  chat.temperature = temperatureInput.valueAsNumber;
  chat.maxTokens = maxTokensInput.valueAsNumber;
  if (writeStored(STORAGE, JSON.stringify(chat))) return;
  writeStored(STORAGE, null); // else an older copy would come back on reload, passing for this one
  storageFull = true;
  showMessage(noteBox, TOO_LONG);
}

function messageItem(message) {
  const content = el("div", { class: "content" });
  if (message.role === "user") {
    content.textContent = message.content;
    return el("li", { class: "message user" }, content);
  }
  content.append(renderMarkdown(message.content));
  const copyButton = el("button", { type: "button", class: "quiet small", text: "Copy" });
  copyButton.addEventListener("click", async () => {
    const copied = await copyText(message.content);
    copyButton.textContent = copied ? "Copied" : "Copy failed";
    setTimeout(() => (copyButton.textContent = "Copy"), 1500);
  });
  const stats = el("p", { class: "stats", text: message.stats || "" });
  return el("li", { class: "message assistant" }, content, stats, el("div", { class: "actions" }, copyButton));
}

// Only the messages that change are drawn: the others keep their focus and their parsed text.
function appendMessage(message) {
  chat.messages.push(message);
  const item = messageItem(message);
  conversation.append(item);
  return item;
}

function dropLast() {
  chat.messages.pop();
  conversation.lastElementChild?.remove();
}

function placeRegenerate() {
  const last = chat.messages[chat.messages.length - 1];
  const item = conversation.lastElementChild;
  if (!last || !item || streaming) {
    regenerateButton.remove();
    return;
  }
  regenerateButton.textContent = last.role === "user" ? "Retry" : "Regenerate";
  let actions = item.querySelector(".actions");
  if (!actions) item.append((actions = el("div", { class: "actions" })));
  if (regenerateButton.parentElement !== actions) actions.append(regenerateButton);
}

function renderConversation() {
  conversation.replaceChildren(...chat.messages.map(messageItem));
  placeRegenerate();
}

// Send stays enabled (it does nothing meanwhile): a disabled button would drop the focus.
function setStreaming(value) {
  streaming = value;
  stopButton.disabled = !value;
  if (value) sendButton.setAttribute("aria-disabled", "true");
  else sendButton.removeAttribute("aria-disabled");
}

function stopStream() {
  streaming?.controller.abort();
  setStreaming(null);
}

// Follow the answer as it grows, unless the reader has scrolled up to read something.
function nearBottom() {
  const page = document.scrollingElement;
  return page.scrollHeight - page.scrollTop - page.clientHeight < 120;
}

function scrollToEnd() {
  const page = document.scrollingElement;
  page.scrollTop = page.scrollHeight;
}

// "12.3 tok/s · TTFT 180 ms · 57 tokens", and then how it ended if not as it should.
function describeSpeed({ started, first, last, tokens }, ending) {
  const parts = [];
  if (first !== null) {
    // All of it in one burst (first == last): then count from the moment it was sent.
    const seconds = (last - first || last - started) / 1000;
    const rate = tokens / seconds;
    if (seconds > 0) parts.push(`${rate >= 100 ? Math.round(rate) : rate.toFixed(1)} tok/s`);
    parts.push(`TTFT ${Math.round(first - started)} ms`);
    parts.push(`${tokens} ${tokens === 1 ? "token" : "tokens"}`);
  }
  if (ending) parts.push(ending);
  return parts.join(" · ");
}

/** Ask the model to answer the conversation so far; the answer streams into a new message. */
async function ask() {
  // Never an empty answer in the history.
  const history = chat.messages.filter((message) => message.content).map(({ role, content }) => ({ role, content }));
  if (systemBox.value.trim()) history.unshift({ role: "system", content: systemBox.value });
  const request = { model: modelSelect.value, messages: history, stream: true, stream_options: { include_usage: true } };
  if (Number.isFinite(temperatureInput.valueAsNumber)) request.temperature = temperatureInput.valueAsNumber;
  if (Number.isFinite(maxTokensInput.valueAsNumber)) request.max_tokens = maxTokensInput.valueAsNumber;

  const answer = { role: "assistant", content: "" };
  const item = appendMessage(answer);
  const [content, stats, actions] = item.children;
  item.setAttribute("aria-busy", "true");
  actions.hidden = true; // Copy and Regenerate once it has ended
  const mine = { controller: new AbortController(), userStopped: false };
  setStreaming(mine);
  regenerateButton.remove();
  announcer.textContent = "";
  scrollToEnd();

  const timing = { started: performance.now(), first: null, last: null, tokens: 0 };
  let chunks = 0;
  let usage = null;
  let finish = null; // the model's finish_reason
  let done = false; // the [DONE] event came
  let failure = null;
  let ended = false;
  let drawn = 0;
  let drawWaiting = false;
  const draw = () => {
    drawWaiting = false;
    if (ended) return;
    drawn = performance.now();
    const follow = nearBottom();
    content.replaceChildren(renderMarkdown(answer.content));
    if (follow) scrollToEnd();
  };
  const scheduleDraw = () => {
    if (drawWaiting) return;
    drawWaiting = true;
    const wait = answer.content.length > BIG_ANSWER ? drawn + THROTTLE_MS - performance.now() : 0;
    if (wait > 0) setTimeout(() => requestAnimationFrame(draw), wait);
    else requestAnimationFrame(draw); // at most one draw a frame
  };
  try {
    const response = await apiFetch("/v1/chat/completions", { method: "POST", json: request, signal: mine.controller.signal });
    if (!response.ok) throw await errorOf(response);
    for await (const data of readEvents(response.body)) {
      if (data === "[DONE]") {
        done = true;
        break;
      }
      let event;
      try {
        event = JSON.parse(data);
      } catch {
        continue; // not an event of ours
      }
      if (event.error) throw new ApiError(event.error.message || "The model failed to answer.");
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (choice?.finish_reason) finish = choice.finish_reason;
      if (choice?.delta?.content) {
        const now = performance.now();
        if (timing.first === null) timing.first = now;
        timing.last = now;
        chunks += 1;
        answer.content += choice.delta.content;
        scheduleDraw();
      }
    }
  } catch (error) {
    failure = error;
  }
  ended = true;
  if (streaming === mine) setStreaming(null);
  if (!chat.messages.includes(answer)) return; // New chat, or Forget key, cleared it all
  const stopped = mine.userStopped;
  if (stopped) failure = null;
  else if (failure?.name === "AbortError") failure = new ApiError("The answer was interrupted.");
  const stopHadFocus = document.activeElement === stopButton;
  const follow = nearBottom();

  if (!answer.content && !stopped) {
    // Nothing came: the question goes back into the box, to send again (Enter) when ready.
    dropLast();
    const question = chat.messages[chat.messages.length - 1];
    if (question?.role === "user") {
      dropLast();
      const typed = messageBox.value.trim();
      messageBox.value = typed ? `${question.content}\n\n${typed}` : question.content;
    }
    const empty = done || finish ? "The model sent an empty answer." : "The answer ended before any text came.";
    showMessage(errorBox, failure ? messageOf(failure) : empty);
  } else if (!answer.content) {
    dropLast(); // stopped before the first word: the question stays, with Retry
    announcer.textContent = "Stopped";
  } else {
    let ending = "";
    if (stopped) ending = "stopped";
    else if (failure) ending = "error";
    else if (finish === "length") ending = "cut at max tokens";
    else if (!done && !finish) ending = "incomplete";
    timing.tokens = usage?.completion_tokens ?? chunks;
    answer.stats = describeSpeed(timing, ending);
    content.replaceChildren(renderMarkdown(answer.content));
    stats.textContent = answer.stats;
    item.removeAttribute("aria-busy");
    actions.hidden = false;
    if (failure) showMessage(errorBox, messageOf(failure)); // the alert says it
    else announcer.textContent = stopped ? "Stopped" : `Answer ${ending || "finished"}`;
  }
  save();
  placeRegenerate();
  if (follow) scrollToEnd();
  if (stopHadFocus || document.activeElement === document.body) messageBox.focus();
}

function send() {
  const text = messageBox.value.trim();
  if (!text || streaming) return;
  if (!modelSelect.value) {
    showMessage(errorBox, "There is no chat model to send to.");
    return;
  }
  showMessage(errorBox, "");
  if (!storageFull) showMessage(noteBox, "");
  messageBox.value = "";
  // A question whose answer was stopped before its first word gives way to this one.
  if (chat.messages[chat.messages.length - 1]?.role === "user") dropLast();
  appendMessage({ role: "user", content: text });
  ask();
}

function regenerate() {
  if (streaming || !chat.messages.length) return;
  if (!modelSelect.value) {
    showMessage(errorBox, "There is no chat model to send to.");
    return;
  }
  const hadFocus = document.activeElement === regenerateButton;
  showMessage(errorBox, "");
  if (chat.messages[chat.messages.length - 1].role === "assistant") dropLast();
  ask();
  if (hadFocus) stopButton.focus(); // its button went with the old answer: Stop is what it does now
}

function newChat() {
  stopStream();
  chat.messages = [];
  storageFull = false;
  showMessage(errorBox, "");
  showMessage(noteBox, "");
  announcer.textContent = "";
  save();
  renderConversation();
  messageBox.focus();
}

/** Stop any answer in progress (the key was refused: the question goes back into the box). */
export function stopChat() {
  stopStream();
}

/** Forget the conversation and the settings, on screen and in the browser (Forget key). */
export function clearChat() {
  stopStream();
  chat = { ...DEFAULTS, messages: [] };
  storageFull = false;
  writeStored(STORAGE, null);
  showSettings();
  messageBox.value = "";
  showMessage(errorBox, "");
  showMessage(noteBox, "");
  announcer.textContent = "";
  renderConversation();
}

/** Show the session's chat models in the picker, keeping the last choice. */
export function updateChatModels(models) {
  const gone = fillModelSelect(modelSelect, models, "chat", chat.model);
  if (gone) showMessage(noteBox, gone);
}

export function setupChat() {
  load();
  renderConversation();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  messageBox.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; not while an input method is composing a word.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  stopButton.addEventListener("click", () => {
    if (!streaming) return;
    streaming.userStopped = true;
    streaming.controller.abort();
  });
  newChatButton.addEventListener("click", newChat);
  for (const input of [modelSelect, systemBox, temperatureInput, maxTokensInput]) {
    input.addEventListener("change", save);
  }
}
