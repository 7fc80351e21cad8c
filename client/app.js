// The page: microphone → WebRTC → bridge; model audio ← <audio>; captions from "oai-events".
// Plain JS, no build step. window.bridge exposes state for tests and debugging.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = { call: $("call"), state: $("state"), error: $("error"), captions: $("captions"), net: $("net"),
             banner: $("banner"),
             micLevel: $("mic-level"), modelLevel: $("model-level"), remote: $("remote") };

const bridge = (window.bridge = {
  state: "idle", callId: null, events: [], micPeak: 0, modelPeak: 0, modelLevel: 0, quality: null,
  pc: null, dc: null, mic: null, audioCtx: null, meterTimer: null,
});

function setState(state) {
  bridge.state = state;
  ui.state.textContent = state === "reconnecting" ? "reconnecting…" : state;
  ui.state.dataset.state = state;
  const live = state === "connecting" || state === "connected" || state === "reconnecting";
  ui.call.textContent = live ? "Hang up" : "Start";
  ui.banner.textContent = state === "reconnecting" ? "Reconnecting… the call goes on when the network is back." : "";
  ui.banner.hidden = state !== "reconnecting";
  if (!live) { ui.net.hidden = true; bridge.quality = null; }
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
    who.textContent = { user: "You", assistant: "Model", tool: "Tool" }[role] || role;
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
    case "response.function_call_arguments.done": // a tool the model called (the bridge's or the page's)
      finishCaption(`tool:${ev.call_id}`, "tool", `${ev.name}(${ev.arguments || ""})`);
      break;
    case "conversation.item.added": {
      const item = ev.item || {};
      if (item.type === "function_call_output" && captions.has(`tool:${item.call_id}`)) {
        const el = captions.get(`tool:${item.call_id}`);
        const out = String(item.output ?? "");
        el.lastChild.textContent += ` → ${out.length > 160 ? out.slice(0, 160) + "…" : out}`;
      }
      break;
    }
    case "conversation.item.truncated": {
      const el = captions.get(ev.item_id);
      if (el) el.classList.add("interrupted");
      break;
    }
    case "call.reconnect_info":
      bridge.secret = ev.secret;
      bridge.graceSeconds = ev.grace_seconds;
      break;
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
    watchSound(bridge.audioCtx);
    ui.remote.play().catch(() => {});
    bridge.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    }).catch((err) => {
      throw new Error(err.name === "NotAllowedError" ? "Microphone permission was denied." :
        err.name === "NotFoundError" ? "No microphone found." :
        !window.isSecureContext ? "The microphone needs https (or localhost)." : `Microphone error: ${err.message}`);
    });
    startMeters(bridge.mic);
    bridge.config = await fetch("/config.json").then((r) => r.json());
    const pc = newPeer();
    // A server started with BRIDGE_AUTH_TOKEN wants a key: links carry one as #key=ek_...
    const key = new URLSearchParams(location.hash.slice(1)).get("key");
    const resp = await offer(pc, "/v1/realtime/calls", key);
    if (resp.status !== 201) throw new Error(`Server refused the call (${resp.status}): ${resp.message}`);
    bridge.callId = (resp.headers.get("Location") || "").split("/").pop();
    await pc.setRemoteDescription({ type: "answer", sdp: resp.body });
  } catch (err) {
    showError(err.message || String(err));
    await teardown("failed");
  } finally {
    ui.call.disabled = false;
  }
}

// One peer connection: the microphone out, the model's audio in, the "oai-events" channel.
// A call can go through several: after a network change the page re-attaches with a new one.
function newPeer() {
  const pc = (bridge.pc = new RTCPeerConnection({ iceServers: bridge.config.ice_servers || [] }));
  for (const track of bridge.mic.getAudioTracks()) pc.addTrack(track, bridge.mic);
  pc.ontrack = (e) => {
    const stream = e.streams[0] || new MediaStream([e.track]);
    ui.remote.srcObject = stream; // the <audio> element is the echo canceller's reference
    ui.remote.play().catch((err) => showError(`Playback blocked: ${err.message}`));
    bridge.attachModel(stream);
  };
  pc.onconnectionstatechange = () => {
    if (pc !== bridge.pc) return; // a peer already replaced
    const s = pc.connectionState;
    if (s === "connected") {
      bridge.everConnected = true; showError(""); setState("connected"); watchInbound(pc); watchQuality(pc);
    }
    else if (s === "failed") reconnect("the connection failed");
    else if (s === "disconnected") {
      // ICE often recovers by itself within a second or two; if not, offer again
      setState("reconnecting");
      clearTimeout(bridge.disconnectTimer);
      bridge.disconnectTimer = setTimeout(() => {
        if (pc === bridge.pc && pc.connectionState !== "connected") reconnect("the connection was lost");
      }, 1500);
    }
  };
  const dc = (bridge.dc = pc.createDataChannel("oai-events"));
  dc.onmessage = (e) => { try { onServerEvent(JSON.parse(e.data)); } catch (err) { console.error(err); } };
  dc.onclose = () => { if (pc === bridge.pc && bridge.state === "connected") reconnect("the event channel closed"); };
  return pc;
}

