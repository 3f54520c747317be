// The Images area: generate a picture from a prompt; results stay (newest first) for the visit.

import { apiJson, messageOf } from "./api.js";
import { el, fillModelSelect, showMessage } from "./dom.js";

const form = document.getElementById("images-form");
const modelSelect = document.getElementById("images-model");
const promptBox = document.getElementById("images-prompt");
const sizeSelect = document.getElementById("images-size");
const stepsInput = document.getElementById("images-steps");
const seedInput = document.getElementById("images-seed");
const generateButton = document.getElementById("images-generate");
const clearButton = document.getElementById("images-clear");
const statusLine = document.getElementById("images-status");
const errorBox = document.getElementById("images-error");
const results = document.getElementById("images-results");

let working = null; // the AbortController of the generation under way
const urls = new Set(); // the results' blob: URLs, let go of when they are cleared

function pngBlob(base64) {
  const bytes = Uint8Array.from(atob(base64), (character) => character.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

async function showResult(prompt, blob, seed, signal) {
  const url = URL.createObjectURL(blob);
  const name = `hearth-${seed ?? Date.now()}.png`;
  const image = el("img", { src: url, alt: prompt });
  await image.decode().catch(() => {}); // shown once drawn; a broken one shows its alt text
  if (signal.aborted) return URL.revokeObjectURL(url); // cleared meanwhile
  urls.add(url);
  const figure = el(
    "figure",
    { class: "card result" },
    image,
    el(
      "figcaption",
      {},
      el("span", { class: "prompt", text: prompt }),
      el("a", { href: url, download: name, class: "button small", text: "Download" }),
    ),
  );
  results.prepend(figure);
  clearButton.hidden = false;
}

// Generate stays enabled while it works (aria-disabled, clicks ignored): the focus stays on it.
function setWorking(controller) {
  working = controller;
  if (controller) generateButton.setAttribute("aria-disabled", "true");
  else generateButton.removeAttribute("aria-disabled");
}

async function generate() {
  if (working) return; // one at a time
  const prompt = promptBox.value.trim();
  if (!prompt) {
    showMessage(errorBox, "Write a prompt first.");
    return;
  }
  if (!modelSelect.value) {
    showMessage(errorBox, "There is no image model to send to.");
    return;
  }
  const request = {
    model: modelSelect.value,
    prompt,
    size: sizeSelect.value,
    n: 1,
    response_format: "b64_json",
  };
  // Empty means the model's default steps and a random seed: leave them out.
  if (stepsInput.value !== "" && Number.isFinite(stepsInput.valueAsNumber)) request.steps = stepsInput.valueAsNumber;
  if (seedInput.value !== "" && Number.isFinite(seedInput.valueAsNumber)) request.seed = seedInput.valueAsNumber;
  const controller = new AbortController();
  setWorking(controller);
  showMessage(errorBox, "");
  statusLine.textContent = "Generating…";
  try {
    const answer = await apiJson("/v1/images/generations", { method: "POST", json: request, signal: controller.signal });
    const image = answer?.data?.[0]?.b64_json;
    if (!image) throw new Error("the server sent no image");
    await showResult(prompt, pngBlob(image), request.seed, controller.signal);
    if (!controller.signal.aborted) statusLine.textContent = "Done.";
  } catch (error) {
    if (controller.signal.aborted) return; // Forget key: nothing of it is shown
    statusLine.textContent = "";
    showMessage(errorBox, messageOf(error));
  } finally {
    if (working === controller) setWorking(null);
  }
}

function clearResults() {
  for (const url of urls) URL.revokeObjectURL(url);
  urls.clear();
  results.replaceChildren();
  clearButton.hidden = true;
}

export function updateImageModels(models) {
  const gone = fillModelSelect(modelSelect, models, "image");
  if (gone) statusLine.textContent = gone;
}

/** Stop any generation and forget the pictures and the prompt (Forget key). */
export function clearImages() {
  working?.abort();
  setWorking(null);
  clearResults();
  promptBox.value = "";
  statusLine.textContent = "";
  showMessage(errorBox, "");
}

export function setupImages() {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  clearButton.addEventListener("click", () => {
    clearResults();
    statusLine.textContent = "Cleared the images.";
    promptBox.focus(); // the button is gone
  });
}
