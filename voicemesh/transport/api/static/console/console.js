// The voicemesh console: agents, live sessions, connector health. Plain ES module, no framework,
// and nothing but the public API under /api with the key the user enters (sessionStorage: this
// tab only). Live data comes over one Server-Sent Events stream per view (read with fetch, since
// EventSource cannot send an Authorization header); nothing polls.
import {attachCompletion} from "/console/complete.js";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY_STORE = "voicemesh-api-key";  // the call page's too: "test this agent" needs no second entry
const view = $("#view");

// What a test (or a curious user) can read: API calls per view, the stream's last events.
const stats = window.__console = {calls: {}, streams: {}, view: null, events: []};

let schema = null;          // GET /api/schema, once per page
let streamAbort = null;     // the current view's event stream

function status(text, state = "info") {
  $("#status").textContent = text;
  $("#status").dataset.state = state;
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : (detail || []).map((d) => `${d.path}: ${d.msg}`).join("; "));
    this.status = status; this.detail = detail;
  }
}

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? {Authorization: `Bearer ${key}`, ...extra} : extra;
}

async function api(method, path, body, headers = {}) {
  stats.calls[stats.view] = (stats.calls[stats.view] || 0) + 1;
  const init = {method, headers: authHeaders(headers)};
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] ??= "application/json";
  }
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 401) askKey("the API needs a key (or refused this one)");
  if (!resp.ok) throw new ApiError(resp.status, data.detail ?? resp.statusText);
  return data;
}

// --- the event stream: SSE over fetch ---------------------------------------------------------
async function stream(path, onEvent) {
  stopStream();
  const abort = streamAbort = new AbortController();
  stats.calls[stats.view] = (stats.calls[stats.view] || 0) + 1;
  stats.streams[stats.view] = path;
  try {
    const resp = await fetch(path, {headers: authHeaders({Accept: "text/event-stream"}), signal: abort.signal});
    if (!resp.ok) {
      const data = await resp.json().catch(() => ({}));
      throw new ApiError(resp.status, data.detail ?? resp.statusText);
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let type = "message", data = "";
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event: ")) type = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) onEvent(type, JSON.parse(data));
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") status(`live stream: ${e.message}`, "error");
  }
}

function stopStream() {
  if (streamAbort) streamAbort.abort();
  streamAbort = null;
}

// --- key ------------------------------------------------------------------------------------
function askKey(why) {
  $("#keybox").hidden = false;
  status(why, "error");
}

$("#keybox").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("#key").value.trim());
  $("#key").value = "";
  $("#keybox").hidden = true;
  schema = null;
  route();
});

// --- agents ---------------------------------------------------------------------------------
const STAGES = ["stt", "llm", "tts"];

async function loadSchema() {
  if (!schema) schema = await api("GET", "/api/schema");
  return schema;
}

function connectorsOf(stage) {
  return Object.keys(schema.schema["x-connector-options"]?.[stage] || {}).sort();
}

