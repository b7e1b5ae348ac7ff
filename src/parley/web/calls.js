// The calls console (/calls): live calls (GET /api/calls/live), recent calls from the call records
// (GET /api/calls), and one call's turns and event timeline (GET /api/calls/{id}/turns, /events).
// Everything is polled (POLL_MS); a live call's timeline asks only for the events after the last one
// it has. Text from calls is only ever set as textContent (callers' words are not markup).
import { apiJson, apiFetch, bindTokenForm, el, getToken, setToken } from "/static/common.js";

const POLL_MS = 1500;
const EVENTS_PAGE = 1000;
const MAX_SHOWN_EVENTS = 5000; // a long call's timeline shows its latest events beyond this

const $ = (id) => document.getElementById(id);

const state = {
  eventsApi: true,
  selected: null, // call id shown in the timeline
  call: null, // the timeline shown: { id, t0, lastSeq, live }
  polling: null,
  blocked: false, // a 401/403: wait for a token before asking again
  rows: new Map(), // call id -> its row in the recent calls (the timeline's facts)
  generation: 0, // of the poll chain
  refreshing: Promise.resolve(), // the timeline's reads, one after the other
};

// ---------------------------------------------------------------- formatting

function shortId(id) {
  return id.length > 14 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id;
}

function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const m = Math.floor(s / 60);
  return m ? `${m}:${String(s % 60).padStart(2, "0")}` : `${s} s`;
}

function ms(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${Math.round(value)} ms` : "–";
}

function clock(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

function offset(seconds) {
  const sign = seconds < 0 ? "-" : "+";
  return `${sign}${Math.abs(seconds).toFixed(3)} s`;
}

// ---------------------------------------------------------------- access and errors

function showAccess(message) {
  state.blocked = true;
  $("access-message").textContent = message;
  $("access").hidden = false;
  $("access-token").value = getToken();
  $("access-token").focus();
}

function hideAccess() {
  state.blocked = false;
  $("access").hidden = true;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

// A failed request: 401/403 asks for a token (the server's words say why); others are shown and retried.
function failed(error, what) {
  if (error.status === 401 || error.status === 403) {
    showAccess(error.message.replace(/^\d+: /, ""));
    return true;
  }
  notice(`Could not read ${what}: ${error.message}. Trying again…`);
  return false;
}

// ---------------------------------------------------------------- the lists

function selectable(row, callId) {
  row.tabIndex = 0;
  row.dataset.callId = callId;
  row.classList.toggle("selected", callId === state.selected);
  row.addEventListener("click", () => select(callId));
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      select(callId);
    }
  });
  return row;
}

function renderLive(calls) {
  const body = $("live").tBodies[0];
  body.replaceChildren(
    ...calls.map((call) =>
      selectable(
        el(
          "tr",
          {},
          el("td", { class: "mono", title: call.call_id, text: shortId(call.call_id) }),
          el("td", {}, el("span", { class: `badge state-${call.state}`, text: call.state })),
          el("td", { class: "num", text: duration(call.duration_s) }),
          el("td", { text: call.agent || "–" }),
          el("td", { class: "mono", text: call.caller || "–" }),
        ),
        call.call_id,
      ),
    ),
  );
  $("live-count").textContent = calls.length ? `(${calls.length})` : "";
  $("live-empty").hidden = calls.length > 0;
}

function renderRecent(calls) {
  state.rows = new Map(calls.map((call) => [call.call_id, call]));
  const body = $("recent").tBodies[0];
  body.replaceChildren(
    ...calls.map((call) => {
      const seconds = (call.ended_at ?? Date.now() / 1000) - call.started_at;
      const ended = call.live
        ? el("span", { class: "badge state-live", text: "live" })
        : el("span", {
            class: `reason ${/error|lost|timeout/.test(call.end_reason || "") ? "bad" : ""}`,
            title: call.end_reason || "",
            text: (call.end_reason || "–").replace(/ \(code \d+\)$/, ""), // the close code: in the title
          });
      return selectable(
        el(
          "tr",
          {},
          el("td", { text: clock(call.started) }),
          el("td", { class: "mono", title: call.call_id, text: shortId(call.call_id) }),
          el("td", { text: call.agent || "–" }),
          el("td", { class: "num", text: duration(seconds) }),
          el("td", { class: "num", text: String(call.events) }),
          el("td", {}, ended),
        ),
        call.call_id,
      );
    }),
  );
  $("recent-empty").hidden = calls.length > 0;
}

async function refreshLists() {
  const live = await apiJson("/api/calls/live");
  state.eventsApi = live.events_api;
  renderLive(live.calls);
  $("recent-card").hidden = !state.eventsApi;
  if (!state.eventsApi) {
    notice(
      "Call records are off on this server (PARLEY_EVENTS_API=false): only live calls are listed, " +
        "with no history and no timelines.",
    );
    return;
  }
  const recent = await apiJson(`/api/calls?limit=${encodeURIComponent($("recent-limit").value)}`);
  renderRecent(recent.calls);
  if (state.call && state.rows.has(state.selected)) facts(state.rows.get(state.selected), state.call.live);
  notice("");
}

// ---------------------------------------------------------------- one call

function select(callId) {
  state.selected = callId;
  state.call = null;
  history.replaceState(null, "", `#call=${encodeURIComponent(callId)}`);
  for (const row of document.querySelectorAll("tr[data-call-id]")) {
    row.classList.toggle("selected", row.dataset.callId === callId);
  }
  $("detail-empty").hidden = true;
  $("detail-body").hidden = false;
  $("timeline").replaceChildren();
  $("turns").tBodies[0].replaceChildren();
  $("call-facts").replaceChildren();
  const path = `/api/calls/${encodeURIComponent(callId)}`;
  $("raw-events").href = `${path}/events`;
  $("raw-turns").href = `${path}/turns`;
  if (!state.eventsApi) {
    $("detail-body").hidden = true;
    $("detail-empty").hidden = false;
    $("detail-empty").textContent = "No timeline: call records are off on this server (PARLEY_EVENTS_API=false).";
    return;
  }
  refreshSelected().catch((error) => failed(error, "the call"));
}

