// visionops web page: draw or upload a digit, POST it to /v1/predict, show the answer.
// For a model of natural pictures (metadata preprocess.kind == "natural") the page is
// upload first: file picker (camera on phones), drag and drop, paste; no drawing; the
// five most probable classes are shown. Every answer shows what the model saw (the
// preprocessed input the API returns with ?return_input=true).
// Plain JavaScript, no dependencies: it is served by the app itself.
"use strict";

(function () {
  const canvas = document.getElementById("canvas");
  const ctx = canvas.getContext("2d");
  const fileInput = document.getElementById("file");
  const labelEl = document.getElementById("label");
  const confidenceEl = document.getElementById("confidence");
  const acceptedEl = document.getElementById("accepted");
  const barsEl = document.getElementById("bars");
  const statusEl = document.getElementById("status");
  const versionEl = document.getElementById("model-version");
  const predictBtn = document.getElementById("predict");
  const feedbackEl = document.getElementById("feedback");
  const fbChoose = document.getElementById("fb-choose");
  const fbLabel = document.getElementById("fb-label");
  const fbStatus = document.getElementById("fb-status");

  const dropEl = document.getElementById("drop");
  const hintEl = document.getElementById("hint");
  const clearBtn = document.getElementById("clear");
  const seenEl = document.getElementById("seen");
  const previewEl = document.getElementById("input-preview");

  let classes = [];
  let natural = false; // a model of photos: upload only, top-5
  let drawing = false;
  let inked = false; // something was drawn since the last clear
  let source = "canvas"; // "canvas" or "file": what Predict sends
  let last = null;
  let seq = 0;
  let answered = null; // {label, requestId} of the prediction on screen

  function clearCanvas() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    inked = false;
  }

  function point(ev) {
    const r = canvas.getBoundingClientRect();
    return {
      x: ((ev.clientX - r.left) * canvas.width) / r.width,
      y: ((ev.clientY - r.top) * canvas.height) / r.height,
    };
  }

  function strokeTo(p) {
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = Math.max(12, canvas.width / 14);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
    inked = true;
  }

  // Pointer events cover mouse, touch and pen alike.
  canvas.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    if (natural) return; // the canvas only previews uploads for photo models
    if (source === "file") {
      // Drawing after an upload starts a new drawing.
      clearCanvas();
      fileInput.value = "";
      source = "canvas";
    }
    canvas.setPointerCapture(ev.pointerId);
    drawing = true;
    last = point(ev);
    strokeTo({ x: last.x + 0.01, y: last.y + 0.01 }); // a dot for a tap
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (drawing) strokeTo(point(ev));
  });
  for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
    canvas.addEventListener(type, () => {
      drawing = false;
    });
  }

  function setStatus(text, isError) {
    statusEl.textContent = text || "";
    statusEl.className = isError ? "error" : "";
  }

  function renderBars(probabilities, top) {
    barsEl.replaceChildren();
    let names = classes.length ? classes : Object.keys(probabilities);
    if (natural || names.length > 10) {
      // The five most probable classes, most probable first.
      names = [...names].sort((a, b) => (probabilities[b] || 0) - (probabilities[a] || 0));
      names = names.slice(0, 5);
    }
    for (const name of names) {
      const p = probabilities[name] || 0;
      const row = document.createElement("div");
      row.className = "bar" + (name === top ? " top" : "");
      row.setAttribute("role", "listitem");
      row.dataset.label = name;
      row.dataset.probability = String(p);
      const lab = document.createElement("span");
      lab.className = "bar-label";
      lab.textContent = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      track.appendChild(fill);
      const val = document.createElement("span");
      val.className = "bar-value";
      val.textContent = (100 * p).toFixed(1) + "%";
      row.append(lab, track, val);
      barsEl.appendChild(row);
    }
  }

  // Why an answer is not accepted, in words (the API's `reason`).
  const REASON_TEXT = {
    no_ink: "I don't see a digit here",
    out_of_distribution: "This doesn't look like a digit to me",
    low_confidence: "Not sure: low confidence",
  };

  function render(prediction, requestId) {
    labelEl.textContent = prediction.label;
    confidenceEl.textContent = (100 * prediction.confidence).toFixed(1) + "%";
    confidenceEl.dataset.value = String(prediction.confidence);
    acceptedEl.hidden = prediction.accepted;
    const reason = prediction.reason || (prediction.accepted ? "" : "low_confidence");
    acceptedEl.textContent = REASON_TEXT[reason] || "not accepted";
    acceptedEl.dataset.reason = reason;
    labelEl.classList.toggle("rejected", !prediction.accepted);
    renderBars(prediction.probabilities, prediction.label);
    // What the model saw: the preprocessed input the API returned (return_input=true).
    if (prediction.input_png) {
      previewEl.src = prediction.input_png;
      seenEl.hidden = false;
    } else {
      previewEl.removeAttribute("src");
      seenEl.hidden = true;
    }
    seq += 1;
    labelEl.dataset.requestId = requestId || "";
    labelEl.dataset.seq = String(seq); // lets tests wait for a fresh answer
    answered = requestId ? { label: prediction.label, requestId: requestId } : null;
    resetFeedback();
  }

  // Feedback: "wrong — it was a 7" (or "right") goes to POST /v1/feedback with the
  // request id, so the monitoring report can show realised accuracy beside the estimate.
  function resetFeedback() {
    feedbackEl.hidden = !answered;
    fbChoose.hidden = true;
    fbStatus.textContent = "";
    delete fbStatus.dataset.sent;
    for (const b of feedbackEl.querySelectorAll("button")) b.disabled = false;
  }

  async function sendFeedback(label) {
    if (!answered) return;
    const body = JSON.stringify({ request_id: answered.requestId, label: label });
    for (const b of feedbackEl.querySelectorAll("button")) b.disabled = true;
    fbStatus.textContent = "sending…";
    // The prediction log is written in the background: a label sent within milliseconds
    // of the prediction may find no row yet (404), so retry a few times.
    for (let attempt = 0; attempt < 10; attempt += 1) {
      let res;
      try {
        res = await fetch("/v1/feedback", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: body,
        });
      } catch (e) {
        fbStatus.textContent = "feedback failed: " + e;
        break;
      }
      if (res.ok) {
        const saved = await res.json();
        fbStatus.textContent = saved.correct
          ? "thanks: recorded as right"
          : "thanks: recorded, it was a " + saved.label;
        fbStatus.dataset.sent = saved.label;
        fbChoose.hidden = true;
        return;
      }
      if (res.status !== 404 || attempt === 9) {
        let msg = res.status + " " + res.statusText;
        try {
          const err = await res.json();
          if (err && err.error) msg = err.error.message;
        } catch (e) {
          // keep the status line
        }
        fbStatus.textContent = "feedback not recorded: " + msg;
        break;
      }
      await new Promise((r) => setTimeout(r, 300));
    }
    for (const b of feedbackEl.querySelectorAll("button")) b.disabled = false;
  }

  document.getElementById("fb-right").addEventListener("click", () => {
    if (answered) sendFeedback(answered.label);
  });
  document.getElementById("fb-wrong").addEventListener("click", () => {
    if (!answered) return;
    fbLabel.replaceChildren();
    for (const name of classes) {
      if (name === answered.label) continue;
      const opt = document.createElement("option");
      opt.value = name;
      opt.textContent = name;
      fbLabel.appendChild(opt);
    }
    fbChoose.hidden = false;
    fbStatus.textContent = "";
  });
  document.getElementById("fb-send").addEventListener("click", () => {
    if (fbLabel.value) sendFeedback(fbLabel.value);
  });

  async function predictBlob(blob, name) {
    const form = new FormData();
    form.append("files", blob, name);
    predictBtn.disabled = true;
    setStatus("predicting…");
    try {
      const res = await fetch("/v1/predict?return_input=true", { method: "POST", body: form });
      let body = null;
      try {
        body = await res.json();
      } catch (e) {
        body = null;
      }
      if (!res.ok) {
        const msg = body && body.error ? body.error.message : res.status + " " + res.statusText;
        setStatus(msg, true);
        return;
      }
      render(body.predictions[0], res.headers.get("X-Request-ID"));
      setStatus("");
    } catch (e) {
      setStatus("request failed: " + e, true);
    } finally {
      predictBtn.disabled = false;
    }
  }

  function predict() {
    if (source === "file" && (pending || fileInput.files.length)) {
      const f = pending || fileInput.files[0];
      return predictBlob(f, f.name || "pasted.png");
    }
    if (natural) {
      setStatus("choose, drop or paste a picture first", true);
      return Promise.resolve();
    }
    if (!inked) {
      setStatus("draw a digit first (or upload an image)", true);
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      canvas.toBlob((blob) => resolve(predictBlob(blob, "drawing.png")), "image/png");
    });
  }

  function showUpload(file) {
    // Preview the upload on the canvas; the original file is what gets sent.
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      clearCanvas();
      const s = Math.min(canvas.width / img.width, canvas.height / img.height);
      const w = img.width * s;
      const h = img.height * s;
      ctx.drawImage(img, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      URL.revokeObjectURL(url);
    };
    img.onerror = () => URL.revokeObjectURL(url);
    img.src = url;
  }

  let pending = null; // a dropped or pasted picture (not in the file input)

  function useFile(file) {
    source = "file";
    pending = file;
    showUpload(file);
    predictBlob(file, file.name || "pasted.png");
  }

  fileInput.addEventListener("change", () => {
    if (!fileInput.files.length) return;
    useFile(fileInput.files[0]);
  });
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (ev) => {
      ev.preventDefault();
      dropEl.classList.add("over");
    });
  }
  document.addEventListener("dragleave", () => dropEl.classList.remove("over"));
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    dropEl.classList.remove("over");
    const f = ev.dataTransfer && ev.dataTransfer.files[0];
    if (f) useFile(f);
  });
  document.addEventListener("paste", (ev) => {
    const items = (ev.clipboardData && ev.clipboardData.files) || [];
    if (items.length) useFile(items[0]);
  });
  predictBtn.addEventListener("click", () => {
    predict();
  });
  clearBtn.addEventListener("click", () => {
    clearCanvas();
    fileInput.value = "";
    pending = null;
    source = "canvas";
    labelEl.textContent = "–";
    confidenceEl.textContent = "–";
    acceptedEl.hidden = true;
    acceptedEl.dataset.reason = "";
    labelEl.classList.remove("rejected");
    barsEl.replaceChildren();
    previewEl.removeAttribute("src");
    seenEl.hidden = true;
    answered = null;
    resetFeedback();
    setStatus("");
  });

  async function loadModelInfo() {
    try {
      const res = await fetch("/v1/model");
      const body = await res.json();
      if (!res.ok) {
        versionEl.textContent = body && body.error ? body.error.message : "not ready";
        setTimeout(loadModelInfo, 2000);
        return;
      }
      classes = body.classes;
      natural = Boolean(body.preprocess && body.preprocess.kind === "natural");
      if (natural) {
        document.title = "visionops — classify a picture";
        dropEl.hidden = false;
        clearBtn.hidden = true;
        canvas.setAttribute("aria-label", "The uploaded picture");
        hintEl.textContent =
          "The server resizes and centre-crops the picture exactly as the training " +
          "pictures were.";
      }
      document.body.dataset.kind = natural ? "natural" : "digit";
      const parts = [body.name];
      parts.push(body.version ? "version " + body.version : "sha " + body.digest.slice(0, 8));
      if (body.alias) parts.push("@" + body.alias);
      versionEl.textContent = parts.join(" · ");
      versionEl.dataset.version = body.version || "";
      versionEl.dataset.loaded = "1";
    } catch (e) {
      versionEl.textContent = "unavailable";
      setTimeout(loadModelInfo, 2000);
    }
  }

  clearCanvas();
  loadModelInfo();
})();
