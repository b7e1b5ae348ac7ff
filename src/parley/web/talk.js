// The talk page: a call to one of the server's agents from the browser, over /ws/browser.
//
// Microphone -> parley-capture worklet (16 kHz PCM16, 20 ms) -> binary messages up.
// Binary messages down (the agent's PCM16) -> parley-player worklet (jitter buffer) -> speakers;
// {"type":"stop_audio"} flushes the player at once (a barge-in). The call's events arrive as
// {"type":"event"} and {"type":"figure"} messages: captions, the agent's text, the timeline, figures.
// Protocol and access rules: docs/web.md.
import {
  apiJson,
  bindTokenForm,
  el,
  formatSeconds,
  socketProtocols,
  socketUrl,
} from "/static/common.js";

const CHANNEL = "parley.browser";
const RATE = 16000;
const PLAYER_TARGET_MS = 80; // the jitter buffer fills this much before playing
const MAX_BUFFERED_BYTES = 32000; // ~1 s of audio not yet sent: a stalled socket drops frames instead

const $ = (id) => document.getElementById(id);
const ui = {
  button: $("talk-button"),
  agent: $("agent"),
  status: $("status"),
  agentsStatus: $("agents-status"),
  captions: $("captions"),
  timeline: $("timeline"),
  bar: $("timeline-bar"),
  turns: $("turns"),
  level: document.querySelector("#level > span"),
  announce: $("announce"), // what a screen reader reads: finals and the agent's text, not every partial
};

// Test hooks and a live view for the curious: what the page has sent, received, played, flushed.
const hooks = {
  state: "idle",
  framesSent: 0,
  framesDropped: 0,
  framesReceived: 0,
  framesPlayed: 0,
  playerReceived: 0,
  flushes: 0,
  underruns: 0,
  markers: [],
  captions: [],
  agentText: [],
  figures: [],
  events: 0,
  closeCode: null,
  error: null,
};
window.parley = hooks;

let call = null; // the call in progress: { ws, ctx, stream, capture, player, ... }

function setStatus(text, state = "") {
  ui.status.textContent = text;
  ui.status.dataset.state = state;
}

function setState(state) {
  hooks.state = state;
  const active = state === "connecting" || state === "live" || state === "ending";
  ui.button.setAttribute("aria-pressed", String(active));
  ui.button.textContent = active ? "Hang up" : "Talk";
  ui.button.disabled = state === "ending";
  ui.agent.disabled = active;
}

// --- agents --------------------------------------------------------------------------------------

async function loadAgents() {
  try {
    const { agents, default: first } = await apiJson("/api/agents");
    const chosen = ui.agent.value;
    ui.agent.replaceChildren(...agents.map((name) => el("option", { value: name, text: name === first ? `${name} (default)` : name })));
    ui.agent.value = agents.includes(chosen) ? chosen : first;
    ui.agentsStatus.textContent = "";
  } catch (error) {
    ui.agentsStatus.textContent = `Agents: ${error.message}.${error.status === 401 || error.status === 403 ? " Enter the API token above." : ""}`;
  }
}

// --- the call ------------------------------------------------------------------------------------

async function start() {
  resetView();
  setState("connecting");
  setStatus("Starting the microphone…");
  const ctx = new AudioContext({ latencyHint: "interactive" });
  call = { ws: null, ctx, stream: null, nodes: [], t0: performance.now(), userEnded: false };
  try {
    await ctx.resume();
    await ctx.audioWorklet.addModule("/static/audio-worklet.js");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    call.stream = stream;
    const source = ctx.createMediaStreamSource(stream);
    const capture = new AudioWorkletNode(ctx, "parley-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: RATE },
    });
    const player = new AudioWorkletNode(ctx, "parley-player", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { inputRate: RATE, targetMs: PLAYER_TARGET_MS },
    });
    source.connect(capture);
    capture.connect(ctx.destination); // silent: a node must reach the destination to be run
    player.connect(ctx.destination);
    call.nodes = [source, capture, player];
    call.capture = capture;
    call.player = player;
    player.port.onmessage = (event) => onPlayerStats(event.data);
    capture.port.onmessage = (event) => sendFrame(event.data);
    connect();
  } catch (error) {
    fail(`Could not start: ${error.message || error}`);
  }
}

function connect() {
  setStatus("Connecting…");
  let ws;
  try {
    ws = new WebSocket(socketUrl("/ws/browser", { agent: ui.agent.value }), socketProtocols(CHANNEL));
  } catch (error) {
    fail(`Could not connect: ${error.message} (is the token made of letters, digits, - _ . ~ only?)`);
    return;
  }
  ws.binaryType = "arraybuffer";
  call.ws = ws;
  ws.onopen = () => {
    ws.send(JSON.stringify({ type: "start", sampleRate: RATE }));
    call.redraw = setInterval(drawBar, 500); // the timeline moves on while nobody speaks
    setState("live");
    setStatus("Connected: talk any time, even over the agent.", "live");
  };
  ws.onmessage = (event) => onMessage(event.data);
  ws.onclose = (event) => ended(event);
}

