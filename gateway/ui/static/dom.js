// Small DOM helpers. Everything that shows server or model text goes through textContent.

/** Create an element: el("button", {type: "button", class: "x", onclick: f}, "text", child). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== "string") node[name] = value; // hidden, disabled, max, value
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child);
  }
  return node;
}

/** Show a message in an element (an alert or a note), or hide the element when there is none.
 * The same text again changes nothing: a screen reader does not hear it once more. */
export function showMessage(element, text) {
  if (element.textContent !== (text || "")) element.textContent = text || "";
  element.hidden = !text;
}

/** Fill a model picker with the session's models of one kind, keeping `preferred` if offered.
 * Returns what to tell the user when the chosen model went away (removed), else "". */
export function fillModelSelect(select, models, kind, preferred) {
  const ids = models.filter((model) => model.kind === kind).map((model) => model.id);
  const chosen = select.value || preferred;
  const keep = preferred && ids.includes(preferred) ? preferred : select.value;
  select.replaceChildren();
  for (const id of ids) select.append(el("option", { value: id, text: id }));
  if (ids.length === 0) select.append(el("option", { value: "", text: "No models of this kind" }));
  select.disabled = ids.length === 0;
  if (ids.includes(keep)) select.value = keep;
  if (!chosen || ids.includes(chosen)) return "";
  return select.value ? `${chosen} is no longer available; picked ${select.value}.` : `${chosen} is no longer available.`;
}

/** Bytes as a person reads them: "97 MB", "1.2 GB" (powers of 1000, as the units say). */
export function formatBytes(count) {
  if (typeof count !== "number" || !Number.isFinite(count)) return "–";
  if (count >= 1e12) return `${(count / 1e12).toFixed(1)} TB`;
  if (count >= 1e9) return `${(count / 1e9).toFixed(1)} GB`;
  if (count >= 1e6) return `${Math.round(count / 1e6)} MB`;
  if (count >= 1e3) return `${Math.round(count / 1e3)} kB`;
  return `${count} B`;
}

/** Copy text to the clipboard; on plain http (no Clipboard API) through a hidden textarea. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Denied (e.g. the page lost focus): try the old way below.
    }
  }
  const area = el("textarea", { class: "offscreen", readonly: true, "aria-hidden": "true" });
  area.value = text;
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch {
    copied = false;
  }
  area.remove();
  return copied;
}
