// guardproxy's page: a playground (judge a conversation token by token, move the thresholds over the
// verdicts) and a live view of recent decisions. Plain DOM, no framework, no build step. Everything a
// client sent (prompts, answers) is shown with textContent, never parsed as HTML.
"use strict";

const KEY = "guardproxy.key"; // the API key lives in this tab's sessionStorage only, never on screen
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, text) => {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
};

// -- the key ---------------------------------------------------------------------------------------

let asking = null; // one dialog for every request refused at once

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function askKey() {
  if (asking) return asking;
  const refused = Boolean(sessionStorage.getItem(KEY));
  sessionStorage.removeItem(KEY);
  $("key-error").hidden = !refused;
  $("key-input").value = "";
  asking = new Promise((resolve) => {
    $("key-form").onsubmit = () => {
      sessionStorage.setItem(KEY, $("key-input").value.trim());
      $("key-input").value = "";
      $("forget-key").hidden = false;
      asking = null;
      resolve();
    };
  });
  $("key-dialog").showModal();
  return asking;
}

$("key-dialog").addEventListener("cancel", (e) => e.preventDefault()); // the data needs a key: no way around
$("forget-key").onclick = () => {
  sessionStorage.removeItem(KEY);
  $("forget-key").hidden = true;
};
$("forget-key").hidden = !sessionStorage.getItem(KEY);

async function api(path, body) {
  for (;;) {
    const init = body === undefined
      ? { headers: headers(false) }
      : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
    const resp = await fetch(path, init);
    if (resp.status === 401) {
      await askKey();
      continue;
    }
    const data = await resp.json().catch(() => null);
    if (!resp.ok) throw new Error(data?.error?.message ?? `${resp.status} ${resp.statusText}`);
    return data;
  }
}

// -- tokens, coloured ------------------------------------------------------------------------------

const MARKUP_LABEL = "⟨end⟩";
const fmt = (p) => (p === null || p === undefined ? "–" : Number(p).toFixed(4));

// rows: [{token, markup, tier, category, p_unsafe, p_controversial, action}]; the first "cut" ends what
// the client received: a marker stands before it and it and everything after are shown as not sent.
function renderTokens(container, detail, rows) {
  container.replaceChildren();
  const cutAt = rows.findIndex((r) => r.action === "cut");
  let pinned = null;
  const show = (row, index) => showDetail(detail, row, index);
  rows.forEach((row, index) => {
    if (index === cutAt) {
      container.append(el("span", { class: "cut-marker", title: "the stream was cut here" }, "✂ cut"));
    }
    const p = row.tier === "Unsafe" ? row.p_unsafe : row.tier === "Controversial" ? row.p_controversial : 0;
    const classes = ["tok", `tier-${row.tier}`];
    if (row.action === "flag") classes.push("flagged");
    if (row.action === "redact") classes.push("redacted");
    if (cutAt >= 0 && index >= cutAt) classes.push("after-cut");
    if (row.markup) classes.push("markup");
    if (row.field && row.field !== "content") classes.push(`field-${row.field}`);
    const span = el("span", {
      class: classes.join(" "),
      tabindex: "0",
      "data-index": String(index),
      "data-tier": row.tier,
      "data-action": row.action,
      style: `--p:${Math.max(0.15, p).toFixed(3)}`,
    }, row.markup ? MARKUP_LABEL : row.token);
    span.addEventListener("mouseenter", () => show(row, index));
    span.addEventListener("focus", () => show(row, index));
    span.addEventListener("mouseleave", () => { if (pinned) show(...pinned); });
    span.addEventListener("click", () => {
      container.querySelectorAll(".selected").forEach((s) => s.classList.remove("selected"));
      span.classList.add("selected");
      pinned = [row, index];
      show(row, index);
    });
    container.append(span);
  });
  detail.hidden = true;
}

function showDetail(table, row, index) {
  const body = table.tBodies[0];
  body.replaceChildren();
  const fields = [
    ["token", `#${index}`],
    ["text", row.markup ? "<|im_end|> (markup the guard reads)" : JSON.stringify(row.token)],
    ["risk", row.tier],
    ["category", row.category ?? row.top_category ?? "–"],
    ["p(Unsafe)", fmt(row.p_unsafe)],
    ["p(Controversial)", fmt(row.p_controversial)],
    ["action", row.action],
  ];
  if (row.id !== undefined) fields.push(["token id", String(row.id)], ["position", String(row.position)]);
  for (const [name, value] of fields) {
    const tr = el("tr");
    tr.append(el("th", {}, name), el("td", {}, value));
    body.append(tr);
  }
  table.hidden = false;
}

// -- the playground --------------------------------------------------------------------------------

let policies = [];
let judged = null; // the last /ui/api/judge answer: its verdicts, sent back, move the thresholds without the guard

