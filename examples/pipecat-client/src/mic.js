// The microphone, straight from getUserMedia. SmallWebRTCTransport's default media manager sets
// the microphone up through a Daily call object, which downloads daily-js' call-machine bundle
// from Daily's CDN at run time (it is not on npm); this one needs nothing but the browser, so the
// page works offline and on a private network. It implements the part of pipecat's MediaManager
// interface a SmallWebRTC call uses: audio in, no camera, no screen share.
export class MicManager {
  constructor(constraints = { echoCancellation: true, noiseSuppression: true, autoGainControl: true }) {
    this._constraints = constraints;
    this._callbacks = {};
    this._micEnabled = true;
    this._stream = null;
    this._track = null;
  }
  setUserAudioCallback() {}
  setClientOptions(options, override = false) {
    if (this._options && !override) return;
    this._options = options;
    this._callbacks = options.callbacks ?? {};
    this._micEnabled = options.enableMic ?? true;
  }
  get supportsScreenShare() { return false; }
  async initialize() {
    if (this._stream) return;
    this._stream = await navigator.mediaDevices.getUserMedia({ audio: this._constraints });
    this._track = this._stream.getAudioTracks()[0];
    this._track.enabled = this._micEnabled;
    const mics = await this.getAllMics();
    this._callbacks.onAvailableMicsUpdated?.(mics);
    this._callbacks.onTrackStarted?.(this._track, { id: "local", name: "", local: true });
  }
  async connect() { await this.initialize(); }
  async disconnect() {
    this._stream?.getTracks().forEach((t) => t.stop());
    this._stream = null;
    this._track = null;
  }
  async userStartedSpeaking() {}
  bufferBotAudio() {}
  async getAllMics() {
    return (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "audioinput");
  }
  async getAllCams() { return []; }
  async getAllSpeakers() { return []; }
  updateMic() {}
  updateCam() {}
  async updateSpeaker() {}
  get selectedMic() { return {}; }
  get selectedCam() { return {}; }
  get selectedSpeaker() { return {}; }
  async enableMic(enable) {
    this._micEnabled = enable;
    if (this._track) this._track.enabled = enable;
  }
  enableCam() {}
  enableScreenShare() {}
  get isCamEnabled() { return false; }
  get isMicEnabled() { return this._micEnabled; }
  get isSharingScreen() { return false; }
  tracks() { return { local: { audio: this._track ?? undefined } }; }
}