// Offer `pc`'s SDP at `url`; the answer is applied by the caller. A request that takes
// longer than `timeoutMs` is given up (after a network change it can hang on a dead path).
async function offer(pc, url, bearer, timeoutMs = 30000) {
  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringDone(pc, 2000);
  const headers = { "Content-Type": "application/sdp" };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  const resp = await fetch(url, { method: "POST", headers, body: pc.localDescription.sdp,
                                  signal: AbortSignal.timeout(timeoutMs) });
  const body = await resp.text();
  let message = body;
  try { message = JSON.parse(body).error.message; } catch (_) {}
  const secret = resp.headers.get("X-Reconnect-Secret");
  if (secret) bridge.secret = secret;
  return { status: resp.status, headers: resp.headers, body, message };
}

// The network changed (Wi-Fi to cellular, a tunnel): the server holds the call for a grace
// period; come back with a new peer, authorised by the call's reconnect secret.
async function reconnect(why) {
  if (!bridge.callId || !bridge.everConnected || bridge.reconnecting || !bridge.mic) {
    if (bridge.callId && !bridge.everConnected) { showError(`The connection failed (${why}: network or firewall).`); teardown("failed"); }
    return;
  }
  bridge.reconnecting = true;
  setState("reconnecting");
  const deadline = Date.now() + 1000 * (bridge.graceSeconds || 20);
  let delay = 250;
  try {
    while (bridge.callId && Date.now() < deadline) {
      if (navigator.onLine === false) { await sleep(500); continue; } // no network at all yet
      const old = bridge.pc;
      const pc = newPeer();
      if (old) old.close();
      try {
        const resp = await offer(pc, `/v1/realtime/calls/${bridge.callId}/reconnect`, bridge.secret, 3000);
        if (resp.status === 200) {
          await pc.setRemoteDescription({ type: "answer", sdp: resp.body });
          bridge.reconnects = (bridge.reconnects || 0) + 1;
          if (await connectedWithin(pc, 1200)) return;
          // Not through yet (the network is still away): ICE checks back off the longer they fail,
          // so a fresh peer every ~1.2 s has fresh checks ready for when the network returns.
          continue;
        }
        if (resp.status === 403 || resp.status === 404) {
          showError(`The call could not be resumed (${resp.status}): ${resp.message}`);
          await teardown("ended");
          return;
        }
      } catch (err) {
        console.warn("reconnect attempt failed", err); // the network is not back yet
      }
      await sleep(delay);
      delay = Math.min(2000, delay * 2);
    }
    if (bridge.callId) { showError(`The connection was lost (${why}) and did not come back.`); await teardown("ended"); }
  } finally {
    bridge.reconnecting = false;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The server sends a packet at least every 420 ms (every 20 ms while the model speaks; in
// silence, DTX keeps one in 21), so 2 s without a packet (after packets had come) means the
// path is gone: well before ICE says "disconnected".
function watchInbound(pc) {
  let last = -1, since = Date.now();
  const timer = setInterval(async () => {
    if (pc !== bridge.pc || pc.connectionState === "closed") { clearInterval(timer); return; }
    let received = 0;
    (await pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") received = r.packetsReceived; });
    if (received !== last) { last = received; since = Date.now(); return; }
    if (received > 0 && Date.now() - since > 2000) { clearInterval(timer); reconnect("no audio from the server for 2 s"); }
  }, 250);
}

// ---- network quality, for a glance: loss both ways and the round trip, each second -------
// good: under 2 % lost and under 150 ms; fair: under 8 % and 300 ms; poor otherwise.
function watchQuality(pc) {
  let prev = null;
  const timer = setInterval(async () => {
    if (pc !== bridge.pc || pc.connectionState === "closed") { clearInterval(timer); return; }
    let inbound = null, remote = null, pair = null;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") inbound = r;
      else if (r.type === "remote-inbound-rtp" && r.kind === "audio") remote = r;
      else if (r.type === "candidate-pair" && r.state === "succeeded" && (r.nominated || r.selected)) pair = r;
    });
    if (!inbound) return;
    const now = { lost: Math.max(0, inbound.packetsLost || 0), got: inbound.packetsReceived || 0,
                  fec: inbound.fecPacketsReceived || 0, concealed: inbound.concealedSamples || 0,
                  samples: inbound.totalSamplesReceived || 0 };
    const was = prev || { lost: 0, got: 0, fec: 0, concealed: 0, samples: 0 };
    prev = now;
    const lost = now.lost - was.lost, got = now.got - was.got;
    const rtt = remote && remote.roundTripTime !== undefined ? remote.roundTripTime
      : pair && pair.currentRoundTripTime !== undefined ? pair.currentRoundTripTime : null;
    const q = {
      loss_down_pct: lost + got > 0 ? Math.round((1000 * lost) / (lost + got)) / 10 : 0,
      loss_up_pct: remote && remote.fractionLost !== undefined ? Math.round(remote.fractionLost * 1000) / 10 : null,
      rtt_ms: rtt === null ? null : Math.round(rtt * 1000),
      recovered_packets: now.fec - was.fec,
      concealed_pct: now.samples > was.samples ? Math.round((1000 * (now.concealed - was.concealed)) / (now.samples - was.samples)) / 10 : 0,
    };
    const loss = Math.max(q.loss_down_pct, q.loss_up_pct || 0), slow = q.rtt_ms || 0;
    q.level = loss < 2 && slow < 150 ? "good" : loss < 8 && slow < 300 ? "fair" : "poor";
    bridge.quality = q;
    const rttText = q.rtt_ms === null ? "…" : `${q.rtt_ms} ms`;
    ui.net.dataset.level = q.level;
    ui.net.textContent = `${q.level} · ${rttText}${loss >= 1 ? ` · ${loss}% lost` : ""}`;
    ui.net.setAttribute("aria-label", `Network quality ${q.level}: round trip ${rttText}, ` +
      `${q.loss_down_pct}% lost toward you, ${q.loss_up_pct === null ? "unknown" : q.loss_up_pct + "%"} lost ` +
      `toward the server, ${q.recovered_packets} packets repaired in the last second`);
    ui.net.hidden = false;
  }, 1000);
}

function connectedWithin(pc, ms) {
  if (pc.connectionState === "connected") return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(pc.connectionState === "connected"), ms);
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "connected") { clearTimeout(timer); resolve(true); }
    });
  });
}

