// A stand-in for daily-js' call-machine bundle (c.daily.co/call-machine/.../call-machine-object-
// bundle.js), which pipecat's prebuilt UI downloads at run time even for SmallWebRTC calls: its
// default media manager gets the microphone through a Daily call object. The test machine has no
// internet, so the browser test answers that one request with this file (a machine with internet
// loads Daily's own). It does only what a SmallWebRTC call asks of a call object before any room is
// joined: load, start the camera (here: the microphone, from getUserMedia), report the local
// track, answer the calls that wait for a reply, and leave. Not a Daily implementation.
(function () {
  "use strict";
  const id = window._daily.pendings.shift(); // the call client that is loading its call machine
  const WHAT = "iframe-call-message"; // daily-js and its call machine talk by window.postMessage
  const state = { local: { streams: {}, public: { subscribedTracks: {} } }, streams: {}, participants: {} };
  window._daily.instances[id] = window._daily.instances[id] || {};
  window._daily.instances[id].callMachine = { store: { getState: () => state }, reset() {} };
  const send = (message) =>
    window.postMessage({ ...message, what: WHAT, from: "embedded", callClientId: id }, location.origin);
  const answer = (m, extra = {}) => {
    if (m.callbackStamp) send({ action: "stand-in-result", callbackStamp: m.callbackStamp, ...extra });
  };
  const off = { state: "off", off: { byUser: true } };
  const local = (track) => ({
    session_id: "stand-in-local", user_id: "stand-in-local", user_name: "", local: true,
    owner: false, joined_at: new Date(), audio: !!track, video: false, screen: false,
    tracks: {
      audio: track ? { state: "playable", subscribed: true } : { state: "off", off: { byUser: true } },
      video: off, screenAudio: off, screenVideo: off,
    },
  });

  async function startCamera(m) {
    try {
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
      state.local.streams.cam = { stream };
      const track = stream.getAudioTracks()[0];
      const settings = track.getSettings();
      const mic = { deviceId: settings.deviceId || "default", label: track.label, kind: "audioinput" };
      answer(m, { camera: {}, mic, speaker: {} });
      send({ action: "started-camera", camera: {}, mic, speaker: {} });
      send({ action: "participant-updated", participant: local(track) });
    } catch (e) {
      answer(m, { error: { type: "unknown", msg: String(e) } });
    }
  }

  window.addEventListener("message", (event) => {
    const m = event.data;
    if (!m || m.what !== WHAT || m.from !== "module" || m.callClientId !== id) return;
    switch (m.action) {
      case "iframe-launch-config":
        send({ action: "call-machine-initialized" });
        send({ action: "loaded" });
        break;
      case "start-camera":
        startCamera(m);
        break;
      case "local-audio": {
        const track = state.local.streams.cam?.stream.getAudioTracks()[0];
        if (track) track.enabled = !!m.state;
        answer(m);
        break;
      }
      case "leave-meeting":
        state.local.streams.cam?.stream.getTracks().forEach((t) => t.stop());
        state.local.streams = {};
        send({ action: "left-meeting" });
        break;
      default:
        answer(m);
    }
  });
  send({ action: "iframe-ready-for-launch-config" });
})();