async function agentsView() {
  const data = await api("GET", "/api/agents");
  const rows = data.agents.map((a) => h("tr", {dataset: {agent: a.name, owner: a.owner ?? ""}},
    h("td", {}, h("b", {}, a.name), " ", a.name === data.default ? h("span", {class: "badge default"}, "default") : null),
    h("td", {}, a.owner ?? "global"),
    h("td", {}, a.description || ""),
    h("td", {}, STAGES.map((s) => `${s}: ${a.config.connectors?.[s]?.primary ?? "—"}`).join(", ")),
    h("td", {},
      h("button", {class: "quiet", "data-act": "edit", onclick: () => { location.hash = `#agent=${encodeURIComponent(a.name)}`; }}, "Edit"), " ",
      h("button", {class: "quiet", "data-act": "default", disabled: a.name === data.default, onclick: () => makeDefault(a.name)}, "Make default"), " ",
      h("button", {class: "quiet", "data-act": "test", onclick: () => testAgent(a.name)}, "Test this agent"), " ",
      h("button", {class: "danger", "data-act": "delete", onclick: () => deleteAgent(a.name)}, "Delete"))));
  view.replaceChildren(
    h("div", {class: "bar"}, h("h2", {}, "Agents"), h("button", {id: "new-agent", onclick: () => { location.hash = "#agent="; }}, "New agent")),
    h("table", {id: "agents"}, h("thead", {}, h("tr", {}, ["Name", "Owner", "Description", "Connectors", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)));
  status(`${data.agents.length} agents; default: ${data.default ?? "none"}`, "ok");
}

async function makeDefault(name) {
  try { await api("POST", `/api/agents/${encodeURIComponent(name)}/set-default`); await agentsView(); status(`${name} is now the default agent`, "ok"); }
  catch (e) { status(e.message, "error"); }
}

async function deleteAgent(name) {
  if (!confirm(`Delete agent ${name}?`)) return;
  try { await api("DELETE", `/api/agents/${encodeURIComponent(name)}`); await agentsView(); status(`deleted ${name}`, "ok"); }
  catch (e) { status(e.message, "error"); }
}

function testAgent(name) {
  // The call page reads the key from this tab's sessionStorage, which a tab opened from here copies.
  const w = window.open(`/?agent=${encodeURIComponent(name)}${location.search.includes("raw_audio=1") ? "&raw_audio=1" : ""}`, "_blank");
  stats.testCall = name;
  if (!w) status("the browser blocked the call window", "error");
}

function field(path, label, control, hint) {
  return h("div", {class: "field", "data-path": path}, h("label", {}, label), control,
    hint ? h("div", {class: "hint"}, hint) : null, h("div", {class: "field-error", role: "alert"}));
}

// Show the API's path-named errors at the fields they name; the rest above the JSON editor.
function showErrors(root, detail) {
  for (const el of root.querySelectorAll(".field")) { el.classList.remove("invalid"); $(".field-error", el).textContent = ""; }
  if (!Array.isArray(detail)) return;
  for (const d of detail) {
    const path = d.path.replace(/^body\./, "");
    let best = null;
    for (const el of root.querySelectorAll(".field[data-path]")) {
      const p = el.dataset.path;
      if ((path === p || path.startsWith(p + ".") || path.startsWith(p + "[")) && (!best || p.length > best.dataset.path.length)) best = el;
    }
    best = best || $(".field[data-path=json]", root);
    best.classList.add("invalid");
    const err = $(".field-error", best);
    err.textContent = (err.textContent ? err.textContent + "; " : "") + `${d.path}: ${d.msg}`;
  }
}

function secretHint(stage, name) {
  const refs = schema.secret_refs?.[stage]?.[name];
  if (!refs) return null;
  return Object.entries(refs).map(([f, names]) =>
    `${f}: write a reference, e.g. "\${${names[0] ?? "NAME"}}" (allowed: ${names.join(", ") || "none"})`).join("; ");
}

async function agentEditor(name) {
  await loadSchema();
  const isNew = !name;
  let record = {name: "", description: "", config: null};
  if (isNew) {
    const cur = await api("GET", "/api/agents/current").catch(() => null);
    record.config = cur ? structuredClone(cur.config) : {connectors: {}};
  } else {
    record = await api("GET", `/api/agents/${encodeURIComponent(name)}`);
  }
  const json = h("textarea", {id: "agent-json", rows: 18, spellcheck: "false"});
  const nameIn = h("input", {id: "agent-name", value: record.name, disabled: !isNew});
  const desc = h("input", {id: "agent-description", value: record.description || ""});
  const prompt = h("textarea", {id: "system-prompt", rows: 3});
  const stageBoxes = {};
  const form = h("div", {class: "card"},
    field("name", "Name", nameIn, "letters, digits, _ . - (starting with a letter or digit)"),
    field("description", "Description", desc),
    field("config.system_prompt", "System prompt", prompt));
  for (const stage of STAGES) {
    const primary = h("select", {id: `${stage}-primary`}, connectorsOf(stage).map((c) => h("option", {value: c}, c)));
    const fallback = h("select", {id: `${stage}-fallback`, multiple: true, size: 3}, connectorsOf(stage).map((c) => h("option", {value: c}, c)));
    const hint = h("div", {class: "hint"});
    const refresh = () => { hint.textContent = secretHint(stage, primary.value) || ""; };
    primary.addEventListener("change", () => { refresh(); formToJson(); });
    fallback.addEventListener("change", formToJson);
    stageBoxes[stage] = {primary, fallback, refresh};
    form.append(h("div", {class: "stage"}, h("b", {}, stage.toUpperCase()),
      field(`config.connectors.${stage}.primary`, "Primary", primary),
      field(`config.connectors.${stage}.fallback`, "Fallbacks (in order)", fallback), hint));
  }
  prompt.addEventListener("input", formToJson);

  function current() {
    try { return JSON.parse(json.value); } catch { return null; }
  }
  function jsonToForm(cfg) {
    prompt.value = cfg.system_prompt ?? "";
    for (const stage of STAGES) {
      const c = cfg.connectors?.[stage] || {};
      stageBoxes[stage].primary.value = c.primary ?? "";
      for (const o of stageBoxes[stage].fallback.options) o.selected = (c.fallback || []).includes(o.value);
      stageBoxes[stage].refresh();
    }
  }
  function formToJson() {
    const cfg = current() ?? record.config;
    cfg.system_prompt = prompt.value;
    cfg.connectors ??= {};
    for (const stage of STAGES) {
      const c = cfg.connectors[stage] ??= {};
      c.primary = stageBoxes[stage].primary.value;
      c.fallback = [...stageBoxes[stage].fallback.selectedOptions].map((o) => o.value);
    }
    json.value = JSON.stringify(cfg, null, 2);
  }
  json.value = JSON.stringify(record.config, null, 2);
  const jsonField = field("json", "Agent JSON (validated by the API against the schema; Ctrl+Space completes from it)", json,
    "Secrets only as ${ENV} references; the console never sees resolved values.");
  attachCompletion(json, () => schema?.schema);
  json.addEventListener("change", () => {
    const cfg = current();
    if (cfg) { jsonToForm(cfg); showErrors(view, []); }
    else showErrors(view, [{path: "json", msg: "not valid JSON"}]);
  });
  jsonToForm(record.config);

  async function save() {
    const cfg = current();
    if (!cfg) return showErrors(view, [{path: "json", msg: "not valid JSON"}]);
    try {
      if (isNew) await api("POST", "/api/agents", {name: nameIn.value.trim(), description: desc.value, config: cfg});
      else await api("PUT", `/api/agents/${encodeURIComponent(record.name)}`, {description: desc.value, config: cfg});
      showErrors(view, []);
      status(`saved agent ${isNew ? nameIn.value.trim() : record.name}`, "ok");
      location.hash = "#agents";
    } catch (e) {
      showErrors(view, e.detail);
      status(e.status === 422 ? "not saved: fix the fields marked below" : e.message, "error");
    }
  }
  view.replaceChildren(
    h("div", {class: "bar"}, h("h2", {}, isNew ? "New agent" : `Agent ${record.name}`),
      h("button", {id: "save-agent", onclick: save}, "Save"),
      h("button", {class: "quiet", onclick: () => { location.hash = "#agents"; }}, "Back")),
    h("div", {class: "cols"}, form,
      h("div", {class: "card"}, jsonField)));
  status(isNew ? "a new agent, starting from the default agent's config" : `editing ${record.name}`, "info");
}

// --- sessions -------------------------------------------------------------------------------
const live = {};  // session id -> {transport, serving: {stage: connector}, lastEvent}

function age(ms, now) {
  const s = Math.max(0, Math.round((now - ms) / 1000));
  return s < 120 ? `${s} s` : `${Math.round(s / 60)} min`;
}

function noteCall(ev) {
  const l = live[ev.session_id] ??= {serving: {}, errors: 0};
  l.transport = ev.transport;
  const e = ev.event;
  // Which connector served each stage: the transcripts name STT's and the LLM's, the TTS hop
  // (once per turn, at its first audio) names TTS's, a fallback after a failover included.
  if (e.type === "transcript" && e.connector && (e.role === "assistant" || e.final)) l.serving[e.role === "user" ? "stt" : "llm"] = e.connector;
  if (e.type === "hop" && e.connector) l.serving[e.stage] = e.connector;
  if (e.type === "turn_metrics" && e.connectors) Object.assign(l.serving, e.connectors);
  if (e.type === "error") l.errors += 1;
  l.last = e.type;
}

// One stage's serving connector: the one a turn was last served by (a fallback is marked), else
// the configured primary until a turn shows otherwise.
function servingBadge(stage, primary, served) {
  const fallback = served && primary && served !== primary;
  return h("span", {class: `badge${fallback ? " fallback" : ""}`, dataset: {stage, serving: served ?? ""},
    title: served ? (fallback ? `a fallback is serving: the primary ${primary} failed or is marked down` : "served the last turn")
                  : "configured primary; no turn seen yet"},
    `${stage}: ${served ?? primary ?? "—"}${fallback ? " (fallback)" : ""}`);
}

function sessionsView() {
  const table = h("table", {id: "sessions"}, h("thead", {}, h("tr", {},
    ["Session", "Agent", "Age", "TTL", "Version", "Transport", "Serving", "Health"].map((t) => h("th", {}, t)))), h("tbody"));
  view.replaceChildren(h("h2", {}, "Live sessions"), table, h("p", {class: "meta"}, "live over one event stream (/api/events)"));
  let last = null;
  const render = () => {
    if (!last) return;
    const down = new Set(last.health.map((m) => `${m.stage}:${m.connector}`));
    $("tbody", table).replaceChildren(...last.sessions.map((s) => {
      const l = live[s.session_id] || {serving: {}};
      const serving = STAGES.map((st) => servingBadge(st, s.stages[st]?.primary, l.serving[st]));
      const bad = STAGES.filter((st) => down.has(`${st}:${s.stages[st]?.primary}`));
      return h("tr", {dataset: {session: s.session_id}},
        h("td", {}, h("a", {href: `#session=${s.session_id}`}, s.session_id.slice(0, 12))),
        h("td", {}, s.agent ?? "(raw config)"), h("td", {}, age(s.created_ms, last.now_ms)),
        h("td", {}, `${s.ttl_s} s`), h("td", {}, String(s.version)), h("td", {}, l.transport ?? "no call seen"),
        h("td", {class: "serving"}, serving),
        h("td", {}, bad.length ? h("span", {class: "badge down"}, `down: ${bad.join(", ")}`) : h("span", {class: "badge ok"}, "ok")));
    }));
    status(`${last.sessions.length} live sessions`, "ok");
  };
  stream("/api/events", (type, data) => {
    if (type === "snapshot") { last = data; render(); }
    else if (type === "call") { noteCall(data); stats.events.push(data); render(); }
  });
}

function healthView() {
  const table = h("table", {id: "health"}, h("thead", {}, h("tr", {},
    ["Stage", "Connector", "Reason", "Since", "Until"].map((t) => h("th", {}, t)))), h("tbody"));
  view.replaceChildren(h("h2", {}, "Connector health"), table,
    h("p", {class: "meta"}, "connectors marked down in the shared health marks; a mark lapses by itself when nobody renews it"));
  stream("/api/events", (type, data) => {
    if (type !== "snapshot") return;
    const t = (ms) => new Date(ms).toLocaleTimeString();
    $("tbody", table).replaceChildren(...(data.health.length ? data.health.map((m) => h("tr", {dataset: {connector: m.connector}},
      h("td", {}, m.stage), h("td", {}, m.connector), h("td", {}, [m.kind, m.code, m.status, m.message].filter(Boolean).join(" · ")),
      h("td", {}, t(m.since_ms)), h("td", {}, t(m.until_ms))))
      : [h("tr", {}, h("td", {colspan: 5}, "every connector is healthy (none marked down)"))]));
    status(`${data.health.length} connectors marked down`, "ok");
  });
}

// --- one session ----------------------------------------------------------------------------
const PHASES = [["eou", "eou_ms"], ["stt", "stt_ms"], ["llm", "llm_ttft_ms"], ["tts", "tts_ttfb_ms"], ["audio", "first_audio_ms"]];

function waterfall(m) {
  // Phases run one after another from the caller's end of speech; each bar starts where the last ended.
  const total = Math.max(m.v2v_ms || 0, PHASES.reduce((a, [, k]) => a + (m[k] || 0), 0), 1);
  let at = 0;
  return h("div", {class: "wf", dataset: {epoch: m.epoch, v2vMs: m.v2v_ms ?? ""}},
    ...PHASES.flatMap(([name, key]) => {
      const ms = m[key];
      const seg = h("div", {class: "track"}, ms == null ? null :
        h("div", {class: `seg ${name}`, style: `left:${(100 * at / total).toFixed(1)}%;width:${Math.max(0.5, 100 * ms / total).toFixed(1)}%`}));
      at += ms || 0;
      return [h("span", {}, `turn ${m.epoch} ${name}`), seg, h("span", {}, ms == null ? "—" : `${Math.round(ms)} ms`)];
    }),
    h("span", {}, h("b", {}, "voice-to-voice")), h("span"), h("span", {class: "v2v"}, m.v2v_ms == null ? "—" : `${Math.round(m.v2v_ms)} ms`));
}

async function sessionView(id) {
  await loadSchema();
  let session = await api("GET", `/api/sessions/${encodeURIComponent(id)}`);
  let editing = null;  // the version the swap form was loaded from (If-Match)
  const head = h("div", {class: "card", id: "session-head"});
  const transcript = h("div", {id: "transcript", class: "card", role: "log"});
  const turns = h("div", {id: "waterfall", class: "card"}, h("b", {}, "Turns"));
  const events = h("ul", {id: "session-events", class: "events"});
  const stageSel = h("select", {id: "swap-stage"}, ["stt", "llm", "tts"].map((s) => h("option", {value: s}, s)));
  const connSel = h("select", {id: "swap-connector"});
  const opts = h("textarea", {id: "swap-options", rows: 4, spellcheck: "false"});
  const swapMsg = h("p", {id: "swap-status", role: "status"});
  const fillConnectors = () => {
    connSel.replaceChildren(...connectorsOf(stageSel.value).map((c) => h("option", {value: c}, c)));
    connSel.value = editing?.config.connectors?.[stageSel.value]?.primary ?? connSel.value;
    fillOptions();
  };
  const fillOptions = () => {
    opts.value = JSON.stringify(editing?.config.connectors?.[stageSel.value]?.config?.[connSel.value] ?? {}, null, 2);
  };
  const agentSel = h("select", {id: "switch-agent"});
  const agentMsg = h("p", {id: "agent-switch-status", role: "status"});
  api("GET", "/api/agents").then((data) => {
    agentSel.replaceChildren(...data.agents.map((a) => h("option", {value: a.name}, a.name)));
    agentSel.value = session.agent ?? "";
  }).catch((e) => { agentMsg.textContent = `cannot list agents: ${e.message}`; });
  async function switchAgent() {
    // the whole config becomes the named agent's (PUT .../agent), compare-and-set like the swap
    const name = agentSel.value;
    try {
      const out = await api("PUT", `/api/sessions/${encodeURIComponent(id)}/agent`, {agent: name},
        {"If-Match": `"${editing.version}"`});
      agentMsg.textContent = `switched: the session is now agent ${out.agent} (version ${out.version}); the next turn uses it`;
      agentMsg.dataset.state = "ok";
      session = await api("GET", `/api/sessions/${encodeURIComponent(id)}`);
      if (live[id]) live[id].serving = {};  // the last turn's connectors were the old agent's
      loadEditor(); renderHead();
    } catch (e) {
      agentMsg.dataset.state = "error";
      agentMsg.textContent = e.status === 409 ? `Conflict: ${e.message}` : `not switched: ${e.message}`;
    }
  }
  stageSel.addEventListener("change", fillConnectors);
  connSel.addEventListener("change", fillOptions);
  const loadEditor = () => { editing = structuredClone(session); $("#swap-version").textContent = `editing version ${editing.version}`; fillConnectors(); };
  async function swap() {
    let options;
    try { options = JSON.parse(opts.value || "{}"); } catch { swapMsg.textContent = "options: not valid JSON"; swapMsg.dataset.state = "error"; return; }
    const stage = stageSel.value, name = connSel.value;
    const patch = {connectors: {[stage]: {primary: name, config: {[name]: options}}}};
    try {
      const out = await api("PATCH", `/api/sessions/${encodeURIComponent(id)}/config`, patch,
        {"Content-Type": "application/merge-patch+json", "If-Match": `"${editing.version}"`});
      swapMsg.textContent = `saved: ${stage} is now ${name} (version ${out.version}); the next turn uses it`;
      swapMsg.dataset.state = "ok";
      session = await api("GET", `/api/sessions/${encodeURIComponent(id)}`);
      loadEditor(); renderHead();
    } catch (e) {
      swapMsg.dataset.state = "error";
      swapMsg.textContent = e.status === 409 ? `Conflict: ${e.message}` : `not saved: ${e.message}`;
    }
  }
  async function extend() {
    try { const out = await api("POST", `/api/sessions/${encodeURIComponent(id)}/ttl`, {ttl_s: Number($("#ttl-s").value)}); status(`TTL set to ${out.ttl_s} s`, "ok"); }
    catch (e) { status(e.message, "error"); }
  }
  async function end() {
    try { await api("DELETE", `/api/sessions/${encodeURIComponent(id)}`); status(`session ${id} ended`, "ok"); }
    catch (e) { status(e.message, "error"); }
  }
  function renderHead() {
    const c = session.config.connectors || {};
    head.replaceChildren(
      h("div", {}, h("b", {}, `Session ${session.session_id}`), " · agent ",
        h("span", {id: "session-agent"}, session.agent ?? "(raw config)"), " · ",
        h("span", {id: "session-version"}, `version ${session.version}`), ` · TTL ${session.ttl_s} s · `,
        h("span", {id: "session-transport"}, live[id]?.transport ? `transport ${live[id].transport}` : "no call seen yet")),
      h("div", {id: "session-stages"}, STAGES.flatMap((s) => {
        const served = live[id]?.serving?.[s];
        const fallback = served && served !== c[s]?.primary;
        return [h("span", {class: `badge${fallback ? " fallback" : ""}`, dataset: {stage: s, serving: served ?? ""}},
          `${s}: ${c[s]?.primary ?? "—"}${(c[s]?.fallback || []).length ? " → " + c[s].fallback.join(", ") : ""}` +
          (served ? ` (serving: ${served}${fallback ? ", fallback" : ""})` : "")), " "];
      })));
  }
  view.replaceChildren(
    h("div", {class: "bar"}, h("h2", {}, "Session"), h("a", {href: "#sessions"}, "all sessions")),
    head,
    h("div", {class: "cols"},
      h("div", {}, h("h3", {}, "Transcript"), transcript, turns),
      h("div", {},
        h("div", {class: "card", id: "agent-switch"}, h("h3", {}, "Switch the agent"),
          h("div", {class: "bar"}, h("label", {}, "agent ", agentSel),
            h("button", {id: "agent-switch-save", onclick: switchAgent}, "Switch (compare-and-set)")),
          h("p", {class: "meta"}, "the session's whole config becomes the agent's; the call, its transcript and TTL stay"), agentMsg),
        h("div", {class: "card", id: "swap"}, h("h3", {}, "Swap a provider"), h("span", {id: "swap-version", class: "meta"}),
          h("div", {class: "bar"}, h("label", {}, "stage ", stageSel), h("label", {}, "connector ", connSel)),
          field("options", "Options (JSON; secrets only as ${ENV} references)", opts),
          h("div", {class: "bar"}, h("button", {id: "swap-save", onclick: swap}, "Save (compare-and-set)"),
            h("button", {class: "quiet", id: "swap-reload", onclick: loadEditor}, "Reload")), swapMsg),
        h("div", {class: "card"}, h("h3", {}, "Session"),
          h("div", {class: "bar"}, h("input", {id: "ttl-s", type: "number", value: 3600, min: 10}),
            h("button", {id: "extend-ttl", onclick: extend}, "Extend TTL"),
            h("button", {class: "danger", id: "end-session", onclick: end}, "End session"))),
        h("div", {class: "card"}, h("h3", {}, "Errors and fallbacks"), events))));
  loadEditor(); renderHead();
  status(`session ${id}: live`, "ok");
  const lines = {};
  stream(`/api/sessions/${encodeURIComponent(id)}/events`, (type, data) => {
    if (type === "session") {
      if (data.agent !== session.agent && live[id]) live[id].serving = {};  // switched elsewhere
      session = {...session, ...data}; renderHead(); return;
    }
    if (type === "ended") { status(`session ${id} has ended`, "error"); return; }
    if (type !== "call") return;
    noteCall(data); stats.events.push(data);
    const e = data.event;
    if (e.type === "transcript" && e.text && (e.role === "assistant" || e.final)) {
      const key = `${e.role}:${e.epoch}`;
      let line = lines[key];
      if (!line) {
        line = lines[key] = h("div", {class: "line", dataset: {role: e.role, epoch: e.epoch ?? ""}},
          h("span", {class: "who"}, e.role === "user" ? "you" : "bot"), h("span", {class: "text"}), h("span", {class: "meta via"}));
        transcript.append(line);
      }
      const text = $(".text", line);
      text.textContent = e.role === "assistant" ? `${text.textContent} ${e.text}`.trim() : e.text;
      if (e.connector) $(".via", line).textContent = ` (${e.connector})`;
      transcript.scrollTop = transcript.scrollHeight;
    } else if (e.type === "turn_metrics") {
      turns.append(waterfall(e));
    } else if (e.type === "error" || e.type === "warning") {
      events.append(h("li", {dataset: {type: e.type}}, `${new Date().toLocaleTimeString()} ${e.type}${e.stage ? ` (${e.stage})` : ""}: ${e.code ? e.code + " " : ""}${e.error ?? e.message}`));
    } else if (e.type === "interrupted") {
      events.append(h("li", {dataset: {type: "interrupted"}}, `turn ${e.epoch} interrupted after "${e.heard}"`));
    }
    renderHead();
  });
}

// --- routing --------------------------------------------------------------------------------
async function route() {
  stopStream();
  const hash = location.hash || "#agents";
  const [name, arg] = hash.slice(1).split("=");
  stats.view = name === "agent" ? "agent-editor" : name;
  const nav = {agent: "agents", session: "sessions"}[name] ?? name;
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.id === `nav-${nav}`) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (!sessionStorage.getItem(KEY_STORE)) {
    // Auth may be off: try once without a key; a 401 asks for one.
    try { await api("GET", "/api/agents"); } catch { return; }
  }
  try {
    if (name === "agents") await agentsView();
    else if (name === "agent") await agentEditor(decodeURIComponent(arg || ""));
    else if (name === "sessions") sessionsView();
    else if (name === "session") await sessionView(decodeURIComponent(arg));
    else if (name === "health") healthView();
    else location.hash = "#agents";
  } catch (e) {
    status(e.message, "error");
  }
}

window.addEventListener("hashchange", route);
route();