function sendFrame(buffer) {
  const ws = call && call.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  showLevel(new Int16Array(buffer));
  if (ws.bufferedAmount > MAX_BUFFERED_BYTES) {
    hooks.framesDropped++;
    return;
  }
  ws.send(buffer);
  hooks.framesSent++;
}

function onMessage(data) {
  if (data instanceof ArrayBuffer) {
    hooks.framesReceived++;
    call.player.port.postMessage(data, [data]);
    return;
  }
  let message;
  try {
    message = JSON.parse(data);
  } catch {
    return;
  }
  if (message.type === "stop_audio") {
    // A barge-in: what the player holds of the interrupted reply goes now.
    call.player.port.postMessage({ type: "flush" });
    addMarker("flush", serverTime(), null, "audio flushed");
  } else if (message.type === "event") {
    onEvent(message.event);
  } else if (message.type === "figure") {
    onFigure(message);
  }
}

function hangUp() {
  if (!call) return;
  call.userEnded = true;
  setState("ending");
  setStatus("Hanging up…");
  const ws = call.ws;
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: "stop" }));
    setTimeout(() => ws.readyState !== WebSocket.CLOSED && ws.close(1000), 2000); // the server closes first
  } else {
    if (ws) ws.close();
    cleanup();
    setState("idle");
    setStatus("Call ended.");
  }
}

function ended(event) {
  hooks.closeCode = event.code;
  const wasLive = hooks.state === "live" || hooks.state === "ending";
  const userEnded = call && call.userEnded;
  cleanup();
  setState("idle");
  if (userEnded || event.code === 1000) {
    setStatus(`Call ended${event.reason ? `: ${event.reason}` : "."}`);
  } else if (!wasLive) {
    fail("Could not connect: the server refused the call (a token needed? see the server's log).");
  } else {
    setStatus(`Call ended (${event.code}${event.reason ? `: ${event.reason}` : ""}).`, "error");
  }
}

function fail(text) {
  hooks.error = text;
  cleanup();
  setState("idle");
  setStatus(text, "error");
}

function cleanup() {
  if (!call) return;
  const { ws, ctx, stream, nodes, capture, player, redraw } = call;
  call = null;
  clearInterval(redraw);
  if (ws && ws.readyState === WebSocket.OPEN) ws.close(1000);
  for (const worklet of [capture, player]) if (worklet) worklet.port.postMessage({ type: "close" });
  for (const node of nodes) node.disconnect();
  if (stream) for (const track of stream.getTracks()) track.stop();
  if (ctx && ctx.state !== "closed") ctx.close();
  ui.level.style.transform = "scaleX(0)";
}

function onPlayerStats(stats) {
  if (!stats || stats.type !== "stats") return;
  hooks.framesPlayed = stats.played;
  hooks.playerReceived = stats.received;
  hooks.flushes = stats.flushes;
  hooks.underruns = stats.underruns;
}

function showLevel(pcm) {
  let sum = 0;
  for (let i = 0; i < pcm.length; i += 4) sum += pcm[i] * pcm[i];
  const rms = Math.sqrt(sum / (pcm.length / 4)) / 32768;
  ui.level.style.transform = `scaleX(${Math.min(1, rms * 6).toFixed(3)})`;
}

// --- what the page shows -------------------------------------------------------------------------

const view = { utterances: new Map(), agentTurns: new Map(), turns: new Map(), spans: [], open: {}, duration: 1, offset: 0 };

function resetView() {
  ui.captions.replaceChildren();
  ui.timeline.replaceChildren();
  ui.turns.replaceChildren();
  ui.bar.replaceChildren();
  view.utterances.clear();
  view.agentTurns.clear();
  view.turns.clear();
  view.spans = [];
  view.open = {};
  view.offset = 0;
  view.duration = 1;
  Object.assign(hooks, {
    framesSent: 0, framesDropped: 0, framesReceived: 0, framesPlayed: 0, playerReceived: 0, flushes: 0,
    underruns: 0, markers: [], captions: [], agentText: [], figures: [], events: 0, closeCode: null, error: null,
  });
}

function elapsed() {
  return call ? (performance.now() - call.t0) / 1000 : 0;
}

// The call's clock (event times count from its call_started), read on the page: the page's own
// time less the offset seen when call_started arrived.
function serverTime() {
  return Math.max(0, elapsed() - (view.offset ?? 0));
}

const MARKERS = {
  barge_in_paused: ["pause", "caller spoke: agent paused"],
  barge_in_pending: ["pending", "caller spoke: barge-in pending"],
  barge_in_confirmed: ["barge-in", "barge-in: reply stopped"],
  barge_in_decided: ["barge-in", "barge-in: reply stopped"],
  barge_in_resumed: ["resume", "no words: reply resumed"],
};

