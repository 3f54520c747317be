// The Speech area: transcribe or translate an uploaded file or a recording from the microphone.

import { apiJson, messageOf } from "./api.js";
import { fillModelSelect, showMessage } from "./dom.js";

const modelSelect = document.getElementById("speech-model");
const taskSelect = document.getElementById("speech-task");
const fileInput = document.getElementById("speech-file");
const sendButton = document.getElementById("speech-send");
const recordButton = document.getElementById("speech-record");
const recordNote = document.getElementById("speech-record-note");
const statusLine = document.getElementById("speech-status");
const errorBox = document.getElementById("speech-error");
const transcript = document.getElementById("transcript");

let recording = null; // {recorder, stream, discard} while the microphone records
let working = null; // the AbortController of the transcription under way
const waiting = []; // recordings made meanwhile, sent in turn: [{file, name}]
let visit = 0; // one more at each Forget key: what was started before is dropped

// The file name tells the server the container; MediaRecorder picks it per browser.
const EXTENSIONS = { webm: "webm", ogg: "ogg", mp4: "m4a", mpeg: "mp3", wav: "wav", aac: "aac" };

function extensionOf(mimeType) {
  const subtype = (mimeType || "").split(";")[0].split("/")[1] || "";
  return EXTENSIONS[subtype] || "webm";
}

// Transcribe stays enabled while it works (aria-disabled, clicks ignored): the focus stays on it.
function setWorking(controller) {
  working = controller;
  if (controller) sendButton.setAttribute("aria-disabled", "true");
  else sendButton.removeAttribute("aria-disabled");
}

async function transcribe(file, name) {
  if (!modelSelect.value) {
    showMessage(errorBox, "There is no speech model to send to.");
    return;
  }
  const form = new FormData();
  form.append("file", file, name);
  form.append("model", modelSelect.value);
  form.append("response_format", "json");
  const controller = new AbortController();
  setWorking(controller);
  showMessage(errorBox, "");
  statusLine.textContent = "Transcribing…";
  transcript.textContent = ""; // the old text must not pass for the new one
  try {
    const result = await apiJson(`/v1/audio/${taskSelect.value}`, { method: "POST", form, signal: controller.signal });
    transcript.textContent = result.text ?? "";
    statusLine.textContent = "Done.";
  } catch (error) {
    if (controller.signal.aborted) return; // Forget key: nothing of it is shown
    statusLine.textContent = "";
    showMessage(errorBox, messageOf(error));
  } finally {
    if (working === controller) setWorking(null);
  }
  const next = waiting.shift();
  if (next) transcribe(next.file, next.name);
}

function sendFile() {
  if (working) return; // one at a time
  const file = fileInput.files?.[0];
  if (!file) {
    showMessage(errorBox, "Choose an audio file first.");
    return;
  }
  transcribe(file, file.name);
}

async function startRecording() {
  showMessage(errorBox, "");
  const started = visit;
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showMessage(errorBox, `The microphone is not available: ${error.message || error.name}.`);
    return;
  }
  const stopTracks = () => stream.getTracks().forEach((track) => track.stop()); // the browser's recording mark goes
  if (started !== visit) return stopTracks(); // signed out meanwhile
  let recorder;
  try {
    recorder = new MediaRecorder(stream);
  } catch (error) {
    stopTracks();
    showMessage(errorBox, `This browser cannot record: ${error.message || error.name}.`);
    return;
  }
  const chunks = [];
  const current = { recorder, stopTracks, discard: false };
  recorder.addEventListener("dataavailable", (event) => {
    if (event.data.size > 0) chunks.push(event.data);
  });
  recorder.addEventListener("stop", () => {
    stopTracks();
    if (recording === current) recording = null;
    recordButton.textContent = "Record";
    recordButton.classList.remove("recording");
    if (current.discard) return;
    const type = recorder.mimeType || chunks[0]?.type || "audio/webm";
    const file = new Blob(chunks, { type });
    const name = `recording.${extensionOf(type)}`;
    if (!working) transcribe(file, name);
    else {
      waiting.push({ file, name }); // kept, and sent once the one under way is done
      statusLine.textContent = "Still transcribing the previous one; this recording is sent next.";
    }
  });
  recorder.start();
  recording = current;
  recordButton.textContent = "Stop recording";
  recordButton.classList.add("recording");
  statusLine.textContent = "Recording…";
}

function toggleRecording() {
  if (recording) recording.recorder.stop();
  else startRecording();
}

export function updateSpeechModels(models) {
  const gone = fillModelSelect(modelSelect, models, "transcription");
  if (gone) statusLine.textContent = gone;
}

/** Stop the microphone and any transcription, and forget the transcript (Forget key). */
export function clearSpeech() {
  visit += 1;
  waiting.length = 0;
  if (recording) {
    recording.discard = true;
    recording.stopTracks();
    if (recording.recorder.state !== "inactive") recording.recorder.stop();
  }
  working?.abort();
  setWorking(null);
  transcript.textContent = "";
  statusLine.textContent = "";
  showMessage(errorBox, "");
  fileInput.value = "";
}

export function setupSpeech() {
  sendButton.addEventListener("click", sendFile);
  // Browsers give the microphone only to https pages and localhost.
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
    recordButton.disabled = true;
    recordNote.hidden = false;
  } else {
    recordButton.addEventListener("click", toggleRecording);
  }
}
