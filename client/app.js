// The page: microphone → WebRTC → bridge; model audio ← <audio>; captions from "oai-events".
// Plain JS, no build step. window.bridge exposes state for tests and debugging.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = { call: $("call"), state: $("state"), error: $("error"), captions: $("captions"),
             micLevel: $("mic-level"), modelLevel: $("model-level"), remote: $("remote") };

const bridge = (window.bridge = {
  state: "idle", callId: null, events: [], micPeak: 0, modelPeak: 0, modelLevel: 0,
  pc: null, dc: null, mic: null, audioCtx: null, meterTimer: null,
});

function setState(state) {
  bridge.state = state;
  ui.state.textContent = state;
  ui.state.dataset.state = state;
  const live = state === "connecting" || state === "connected";
  ui.call.textContent = live ? "Hang up" : "Start";
  ui.call.classList.toggle("live", live);
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

// ---- captions -------------------------------------------------------------------
const captions = new Map(); // item_id → element

function caption(itemId, role) {
  let el = captions.get(itemId);
  if (!el) {
    el = document.createElement("div");
    el.className = `caption ${role} partial`;
    el.dataset.itemId = itemId;
    el.dataset.role = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    el.append(who, document.createElement("span"));
    captions.set(itemId, el);
    ui.captions.append(el);
  }
  return el;
}

function appendCaption(itemId, role, delta) {
  const el = caption(itemId, role);
  el.lastChild.textContent += delta;
  el.scrollIntoView({ block: "end" });
}

function finishCaption(itemId, role, text) {
  const el = caption(itemId, role);
  if (typeof text === "string" && text.trim()) el.lastChild.textContent = text.trim();
  el.classList.remove("partial");
  if (!el.lastChild.textContent.trim()) el.remove();
}

// ---- events from the server -------------------------------------------------------
function onServerEvent(ev) {
  bridge.events.push(ev);
  switch (ev.type) {
    case "input_audio_buffer.speech_started":
      caption(ev.item_id, "user");
      break;
    case "conversation.item.input_audio_transcription.delta":
      appendCaption(ev.item_id, "user", ev.delta || "");
      break;
    case "conversation.item.input_audio_transcription.completed":
      finishCaption(ev.item_id, "user", ev.transcript);
      break;
    case "conversation.item.input_audio_transcription.failed":
      finishCaption(ev.item_id, "user", "(not understood)");
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      appendCaption(ev.item_id, "assistant", ev.delta || "");
      break;
    case "response.output_audio_transcript.done":
    case "response.output_text.done":
      finishCaption(ev.item_id, "assistant", ev.transcript ?? ev.text);
      break;
    case "conversation.item.truncated": {
      const el = captions.get(ev.item_id);
      if (el) el.classList.add("interrupted");
      break;
    }
    case "error": {
      const e = ev.error || {};
      showError(`${e.message || "error"}${e.code ? ` (${e.code})` : ""}`);
      if (e.code === "call_ended" || e.code === "upstream_closed" || e.code === "upstream_error") teardown("ended");
      break;
    }
  }
}

// ---- level meters (Web Audio analysers; the <audio> element does the playing) ---------
function analyser(stream) {
  const node = bridge.audioCtx.createAnalyser();
  node.fftSize = 1024;
  bridge.audioCtx.createMediaStreamSource(stream).connect(node);
  const buf = new Float32Array(node.fftSize);
  return () => {
    node.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const x of buf) sum += x * x;
    return Math.sqrt(sum / buf.length);
  };
}

function startMeters(micStream) {
  const mic = analyser(micStream);
  let model = null;
  bridge.attachModel = (stream) => { model = analyser(stream); };
  bridge.meterTimer = setInterval(() => {
    const m = mic();
    bridge.micPeak = Math.max(bridge.micPeak, m);
    ui.micLevel.value = Math.min(1, m * 4);
    if (model) {
      const r = model();
      bridge.modelLevel = r;
      bridge.modelPeak = Math.max(bridge.modelPeak, r);
      ui.modelLevel.value = Math.min(1, r * 4);
    }
  }, 50);
}