function onEvent(event) {
  hooks.events++;
  const t = event.t;
  view.duration = Math.max(view.duration, t);
  switch (event.name) {
    case "call_started":
      view.offset = elapsed() - t;
      break;
    case "partial":
    case "final":
      caption(event);
      break;
    case "speech_started":
      view.open.caller = t;
      break;
    case "speech_ended":
      closeSpan("caller", t);
      break;
    case "turn_started":
      turnRow(event.turn_id).kind.textContent = event.kind;
      break;
    case "agent_text":
      agentText(event);
      break;
    case "first_audio_sent":
      view.open.agent = t;
      break;
    case "stop_audio_sent":
    case "turn_completed":
    case "turn_cancelled":
      closeSpan("agent", t);
      if (event.name === "turn_cancelled") markInterrupted(event.turn_id);
      break;
    case "dtmf_input":
      addCaption("caller final", `Keys: ${event.digits}`);
      break;
    default:
      if (MARKERS[event.name]) addMarker(MARKERS[event.name][0], t, event.turn_id, MARKERS[event.name][1]);
  }
  drawBar();
}

function caption(event) {
  let line = view.utterances.get(event.utterance_id);
  if (!line) {
    line = addCaption("caller partial", "");
    view.utterances.set(event.utterance_id, line);
  }
  line.querySelector(".text").textContent = event.text;
  line.className = `caller ${event.name}`;
  if (event.name === "final") {
    hooks.captions.push(event.text);
    ui.announce.textContent = `You: ${event.text}`;
  }
}

function agentText(event) {
  let line = view.agentTurns.get(event.turn_id);
  if (!line) {
    line = addCaption("agent", "");
    view.agentTurns.set(event.turn_id, line);
  }
  const text = line.querySelector(".text");
  text.textContent = text.textContent ? `${text.textContent} ${event.text}` : event.text;
  hooks.agentText.push(event.text);
  ui.announce.textContent = `Agent: ${event.text}`;
}

function addCaption(kind, text) {
  const who = kind.startsWith("caller") ? "You" : "Agent";
  const line = el("li", { class: kind }, el("span", { class: "who", text: who }), el("span", { class: "text", text }));
  ui.captions.append(line);
  line.scrollIntoView({ block: "nearest" });
  return line;
}

function markInterrupted(turnId) {
  const line = view.agentTurns.get(turnId);
  if (line && !line.querySelector(".cut")) line.querySelector(".text").append(el("span", { class: "cut", text: " (interrupted)" }));
}

function addMarker(kind, t, turnId, label) {
  // A barge-in may be decided, then confirmed: one marker per turn says it.
  if (kind === "barge-in" && hooks.markers.some((m) => m.kind === kind && m.turn === turnId)) return;
  hooks.markers.push({ kind, t, turn: turnId });
  const item = el("li", { class: `marker ${kind}` }, el("span", { class: "t", text: `${t.toFixed(1)} s` }), el("span", { text: label }));
  ui.timeline.append(item);
  view.spans.push({ lane: "marker", kind, from: t, to: t });
}

function closeSpan(lane, t) {
  const from = view.open[lane];
  if (from === undefined) return;
  delete view.open[lane];
  view.spans.push({ lane, from, to: t });
}

let drawPending = false;
function drawBar() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    const now = Math.max(view.duration, call ? serverTime() : 0, 1);
    const total = now;
    const open = Object.entries(view.open).map(([lane, from]) => ({ lane, from, to: now }));
    const pieces = [...view.spans, ...open].map((span) => {
      const node = el("span", { class: `span ${span.lane} ${span.kind || ""}`, title: `${span.lane} ${span.from.toFixed(1)} s` });
      node.style.left = `${(100 * span.from) / total}%`;
      node.style.width = span.lane === "marker" ? "" : `${Math.max(0.5, (100 * (span.to - span.from)) / total)}%`;
      return node;
    });
    ui.bar.replaceChildren(...pieces);
  });
}

function turnRow(turnId) {
  let row = view.turns.get(turnId);
  if (!row) {
    const cells = { id: el("td", { text: String(turnId) }), kind: el("td"), v2v: el("td", { class: "num", text: "–" }), stop: el("td", { class: "num", text: "–" }) };
    ui.turns.append(el("tr", {}, cells.id, cells.kind, cells.v2v, cells.stop));
    row = cells;
    view.turns.set(turnId, row);
  }
  return row;
}

function onFigure(figure) {
  hooks.figures.push(figure);
  if (figure.turn_id === null || figure.turn_id === undefined) return;
  if (figure.name === "voice_to_voice") turnRow(figure.turn_id).v2v.textContent = formatSeconds(figure.seconds);
  if (figure.name === "bargein_onset_to_stop") turnRow(figure.turn_id).stop.textContent = formatSeconds(figure.seconds);
}

// --- wiring --------------------------------------------------------------------------------------

ui.button.addEventListener("click", () => {
  if (call) hangUp();
  else start();
});
bindTokenForm($("token-form"), $("token"), loadAgents);
if (!window.AudioWorkletNode || !navigator.mediaDevices) {
  ui.button.disabled = true;
  setStatus("This browser cannot talk here: it needs AudioWorklet and microphone access (HTTPS or localhost).", "error");
}
loadAgents();
