// The page talks to the server's own OpenAI-compatible API: two streamed chat completions per question,
// dense first, then CoreMatching, so that the two times are not measured against each other.
"use strict";

const state = { imageUrl: null, model: null, image: null };
const $ = (id) => document.getElementById(id);

function setStatus(text) { $("status").textContent = text; }

function chooseImage(url) {
  state.imageUrl = url;
  const image = new Image();
  image.onload = () => { state.image = image; drawOverlay(null, null); };
  image.src = url;
  $("preview").src = url;
  $("ask").disabled = false;
  for (const panel of ["dense", "corematching"]) {
    const answer = document.querySelector(`#${panel} .answer`);
    answer.textContent = ""; answer.dataset.state = "idle";
    document.querySelector(`#${panel} .stats`).textContent = "";
  }
  $("overlay").dataset.kept = "";
}

function drawOverlay(keptPatches, grid) {
  const canvas = $("overlay"), ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  if (!keptPatches || !grid) return;
  const [rows, cols] = grid, h = canvas.height / rows, w = canvas.width / cols;
  const kept = new Set(keptPatches);
  for (let p = 0; p < rows * cols; p++) {
    const x = (p % cols) * w, y = Math.floor(p / cols) * h;
    if (kept.has(p)) {
      ctx.strokeStyle = "rgba(255, 200, 0, 0.95)"; ctx.lineWidth = 2; ctx.strokeRect(x + 1, y + 1, w - 2, h - 2);
    } else {
      ctx.fillStyle = "rgba(0, 0, 0, 0.55)"; ctx.fillRect(x, y, w, h);
    }
  }
  canvas.dataset.kept = String(kept.size);
  canvas.dataset.total = String(rows * cols);
}

function parseBudget(text) {
  text = text.trim().toLowerCase();
  if (text === "adaptive" || text === "none") return null;
  const value = Number(text);
  if (!Number.isFinite(value)) throw new Error(`tokens kept must be a number or 'adaptive', got ${text}`);
  return value;
}

async function streamAnswer(panel, method) {
  const answer = document.querySelector(`#${panel} .answer`), stats = document.querySelector(`#${panel} .stats`);
  answer.textContent = ""; answer.dataset.state = "streaming"; stats.textContent = "";
  const body = {
    model: state.model, stream: true, stream_options: { include_usage: true }, max_tokens: 16,
    messages: [{ role: "user", content: [
      { type: "image_url", image_url: { url: state.imageUrl } },
      { type: "text", text: $("question").value } ] }],
    corematching: method,
  };
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (!response.ok) {
    const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
    answer.dataset.state = "error";
    throw new Error(error.error.message);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", usage = null, extension = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { answer.dataset.state = "error"; throw new Error(chunk.error.message); }
      if (chunk.usage) usage = chunk.usage;
      if (chunk.corematching) extension = chunk.corematching;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
      }
    }
  }
  const wall = (performance.now() - started) / 1000;
  answer.dataset.state = "done";
  if (usage) {
    stats.textContent = `${wall.toFixed(2)} s total · prefill ${usage.prefill_time_s.toFixed(3)} s · ` +
      `decode ${usage.decode_time_s.toFixed(3)} s · visual tokens ${usage.visual_tokens_kept}/${usage.visual_tokens}`;
  }
  return extension;
}

async function ask() {
  setStatus("");
  if (!state.imageUrl) { setStatus("choose an image first"); return; }
  if (!$("question").value.trim()) { setStatus("type a question"); return; }
  $("ask").disabled = true;
  try {
    const method = { method: "corematching", token_budget: parseBudget($("budget").value) };
    await streamAnswer("dense", { method: "dense" });
    const extension = await streamAnswer("corematching", method);
    if (extension && extension.kept_patches.length) drawOverlay(extension.kept_patches[0], extension.grid);
  } catch (error) {
    setStatus(error.message);
  } finally {
    $("ask").disabled = false;
  }
}

async function start() {
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => chooseImage(reader.result);
    reader.readAsDataURL(file);
  });
  $("ask").addEventListener("click", ask);
  $("question").addEventListener("keydown", (event) => { if (event.key === "Enter") ask(); });
  try {
    state.model = (await (await fetch("/v1/models")).json()).data[0].id;
    const examples = await (await fetch("/examples")).json();
    for (const example of examples) {
      const thumb = document.createElement("img");
      thumb.src = example.url; thumb.alt = example.id; thumb.title = example.question;
      thumb.addEventListener("click", () => {
        document.querySelectorAll("#examples img").forEach((img) => img.classList.remove("chosen"));
        thumb.classList.add("chosen");
        chooseImage(example.url);
        $("question").value = example.question;
      });
      $("examples").appendChild(thumb);
    }
  } catch (error) {
    setStatus(`cannot reach the server: ${error.message}`);
  }
  document.body.dataset.ready = "true";
}

start();
