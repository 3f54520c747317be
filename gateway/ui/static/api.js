// Talking to the Hearth server: the stored key, requests, and OpenAI-shaped errors.

const KEY_STORAGE = "hearth.key";
let activeKey = "";
let unauthorized = () => {};

/** An error to show the user: the server's `error.message`, or what went wrong on the way. */
export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

// localStorage throws in some private modes; the UI still works, it just forgets.
export function readStored(name) {
  try {
    return localStorage.getItem(name);
  } catch {
    return null;
  }
}

/** Keep (or with null, drop) a value; false if the browser refused (full, or no storage). */
export function writeStored(name, value) {
  try {
    if (value === null) localStorage.removeItem(name);
    else localStorage.setItem(name, value);
    return true;
  } catch {
    return false; // see readStored; or the storage is full
  }
}

export function storedKey() {
  return readStored(KEY_STORAGE) || "";
}

/** Use `key` for every request from now on, and keep it for the next visit if `remember`. */
export function useKey(key, remember) {
  activeKey = key;
  if (remember) writeStored(KEY_STORAGE, key || null);
}

/** Run `handler` when a request with the active key is answered 401 (the key was revoked). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function forgetKey() {
  activeKey = "";
  writeStored(KEY_STORAGE, null);
}

/**
 * fetch() with the key. `json` becomes a JSON body, `form` a multipart one; `key` overrides the
 * active key (to try one before keeping it). Network failures become an ApiError.
 */
export async function apiFetch(path, { method = "GET", json, form, signal, key } = {}) {
  const headers = {};
  const useThisKey = key ?? activeKey;
  if (useThisKey) headers.Authorization = `Bearer ${useThisKey}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary itself
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`Could not reach the Hearth server (${error.message}). Is it running?`);
  }
  if (response.status === 401 && key === undefined) unauthorized();
  return response;
}

/** The ApiError an unsuccessful response stands for. */
export async function errorOf(response) {
  let message = "";
  try {
    const body = await response.json();
    message = body?.error?.message || body?.detail || "";
  } catch {
    // Not JSON (a proxy's error page, say): fall back to the status below.
  }
  if (typeof message !== "string" || !message) {
    message = `The server answered ${response.status} ${response.statusText}`.trim() + ".";
  }
  return new ApiError(message, response.status);
}

/** A request whose answer is JSON; throws an ApiError for an error answer. */
export async function apiJson(path, options) {
  const response = await apiFetch(path, options);
  if (!response.ok) throw await errorOf(response);
  try {
    return await response.json();
  } catch {
    throw new ApiError("The server sent an answer that is not JSON.", response.status);
  }
}

/** The message to show for anything a request threw. */
export function messageOf(error) {
  if (error instanceof ApiError) return error.message;
  return `Something went wrong: ${error?.message || error}`;
}

/** Parse server-sent events from a response body: yields each event's data (a string). */
export async function* readEvents(body) {
  const reader = body.getReader();
  // stream: true keeps a UTF-8 character split across two chunks whole.
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  let data = [];
  const take = function* (line) {
    if (line.endsWith("\r")) line = line.slice(0, -1);
    if (line === "") {
      if (data.length) yield data.join("\n");
      data = [];
    } else if (line.startsWith("data:")) {
      data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    } // comments (":") and the other fields (event, id, retry) are not used here
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        yield* take(buffer + decoder.decode());
        yield* take(""); // the stream's end ends the last event too
        return;
      }
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop(); // the last piece may be half a line: it waits for the rest
      for (const line of lines) yield* take(line);
    }
  } finally {
    // Stopped early (the [DONE] event, an abort): let go of the connection.
    reader.cancel().catch(() => {});
  }
}