function addTurn(role = "user", content = "") {
  const row = el("div", { class: "turn" });
  const select = el("select", { "aria-label": "role" });
  for (const r of ["system", "user", "assistant", "tool"]) {
    const option = el("option", { value: r }, r);
    if (r === role) option.selected = true;
    select.append(option);
  }
  const text = el("textarea", { rows: "2", "aria-label": "message" });
  text.value = content;
  const remove = el("button", { type: "button", class: "quiet", title: "remove this turn" }, "×");
  remove.onclick = () => row.remove();
  row.append(select, text, remove);
  $("turns").append(row);
}

function messages() {
  return [...$("turns").querySelectorAll(".turn")].map((row) => ({
    role: row.querySelector("select").value,
    content: row.querySelector("textarea").value,
  }));
}

const THRESHOLDS = ["unsafe", "controversial"];

function setThresholds(values) {
  for (const name of THRESHOLDS) {
    const on = values[name] !== null && values[name] !== undefined;
    $(`${name}-on`).checked = on;
    $(`${name}-range`).disabled = !on;
    $(name).disabled = !on;
    if (on) {
      $(`${name}-range`).value = values[name];
      $(name).value = values[name];
    }
  }
}

function thresholds() {
  const out = {};
  for (const name of THRESHOLDS) out[name] = $(`${name}-on`).checked ? Number($(name).value) : null;
  return out;
}

function summarize(decisions) {
  const d = decisions.details;
  const said = (x) => `token #${x.token_index} (${x.risk}, ${x.category ?? "no category"}, p(Unsafe) ${fmt(x.p_unsafe)}, p(Controversial) ${fmt(x.p_controversial)})`;
  if (d.cut) return `Answer cut before ${said(d.cut)}.`;
  if (d.first_redaction) return `Answer redacted from ${said(d.first_redaction)}: ${d.redacted_tokens} token(s).`;
  if (d.first_flag) return `Answer flagged at ${said(d.first_flag)}.`;
  return `Answer allowed: ${d.judged_tokens} token(s) judged, none decided Controversial or Unsafe.`;
}

function renderJudged(answer) {
  const pv = answer.prompt;
  $("prompt-verdict").textContent =
    `Prompt: ${answer.prompt_tier} (${pv.category ?? "no category"}; p(Unsafe) ${fmt(pv.p_unsafe)}, ` +
    `p(Controversial) ${fmt(pv.p_controversial)}): ${answer.prompt_action}.`;
  $("prompt-verdict").dataset.action = answer.prompt_action;
  const rows = judged.tokens.map((t, i) => ({
    ...t,
    tier: answer.decisions.tiers[i],
    action: answer.decisions.actions[i],
  }));
  renderTokens($("tokens"), $("token-detail"), rows);
  $("summary").textContent = summarize(answer.decisions);
  $("result").hidden = false;
}

const probs = (v) => ({ risk_probs: v.risk_probs, category_probs: v.category_probs });

let deciding = 0;
async function decideAgain() {
  if (!judged) return;
  const ticket = ++deciding; // a slider sends many; only the last answer is drawn
  try {
    const verdicts = { prompt: probs(judged.prompt), tokens: judged.tokens.map(probs) };
    const answer = await api("/ui/api/decide", { verdicts, policy: $("policy").value, thresholds: thresholds() });
    if (ticket !== deciding) return;
    renderJudged({ ...answer, prompt: judged.prompt });
    $("judge-error").hidden = true;
  } catch (err) {
    $("judge-error").textContent = err.message;
    $("judge-error").hidden = false;
  }
}

for (const name of THRESHOLDS) {
  $(`${name}-on`).addEventListener("change", () => {
    $(`${name}-range`).disabled = !$(`${name}-on`).checked;
    $(name).disabled = !$(`${name}-on`).checked;
    decideAgain();
  });
  $(`${name}-range`).addEventListener("input", () => {
    $(name).value = $(`${name}-range`).value;
    decideAgain();
  });
  $(name).addEventListener("change", () => {
    $(`${name}-range`).value = $(name).value;
    decideAgain();
  });
}

$("policy").addEventListener("change", () => {
  const policy = policies.find((p) => p.name === $("policy").value);
  if (policy) setThresholds(policy.thresholds);
  decideAgain();
});

$("add-turn").onclick = () => addTurn(messages().at(-1)?.role === "user" ? "assistant" : "user");

$("judge-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("judge").disabled = true;
  $("judge-error").hidden = true;
  try {
    const policy = policies.find((p) => p.name === $("policy").value);
    if (policy) setThresholds(policy.thresholds);
    judged = await api("/ui/api/judge", { messages: messages(), response: $("response").value, policy: $("policy").value });
    renderJudged(judged);
  } catch (err) {
    $("judge-error").textContent = err.message;
    $("judge-error").hidden = false;
  } finally {
    $("judge").disabled = false;
  }
});

