// Completion from the agent config's JSON Schema (GET /api/schema, the one `voicemesh config
// schema` prints) in a plain <textarea>: at the cursor, work out the JSON path and offer the
// property names valid there (with type, default and description) or, for a value, the enum /
// const choices, booleans and null, and the connector names a stage knows. Plain JS, no parser
// library: the text is usually half-typed, so a tolerant scan of the tokens stands in for a
// parser. Enter/Tab/click picks, arrows move, Esc closes, Ctrl+Space opens.

// --- where the cursor is -------------------------------------------------------------------

// One scan of the whole text, tracking containers: returns what holds at `cursor`:
// {mode: "key"|"value"|null, path, frame, prefix, from, to, quoted}. Frames are completed by the
// rest of the scan, so a frame's `keys` and `vals` include what follows the cursor (the keys
// already present, a discriminator written further down).
export function cursorContext(text, cursor) {
  const root = {t: "root", state: "value", seg: null, keys: new Set(), vals: {}};
  const stack = [root];
  let ctx = null;
  const top = () => stack[stack.length - 1];
  const capture = (from, prefix, quoted) => {
    const f = top();
    const path = stack.slice(2).map((fr) => fr.seg);
    if (f.t === "o" && f.state === "key") {
      ctx = {mode: "key", path, frame: f, frames: stack.slice(1), prefix, from, quoted};
    } else if (f.state === "value" && f.t !== "root") {
      const seg = f.t === "o" ? f.key : f.idx;
      ctx = {mode: "value", path: [...path, seg], frame: f, frames: stack.slice(1), prefix, from, quoted};
    } else if (f.t === "root" && f.state === "value") {
      ctx = {mode: "value", path: [], frame: f, frames: [], prefix, from, quoted};
    } else {
      ctx = {mode: null, path, frame: f, frames: stack.slice(1), prefix, from, quoted};
    }
  };
  const afterValue = () => { const f = top(); f.state = f.t === "root" ? "done" : "after"; };
  let i = 0;
  const n = text.length;
  while (i < n) {
    const c = text[i];
    if (c === " " || c === "\n" || c === "\r" || c === "\t") { i++; continue; }
    if (!ctx && i >= cursor) capture(cursor, "", false);
    if (c === "{" || c === "[") {
      const parent = top();
      const seg = parent.t === "o" ? parent.key : parent.t === "a" ? parent.idx : null;
      stack.push(c === "{" ? {t: "o", state: "key", key: null, seg, keys: new Set(), vals: {}}
                           : {t: "a", state: "value", idx: 0, seg});
      i++;
    } else if (c === "}" || c === "]") {
      if (stack.length > 1) stack.pop();
      afterValue();
      i++;
    } else if (c === ":") {
      const f = top();
      if (f.t === "o") f.state = "value";
      i++;
    } else if (c === ",") {
      const f = top();
      if (f.t === "o") { f.state = "key"; f.key = null; } else if (f.t === "a") { f.idx++; f.state = "value"; }
      i++;
    } else if (c === '"') {
      // a string ends at its closing quote, or (half-typed) at the end of the line
      let j = i + 1, s = "";
      while (j < n && text[j] !== '"' && text[j] !== "\n") {
        if (text[j] === "\\" && j + 1 < n) { s += text[j + 1]; j += 2; } else { s += text[j]; j++; }
      }
      const closed = j < n && text[j] === '"';
      if (!ctx && cursor > i && cursor <= j) capture(i, text.slice(i + 1, cursor), true);
      const f = top();
      // In an object, a string not after a colon is a key (also after a value with its comma
      // not yet typed); a key cut off at the end of its line is half-typed: the next is a key.
      if (f.t === "o" && f.state !== "value") {
        if (closed) { f.key = s; f.keys.add(s); f.state = "colon"; } else f.state = "key";
      } else { if (f.t === "o" && f.key !== null) f.vals[f.key] = s; afterValue(); }
      i = closed ? j + 1 : j;
    } else {
      let j = i;
      while (j < n && !/[\s,:{}[\]"]/.test(text[j])) j++;
      if (j === i) j++;
      if (!ctx && cursor > i && cursor <= j) capture(i, text.slice(i, cursor), false);
      const f = top();
      if (f.t === "o" && f.state === "key") { f.key = text.slice(i, j); f.state = "colon"; }
      else afterValue();
      i = j;
    }
  }
  if (!ctx) capture(cursor, "", false);
  return ctx;
}

// --- what the schema allows there -----------------------------------------------------------

function deref(root, node, seen = 0) {
  while (node && node.$ref && seen++ < 32) {
    const parts = node.$ref.replace(/^#\//, "").split("/");
    node = parts.reduce((n, p) => n?.[p], root);
  }
  return node || {};
}

// The alternatives a node stands for: anyOf/oneOf flattened (a discriminated oneOf narrowed to
// the branch its discriminator names, when the object being written names one).
function alternatives(root, node, frame) {
  node = deref(root, node);
  const union = node.oneOf || node.anyOf;
  if (!union) return [node];
  const disc = node.discriminator;
  if (disc && frame?.vals?.[disc.propertyName] && disc.mapping?.[frame.vals[disc.propertyName]]) {
    return [deref(root, {$ref: disc.mapping[frame.vals[disc.propertyName]]})];
  }
  return union.flatMap((alt) => alternatives(root, alt, frame));
}

// The schema of the value at `path`. frames[k] is the container at path[0..k-1] (its keys and
// string values so far), which settles a discriminated union on the way down.
export function schemaAt(schema, path, frames = []) {
  const xco = schema["x-connector-options"] || {};
  let nodes = [schema];
  for (let k = 0; k < path.length; k++) {
    const seg = path[k];
    // connectors.<stage>.config.<name>: the options model of that stage's connector `name`
    if (k === 3 && path[0] === "connectors" && path[2] === "config") {
      const found = xco[path[1]]?.[seg];
      nodes = found ? [deref(schema, found)] : [];
      continue;
    }
    const next = [];
    for (const node of nodes) {
      for (const alt of alternatives(schema, node, frames[k])) {
        if (typeof seg === "number") {
          if (alt.items) next.push(deref(schema, alt.items));
        } else if (alt.properties?.[seg]) next.push(alt.properties[seg]);
        else if (alt.patternProperties) {
          for (const [re, sub] of Object.entries(alt.patternProperties)) if (new RegExp(re).test(seg)) next.push(sub);
        } else if (alt.additionalProperties && typeof alt.additionalProperties === "object") {
          next.push(alt.additionalProperties);
        }
      }
    }
    nodes = next;
  }
  return {nodes, frame: frames[path.length]};
}

function typeOf(root, node) {
  const alts = alternatives(root, node);
  const types = [...new Set(alts.map((a) => a.const !== undefined ? JSON.stringify(a.const)
    : a.enum ? "enum" : a.type || (a.properties ? "object" : "any")))];
  return types.join(" | ");
}

// The JSON to insert as a new key's value: its default, else an empty value of its type.
function skeleton(root, node) {
  node = deref(root, node);
  if (node.default !== undefined) return JSON.stringify(node.default);
  const alts = alternatives(root, node).filter((a) => a.type !== "null");
  const a = alts[0] || {};
  if (a.const !== undefined) return JSON.stringify(a.const);
  if (a.enum) return JSON.stringify(a.enum[0]);
  switch (a.type) {
    case "object": return "{}";
    case "array": return "[]";
    case "string": return '""';
    case "integer": case "number": return String(a.minimum ?? a.exclusiveMinimum ?? 0);
    case "boolean": return "false";
    default: return a.properties ? "{}" : "null";
  }
}

// [{label, detail, doc, insert}] for the cursor's context.
export function suggestions(schema, ctx) {
  if (!ctx || !ctx.mode) return [];
  const xco = schema["x-connector-options"] || {};
  const p = ctx.path;
  const out = [];
  if (ctx.mode === "key") {
    const present = ctx.frame.keys;
    if (p.length === 1 && p[0] === "connectors") {
      for (const stage of Object.keys(xco)) out.push({label: stage, detail: "stage", doc: `the ${stage} stage's connectors`, value: "{}"});
    } else if (p.length === 3 && p[0] === "connectors" && p[2] === "config") {
      for (const name of Object.keys(xco[p[1]] || {}).sort()) {
        const model = deref(schema, xco[p[1]][name]);
        out.push({label: name, detail: `${p[1]} connector options`, doc: model.description || "", value: "{}"});
      }
    } else {
      const {nodes, frame} = schemaAt(schema, p, ctx.frames);
      const seen = new Set();
      for (const node of nodes) {
        for (const alt of alternatives(schema, node, frame)) {
          for (const [name, sub] of Object.entries(alt.properties || {})) {
            if (seen.has(name)) continue;
            seen.add(name);
            const d = deref(schema, sub);
            const def = d.default !== undefined ? ` = ${JSON.stringify(d.default)}` : "";
            out.push({label: name, detail: typeOf(schema, sub) + def,
                      doc: d.description || d.title || "", value: skeleton(schema, sub),
                      required: (alt.required || []).includes(name)});
          }
        }
      }
    }
    return out.filter((s) => !present.has(s.label) || s.label === ctx.prefix)
              .filter((s) => s.label.startsWith(ctx.prefix))
              .sort((a, b) => (b.required ? 1 : 0) - (a.required ? 1 : 0));
  }
  // a value
  const values = [];
  const stage = p[0] === "connectors" ? p[1] : null;
  if (stage && (p[2] === "primary" || (p[2] === "fallback" && typeof p[3] === "number"))) {
    for (const name of Object.keys(xco[stage] || {}).sort()) values.push({v: name, doc: `${stage} connector`});
  } else {
    const {nodes} = schemaAt(schema, p, ctx.frames);
    for (const node of nodes) {
      for (const alt of alternatives(schema, node)) {
        if (alt.const !== undefined) values.push({v: alt.const, doc: alt.description || ""});
        for (const e of alt.enum || []) values.push({v: e, doc: ""});
        if (alt.type === "boolean") values.push({v: true, doc: ""}, {v: false, doc: ""});
        if (alt.type === "null") values.push({v: null, doc: ""});
      }
      // a discriminated union's tag, e.g. a tool handler's "type"
    }
    const parent = p.length ? schemaAt(schema, p.slice(0, -1), ctx.frames) : null;
    for (const node of parent?.nodes || []) {
      const d = deref(schema, node).discriminator;
      if (d && d.propertyName === p[p.length - 1]) for (const tag of Object.keys(d.mapping || {})) values.push({v: tag, doc: "kind"});
    }
  }
  const seen = new Set();
  for (const {v, doc} of values) {
    const text = JSON.stringify(v);
    if (seen.has(text)) continue;
    seen.add(text);
    out.push({label: text, detail: v === null ? "null" : typeof v, doc, value: text});
  }
  const typed = ctx.quoted ? '"' + ctx.prefix : ctx.prefix;
  return out.filter((s) => s.label.startsWith(typed));
}

// The edit picking `s` makes: {text, cursor}.
export function applySuggestion(text, ctx, s) {
  let from = ctx.from, to = from + (ctx.quoted ? 1 : 0) + ctx.prefix.length;
  while (to < text.length && /[\w.-]/.test(text[to])) to++;  // the rest of the word under the cursor
  if (ctx.quoted && text[to] === '"') to++;
  if (ctx.mode === "value") {
    return {text: text.slice(0, from) + s.value + text.slice(to), cursor: from + s.value.length};
  }
  let before = "", after = "";
  const prev = text.slice(0, from).trimEnd().slice(-1);
  if (prev && !"{,[".includes(prev)) before = ", ";
  const rest = text.slice(to);
  const next = rest.trimStart()[0];
  if (next === '"') after = /^\s/.test(rest) ? "," : ", ";
  // a colon already written after the key stays: only the key is replaced then
  if (rest.trimStart().startsWith(":")) {
    const ins = before + JSON.stringify(s.label);
    return {text: text.slice(0, from) + ins + rest, cursor: from + ins.length};
  }
  const ins = `${before}${JSON.stringify(s.label)}: ${s.value}`;
  // inside an empty string, object or array skeleton: the cursor goes between its brackets
  const inner = ['""', "{}", "[]"].includes(s.value) ? 1 : 0;
  return {text: text.slice(0, from) + ins + after + rest, cursor: from + ins.length - inner};
}

// --- the popup ------------------------------------------------------------------------------

// The caret's position in the textarea, measured on an off-screen copy with the same style.
function caretXY(ta) {
  const style = getComputedStyle(ta);
  const mirror = document.createElement("div");
  for (const prop of ["fontFamily", "fontSize", "fontWeight", "lineHeight", "letterSpacing", "paddingTop",
    "paddingLeft", "paddingRight", "borderTopWidth", "borderLeftWidth", "boxSizing", "tabSize"]) mirror.style[prop] = style[prop];
  Object.assign(mirror.style, {position: "absolute", visibility: "hidden", whiteSpace: "pre-wrap",
    wordWrap: "break-word", width: ta.clientWidth + "px", top: "0", left: "-9999px"});
  mirror.textContent = ta.value.slice(0, ta.selectionStart);
  const mark = document.createElement("span");
  mark.textContent = "\u200b";
  mirror.append(mark);
  document.body.append(mirror);
  const xy = {x: mark.offsetLeft, y: mark.offsetTop + mark.offsetHeight};
  mirror.remove();
  return {x: xy.x - ta.scrollLeft, y: xy.y - ta.scrollTop};
}

// Attach completion to `ta`; `getSchema()` gives the schema (already loaded).
export function attachCompletion(ta, getSchema) {
  const box = document.createElement("ul");
  box.className = "complete";
  box.id = `${ta.id}-complete`;
  box.setAttribute("role", "listbox");
  box.hidden = true;
  const wrap = document.createElement("div");
  wrap.className = "complete-wrap";
  ta.replaceWith(wrap);
  wrap.append(ta, box);
  let items = [], at = 0, ctx = null;

  const close = () => { box.hidden = true; items = []; ctx = null; };
  const render = () => {
    box.replaceChildren(...items.map((s, k) => {
      const li = document.createElement("li");
      li.setAttribute("role", "option");
      li.dataset.label = s.label;
      if (k === at) li.setAttribute("aria-selected", "true");
      const b = document.createElement("b"); b.textContent = s.label;
      const d = document.createElement("span"); d.className = "detail"; d.textContent = s.detail;
      const doc = document.createElement("div"); doc.className = "doc"; doc.textContent = s.doc || "";
      li.append(b, " ", d, doc);
      li.addEventListener("mousedown", (e) => { e.preventDefault(); at = k; pick(); });
      return li;
    }));
    box.querySelector("[aria-selected]")?.scrollIntoView({block: "nearest"});
  };
  const open = (force) => {
    const schema = getSchema();
    if (!schema) return close();
    ctx = cursorContext(ta.value, ta.selectionStart);
    if (!force && !(ctx.mode === "key" && ctx.quoted) && !(ctx.mode === "value" && (ctx.quoted || ctx.prefix))) return close();
    items = suggestions(schema, ctx).slice(0, 50);
    if (!items.length) return close();
    at = 0;
    const {x, y} = caretXY(ta);
    box.style.left = `${Math.max(0, Math.min(x, ta.clientWidth - 220))}px`;
    box.style.top = `${ta.offsetTop + y + 2}px`;
    box.hidden = false;
    render();
  };
  const pick = () => {
    const s = items[at];
    if (!s || !ctx) return close();
    const out = applySuggestion(ta.value, ctx, s);
    ta.value = out.text;
    ta.setSelectionRange(out.cursor, out.cursor);
    close();
    ta.dispatchEvent(new Event("change"));
    ta.focus();
  };

  ta.addEventListener("keydown", (e) => {
    if (e.key === " " && (e.ctrlKey || e.metaKey)) { e.preventDefault(); open(true); return; }
    if (box.hidden) return;
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      at = (at + (e.key === "ArrowDown" ? 1 : items.length - 1)) % items.length;
      render();
    } else if (e.key === "Enter" || e.key === "Tab") { e.preventDefault(); pick(); }
    else if (e.key === "Escape") { e.preventDefault(); close(); }
  });
  ta.addEventListener("input", (e) => {
    if (e.inputType === "insertText" && /[\w"-]/.test(e.data || "")) open(false);
    else if (!box.hidden) open(false);
  });
  ta.addEventListener("blur", () => setTimeout(close, 150));
  ta.addEventListener("click", close);
  return {open, close, box};
}
