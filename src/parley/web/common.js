// Shared by parley's pages (talk, calls): the API token, authorised fetches, small DOM helpers.
// The token a user types is kept for this tab only (sessionStorage["parley.token"]): it is sent as
// `Authorization: Bearer` on fetches, and as a WebSocket subprotocol `bearer.<token>` on media
// sockets (a browser cannot set headers on a WebSocket). A loopback server without
// PARLEY_API_TOKEN needs none.

const TOKEN_KEY = "parley.token";

export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return ""; // storage disabled: no token
  }
}

export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the token lives only as long as the field */
  }
}

// fetch() with the token; throws an Error carrying the status and the server's detail.
export async function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = getToken();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      if (body && body.detail) detail = body.detail;
    } catch {
      /* not JSON */
    }
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

export async function apiJson(path, options = {}) {
  return (await apiFetch(path, options)).json();
}

// ws:// or wss:// URL of a path on this server, with query parameters.
export function socketUrl(path, params = {}) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  return url.toString();
}

// The subprotocols a media socket offers: the channel's, then the token if there is one.
export function socketProtocols(channel) {
  const token = getToken();
  return token ? [channel, `bearer.${token}`] : [channel];
}

// The token form shared by the pages: <form id="token-form"> with an <input id="token">.
export function bindTokenForm(form, input, onChange) {
  input.value = getToken();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    if (onChange) onChange();
  });
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

export function formatSeconds(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}