async function loadPolicies() {
  policies = await api("/ui/api/policies");
  $("policy").replaceChildren(...policies.map((p) => el("option", { value: p.name }, `${p.name} (${p.mode})`)));
  if (policies.length) setThresholds(policies[0].thresholds);
}

// -- the live view ---------------------------------------------------------------------------------

const MAX_ROWS = 200;
let liveStarted = false;

function outcomeOf(record) {
  const r = record.response ?? {};
  return r.action && r.action !== "allow" ? `${r.action} (${r.risk}${r.category ? `, ${r.category}` : ""})` : "allow";
}

function addRecord(record) {
  const tr = el("tr", { class: `outcome-${record.outcome}`, tabindex: "0", "data-request-id": record.request_id ?? "" });
  const cells = [
    (record.time ?? "").slice(11, 19), // UTC time of day; the full stamp is the row's title
    record.route,
    record.model ?? "–",
    record.policy,
    record.outcome,
    `${record.prompt?.risk ?? "–"}${record.prompt?.category ? ` (${record.prompt.category})` : ""}`,
    outcomeOf(record),
    record.response?.first_flagged_token === undefined ? "–" : `#${record.response.first_flagged_token}`,
    String(record.duration_ms ?? ""),
  ];
  for (const c of cells) tr.append(el("td", {}, c ?? ""));
  tr.title = `${record.time ?? ""} · ${record.request_id ?? ""}`;
  const open = () => showRecord(record, tr);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
  const body = $("records").tBodies[0];
  body.prepend(tr);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
}

function showRecord(record, tr) {
  $("records").querySelectorAll("tr.selected").forEach((r) => r.classList.remove("selected"));
  tr.classList.add("selected");
  $("record-id").textContent = record.request_id ?? "";
  const parts = [`${record.outcome} on ${record.route}`, `status ${record.status}`, `policy ${record.policy}`];
  if (record.guard_error) parts.push(`guard failed open: ${record.guard_error}`);
  if (record.response?.judged_tokens !== undefined) parts.push(summarize({ details: record.response }));
  $("record-summary").textContent = parts.join(" · ");
  $("record-prompt").textContent = record.prompt_text ?? "";
  $("record-prompt").hidden = !record.prompt_text;
  const container = $("record-tokens");
  if (record.tokens) {
    const rows = Object.values(record.tokens).flat().map((t) => ({ ...t, markup: t.field === null }));
    renderTokens(container, $("record-token-detail"), rows);
  } else {
    container.replaceChildren(el("p", { class: "quiet" }, "This policy does not record text (audit_text: false): decisions only."));
    $("record-token-detail").hidden = true;
  }
  $("record-view").hidden = false;
}

function showEngine(state) {
  const names = {
    active_streams: "streams",
    queued_streams: "queued",
    cached_tokens: "cached tokens",
    step_ms: "last step (ms)",
    verdict_wait_ms: "verdict wait (ms, last second)",
    prefill_tokens: "prefill tokens",
    prefix_hit_tokens: "prefix hits (tokens)",
  };
  const dl = $("engine");
  dl.replaceChildren();
  for (const [key, label] of Object.entries(names)) {
    const box = el("div", { "data-stat": key });
    box.append(el("dt", {}, label), el("dd", {}, state[key] === null ? "–" : String(state[key])));
    dl.append(box);
  }
}

async function live() {
  for (;;) {
    try {
      const resp = await fetch("/ui/api/live", { headers: headers(false) });
      if (resp.status === 401) {
        await askKey();
        continue;
      }
      if (!resp.ok) throw new Error(`${resp.status}`);
      $("records").tBodies[0].replaceChildren(); // the server replays its recent records first
      $("live-status").textContent = "● live";
      $("live-status").className = "on";
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) event = line.slice(7);
            else if (line.startsWith("data: ")) data.push(line.slice(6));
          }
          const payload = JSON.parse(data.join("\n"));
          if (event === "record") addRecord(payload);
          else if (event === "engine") showEngine(payload);
        }
      }
    } catch (err) {
      // the server restarted or the network dropped: say so and reconnect
    }
    $("live-status").textContent = "○ reconnecting";
    $("live-status").className = "";
    await new Promise((resolve) => setTimeout(resolve, 2000)); // back off before the next attempt
  }
}

// -- tabs ------------------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(on));
    $(`view-${tab.dataset.view}`).hidden = !on;
  }
  if (name === "live" && !liveStarted) {
    liveStarted = true;
    live();
  }
}

for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => {
    history.replaceState(null, "", `#${tab.dataset.view}`);
    showView(tab.dataset.view);
  });
}

addTurn("user", "");
showView(location.hash === "#live" ? "live" : "playground");
loadPolicies().catch((err) => {
  $("judge-error").textContent = err.message;
  $("judge-error").hidden = false;
});
