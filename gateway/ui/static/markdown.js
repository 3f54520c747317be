// Markdown for model answers, built as DOM nodes: model text is untrusted, so no innerHTML.
// A practical subset: paragraphs, headings, emphasis, code, lists, quotes, links, rules, tables.

import { el } from "./dom.js";

const FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]|$)/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
const DIVIDER_CELL = /^:?-+:?$/;
const ESCAPABLE = /[!-/:-@[-`{-~]/;
const WORD_CHARACTER = /[\p{L}\p{N}]/u;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
// Deeper nesting than this is shown as text: a hostile answer cannot blow the stack.
const MAX_DEPTH = 12;
// How far a link's "(destination)" is looked for: a longer one is not a link.
const MAX_URL = 2048;
// Model output is untrusted and can be degenerate ("[[[[…", "_a _a _a …", 40k spaces): every
// scan below is linear or bounded, so a render costs O(length) whatever the text is.

/** Render Markdown text as a DocumentFragment of plain DOM nodes. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  renderBlocks(lines, fragment, 0);
  return fragment;
}

const isBlank = (line) => line.trim() === "";
const indentOf = (line) => line.length - line.trimStart().length;
const isOrdered = (marker) => /\d/.test(marker);

// Lines that end a paragraph without a blank line before them.
function startsBlock(line) {
  const item = LIST_ITEM.exec(line);
  const listStart = item && item[3] && (!isOrdered(item[2]) || parseInt(item[2], 10) === 1);
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || listStart;
}

// `tight`: a tight list's item, whose paragraphs are its text itself, not <p>s.
function renderBlocks(lines, parent, depth, tight = false) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (isBlank(line)) i += 1;
    else if (depth >= MAX_DEPTH) i = paragraph(lines, i, parent, depth);
    else if ((match = FENCE.exec(line))) i = codeBlock(lines, i, match, parent);
    else if ((match = HEADING.exec(line))) {
      const heading = el(`h${match[1].length}`);
      renderInline(headingText(line.slice(match[0].length)), heading, depth);
      parent.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) i = blockquote(lines, i, parent, depth);
    else if (LIST_ITEM.test(line)) i = list(lines, i, parent, depth);
    else if (isTableStart(lines, i)) i = table(lines, i, parent, depth);
    else i = paragraph(lines, i, parent, depth, tight);
  }
}

// "# Title ##" -> "Title": the closing #'s go if a space comes before them.
function headingText(rest) {
  const text = rest.trim();
  let end = text.length;
  while (end > 0 && text[end - 1] === "#") end -= 1;
  return end === 0 || text[end - 1] === " " || text[end - 1] === "\t" ? text.slice(0, end).trimEnd() : text;
}

// A fence left open (the answer is still streaming) runs to the end of the text.
function codeBlock(lines, start, match, parent) {
  const [, indent, fence, language] = match;
  const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
  const body = [];
  let i = start + 1;
  while (i < lines.length && !closing.test(lines[i])) {
    const line = lines[i];
    body.push(line.slice(Math.min(indent.length, indentOf(line))));
    i += 1;
  }
  const code = el("code", { text: body.join("\n") });
  const cleanLanguage = language.replace(/[^\w#+.-]/g, "");
  if (cleanLanguage) code.className = `language-${cleanLanguage}`;
  parent.append(el("pre", {}, code));
  return i + 1; // past the closing fence
}

function blockquote(lines, start, parent, depth) {
  const inner = [];
  let i = start;
  while (i < lines.length && !isBlank(lines[i])) {
    const match = QUOTE.exec(lines[i]);
    if (match) inner.push(match[1]);
    else if (!startsBlock(lines[i])) inner.push(lines[i]); // a lazy continuation line
    else break;
    i += 1;
  }
  const quote = el("blockquote");
  renderBlocks(inner, quote, depth + 1);
  parent.append(quote);
  return i;
}

function list(lines, start, parent, depth) {
  const first = LIST_ITEM.exec(lines[start]);
  const ordered = isOrdered(first[2]);
  const level = first[1].length;
  const listElement = el(ordered ? "ol" : "ul");
  const number = parseInt(first[2], 10);
  if (ordered && number !== 1) listElement.start = number;
  const items = [];
  let current = null;
  let contentOffset = 0;
  let loose = false;
  let i = start;
  while (i < lines.length) {
    const line = lines[i];
    const item = LIST_ITEM.exec(line);
    if (item && item[1].length <= level + 1) {
      if (isOrdered(item[2]) !== ordered) break; // another kind of list starts
      current = [item[3] ?? ""];
      items.push(current);
      contentOffset = item[3] ? line.length - item[3].length : item[1].length + item[2].length + 1;
      i += 1;
    } else if (isBlank(line)) {
      // A blank line ends the list unless an item or an indented line follows.
      let next = i + 1;
      while (next < lines.length && isBlank(lines[next])) next += 1;
      if (next >= lines.length) break;
      const nextItem = LIST_ITEM.exec(lines[next]);
      const sibling = nextItem && nextItem[1].length <= level + 1 && isOrdered(nextItem[2]) === ordered;
      if (!sibling && indentOf(lines[next]) <= level + 1) break;
      loose = true;
      for (; i < next; i += 1) current.push("");
    } else if (indentOf(line) > level + 1) {
      current.push(line.slice(Math.min(indentOf(line), contentOffset)));
      i += 1;
    } else if (!isBlank(lines[i - 1]) && !startsBlock(line)) {
      current.push(line); // a lazy continuation of the item's paragraph
      i += 1;
    } else break;
  }
  for (const itemLines of items) {
    const listItem = el("li");
    renderBlocks(itemLines, listItem, depth + 1, !loose);
    listElement.append(listItem);
  }
  parent.append(listElement);
  return i;
}

function isTableStart(lines, i) {
  return (
    lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") &&
    tableCells(lines[i + 1]).every((cell) => DIVIDER_CELL.test(cell))
  );
}

function tableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  // "\|" is a pipe inside a cell. (No regex lookbehind: older Safari cannot parse one.)
  return row.replace(/\\\|/g, "\u0000").split("|").map((cell) => cell.trim().replace(/\u0000/g, "|"));
}

function table(lines, start, parent, depth) {
  const alignments = tableCells(lines[start + 1]).map((cell) => {
    if (cell.startsWith(":") && cell.endsWith(":")) return "align-center";
    if (cell.endsWith(":")) return "align-right";
    return "";
  });
  const row = (cells, tag) =>
    el("tr", {}, ...alignments.map((alignment, column) => {
      const cell = el(tag, { class: alignment || null });
      renderInline(cells[column] ?? "", cell, depth);
      return cell;
    }));
  const body = el("tbody");
  let i = start + 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    body.append(row(tableCells(lines[i]), "td"));
    i += 1;
  }
  const head = el("thead", {}, row(tableCells(lines[start]), "th"));
  // The wrapper scrolls sideways, so a wide table never widens the page.
  parent.append(el("div", { class: "table-wrap" }, el("table", {}, head, body)));
  return i;
}

function paragraph(lines, start, parent, depth, tight = false) {
  const text = [lines[start].trim()];
  let i = start + 1;
  while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i])) {
    text.push(lines[i].trim());
    i += 1;
  }
  const paragraphElement = tight ? parent : el("p");
  renderInline(text.join("\n"), paragraphElement, depth);
  if (!tight) parent.append(paragraphElement);
  return i;
}

/** The URL if it is absolute and http:, https: or mailto:; else null. */
function safeUrl(url) {
  try {
    const parsed = new URL(url);
    return SAFE_PROTOCOLS.has(parsed.protocol) ? parsed.href : null;
  } catch {
    return null; // relative or malformed
  }
}

function link(href, label, depth) {
  const anchor = el("a", { href, rel: "noopener noreferrer", target: "_blank" });
  renderInline(label, anchor, depth + 1, false);
  return anchor;
}

// [label](url "title") or ![alt](url) at i: {label, url, end} or null.
function parseLink(text, i, marks) {
  const open = text[i] === "!" ? i + 1 : i;
  const close = marks.brackets.get(open) ?? -1;
  if (close < 0 || text[close + 1] !== "(") return null;
  const rest = text.slice(close + 2, close + 2 + MAX_URL);
  const destination = /^[ \t]*(?:<([^<>\n]*)>|([^\s()]*(?:\([^\s()]*\)[^\s()]*)*))(?:[ \t]+(?:"[^"]*"|'[^']*'))?[ \t]*\)/.exec(rest);
  if (!destination) return null;
  return {
    label: text.slice(open + 1, close),
    url: destination[1] ?? destination[2],
    end: close + 2 + destination[0].length,
  };
}

// A bare http(s) URL at i, without the punctuation that usually follows one in a sentence.
function bareUrl(text, i) {
  if (i > 0 && WORD_CHARACTER.test(text[i - 1])) return null;
  const match = /^https?:\/\/[^\s<>"'`]+/.exec(text.slice(i, i + 2048));
  if (!match) return null;
  const url = match[0];
  let end = url.length;
  while (end > 0 && ".,:;!?*_~'\"".includes(url[end - 1])) end -= 1;
  let unmatched = 0; // more ")" than "(": the last ones close a parenthesis around the URL
  for (let k = 0; k < end; k += 1) unmatched += url[k] === ")" ? 1 : url[k] === "(" ? -1 : 0;
  for (; unmatched > 0 && url[end - 1] === ")"; unmatched -= 1) end -= 1;
  return end > "https://".length ? url.slice(0, end) : null;
}

