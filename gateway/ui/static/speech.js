// The Speech area: transcribe or translate an uploaded file or a recording from the microphone,
// and read a text aloud with a voice model.

import { apiFetch, apiJson, ApiError, errorOf, messageOf, readStored, writeStored } from "./api.js";
import { el, fillModelSelect, showMessage } from "./dom.js";

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

// Read aloud: text to speech with a voice model (kind "speech").

const ttsForm = document.getElementById("tts");
const ttsNone = document.getElementById("tts-none");
const ttsControls = document.getElementById("tts-controls");
const voiceModelSelect = document.getElementById("tts-model");
const voiceSelect = document.getElementById("tts-voice");
const ttsText = document.getElementById("tts-text");
const speedInput = document.getElementById("tts-speed");
const speakButton = document.getElementById("tts-speak");
const ttsStatus = document.getElementById("tts-status");
const ttsError = document.getElementById("tts-error");
const ttsResult = document.getElementById("tts-result");
const ttsAudio = document.getElementById("tts-audio");
const ttsDownload = document.getElementById("tts-download");

const VOICE_STORAGE = "hearth.voice"; // {model, voices: {model: voice}}: the last choices
let shown = false; // the Speech area was opened: voices are listed from then on
let voicesOf = ""; // the voice model whose voices the Voice picker lists (or is asking for)
let voicesAsked = 0; // one more at each listing: an older answer is dropped
let speaking = null; // the AbortController of the speech under way
let audioUrl = ""; // the blob: URL of the audio shown

function storedVoices() {
  try {
    const stored = JSON.parse(readStored(VOICE_STORAGE) || "{}");
    return { model: String(stored.model || ""), voices: { ...stored.voices } };
  } catch {
    return { model: "", voices: {} };
  }
}

function remember() {
  const stored = storedVoices();
  if (voiceModelSelect.value) stored.model = voiceModelSelect.value;
  if (voiceModelSelect.value && voiceSelect.value && voicesOf === voiceModelSelect.value) {
    stored.voices[voiceModelSelect.value] = voiceSelect.value;
  }
  writeStored(VOICE_STORAGE, JSON.stringify(stored));
}

function updateVoiceModels(models) {
  const none = !models.some((model) => model.kind === "speech");
  ttsNone.hidden = !none;
  ttsControls.hidden = none;
  const gone = fillModelSelect(voiceModelSelect, models, "speech", storedVoices().model);
  if (gone) ttsStatus.textContent = gone;
  if (none) {
    voicesOf = "";
    voiceSelect.replaceChildren();
  } else if (shown && voicesOf !== voiceModelSelect.value) loadVoices();
}

function setVoiceOptions(options, disabled) {
  voiceSelect.replaceChildren(...options);
  voiceSelect.disabled = disabled;
}

// Asking starts the voice model if it is not running: the picker says so meanwhile.
async function loadVoices() {
  const model = voiceModelSelect.value;
  const asked = ++voicesAsked;
  voicesOf = model;
  if (!model) return setVoiceOptions([], true);
  setVoiceOptions([el("option", { value: "", text: "Loading voices…" })], true);
  try {
    const answer = await apiJson(`/v1/audio/voices?model=${encodeURIComponent(model)}`);
    if (asked !== voicesAsked) return; // another model was picked meanwhile
    const voices = Array.isArray(answer?.data) ? answer.data : [];
    const kept = storedVoices().voices[model];
    const options = voices.map((voice) => {
      const notes = [voice.language, voice.default ? "default" : ""].filter(Boolean).join(", ");
      const name = voice.name || voice.id;
      return el("option", { value: voice.id, text: notes ? `${name} (${notes})` : name });
    });
    if (options.length === 0) options.push(el("option", { value: "", text: "The model's default" }));
    setVoiceOptions(options, voices.length === 0);
    const fallback = voices.find((voice) => voice.default)?.id;
    if (voices.some((voice) => voice.id === kept)) voiceSelect.value = kept;
    else if (fallback) voiceSelect.value = fallback;
  } catch (error) {
    if (asked !== voicesAsked) return;
    voicesOf = ""; // asked again at the next change or visit
    setVoiceOptions([el("option", { value: "", text: "The model's default" })], true);
    showMessage(ttsError, `The voices could not be listed: ${messageOf(error)}`);
  }
}

