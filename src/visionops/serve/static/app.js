// visionops web page: draw or upload a digit, POST it to /v1/predict, show the answer.
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

  let classes = [];
  let drawing = false;
  let inked = false; // something was drawn since the last clear
  let source = "canvas"; // "canvas" or "file": what Predict sends
  let last = null;
  let seq = 0;

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
    const names = classes.length ? classes : Object.keys(probabilities);
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
    seq += 1;
    labelEl.dataset.requestId = requestId || "";
    labelEl.dataset.seq = String(seq); // lets tests wait for a fresh answer
  }

  async function predictBlob(blob, name) {
    const form = new FormData();
    form.append("files", blob, name);
    predictBtn.disabled = true;
    setStatus("predicting…");
    try {
      const res = await fetch("/v1/predict", { method: "POST", body: form });
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
    if (source === "file" && fileInput.files.length) {
      const f = fileInput.files[0];
      return predictBlob(f, f.name);
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

  fileInput.addEventListener("change", () => {
    if (!fileInput.files.length) return;
    source = "file";
    showUpload(fileInput.files[0]);
    predict();
  });
  predictBtn.addEventListener("click", () => {
    predict();
  });
  document.getElementById("clear").addEventListener("click", () => {
    clearCanvas();
    fileInput.value = "";
    source = "canvas";
    labelEl.textContent = "–";
    confidenceEl.textContent = "–";
    acceptedEl.hidden = true;
    acceptedEl.dataset.reason = "";
    labelEl.classList.remove("rejected");
    barsEl.replaceChildren();
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