// One pass finds what the inline scan looks ahead for, so each look-up is a binary search, not a
// scan to the end of the text:
// - closers: "*1", "_2", "~2", ...: where runs of that character and length can end emphasis
//   (not after a space, and for "_" not inside a word);
// - brackets: the position of each "[" -> that of its "]";
// - ticks: run length -> where runs of that many backticks start (escapes do not count in code).
function delimiters(text) {
  const closers = new Map();
  const brackets = new Map();
  const ticks = new Map();
  const add = (map, key, position) => {
    const list = map.get(key);
    if (list) list.push(position);
    else map.set(key, [position]);
  };
  const open = [];
  for (let k = 0; k < text.length; ) {
    const character = text[k];
    if (character === "\\") k += 2;
    else if (character === "[") open.push(k++);
    else if (character === "]") {
      if (open.length) brackets.set(open.pop(), k);
      k += 1;
    } else if (character === "*" || character === "_" || character === "~") {
      let run = 1;
      while (text[k + run] === character) run += 1;
      const afterSpace = k > 0 && /\s/.test(text[k - 1]);
      const inWord = character === "_" && WORD_CHARACTER.test(text[k + run] ?? "");
      if (run <= 3 && !afterSpace && !inWord) add(closers, character + run, k);
      k += run;
    } else k += 1;
  }
  for (const match of text.matchAll(/`+/g)) add(ticks, match[0].length, match.index);
  return { closers, brackets, ticks };
}

// The first of the ascending `positions` that is past `after`, or -1.
function firstAfter(positions, after) {
  if (!positions) return -1;
  let low = 0;
  let high = positions.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (positions[middle] > after) high = middle;
    else low = middle + 1;
  }
  return low < positions.length ? positions[low] : -1;
}

function renderInline(text, parent, depth, links = true) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(document.createTextNode(plain));
    plain = "";
  };
  const nested = depth < MAX_DEPTH;
  let found = null;
  const marks = () => (found ??= delimiters(text));
  let i = 0;
  while (i < text.length) {
    const character = text[i];
    if (character === "\\" && ESCAPABLE.test(text[i + 1] ?? "")) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (character === "\n") {
      flush();
      parent.append(el("br"));
      i += 1;
      continue;
    }
    if (character === "`") {
      let size = 1;
      while (text[i + size] === "`") size += 1;
      const close = firstAfter(marks().ticks.get(size), i); // the next run of as many
      if (close >= 0) {
        flush();
        let code = text.slice(i + size, close).replace(/\n/g, " ");
        if (code.length > 2 && code[0] === " " && code[code.length - 1] === " " && code.trim()) {
          code = code.slice(1, -1);
        }
        parent.append(el("code", { text: code }));
        i = close + size;
      } else {
        plain += "`".repeat(size);
        i += size;
      }
      continue;
    }
    if (links && nested && (character === "[" || (character === "!" && text[i + 1] === "["))) {
      const parsed = parseLink(text, i, marks());
      if (parsed) {
        flush();
        const href = safeUrl(parsed.url.trim());
        const label = parsed.label || parsed.url;
        if (href) parent.append(link(href, label, depth));
        else renderInline(label, parent, depth + 1, false); // an unsafe link: its text only
        i = parsed.end;
        continue;
      }
    }
    if (links && character === "h") {
      const url = bareUrl(text, i);
      const href = url && safeUrl(url);
      if (href) {
        flush();
        parent.append(link(href, url, depth));
        i += url.length;
        continue;
      }
    }
    if (nested && (character === "*" || character === "_" || character === "~")) {
      let run = 1;
      while (text[i + run] === character) run += 1;
      const size = character === "~" ? 2 : Math.min(run, 3);
      const opens =
        run === size && !/\s/.test(text[i + size] ?? " ") &&
        !(character === "_" && i > 0 && WORD_CHARACTER.test(text[i - 1]));
      const close = opens ? firstAfter(marks().closers.get(character + size), i + size) : -1;
      if (close >= 0) {
        flush();
        const inner = text.slice(i + size, close);
        let node;
        if (character === "~") node = el("del");
        else if (size === 1) node = el("em");
        else node = el("strong");
        if (size === 3) {
          const emphasis = el("em");
          renderInline(inner, emphasis, depth + 1, links);
          node.append(emphasis);
        } else {
          renderInline(inner, node, depth + 1, links);
        }
        parent.append(node);
        i = close + size;
        continue;
      }
      plain += character.repeat(run);
      i += run;
      continue;
    }
    plain += character;
    i += 1;
  }
  flush();
}