// Speak stays enabled while it works (aria-disabled, clicks ignored): the focus stays on it.
function setSpeaking(controller) {
  speaking = controller;
  if (controller) speakButton.setAttribute("aria-disabled", "true");
  else speakButton.removeAttribute("aria-disabled");
}

function dropAudio() {
  ttsResult.hidden = true;
  ttsAudio.pause();
  ttsAudio.removeAttribute("src");
  ttsAudio.load(); // lets go of the old audio
  ttsDownload.removeAttribute("href");
  if (audioUrl) URL.revokeObjectURL(audioUrl);
  audioUrl = "";
}

async function speak() {
  if (speaking) return; // one at a time
  const input = ttsText.value.trim();
  if (!voiceModelSelect.value) return showMessage(ttsError, "There is no voice model to send to.");
  if (!input) {
    ttsText.focus();
    return showMessage(ttsError, "Write the text to speak first.");
  }
  const speed = speedInput.value === "" ? 1 : speedInput.valueAsNumber;
  if (!Number.isFinite(speed) || speed < 0.25 || speed > 4) {
    speedInput.focus();
    return showMessage(ttsError, "Speed is a number from 0.25 to 4 (1 is normal).");
  }
  const request = { model: voiceModelSelect.value, input, response_format: "mp3", speed };
  if (voiceSelect.value && voicesOf === voiceModelSelect.value) request.voice = voiceSelect.value;
  const controller = new AbortController();
  setSpeaking(controller);
  showMessage(ttsError, "");
  ttsStatus.textContent = "Speaking…";
  try {
    const response = await apiFetch("/v1/audio/speech", { method: "POST", json: request, signal: controller.signal });
    if (!response.ok) throw await errorOf(response);
    const blob = await response.blob();
    if (controller.signal.aborted) return;
    if (blob.size === 0) throw new ApiError("The server sent no audio.");
    dropAudio();
    audioUrl = URL.createObjectURL(new Blob([blob], { type: "audio/mpeg" }));
    ttsAudio.src = audioUrl;
    ttsDownload.href = audioUrl;
    ttsResult.hidden = false;
    ttsStatus.textContent = "Done.";
    // Browsers may refuse to play before the page was used: the controls play it then.
    ttsAudio.play()?.catch(() => {});
  } catch (error) {
    if (controller.signal.aborted) return; // Forget key: nothing of it is shown
    ttsStatus.textContent = "";
    showMessage(ttsError, messageOf(error));
  } finally {
    if (speaking === controller) setSpeaking(null);
  }
}

/** Stop any speech and forget its text and audio (Forget key). */
function clearReadAloud() {
  speaking?.abort();
  setSpeaking(null);
  dropAudio();
  ttsText.value = "";
  ttsStatus.textContent = "";
  showMessage(ttsError, "");
  shown = false; // the next person's session lists the voices again when the area is opened
  voicesOf = "";
  voicesAsked += 1;
}

export function updateSpeechModels(models) {
  const gone = fillModelSelect(modelSelect, models, "transcription");
  if (gone) statusLine.textContent = gone;
  updateVoiceModels(models);
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
  clearReadAloud();
}

/** The Speech area is shown: its voices are asked for now (that starts the voice model). */
export function showSpeech() {
  shown = true;
  if (voiceModelSelect.value && voicesOf !== voiceModelSelect.value) loadVoices();
}

export function setupSpeech() {
  sendButton.addEventListener("click", sendFile);
  ttsForm.addEventListener("submit", (event) => {
    event.preventDefault();
    speak();
  });
  voiceModelSelect.addEventListener("change", () => {
    remember();
    loadVoices();
  });
  voiceSelect.addEventListener("change", remember);
  // Browsers give the microphone only to https pages and localhost.
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
    recordButton.disabled = true;
    recordNote.hidden = false;
  } else {
    recordButton.addEventListener("click", toggleRecording);
  }
}