// The timeline's reads run one after the other (a click and a poll must not append the same events).
function refreshSelected() {
  const next = state.refreshing.catch(() => {}).then(refreshCall);
  state.refreshing = next;
  return next;
}

function facts(call, live) {
  const items = [
    ["Call", call.call_id],
    ["Agent", call.agent || "–"],
    ["Started", clock(call.started)],
    ["Ended", live ? "live" : `${clock(call.ended)} (${call.end_reason || "–"})`],
  ];
  if (call.correlation_id) items.push(["Correlation", call.correlation_id]);
  $("call-facts").replaceChildren(...items.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));
}

function renderTurns(turns) {
  $("turns").tBodies[0].replaceChildren(
    ...turns.map((turn) =>
      el(
        "tr",
        { class: `outcome-${turn.outcome}` },
        el("td", { class: "num", text: String(turn.turn_id) }),
        el("td", { text: turn.kind }),
        el("td", { text: turn.outcome + (turn.barge_ins.length ? " · barge-in" : "") }),
        el("td", { class: "num", text: ms(turn.figures.voice_to_voice) }),
        el("td", { class: "num", text: ms(turn.figures.bargein_onset_to_stop) }),
        el("td", { class: "num", text: ms(turn.first_audio_ms) }),
        el("td", { class: "said", text: turn.heard ?? turn.said ?? "" }),
      ),
    ),
  );
}

// Events that change a turn row or its figures: the turns are read again only after one of these
// (the server derives them from all of the call's events: not on every poll of a long call).
const TURN_EVENTS = new Set([
  "turn_started",
  "first_audio_sent",
  "stop_audio_sent",
  "turn_completed",
  "turn_cancelled",
  "turn_failed",
  "call_ended",
]);

function changesTurns(events) {
  return events.some((event) => TURN_EVENTS.has(event.event) || event.event.startsWith("barge_in_"));
}