// While the current path still works the call stays on it (ICE reports when it stops).
function networkChanged() {
  if (bridge.callId && bridge.pc && bridge.pc.connectionState !== "connected") reconnect("the network changed");
}
// ---- sound that stops by itself ----------------------------------------------------
// Safari suspends ("interrupted") the page's audio for a phone call, Siri or another app's
// sound; a backgrounded tab may come back suspended; a route change (headphones out, the
// earpiece) can pause the <audio> element. Sound is brought back by itself where the browser
// allows it, and by one tap where it wants a gesture (the button says so).
async function resumeSound() {
  if (!bridge.callId) return;
  const ctx = bridge.audioCtx;
  try {
    if (ctx && ctx.state !== "running" && ctx.state !== "closed") await ctx.resume();
    if (ui.remote.srcObject && ui.remote.paused) await ui.remote.play();
    if (ui.resume) ui.resume.hidden = true;
    bridge.soundBlocked = false;
  } catch (err) {
    bridge.soundBlocked = true;
    if (!ui.resume) {
      ui.resume = document.createElement("button");
      ui.resume.type = "button";
      ui.resume.className = "resume";
      ui.resume.textContent = "Tap to turn the sound back on";
      ui.resume.addEventListener("click", resumeSound);
      ui.banner.after(ui.resume);
    }
    ui.resume.hidden = false;
  }
}

function watchSound(ctx) {
  ctx.onstatechange = () => { if (ctx === bridge.audioCtx && ctx.state !== "running") resumeSound(); };
}

document.addEventListener("visibilitychange", () => { if (!document.hidden) resumeSound(); });
if (navigator.mediaDevices) navigator.mediaDevices.addEventListener("devicechange", () => resumeSound());
ui.remote.addEventListener("pause", () => { if (bridge.callId) resumeSound(); });
window.addEventListener("online", networkChanged);
window.addEventListener("offline", () => { if (bridge.callId) setState("reconnecting"); });
if (navigator.connection && navigator.connection.addEventListener) {
  navigator.connection.addEventListener("change", networkChanged);
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
  bridge.secret = null;
  bridge.everConnected = false;
  clearTimeout(bridge.disconnectTimer);
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