// ---- the call ----------------------------------------------------------------------
async function start() {
  showError("");
  setState("connecting");
  ui.call.disabled = true;
  try {
    // Created on the user's gesture, as mobile browsers require for audio.
    bridge.audioCtx = new (window.AudioContext || window.webkitAudioContext)();
    ui.remote.play().catch(() => {});
    bridge.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    }).catch((err) => {
      throw new Error(err.name === "NotAllowedError" ? "Microphone permission was denied." :
        err.name === "NotFoundError" ? "No microphone found." :
        !window.isSecureContext ? "The microphone needs https (or localhost)." : `Microphone error: ${err.message}`);
    });
    startMeters(bridge.mic);
    const config = await fetch("/config.json").then((r) => r.json());
    const pc = (bridge.pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] }));
    for (const track of bridge.mic.getAudioTracks()) pc.addTrack(track, bridge.mic);
    pc.ontrack = (e) => {
      const stream = e.streams[0] || new MediaStream([e.track]);
      ui.remote.srcObject = stream; // the <audio> element is the echo canceller's reference
      ui.remote.play().catch((err) => showError(`Playback blocked: ${err.message}`));
      bridge.attachModel(stream);
    };
    pc.onconnectionstatechange = () => {
      const s = pc.connectionState;
      if (s === "connected") setState("connected");
      else if (s === "failed") { showError("The connection failed (network or firewall)."); teardown("failed"); }
      else if (s === "disconnected") setState("connecting");
    };
    const dc = (bridge.dc = pc.createDataChannel("oai-events"));
    dc.onmessage = (e) => { try { onServerEvent(JSON.parse(e.data)); } catch (err) { console.error(err); } };
    dc.onclose = () => { if (bridge.state === "connected") teardown("ended"); };

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringDone(pc, 2000);
    // A server started with BRIDGE_AUTH_TOKEN wants a key: links carry one as #key=ek_...
    const key = new URLSearchParams(location.hash.slice(1)).get("key");
    const headers = { "Content-Type": "application/sdp" };
    if (key) headers.Authorization = `Bearer ${key}`;
    const resp = await fetch("/v1/realtime/calls", { method: "POST", headers, body: pc.localDescription.sdp });
    const body = await resp.text();
    if (resp.status !== 201) {
      let message = body;
      try { message = JSON.parse(body).error.message; } catch (_) {}
      throw new Error(`Server refused the call (${resp.status}): ${message}`);
    }
    bridge.callId = (resp.headers.get("Location") || "").split("/").pop();
    await pc.setRemoteDescription({ type: "answer", sdp: body });
  } catch (err) {
    showError(err.message || String(err));
    await teardown("failed");
  } finally {
    ui.call.disabled = false;
  }
}

function iceGatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

async function teardown(state) {
  const { pc, callId } = bridge;
  bridge.pc = null;
  bridge.callId = null;
  if (callId && state === "idle") {
    await fetch(`/v1/realtime/calls/${callId}/hangup`, { method: "POST" }).catch(() => {});
  }
  if (pc) pc.close();
  if (bridge.mic) bridge.mic.getTracks().forEach((t) => t.stop());
  bridge.mic = null;
  clearInterval(bridge.meterTimer);
  ui.micLevel.value = ui.modelLevel.value = 0;
  if (bridge.audioCtx) bridge.audioCtx.close().catch(() => {});
  bridge.audioCtx = null;
  ui.remote.srcObject = null;
  setState(state);
}

ui.call.addEventListener("click", () => {
  if (bridge.pc) teardown("idle");
  else start();
});
window.addEventListener("pagehide", () => {
  if (bridge.callId) navigator.sendBeacon(`/v1/realtime/calls/${bridge.callId}/hangup`);
});