// The events not shown yet (all pages of them), then the turns: their figures cover every event
// shown, and are put on the rows they measure.
async function refreshCall() {
  const callId = state.selected;
  if (!callId) return;
  const path = `/api/calls/${encodeURIComponent(callId)}`;
  if (!state.call) state.call = { id: callId, t0: null, lastSeq: 0, live: true, turnsRead: false };
  const call = state.call;
  let turnsChanged = !call.turnsRead;
  let after = call.lastSeq;
  for (;;) {
    let page;
    try {
      page = await apiJson(`${path}/events?after=${after}&limit=${EVENTS_PAGE}`);
    } catch (error) {
      if (error.status !== 404) throw error;
      $("timeline").replaceChildren(el("li", { class: "status", text: "This call is not in the call records." }));
      call.live = false; // nothing to follow
      return;
    }
    if (state.selected !== callId || state.call !== call) return; // another call (or a restart) since
    appendEvents(call, page.events);
    turnsChanged = turnsChanged || changesTurns(page.events);
    call.lastSeq = page.last_seq;
    call.live = page.live;
    if (page.next_after === null) break;
    after = page.next_after;
  }
  facts(state.rows.get(callId) || { call_id: callId }, call.live);
  if (!turnsChanged) return;
  const turns = await apiJson(`${path}/turns`);
  if (state.selected !== callId || state.call !== call) return;
  call.turnsRead = true;
  renderTurns(turns.turns);
  annotate(turns.turns);
}

// Each turn's figures on the rows they end at: voice to voice on its first audio frame, onset to
// stop on the StopAudio that followed its first barge-in (a StopAudio that ends a call is no barge-in).
function annotate(turns) {
  for (const turn of turns) {
    const rows = [...$("timeline").querySelectorAll(`li[data-turn="${turn.turn_id}"]`)];
    const audio = rows.find((row) => row.dataset.event === "first_audio_sent");
    if (audio && turn.figures.voice_to_voice !== undefined) {
      audio.querySelector(".extra").textContent = `voice to voice ${ms(turn.figures.voice_to_voice)}`;
    }
    const bargeIn = rows.findIndex((row) => /^barge_in_(paused|decided)$/.test(row.dataset.event));
    const stop = bargeIn < 0 ? null : rows.slice(bargeIn).find((row) => row.dataset.event === "stop_audio_sent");
    if (stop && turn.figures.bargein_onset_to_stop !== undefined) {
      stop.querySelector(".extra").textContent = `onset to stop ${ms(turn.figures.bargein_onset_to_stop)}`;
    }
  }
}

// ---------------------------------------------------------------- the timeline

const KIND = {
  partial: "partial",
  final: "final",
  agent_text: "agent",
  stop_audio_sent: "stop",
  barge_in_paused: "bargein pause",
  barge_in_pending: "bargein pause",
  barge_in_resumed: "bargein resume",
  barge_in_decided: "bargein",
  barge_in_confirmed: "bargein",
  barge_in_ignored: "muted",
  turn_started: "turn",
  turn_completed: "turn",
  turn_cancelled: "turn cut",
  turn_failed: "error",
  input_error: "error",
  speech_started: "caller",
  speech_ended: "caller",
  dtmf: "caller",
  dtmf_input: "caller",
  call_started: "call",
  call_ended: "call",
};

const SKIPPED = new Set(["event", "t", "call_id", "seq", "turn_id"]);

function quoted(text) {
  return `“${text}”`;
}

