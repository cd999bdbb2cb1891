// HAM playground: a plain browser client of the public API (/v1/transfers), no framework, no CDN.
// Every parameter, default, bound, label and explanation comes from /playground/config.json (built by
// the server from ham_engine.params.PARAM_SPECS); time estimates from /playground/speed.json (seconds
// per step the workers measured). Nothing about the engine is hard-coded here.
"use strict";

(() => {
  const KEY_STORAGE = "ham.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const POLL_START_MS = 400;
  const POLL_MAX_MS = 2000;

  const $ = (id) => document.getElementById(id);
  const state = {
    config: null, job: null, contentUrl: null, abort: null, submitting: false,
    speeds: [], estimate: null, runClock: null, watched: new Map(), thumbs: new Map(),
  };
  // Fields outside the parameter list, by the name the API gives them, and the words on screen.
  const FIELD_LABELS = { content: "Content photo", style: "Style image", style_prompt: "Style prompt",
    style_id: "Library style" };

  // --- errors ------------------------------------------------------------------------------

  class ApiProblem extends Error {
    constructor(message, field = null, status = 0) {
      super(message);
      this.field = field;
      this.status = status;
    }
  }

  function paramByName(name) {
    return state.config ? state.config.params.find((p) => p.name === name) : undefined;
  }

  // The words on screen for an API field name (a parameter's label from the config).
  function labelOf(field) {
    const param = paramByName(field);
    return param ? param.label : (FIELD_LABELS[field] || field);
  }

  function inputOf(field) {
    return paramByName(field) ? $(`param-${field}`) : $(field);
  }

  // The message next to the field, the field marked for assistive technology, focus moved to it.
  function markField(field, message) {
    const input = field && inputOf(field);
    if (!input) return false;
    const holder = input.closest(".param, .field, .drop") || input.parentElement;
    holder.classList.add("invalid");
    const errorId = `${input.id}-error`;
    let note = $(errorId);
    if (!note) {
      note = document.createElement("p");
      note.className = "field-error";
      note.id = errorId;
      holder.append(note);
    }
    note.textContent = message;
    note.hidden = false;
    input.setAttribute("aria-invalid", "true");
    const described = (input.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
    if (!described.includes(errorId)) input.setAttribute("aria-describedby", [errorId, ...described].join(" "));
    const advanced = input.closest("details");
    if (advanced) advanced.open = true;
    input.focus();
    return true;
  }

  function showError(message, field = null) {
    clearError();
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
    if (!markField(field, message)) box.scrollIntoView({ block: "nearest" });
  }

  function clearFieldError(input) {
    input.removeAttribute("aria-invalid");
    const errorId = `${input.id}-error`;
    const described = (input.getAttribute("aria-describedby") || "").split(" ").filter((id) => id && id !== errorId);
    if (described.length) input.setAttribute("aria-describedby", described.join(" "));
    else input.removeAttribute("aria-describedby");
    const note = $(errorId);
    if (note) { note.hidden = true; note.textContent = ""; }
    const holder = input.closest(".param, .field, .drop");
    if (holder) holder.classList.remove("invalid");
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
    document.querySelectorAll("[aria-invalid=true]").forEach(clearFieldError);
    document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  }

  // The API answers every error as {"error": {"code", "message", "field"}}; say it in words.
  async function problemFrom(response) {
    let detail = {};
    try {
      detail = (await response.json()).error || {};
    } catch (_) {
      detail = {};
    }
    const message = detail.message || `${response.status} ${response.statusText}`.trim();
    const retry = response.headers.get("Retry-After");
    let text;
    switch (response.status) {
      case 401: text = `The API key was refused: ${message}`; break;
      case 413: text = `Too large: ${message}`; break;
      case 415: text = `Not an image the server accepts: ${message}`; break;
      case 429: text = `Too many requests: ${message}.` + (retry ? ` Try again in ${retry} s.` : ""); break;
      case 503: text = `The service is unavailable: ${message}.` + (retry ? ` Try again in ${retry} s.` : ""); break;
      default: text = response.status >= 500 ? `Server error (${response.status}): ${message}` : message;
    }
    if (detail.field) {
      // Say it with the words on screen: "<field>: must be in [0, 1]" becomes "<its label>: ...".
      const label = labelOf(detail.field);
      text = text.includes(`${detail.field}: `) ? text.split(`${detail.field}: `).join(`${label}: `)
        : `${label}: ${text}`;
    }
    const problem = new ApiProblem(text, detail.field || null, response.status);
    problem.retryAfter = retry ? Number(retry) : null;
    return problem;
  }

  // --- API key -------------------------------------------------------------------------------

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  function askForKey(reason) {
    const dialog = $("key-dialog");
    state.keyReturnFocus = document.activeElement;
    $("key-error").hidden = !reason;
    $("key-error").textContent = reason || "";
    $("api-key").value = "";
    if (!dialog.open) dialog.showModal();
    $("api-key").focus();
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(apiKey()), { once: true });
    });
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiProblem(`Could not reach the server (${err.message}). Is it running?`);
    }
    if (response.status === 401 && state.config.auth_required) {
      sessionStorage.removeItem(KEY_STORAGE);
      const problem = await problemFrom(response);
      askForKey(problem.message);
      throw problem;
    }
    return response;
  }

  async function apiJson(path, options) {
    const response = await api(path, options);
    if (!response.ok) throw await problemFrom(response);
    return response.json();
  }

  // --- parameter controls ---------------------------------------------------------------------

  function formatNumber(value) {
    return Number.isInteger(value) ? String(value) : String(Number(value.toFixed(4)));
  }

  function buildParam(param) {
    const wrap = document.createElement("div");
    wrap.className = `param ${param.type}`;
    wrap.dataset.field = param.name;
    const id = `param-${param.name}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = param.label;
    const row = document.createElement("div");
    row.className = "row";
    const help = document.createElement("span");
    help.className = "default";
    help.id = `${id}-help`;
    const shownDefault = param.type === "boolean" ? (param.default ? "on" : "off")
      : param.type === "string" ? String(param.default) : formatNumber(param.default);
    help.textContent = `${param.explain || param.description} Default ${shownDefault}. `;
    if (state.config.method_url) {
      const more = document.createElement("a");
      more.href = `${state.config.method_url}#${encodeURIComponent(param.name)}`;
      more.textContent = "More";
      more.setAttribute("aria-label", `More about ${param.label}`);
      more.tabIndex = -1; // the method link above the form is the keyboard's way there; one stop per control
      help.append(more);
    }

    let input;
    if (param.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(param.default);
      row.append(input, label);
      wrap.append(row);
    } else if (param.type === "string") {
      // A choice among the values the server publishes (e.g. the inversion convention).
      input = document.createElement("select");
      for (const choice of param.enum || [param.default]) {
        const option = document.createElement("option");
        option.value = choice;
        option.textContent = choice;
        input.append(option);
      }
      input.value = param.default;
      row.append(input);
      wrap.append(label, row);
    } else {
      input = document.createElement("input");
      input.type = "number";
      if (param.minimum !== undefined) input.min = String(param.minimum);
      // 2**63-1 (the seed's bound) is no exact JavaScript number: leave such a bound to the server.
      if (param.maximum !== undefined && (param.type === "number" || Number.isSafeInteger(param.maximum))) {
        input.max = String(param.maximum);
      }
      const bounded = param.type === "number" && param.minimum !== undefined && param.maximum !== undefined;
      // Arrow keys step a blend by 1/100 of its range, an integer by 1, the size by its multiple.
      input.step = param.multipleOf ? String(param.multipleOf)
        : param.type === "integer" ? "1" : bounded ? String((param.maximum - param.minimum) / 100) : "any";
      input.value = formatNumber(param.default);
      if (bounded) {
        // A slider for the blends in [0, 1]; the number box beside it is the same value, typed.
        const slider = document.createElement("input");
        slider.type = "range";
        slider.min = String(param.minimum);
        slider.max = String(param.maximum);
        slider.step = String((param.maximum - param.minimum) / 100);
        slider.value = String(param.default);
        slider.setAttribute("aria-label", `${param.label} slider`);
        slider.tabIndex = -1; // one tab stop per parameter: the number box (arrow keys step it)
        slider.addEventListener("input", () => { input.value = formatNumber(Number(slider.value)); });
        input.addEventListener("input", () => { if (input.value !== "") slider.value = input.value; });
        row.append(slider);
        input._slider = slider;
      }
      row.append(input);
      wrap.append(label, row);
    }
    input.id = id;
    input.name = param.name;
    input.setAttribute("aria-describedby", help.id);
    input._param = param;
    wrap.append(help);
    input.addEventListener("input", () => { clearFieldError(input); });
    input.addEventListener("change", () => checkParam(param, true));
    if (state.config.cost && Object.values(state.config.cost).includes(param.name)) {
      input.addEventListener("input", showEstimate);
    }
    return wrap;
  }

  function buildControls(config) {
    const main = $("main-params");
    const more = $("more-params");
    for (const param of config.params) {
      (param.main ? main : more).append(buildParam(param));
    }
  }

  function resetParams() {
    for (const param of state.config.params) {
      const input = $(`param-${param.name}`);
      if (param.type === "boolean") input.checked = Boolean(param.default);
      else if (param.type === "string") input.value = param.default;
      else {
        input.value = formatNumber(param.default);
        if (input._slider) input._slider.value = String(param.default);
      }
    }
  }

  // The rules the server publishes for a number (bounds, integer, multiple), checked before upload.
  function numberProblem(param, text) {
    if (text === "") return `enter a value (default ${formatNumber(param.default)})`;
    const value = Number(text);
    if (!Number.isFinite(value)) return "enter a number";
    const safeMax = param.maximum !== undefined && (param.type === "number" || Number.isSafeInteger(param.maximum));
    const range = param.minimum !== undefined && safeMax
      ? `between ${formatNumber(param.minimum)} and ${formatNumber(param.maximum)}` : "";
    if (param.type === "integer" && !Number.isInteger(value)) return `enter a whole number${range ? " " + range : ""}`;
    if ((param.minimum !== undefined && value < param.minimum) || (safeMax && value > param.maximum)) {
      return range ? `must be ${range}` : `must be at least ${formatNumber(param.minimum)}`;
    }
    if (param.multipleOf && value % param.multipleOf !== 0) return `must be a multiple of ${param.multipleOf}`;
    return null;
  }

  function checkParam(param, show) {
    if (param.type === "boolean" || param.type === "string") return true;
    const problem = numberProblem(param, $(`param-${param.name}`).value.trim());
    if (problem && show) markField(param.name, `${param.label}: ${problem}`);
    return !problem;
  }

  function paramValue(param) {
    const input = $(`param-${param.name}`);
    if (param.type === "boolean") return input.checked ? "true" : "false";
    if (param.type === "string") return input.value;
    const text = input.value.trim();
    const problem = numberProblem(param, text);
    if (problem) throw new ApiProblem(`${param.label}: ${problem}`, param.name);
    return text;
  }

  // --- file pickers ---------------------------------------------------------------------------

  // The file rules the page knows (the picker's types, the server's upload limit), in the UI's words.
  function fileProblem(field, file) {
    if (!file) return null;
    const types = $(field).accept.split(",").map((t) => t.trim()).filter(Boolean);
    const extension = (file.name.match(/\.[^.]+$/) || [""])[0].toLowerCase();
    const known = { ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp" };
    const type = file.type || known[extension] || "";
    if (types.length && !types.includes(type)) {
      return `${labelOf(field)}: “${file.name}” is not a PNG, JPEG or WebP image. Choose a picture file.`;
    }
    const limit = state.config.max_upload_bytes;
    if (file.size > limit) {
      const mb = (n) => `${(n / 1048576).toFixed(1)} MB`;
      return `${labelOf(field)}: “${file.name}” is ${mb(file.size)}; this server accepts at most ${mb(limit)}.`;
    }
    return null;
  }

  function setupDrop(field) {
    const zone = $(`${field}-drop`);
    const input = $(field);
    const preview = $(`${field}-preview`);
    const show = () => {
      const file = input.files[0];
      if (preview.src) URL.revokeObjectURL(preview.src);
      if (!file) { preview.hidden = true; preview.removeAttribute("src"); return; }
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
      // A file the browser cannot draw is shown by the server's error on submit, not hidden here.
      preview.onerror = () => { preview.hidden = true; };
    };
    const accept = () => {
      clearError();
      const problem = fileProblem(field, input.files[0]);
      if (problem) {
        input.value = ""; // a refused file leaves no blank preview behind
        show();
        showError(problem, field);
        return;
      }
      show();
    };
    input.addEventListener("change", accept);
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        accept();
      }
    });
  }

  // --- time estimates ----------------------------------------------------------------------------

  function costValue(role) {
    const name = state.config.cost && state.config.cost[role];
    const input = name && $(`param-${name}`);
    const value = input ? Number(input.value) : NaN;
    return Number.isFinite(value) && value > 0 ? value : null;
  }

  function duration(seconds) {
    if (seconds < 1) return "under a second";
    if (seconds < 90) return `${Math.round(seconds)} s`;
    const minutes = Math.floor(seconds / 60);
    const rest = Math.round(seconds - 60 * minutes);
    return minutes >= 60 ? `${Math.floor(minutes / 60)} h ${minutes % 60} min`
      : `${minutes} min${rest ? ` ${rest} s` : ""}`;
  }

  // Seconds for a job of `steps` at `size` px: the workers' measured seconds per step at that size,
  // or at the nearest measured size scaled by the pixel count (time grows with pixels).
  function estimateSeconds(steps, size) {
    // The picked model's measurements (the catalogue's picker), else the server's default model's.
    const model = ($("model") && $("model").value) || state.config.model;
    const measured = state.speeds.filter((s) => !model || s.model === model);
    if (!measured.length || !steps || !size) return null;
    const nearest = measured.reduce((a, b) => (Math.abs(b.size - size) < Math.abs(a.size - size) ? b : a));
    const perStep = nearest.seconds_per_step * (size / nearest.size) ** 2;
    return { seconds: perStep * steps, basis: nearest };
  }

  async function loadSpeeds() {
    try {
      const response = await fetch(state.config.speed_url);
      if (response.ok) state.speeds = (await response.json()).speeds || [];
    } catch (_) {
      state.speeds = []; // no estimate; the form still works
    }
    showEstimate();
  }

  function showEstimate() {
    const steps = costValue("step_count");
    const size = costValue("image_size");
    const found = estimateSeconds(steps, size);
    state.estimate = found ? found.seconds : null;
    const box = $("estimate-box");
    const fast = state.config.fast || {};
    const fastSteps = fast[state.config.cost.step_count];
    const fastSize = fast[state.config.cost.image_size];
    const long = found && found.seconds > state.config.long_seconds;
    box.classList.toggle("long", Boolean(long));
    if (!found) {
      $("estimate").textContent = steps && size
        ? "No time estimate yet: no job has finished on this server. Fewer steps and a smaller size are faster."
        : "";
    } else {
      const basis = found.basis;
      $("estimate").textContent = `Estimated time: about ${duration(found.seconds)}`
        + (long ? " — that is long." : ".")
        + ` (${basis.seconds_per_step.toFixed(2)} s per step measured on this server at ${basis.size} px.)`;
    }
    const slower = (steps && fastSteps && steps > fastSteps) || (size && fastSize && size > fastSize);
    const button = $("use-fast");
    button.hidden = !(long && slower);
    if (!button.hidden) {
      const quick = estimateSeconds(Math.min(steps, fastSteps), Math.min(size, fastSize));
      button.textContent = `Use the fast setting: ${Math.min(steps, fastSteps)} steps, ${Math.min(size, fastSize)} px`
        + (quick ? ` (about ${duration(quick.seconds)})` : "");
    }
  }

  function useFast() {
    const fast = state.config.fast || {};
    for (const [name, value] of Object.entries(fast)) {
      const input = $(`param-${name}`);
      if (input && Number(input.value) > value) {
        input.value = String(value);
        clearFieldError(input);
      }
    }
    showEstimate();
    $("submit").focus();
  }

  // --- submitting and following a job ------------------------------------------------------------

  function buildForm() {
    const content = $("content").files[0];
    if (!content) throw new ApiProblem(`${labelOf("content")}: choose a picture first.`, "content");
    const style = $("style").files[0];
    const prompt = $("style_prompt").value.trim();
    const styleId = $("style_id").value;
    if (!style && !prompt && !styleId) {
      throw new ApiProblem(`${labelOf("style")}: give a style image, a style prompt, or both.`, "style");
    }
    for (const [name, file] of [["content", content], ["style", style]]) {
      const problem = fileProblem(name, file);
      if (problem) throw new ApiProblem(problem, name);
    }
    const form = new FormData();
    form.append("content", content, content.name);
    if (style) form.append("style", style, style.name);
    if (prompt) form.append("style_prompt", prompt);
    if (styleId) form.append("style_id", styleId);
    if ($("model").value) form.append("model", $("model").value);
    for (const param of state.config.params) form.append(param.name, paramValue(param));
    return { form, content };
  }

  // Time left: from this job's own pace once its sampling moves, before that from the estimate.
  function remainingSeconds(job) {
    const now = performance.now() / 1000;
    const clock = state.runClock;
    if (!clock || clock.id !== job.id) {
      state.runClock = { id: job.id, started: now, progress: job.progress || 0, at: now };
      return state.estimate;
    }
    const p = job.progress || 0;
    if (p > clock.progress + 0.02 && now > clock.at) {
      const rate = (p - clock.progress) / (now - clock.at);
      return (1 - p) / rate;
    }
    return state.estimate === null ? null : Math.max(1, state.estimate - (now - clock.started));
  }

  function setProgress(job) {
    let remaining = null;
    const percent = Math.round(100 * (job.status === "succeeded" ? 1 : job.progress || 0));
    $("progress").setAttribute("aria-valuenow", String(percent));
    $("progress").setAttribute("aria-valuetext", `${percent}%`);
    $("progress-fill").style.width = `${percent}%`;
    let text;
    if (job.status === "queued") {
      text = job.queue_position == null ? "Queued…" : `Queued — position ${job.queue_position + 1} in line.`;
    } else if (job.status === "running") {
      text = `Running — ${percent}%`;
      remaining = remainingSeconds(job);
    } else if (job.status === "succeeded") {
      text = "Done.";
    } else if (job.status === "failed") {
      text = `Failed: ${job.error ? job.error.message : "unknown error"}`;
    } else {
      text = "Canceled.";
    }
    $("job-status").textContent = text;
    $("job-remaining").textContent = remaining !== null && remaining !== undefined
      ? `About ${duration(remaining)} left.`
      : job.status === "queued" && state.estimate !== null ? `It will take about ${duration(state.estimate)} once it starts.`
        : "";
    updateRecent(job);
  }

  const sleep = (ms, signal) => new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); reject(new DOMException("aborted", "AbortError")); },
      { once: true });
  });

  // The server's event stream when it has one (fetch, so the API key travels in a header), else polling.
  async function followEvents(jobId, signal, onJob) {
    const response = await api(`/v1/transfers/${encodeURIComponent(jobId)}/events`,
      { headers: { Accept: "text/event-stream" }, signal });
    if (!response.ok || !response.body) throw new ApiProblem(`event stream answered ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      buffer += value.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        let job;
        try { job = JSON.parse(data); } catch (_) { continue; }
        if (job && job.job) job = job.job;
        if (!job || typeof job.status !== "string") continue;
        onJob(job);
        if (TERMINAL.has(job.status)) { reader.cancel().catch(() => {}); return job; }
      }
    }
  }

  async function poll(jobId, signal, onJob) {
    let delay = POLL_START_MS;
    for (;;) {
      const response = await api(`/v1/transfers/${encodeURIComponent(jobId)}`, { signal });
      if (response.status === 429) {
        // Rate limited while following: say so, wait as told, keep following.
        const problem = await problemFrom(response);
        $("job-status").textContent = problem.message;
        await sleep(1000 * (problem.retryAfter || 5), signal);
        continue;
      }
      if (!response.ok) throw await problemFrom(response);
      const job = await response.json();
      onJob(job);
      if (TERMINAL.has(job.status)) return job;
      await sleep(delay, signal);
      delay = Math.min(POLL_MAX_MS, Math.round(delay * 1.25));
    }
  }

  async function follow(jobId, signal, onJob) {
    if (state.config.features.events) {
      try {
        const job = await followEvents(jobId, signal, onJob);
        if (job) return job;
      } catch (err) {
        if (err.name === "AbortError") throw err;
        // Fall through: polling works wherever the stream does not (proxies that buffer, old servers).
      }
    }
    return poll(jobId, signal, onJob);
  }

  function showResult(job, contentUrl) {
    const section = $("result");
    const url = job.result_url;
    const hasBefore = Boolean(contentUrl);
    $("before-img").hidden = !hasBefore;
    $("compare-line").hidden = !hasBefore;
    $("compare-block").hidden = !hasBefore;
    $("compare").classList.toggle("with-before", hasBefore);
    $("result-caption").textContent = `Result — α ${job.params.alpha}, β ${job.params.beta}, γ ${job.params.gamma}, `
      + `${job.params.steps} steps, seed ${job.params.seed}`;
    const img = $("result-img");
    img.onload = () => {
      $("result-caption").textContent += ` — ${img.naturalWidth}×${img.naturalHeight} px`;
    };
    img.style.clipPath = "";
    img.src = url;
    if (hasBefore) {
      $("before-img").src = contentUrl;
      $("compare-slider").value = "50";
      setCompare(50);
    }
    const link = $("download");
    link.href = url;
    link.download = `ham-${job.id}.png`;
    section.hidden = false;
    section.scrollIntoView({ block: "start" });
  }

  function setCompare(at) {
    $("result-img").style.clipPath = `inset(0 0 0 ${at}%)`;
    $("compare-line").style.left = `${at}%`;
    $("compare-slider").setAttribute("aria-valuetext", `${Math.round(at)}% content, ${Math.round(100 - at)}% result`);
  }

  async function submit(event) {
    event.preventDefault();
    if (state.submitting) return;
    clearError();
    if (state.config.auth_required && !apiKey()) {
      await askForKey();
      if (!apiKey()) return;
    }
    let built;
    try {
      built = buildForm();
    } catch (err) {
      showError(err.message, err.field);
      return;
    }
    state.submitting = true;
    // aria-disabled, not disabled: a disabled button drops the keyboard focus to <body>.
    $("submit").setAttribute("aria-disabled", "true");
    $("submit").textContent = "Working…";
    if (state.abort) state.abort.abort();
    const controller = new AbortController();
    state.abort = controller;
    const contentUrl = URL.createObjectURL(built.content);
    try {
      const response = await api("/v1/transfers", { method: "POST", body: built.form, signal: controller.signal });
      if (!response.ok) throw await problemFrom(response);
      const job = await response.json();
      state.job = job;
      state.thumbs.set(job.id, contentUrl);
      $("job").hidden = false;
      $("result").hidden = true;
      $("cancel").hidden = false;
      setProgress(job);
      $("job").scrollIntoView({ block: "nearest" }); // on a phone the form fills the screen
      loadRecent();
      const final = await follow(job.id, controller.signal, (update) => { state.job = update; setProgress(update); });
      if (final.status === "succeeded") showResult(final, contentUrl);
      else if (final.status === "failed") showError(`The job failed: ${final.error ? final.error.message : "no reason given"}`);
    } catch (err) {
      if (err.name !== "AbortError") showError(err.message, err.field);
    } finally {
      state.submitting = false;
      $("submit").removeAttribute("aria-disabled");
      $("submit").textContent = "Transfer style";
      // Keep the focus on the page: moving it off a control that is about to hide loses it.
      if (document.activeElement === $("cancel") || document.activeElement === document.body) $("submit").focus();
      $("cancel").hidden = true;
      loadRecent();
      loadSpeeds();
    }
  }

  async function cancelJob() {
    if (!state.job) return;
    try {
      const job = await apiJson(`/v1/transfers/${encodeURIComponent(state.job.id)}/cancel`, { method: "POST" });
      setProgress(job);
    } catch (err) {
      showError(err.message, err.field);
    }
  }

  // --- recent jobs -----------------------------------------------------------------------------

  function recentItem(job) {
    const li = document.createElement("li");
    li.dataset.job = job.id;
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    const content = state.thumbs.get(job.id);
    const thumb = document.createElement("img");
    thumb.className = "thumb";
    if (job.result_url) {
      thumb.src = job.result_url;
      thumb.alt = `Result of job ${job.id.slice(0, 8)}`;
    } else if (content) {
      thumb.src = content; // this tab's own job: its content photo until the result exists
      thumb.alt = `Content photo of job ${job.id.slice(0, 8)}`;
    } else {
      thumb.alt = "";
    }
    thumbs.append(thumb);
    const meta = document.createElement("div");
    meta.className = "meta";
    const status = document.createElement("strong");
    status.className = `status-${job.status}`;
    status.textContent = job.status + (job.status === "running" ? ` ${Math.round(100 * (job.progress || 0))}%` : "");
    const when = new Date(job.created_at).toLocaleString();
    const style = job.style_prompt ? `“${job.style_prompt}”` : (job.has_style ? "style image" : "");
    const cost = state.config.cost || {};
    const params = job.params || {};
    meta.append(status, document.createTextNode(` · job ${job.id.slice(0, 8)} · ${when} · `
      + `${params[cost.step_count]} steps, ${params[cost.image_size]} px${style ? " · " + style : ""}`));
    if (job.error) meta.append(document.createElement("br"), document.createTextNode(job.error.message));
    li.append(thumb, meta);
    if (job.status === "succeeded" && job.result_url) {
      const view = document.createElement("button");
      view.type = "button";
      view.textContent = "View";
      view.setAttribute("aria-label", `View result of job ${job.id}`);
      view.addEventListener("click", () => showResult(job, null));
      li.append(view);
    } else {
      li.append(document.createElement("span"));
    }
    return li;
  }

  // One entry follows its job: the current job's updates, and a stream per other unfinished job.
  function updateRecent(job) {
    const old = document.querySelector(`#recent-list li[data-job="${CSS.escape(job.id)}"]`);
    if (!old) return;
    const focused = old.contains(document.activeElement);
    const fresh = recentItem(job);
    old.replaceWith(fresh);
    if (focused && fresh.querySelector("button")) fresh.querySelector("button").focus();
  }

  function watchRecent(job) {
    if (TERMINAL.has(job.status) || state.watched.has(job.id) || (state.job && state.job.id === job.id)) return;
    const controller = new AbortController();
    state.watched.set(job.id, controller);
    follow(job.id, controller.signal, updateRecent)
      .catch(() => {}) // the list still shows the job; Refresh reads it again
      .finally(() => state.watched.delete(job.id));
  }

  let recentToken = 0;
  async function loadRecent() {
    if (state.config.auth_required && !apiKey()) {
      $("recent-list").replaceChildren();
      $("recent-empty").textContent = "Enter an API key (“API key…” above) to see your recent jobs.";
      $("recent-empty").hidden = false;
      return;
    }
    const token = ++recentToken;
    try {
      const page = await apiJson("/v1/transfers?limit=10");
      if (token !== recentToken) return;
      const list = $("recent-list");
      list.replaceChildren(...page.items.map(recentItem));
      $("recent-empty").textContent = "No jobs yet.";
      $("recent-empty").hidden = page.items.length > 0;
      page.items.slice(0, 5).forEach(watchRecent);
    } catch (err) {
      if (err.status !== 401) showError(`Could not list recent jobs: ${err.message}`);
    }
  }

  async function loadStyles() {
    try {
      const page = await apiJson("/v1/styles");
      const items = Array.isArray(page) ? page : (page.items || []);
      if (!items.length) return;
      const select = $("style_id");
      for (const item of items) {
        const option = document.createElement("option");
        option.value = item.id;
        option.textContent = item.name || item.id;
        select.append(option);
      }
      $("style-library").hidden = false;
    } catch (_) {
      // The library is optional; the pickers and the prompt still work.
    }
  }

  // --- models (GET /v1/models) -----------------------------------------------------------------

  function showModel() {
    const entry = (state.models || []).find((m) => m.name === $("model").value);
    const note = $("model-note");
    if (!entry) { note.hidden = true; return; }
    const lines = [];
    // A random preset draws noise: say so plainly, and how to get a real model.
    if (entry.random_preset) lines.push(entry.note);
    if (!entry.workers_online) lines.push(`No worker of ${entry.name} is running now: the job waits in its queue.`);
    note.textContent = lines.join(" ");
    note.hidden = lines.length === 0;
    // The model family's own defaults (its training size...) fill the controls nobody typed in.
    for (const [name, value] of Object.entries(entry.defaults || {})) {
      const input = $(`param-${name}`);
      if (input && !input.dataset.typed) input.value = String(value);
    }
    showEstimate();  // another model, another speed (and maybe another size)
  }

  async function loadModels() {
    try {
      const catalogue = await apiJson("/v1/models");
      state.models = catalogue.items || [];
      const select = $("model");
      select.replaceChildren();
      for (const item of state.models) {
        const option = document.createElement("option");
        option.value = item.name;
        const workers = item.workers_online === 1 ? "1 worker" : `${item.workers_online} workers`;
        option.textContent = `${item.name} (${item.family}, ${workers})`;
        select.append(option);
      }
      select.value = catalogue.default;
      select.onchange = showModel;  // once, however often the catalogue is reloaded
      for (const item of state.models) {
        for (const name of Object.keys(item.defaults || {})) {
          const input = $(`param-${name}`);
          if (input) input.oninput = () => { input.dataset.typed = "1"; };
        }
      }
      $("model-field").hidden = state.models.length === 0;
      showModel();
    } catch (_) {
      // No catalogue (an older server): the transfer runs on the default model.
    }
  }

  // --- start ------------------------------------------------------------------------------------

  async function start() {
    try {
      const response = await fetch("/playground/config.json");
      if (!response.ok) throw await problemFrom(response);
      state.config = await response.json();
    } catch (err) {
      showError(`The playground could not load its settings: ${err.message}`);
      $("submit").disabled = true;
      return;
    }
    buildControls(state.config);
    setupDrop("content");
    setupDrop("style");
    $("transfer-form").addEventListener("submit", submit);
    $("reset-params").addEventListener("click", resetParams);
    $("cancel").addEventListener("click", cancelJob);
    $("refresh-recent").addEventListener("click", loadRecent);
    $("compare-slider").addEventListener("input", (event) => setCompare(Number(event.target.value)));
    $("use-fast").addEventListener("click", useFast);
    $("cancel-key").addEventListener("click", () => $("key-dialog").close());
    if (state.config.method_url) $("method-link").href = state.config.method_url;
    loadSpeeds();
    $("key-form").addEventListener("submit", () => {
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
    });
    $("key-dialog").addEventListener("close", () => {
      loadRecent();
      if (apiKey()) { loadModels(); if (state.config.features.styles) loadStyles(); }
      const back = state.keyReturnFocus;
      if (back && back !== document.body && document.contains(back)) back.focus();
    });
    if (state.config.auth_required) {
      $("change-key").hidden = false;
      $("change-key").addEventListener("click", () => askForKey());
      if (!apiKey()) { askForKey(); return; }
    }
    loadRecent();
    loadModels();
    if (state.config.features.styles) loadStyles();
  }

  start();
})();
