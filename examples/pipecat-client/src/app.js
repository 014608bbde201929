// A voicemesh front end on pipecat's client SDK: POST /start, WebRTC to the session it made, and
// RTVI on the data channel. It shows the transcript as it comes (the caller's words, interim and
// final; the bot's, sentence by sentence), each turn's metrics, and hangs up with disconnect-bot.
// Query parameters: ?agent=NAME (else the default agent), ?key=API_KEY (when auth is on),
// ?raw_audio=1 (echo cancellation, noise suppression and AGC off: for a fake microphone).
import { PipecatClient } from "@pipecat-ai/client-js";
import { SmallWebRTCTransport } from "@pipecat-ai/small-webrtc-transport";
import { MicManager } from "./mic.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
// what the page saw, for a test (or a curious developer in the console)
const state = (window.__rtvi = {
  connected: false, ready: null, disconnected: false, errors: [], transcripts: [], bot: [],
  metrics: [], serverMessages: [], botAudio: false, sessionId: null,
});

function line(role, text, interim = false) {
  const el = document.createElement("div");
  el.className = `line ${role}${interim ? " interim" : ""}`;
  el.dataset.role = role;
  el.textContent = `${role === "user" ? "you" : "bot"}: ${text}`;
  $("transcript").append(el);
  return el;
}

let interim = null;
const raw = params.get("raw_audio") === "1";
const mic = new MicManager(
  raw ? { echoCancellation: false, noiseSuppression: false, autoGainControl: false } : undefined,
);
const client = new PipecatClient({
  transport: new SmallWebRTCTransport({ mediaManager: mic }),
  enableMic: true,
  enableCam: false,
  callbacks: {
    onConnected: () => { state.connected = true; },
    onDisconnected: () => {
      state.disconnected = true;
      $("status").textContent = "call ended";
      $("connect").disabled = false;
      $("hangup").disabled = true;
    },
    onBotReady: (data) => {
      state.ready = data;
      state.sessionId = data?.about?.session_id ?? state.sessionId;
      $("status").textContent = `connected (session ${state.sessionId})`;
    },
    onUserTranscript: (data) => {
      state.transcripts.push(data);
      if (!data.final) {
        interim ??= line("user", "", true);
        interim.textContent = `you: ${data.text}…`;
        return;
      }
      interim?.remove();
      interim = null;
      line("user", data.text);
    },
    onBotLlmText: (data) => { state.bot.push(data.text); line("assistant", data.text); },
    onMetrics: (data) => {
      state.metrics.push(data);
      const fmt = (xs) => (xs ?? []).map((x) => `${x.processor} ${Math.round(x.value * 1000)} ms`);
      const el = document.createElement("div");
      el.className = "metrics";
      el.textContent = [...fmt(data.processing), ...fmt(data.ttfb).map((s) => `${s} ttfb`)].join(" · ");
      $("transcript").append(el);
    },
    onServerMessage: (data) => { state.serverMessages.push(data); },
    onError: (message) => { state.errors.push(message.data); },
    onMessageError: (message) => { state.errors.push(message.data); },
    onTrackStarted: (track, participant) => {
      if (participant?.local || track.kind !== "audio") return;
      $("bot-audio").srcObject = new MediaStream([track]);
      state.botAudio = true;
    },
  },
});
window.__client = client;

async function connect() {
  $("connect").disabled = true;
  $("status").textContent = "connecting…";
  const headers = new Headers();
  if (params.get("key")) headers.set("Authorization", `Bearer ${params.get("key")}`);
  const agent = params.get("agent");
  try {
    const ready = await client.startBotAndConnect({
      endpoint: new URL("/start", location.origin).href,
      headers,
      requestData: agent ? { agent } : {},
    });
    state.ready = ready;
    $("hangup").disabled = false;
  } catch (e) {
    state.errors.push(String(e));
    $("status").textContent = `could not connect: ${e}`;
    $("connect").disabled = false;
  }
}

$("connect").onclick = connect;
$("hangup").onclick = () => client.disconnectBot();
$("say").onsubmit = (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (text) client.sendText(text);
  $("text").value = "";
};
