// The Models area (admins only): what is loaded, what is configured, and the gallery to install from.

import { apiFetch, apiJson, messageOf } from "./api.js";
import { el, formatBytes, showMessage } from "./dom.js";

const POLL_MS = 2000;
const JOB_POLL_MS = 250;
// A failed look at an install job is tried again (the install goes on on the server) this many
// times in a row, so a blip of the network or a 5xx does not pass for a failed install.
const JOB_TRIES = 10;
const CONFIRM_MS = 5000; // a Remove not confirmed by then is Remove again
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const isActive = (job) => job && (job.phase === "queued" || job.phase === "downloading");

// Model names may hold a slash ("org/model"); the unload route takes them as a path.
const modelPath = (name) => name.split("/").map(encodeURIComponent).join("/");

// Problems come as a list of "file: message" lines, or as a {file: message} map.
function problemLines(found) {
  if (!found) return [];
  if (Array.isArray(found)) return found.map(String);
  return Object.entries(found).map(([name, message]) => `${name}: ${message}`);
}

/** Build the Models area from its template. `onChanged` runs after an install, a removal or an
 * unload. */
export function createModelsArea({ onChanged }) {
  const section = document.getElementById("models-template").content.firstElementChild.cloneNode(true);
  const part = (id) => section.querySelector(`#${id}`);
  const [budgetLine, nothingLoaded, loadedBody, loadedError] =
    ["models-budget", "models-nothing-loaded", "models-loaded", "models-loaded-error"].map(part);
  const [configuredList, configErrors] = ["models-configured", "models-config-errors"].map(part);
  const [search, galleryStatus, galleryError, galleryList, noMatch, galleryNote] =
    ["gallery-search", "gallery-status", "gallery-error", "gallery-list", "gallery-no-match", "gallery-note"].map(part);
  let shown = false;
  let alive = true;
  let pollRun = 0; // a new run each time the area is shown: an older one stops
  let gallery = { data: [], errors: [] };
  const loadedRows = new Map(); // model -> {row, cells}
  const jobs = new Map(); // gallery id -> its install job, while it runs and until the list shows it
  const entryErrors = new Map(); // gallery id -> the last install or removal error
  const confirming = new Map(); // gallery id -> the timer that takes back its first Remove click
  // gallery id -> its <li>, updated in place: a search only takes items out and puts them back,
  // so their error notes (live regions) and focused buttons stay.
  const items = new Map();
  // Busy buttons stay enabled (aria-disabled, clicks ignored): a disabled one would drop the focus.
  const busy = (button) => button.getAttribute("aria-disabled") === "true";
  const setBusy = (button, value) =>
    value ? button.setAttribute("aria-disabled", "true") : button.removeAttribute("aria-disabled");

  // --- Loaded ---------------------------------------------------------------------------------

  function loadedRow(model) {
    const cells = [0, 1, 2, 3, 4].map((column) => el("td", { class: column === 3 ? "threads" : null }));
    const button = el("button", { type: "button", class: "small", text: "Unload", "aria-label": `Unload ${model}` });
    button.onclick = () => unload(model, button);
    return { row: el("tr", {}, ...cells, el("td", {}, button)), cells };
  }

  function showLoaded(view) {
    const rows = view.data || [];
    const budget = view.budget || {};
    const cores = budget.cores ? ` · ${budget.cores} cores` : "";
    budgetLine.textContent = `Memory: ${formatBytes(budget.memory_used_bytes ?? 0)} used of ${formatBytes(budget.memory_bytes)}${cores}`;
    nothingLoaded.hidden = rows.length > 0;
    const seen = new Set();
    rows.forEach((backend, index) => {
      seen.add(backend.model);
      let entry = loadedRows.get(backend.model);
      if (!entry) {
        entry = loadedRow(backend.model);
        loadedRows.set(backend.model, entry);
      }
      const [model, state, memory, threads, inFlight] = entry.cells;
      model.textContent = backend.model;
      state.replaceChildren(backend.state ?? "");
      if (backend.last_error) state.append(el("span", { class: "error-text", text: backend.last_error }));
      memory.textContent = formatBytes(backend.memory?.rss_bytes ?? backend.memory?.planned_bytes);
      threads.textContent = String(backend.threads ?? "–");
      const queued = backend.requests?.queued ? ` (+${backend.requests.queued} queued)` : "";
      inFlight.textContent = `${backend.requests?.in_flight ?? 0}${queued}`;
      // Rows are updated in place, not rebuilt: a focused Unload button keeps the focus.
      if (loadedBody.children[index] !== entry.row) loadedBody.insertBefore(entry.row, loadedBody.children[index] || null);
    });
    for (const [model, entry] of loadedRows) {
      if (!seen.has(model)) {
        entry.row.remove();
        loadedRows.delete(model);
      }
    }
  }

  async function refreshLoaded() {
    try {
      showLoaded(await apiJson("/backends"));
      showMessage(loadedError, "");
    } catch (error) {
      showMessage(loadedError, messageOf(error));
    }
  }

  async function unload(model, button) {
    if (busy(button)) return;
    setBusy(button, true);
    try {
      await apiJson(`/backends/${modelPath(model)}/unload`, { method: "POST" });
      showMessage(loadedError, "");
    } catch (error) {
      showMessage(loadedError, messageOf(error));
    }
    setBusy(button, false);
    const hadFocus = document.activeElement === button;
    await refreshLoaded();
    // Its row went: the focus goes to the next Unload button, or to the area's heading.
    if (hadFocus && !button.isConnected) (loadedBody.querySelector("button") || section.querySelector("h2")).focus();
    onChanged();
  }

  // Poll while the area is shown; each poll waits for the one before.
  async function poll(run) {
    while (run === pollRun && alive) {
      await refreshLoaded();
      await sleep(POLL_MS);
    }
  }

  // --- Configured -----------------------------------------------------------------------------

  function showConfigured(models) {
    configuredList.replaceChildren(
      ...models.map((model) =>
        el(
          "li",
          {},
          el("strong", { text: model.id }),
          el("span", { class: "hint", text: ` ${model.kind} · ${model.backend}` }),
          model.description ? el("div", { class: "hint", text: model.description }) : null,
        ),
      ),
    );
    if (models.length === 0) configuredList.append(el("li", { text: "No models are configured." }));
  }

  async function refreshConfigErrors() {
    try {
      // /readyz answers 503 while not ready, with the same body: read it either way.
      const response = await apiFetch("/readyz");
      const errors = problemLines((await response.json()).config_errors);
      configErrors.replaceChildren();
      if (errors.length) {
        configErrors.append(
          el("p", { text: "Some model files could not be read:" }),
          el("ul", {}, ...errors.map((line) => el("li", { text: line }))),
        );
      }
      configErrors.hidden = errors.length === 0;
    } catch (error) {
      showMessage(configErrors, messageOf(error));
    }
  }

  // --- Gallery --------------------------------------------------------------------------------

  function matches(entry, query) {
    const text = [entry.id, entry.description, ...(entry.tags || [])].join(" ").toLowerCase();
    return query.split(/\s+/).every((word) => text.includes(word));
  }

  function jobView(entry, job) {
    const total = job.bytes_total || 1;
    const done = job.phase === "done" ? total : Math.min(job.bytes_done || 0, total);
    const percent = Math.floor((done / total) * 100);
    const progress = el("progress", { max: total, value: done, "aria-label": `Installing ${entry.id}` });
    const parts = [progress, el("span", { class: "percent", text: `${percent} %` })];
    if (isActive(job)) {
      const cancel = el("button", { type: "button", class: "small", text: "Cancel" });
      cancel.addEventListener("click", () => cancelJob(job, cancel));
      parts.push(cancel);
    }
    return parts;
  }

  function entryInfo(entry) {
    const mark =
      entry.fits === true ? el("span", { class: "fit-mark fits", text: "fits" })
      : entry.fits === false ? el("span", { class: "fit-mark too-big", text: "too big" })
      : null;
    const facts = [
      entry.backend,
      typeof entry.download_bytes === "number" && `download ${formatBytes(entry.download_bytes)}`,
      typeof entry.memory_bytes === "number" && `memory ${formatBytes(entry.memory_bytes)}`,
      entry.license,
    ].filter(Boolean);
    return el(
      "div",
      {},
      el("div", { class: "entry-head" }, el("strong", { text: entry.id }), mark),
      entry.description ? el("p", { class: "description", text: entry.description }) : null,
      el("p", { class: "hint", text: facts.join(" · ") }),
    );
  }

  function entryActions(entry) {
    const job = jobs.get(entry.id);
    const actions = el("div", { class: "entry-actions" });
    if (job) {
      actions.append(...jobView(entry, job));
    } else if (entry.installed) {
      const remove = el("button", {
        type: "button",
        class: "small remove",
        text: confirming.has(entry.id) ? "Confirm remove" : "Remove",
        "aria-label": `Remove ${entry.id}`,
      });
      remove.addEventListener("click", () => removeModel(entry, remove));
      actions.append(el("span", { class: "installed", text: "installed" }), remove);
    } else {
      const install = el("button", { type: "button", class: "small", text: "Install", "aria-label": `Install ${entry.id}` });
      install.addEventListener("click", () => installModel(entry));
      actions.append(install);
    }
    return actions;
  }

  function entryItem(entry) {
    // A status, not an alert: it is read once, when it changes, and never for a search.
    const error = el("p", { role: "status", class: "error", hidden: true });
    const item = el("li", { class: "gallery-entry", "data-id": entry.id }, entryInfo(entry), entryActions(entry), error);
    showMessage(error, entryErrors.get(entry.id));
    return item;
  }

  // Update an entry in place; if it held the focus, its first button takes it
  // (Install -> Cancel -> Remove).
  function updateItem(item, entry) {
    const hadFocus = item.contains(document.activeElement);
    const [info, actions, error] = item.children;
    info.replaceWith(entryInfo(entry));
    actions.replaceWith(entryActions(entry));
    showMessage(error, entryErrors.get(entry.id));
    if (hadFocus) item.querySelector(".entry-actions button")?.focus();
  }

  // The fresh gallery list: entries are updated, new ones made, gone ones dropped.
  function syncItems() {
    const ids = new Set(gallery.data.map((entry) => entry.id));
    for (const [id, item] of items) {
      if (!ids.has(id)) {
        item.remove();
        items.delete(id);
      }
    }
    for (const entry of gallery.data) {
      const item = items.get(entry.id);
      if (item) updateItem(item, entry);
      else items.set(entry.id, entryItem(entry));
    }
  }

  function showGallery() {
    const query = search.value.trim().toLowerCase();
    const entries = gallery.data.filter((entry) => matches(entry, query));
    entries.forEach((entry, index) => {
      const item = items.get(entry.id);
      if (galleryList.children[index] !== item) galleryList.insertBefore(item, galleryList.children[index] || null);
    });
    while (galleryList.children.length > entries.length) galleryList.lastElementChild.remove();
    noMatch.hidden = !gallery.data.length || entries.length > 0;
    const leftOut = problemLines(gallery.errors);
    showMessage(galleryNote, leftOut.length ? `Left out of the gallery: ${leftOut.join("; ")}` : "");
  }

  function itemOf(id) {
    return items.get(id);
  }

  function redrawEntry(id) {
    const item = itemOf(id);
    const entry = gallery.data.find((candidate) => candidate.id === id);
    if (item && entry) updateItem(item, entry);
  }

  async function refreshGallery() {
    const loading = "Loading the gallery…";
    if (!gallery.data.length) galleryStatus.textContent = loading;
    try {
      gallery = await apiJson("/models/available");
      gallery.data = gallery.data || [];
      showMessage(galleryError, "");
      // A finished install showed 100 % until now; the fresh list says "installed" instead.
      for (const [id, job] of jobs) if (job.phase === "done") jobs.delete(id);
    } catch (error) {
      showMessage(galleryError, messageOf(error));
    }
    if (galleryStatus.textContent === loading) galleryStatus.textContent = "";
    syncItems();
    showGallery();
  }

  async function installModel(entry) {
    entryErrors.delete(entry.id);
    let job;
    try {
      job = await apiJson("/models/apply", { method: "POST", json: { id: entry.id } });
    } catch (error) {
      entryErrors.set(entry.id, messageOf(error));
      redrawEntry(entry.id);
      return;
    }
    jobs.set(entry.id, job);
    redrawEntry(entry.id);
    let misses = 0;
    while (isActive(job) && alive) {
      await sleep(JOB_POLL_MS);
      try {
        job = await apiJson(`/models/jobs/${encodeURIComponent(job.id)}`);
        misses = 0;
      } catch (error) {
        // The network or a 5xx: look again. A 404: the server has no such job (any more).
        const blip = !error.status || error.status >= 500 || error.status === 429;
        if (blip && ++misses < JOB_TRIES) {
          await sleep(JOB_POLL_MS);
          continue;
        }
        const lost = error.status === 404 ? "The server no longer knows this install." :
          `Lost track of the install: ${messageOf(error)} It may still finish on the server.`;
        job = { ...job, phase: "failed", error: lost };
      }
      jobs.set(entry.id, job);
      updateProgress(entry, job);
    }
    if (!alive) return;
    if (job.phase === "done") {
      galleryStatus.textContent = `Installed ${entry.id}.`;
      await sleep(1000); // the full bar stays a moment: the end of the download is seen
      await refreshGallery();
      onChanged();
      return;
    }
    if (job.phase === "failed") {
      entryErrors.set(entry.id, job.error || "The install failed.");
    } else {
      galleryStatus.textContent = `The install of ${entry.id} was cancelled.`;
    }
    jobs.delete(entry.id);
    redrawEntry(entry.id);
  }

  // Update the bar in place: a redraw would take the focus from Cancel, and once done the same
  // bar shows 100 % until the list is read again.
  function updateProgress(entry, job) {
    const item = itemOf(entry.id);
    const progress = item?.querySelector("progress");
    const done = job.phase === "done";
    if (!progress || !(isActive(job) || done)) {
      redrawEntry(entry.id);
      return;
    }
    progress.max = job.bytes_total || progress.max;
    progress.value = done ? progress.max : Math.min(job.bytes_done || 0, progress.max);
    item.querySelector(".percent").textContent = `${Math.floor((progress.value / progress.max) * 100)} %`;
    if (done) item.querySelector(".entry-actions button")?.remove(); // nothing left to cancel
  }

  async function cancelJob(job, button) {
    if (busy(button)) return;
    setBusy(button, true);
    try {
      await apiJson(`/models/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
    } catch (error) {
      galleryStatus.textContent = messageOf(error);
      setBusy(button, false);
    }
  }

  async function removeModel(entry, button) {
    if (busy(button)) return;
    const ask = `Press again to remove ${entry.id}.`;
    if (!confirming.has(entry.id)) {
      const takeBack = () => {
        confirming.delete(entry.id);
        const current = itemOf(entry.id)?.querySelector("button.remove");
        if (current) current.textContent = "Remove";
        if (galleryStatus.textContent === ask) galleryStatus.textContent = "";
      };
      confirming.set(entry.id, setTimeout(takeBack, CONFIRM_MS));
      button.textContent = "Confirm remove";
      galleryStatus.textContent = ask;
      return;
    }
    clearTimeout(confirming.get(entry.id));
    confirming.delete(entry.id);
    entryErrors.delete(entry.id);
    setBusy(button, true);
    try {
      await apiJson(`/models/${encodeURIComponent(entry.id)}`, { method: "DELETE" });
      galleryStatus.textContent = `Removed ${entry.id}.`;
    } catch (error) {
      entryErrors.set(entry.id, messageOf(error));
    }
    await refreshGallery();
    refreshLoaded();
    onChanged();
  }

  search.addEventListener("input", showGallery);

  return {
    section,
    show() {
      if (shown) return;
      shown = true;
      poll(++pollRun);
      refreshConfigErrors();
      refreshGallery();
    },
    hide() {
      shown = false;
      pollRun += 1;
    },
    /** Show the session's configured models (after any change the session is read again). */
    updateSession(session) {
      showConfigured(session.models || []);
      if (shown) refreshConfigErrors();
    },
    destroy() {
      alive = false;
      this.hide();
      section.remove();
    },
  };
}