function fieldsOf(event) {
  return Object.entries(event)
    .filter(([key, value]) => !SKIPPED.has(key) && value !== null && value !== undefined && !key.endsWith("_t"))
    .map(([key, value]) => `${key}=${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(" ");
}

// What a row says of an event: its key fields, the caller's and agent's words quoted.
function describe(event) {
  const turn = event.turn_id !== undefined ? `turn ${event.turn_id}` : "";
  switch (event.event) {
    case "partial":
      return [quoted(event.text ?? ""), ""];
    case "final":
      return [quoted(event.text ?? ""), event.voiced_ms !== undefined ? `${event.voiced_ms} ms voiced` : ""];
    case "agent_text":
      return [quoted(event.text ?? ""), turn];
    case "turn_started":
      return [`${turn} (${event.kind})${event.input ? `: ${quoted(event.input)}` : ""}`, ""];
    case "turn_completed":
      return [`${turn} completed`, `${event.audio_ms ?? "–"} ms of audio`];
    case "turn_cancelled":
      return [`${turn} cancelled${event.heard_text ? `, heard ${quoted(event.heard_text)}` : ""}`, `heard ${ms(event.heard_ms ?? 0)}`];
    case "stop_audio_sent":
      return [`StopAudio, ${turn}`, ""];
    case "barge_in_paused":
    case "barge_in_pending":
      return [turn, event.heard_ms !== null && event.heard_ms !== undefined ? `heard ${ms(event.heard_ms)}` : ""];
    case "barge_in_resumed":
      return [turn, `${event.reason ?? ""}${event.from_ms !== null && event.from_ms !== undefined ? `, from ${event.from_ms} ms` : ""}`];
    case "barge_in_decided":
      return [turn, event.trigger ?? ""];
    case "barge_in_confirmed":
    case "barge_in_ignored":
      return [turn, event.reason ?? ""];
    case "speech_started":
      return [`caller speaks (utterance ${event.utterance_id ?? "?"})`, ""];
    case "speech_ended":
      return [`caller stops (utterance ${event.utterance_id ?? "?"})`, ""];
    case "call_ended":
      return [event.reason ?? "", `${event.frames_in ?? "–"} frames in, ${event.frames_sent ?? "–"} sent`];
    default:
      return [[turn, fieldsOf(event)].filter(Boolean).join(" "), ""];
  }
}

function appendEvents(call, events) {
  const list = $("timeline");
  const rows = [];
  for (const event of events) {
    if (call.t0 === null) call.t0 = event.t;
    const [main, extra] = describe(event);
    const kind = KIND[event.event] || (event.event.startsWith("barge_in_") ? "bargein" : "");
    rows.push(
      el(
        "li",
        { class: `ev ${kind}`, "data-event": event.event, "data-seq": String(event.seq), "data-turn": String(event.turn_id ?? "") },
        el("span", { class: "at", text: offset(event.t - call.t0) }),
        el("span", { class: "name", text: event.event }),
        el("span", { class: "main", text: main }),
        el("span", { class: "extra", text: extra }),
      ),
    );
  }
  const follow = list.scrollTop + list.clientHeight >= list.scrollHeight - 8; // at the bottom: stay there
  list.append(...rows);
  while (list.childElementCount > MAX_SHOWN_EVENTS) list.firstElementChild.remove();
  if (follow) list.scrollTop = list.scrollHeight;
}

// ---------------------------------------------------------------- raw JSON with a token

// A plain link carries no Authorization header: with a token, fetch the JSON and open it as a blob.
function rawLink(anchor) {
  anchor.addEventListener("click", async (event) => {
    if (!getToken()) return; // a loopback server without a token: the link works as it is
    event.preventDefault();
    const opened = window.open("", "_blank");
    try {
      const text = await (await apiFetch(anchor.getAttribute("href"))).text();
      const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
      if (opened) opened.location = url;
    } catch (error) {
      if (opened) opened.close();
      failed(error, "the JSON");
    }
  });
}

// ---------------------------------------------------------------- polling

// One chain of polls at a time: a restart (a token saved, another limit) starts a new generation,
// and a poll of an older one schedules no next.
async function poll(generation) {
  if (!state.blocked && !document.hidden) {
    try {
      await refreshLists();
      if (state.selected && state.eventsApi && (!state.call || state.call.live)) await refreshSelected();
      hideAccess();
    } catch (error) {
      failed(error, "the calls");
    }
  }
  if (generation === state.generation) state.polling = setTimeout(() => poll(generation), POLL_MS);
}

function restart() {
  state.generation += 1;
  clearTimeout(state.polling);
  hideAccess();
  if (state.selected) {
    const id = state.selected;
    state.selected = null;
    setTimeout(() => select(id), 0);
  }
  return poll(state.generation);
}

function start() {
  bindTokenForm($("token-form"), $("token"), restart);
  $("access-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken($("access-token").value.trim());
    $("token").value = getToken();
    restart();
  });
  $("recent-limit").addEventListener("change", restart);
  $("show-partials").addEventListener("change", (event) => {
    $("timeline").classList.toggle("no-partials", !event.target.checked);
  });
  rawLink($("raw-events"));
  rawLink($("raw-turns"));
  const wanted = new URLSearchParams(location.hash.slice(1)).get("call");
  restart().then(() => {
    if (wanted) select(wanted);
  });
}

start();
