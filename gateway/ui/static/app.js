// Hearth's web UI: sign-in, navigation between the areas, and the session they share.

import { ApiError, apiJson, forgetKey, messageOf, onUnauthorized, storedKey, useKey } from "./api.js";
import { clearChat, setupChat, stopChat, updateChatModels } from "./chat.js";
import { el, showMessage } from "./dom.js";
import { clearImages, setupImages, updateImageModels } from "./images.js";
import { createModelsArea } from "./models.js";
import { clearSpeech, setupSpeech, showSpeech, updateSpeechModels } from "./speech.js";

const AREAS = ["chat", "speech", "images", "models"];

const nav = document.getElementById("nav");
const navList = nav.querySelector("ul");
const main = document.getElementById("main");
const keySection = document.getElementById("key");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("key-input");
const keyError = document.getElementById("key-error");
const forgetButton = document.getElementById("forget-key");
const startupProblem = document.getElementById("startup-problem");
const startupError = document.getElementById("startup-error");
const connectionDot = document.getElementById("connection-dot");
const connectionText = document.getElementById("connection-text");

let session = null;
let modelsArea = null; // exists only for admins: others get neither the link nor the area

function setConnection(state, text) {
  connectionDot.dataset.state = state;
  connectionText.textContent = text;
}

function fetchSession(key) {
  return apiJson("/ui/session", key === undefined ? {} : { key });
}

function showKeyForm(message) {
  session = null;
  stopChat();
  modelsArea?.destroy();
  modelsArea = null;
  nav.querySelector('a[data-area="models"]')?.parentElement.remove();
  nav.hidden = true;
  forgetButton.hidden = true;
  startupProblem.hidden = true;
  for (const area of AREAS) {
    const section = document.getElementById(area);
    if (section) section.hidden = true;
  }
  keySection.hidden = false;
  showMessage(keyError, message);
  setConnection("signed-out", "Signed out");
  document.title = "Hearth";
  keyInput.focus();
}

function applySession(next) {
  session = next;
  const models = session.models || [];
  updateChatModels(models);
  updateSpeechModels(models);
  updateImageModels(models);
  if (session.admin && !modelsArea) {
    modelsArea = createModelsArea({ onChanged: refreshSession });
    main.append(modelsArea.section);
    navList.append(el("li", {}, el("a", { href: "#/models", "data-area": "models", text: "Models" })));
  }
  modelsArea?.updateSession(session);
  setConnection("ok", session.admin ? "Connected · admin" : "Connected");
}

function showApp(next) {
  keySection.hidden = true;
  startupProblem.hidden = true;
  showMessage(keyError, "");
  applySession(next);
  nav.hidden = false;
  forgetButton.hidden = !session.keys;
  route(false);
}

/** Read the session again (the models changed): the pickers and the Models area follow. */
async function refreshSession() {
  try {
    applySession(await fetchSession());
  } catch (error) {
    if (error.status === 403) showKeyForm(error.message);
    else if (error.status !== 401) setConnection("error", "Connection problem"); // 401: see below
  }
}

function currentArea() {
  const name = location.hash.replace(/^#\/?/, "");
  if (name === "models" && !modelsArea) return "chat";
  return AREAS.includes(name) ? name : "chat";
}

// Show the area the address names; `moveFocus` after a click, so screen readers follow.
function route(moveFocus = true) {
  if (!session) return;
  const area = currentArea();
  for (const name of AREAS) {
    const section = document.getElementById(name);
    if (section) section.hidden = name !== area;
  }
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.area === area) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (area === "models") modelsArea.show();
  else modelsArea?.hide();
  if (area === "speech") showSpeech(); // lists the voices (starts the voice model) once there
  const title = document.getElementById(area).querySelector("h2");
  document.title = `${title.textContent} · Hearth`;
  if (moveFocus) title.focus();
}

// After signing in: where the user goes on, the Message box in Chat, else the area's heading.
function focusArea() {
  const area = currentArea();
  const target = area === "chat" ? document.getElementById("chat-message") : document.getElementById(area).querySelector("h2");
  target.focus();
}

async function start() {
  startupProblem.hidden = true;
  setConnection("unknown", "Connecting…");
  useKey(storedKey(), false);
  try {
    showApp(await fetchSession());
  } catch (error) {
    if (error.status === 401) showKeyForm("");
    else if (error.status === 403) showKeyForm(error.message);
    else {
      setConnection("error", "Not connected");
      showMessage(startupError, messageOf(error));
      startupProblem.hidden = false;
    }
  }
}

keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (!key) return;
  if (!/^[\x21-\x7e]+$/.test(key)) {
    // A header cannot carry it (fetch would throw), so no server could accept it.
    showMessage(keyError, "That key was refused: keys are letters, digits and punctuation only.");
    return;
  }
  const button = keyForm.querySelector('button[type="submit"]');
  button.disabled = true;
  showMessage(keyError, "");
  try {
    const next = await fetchSession(key);
    useKey(key, true);
    keyInput.value = "";
    showApp(next);
    focusArea();
  } catch (error) {
    keyInput.focus(); // the button was disabled meanwhile: the focus goes back to the key
    if (error instanceof ApiError && error.status === 401) showMessage(keyError, "That key was refused.");
    else if (error instanceof ApiError && error.status === 403) {
      showMessage(keyError, `That key was refused: ${error.message}`);
    } else showMessage(keyError, messageOf(error));
  } finally {
    button.disabled = false;
  }
});

// The next person at this browser sees nothing of the last one's work.
forgetButton.addEventListener("click", () => {
  forgetKey();
  clearChat();
  clearSpeech();
  clearImages();
  showKeyForm("");
});

// A request after signing in was refused: the key was revoked or changed on the server.
onUnauthorized(() => {
  if (session) showKeyForm("Your key was refused; type it again.");
});

document.getElementById("startup-retry").addEventListener("click", start);
window.addEventListener("hashchange", () => route(true));

setupChat();
setupSpeech();
setupImages();
start();
