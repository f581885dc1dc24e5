// The labeling page and grid mode: answer with keys or buttons, no full-page reloads.
// Items come leased from /api/tasks; the next ones are preloaded so the following image shows at once.
// While the engine trains, the server hands out closed rounds' items for a second opinion (kind "check").
(() => {
  "use strict";
  const config = JSON.parse(document.getElementById("annotator-config").textContent);
  const grid = config.mode === "grid";
  const classes = config.classes;
  const keys = config.keys;   // the key of each class (pages.key_map): "3", "x", "shift+1"
  const HISTORY = 10;         // answers that Backspace (and the recent list) can bring back
  const HEARTBEAT_MS = 30000; // leases lapse without a heartbeat (db.LEASE_SECONDS = 100 s)
  const IDLE_MS = 180000;     // no heartbeat after 3 minutes without a key press or a click

  const keyOf = (event) => window.annotatorKeyOf(event, keys);  // static/keys.js

  let queue = [];            // tasks leased to me; in single mode queue[0] is on screen
  const answered = new Set(); // item ids answered here but maybe not yet confirmed by the server
  const history = [];         // answered tasks, most recent last (for undo), at most HISTORY
  const selected = new Set(); // grid mode: item ids selected
  let shownAt = performance.now();
  let pollTimer = null;
  let finished = false;       // the run is over: stop asking for work
  let chain = Promise.resolve(); // answers go to the server one after another, in order
  const preloaded = new Map();

  const $ = (id) => document.getElementById(id);

  async function api(method, url, body) {
    const options = {method, credentials: "same-origin", headers: {"X-CSRF-Token": config.csrf}};
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(url, options);
  }

  function toast(message) {
    const box = $("toast");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, 3500);
  }

  function preload(tasks) {
    for (const task of tasks) {
      if (!preloaded.has(task.item_id)) {
        const image = new Image();
        image.src = task.image_url;
        preloaded.set(task.item_id, image);
      }
    }
    if (preloaded.size > 200) preloaded.clear();
  }

  function showStatus(status) {
    if (!status) return;
    const done = status.query_size - status.remaining;
    $("progress-round").textContent = status.round === null ? "–" : status.round;
    $("progress-done").textContent = done;
    $("progress-size").textContent = status.query_size;
    $("progress-fill").style.width = (100 * done / (status.query_size || 1)).toFixed(1) + "%";
    const bar = document.querySelector(".batch-progress .bar");
    bar.setAttribute("aria-valuenow", done);
    bar.setAttribute("aria-valuemax", status.query_size);
    if (status.finished) {
      $("waiting-title").textContent = "All batches are labeled";
      $("waiting-text").textContent = "The run is finished. An admin can export the labels.";
    } else if (status.remaining > 0) {
      $("waiting-title").textContent = "Others are on the last images";
      $("waiting-text").textContent = "Every remaining image is with another annotator; this page checks again by itself.";
    } else {
      $("waiting-title").textContent = "Nothing to label right now";
      $("waiting-text").textContent = "The engine is learning from the answers; the next batch appears here by itself.";
    }
  }

  function render() {
    const empty = queue.length === 0;
    $("waiting").hidden = !empty;
    if (grid) {
      renderGrid();
    } else {
      $("image-frame").hidden = empty;
      if (!empty) {
        const task = queue[0];
        const image = $("item-image");
        if (image.dataset.itemId !== String(task.item_id)) {
          image.src = task.image_url;
          image.dataset.itemId = task.item_id;
          image.style.setProperty("--ratio", task.width && task.height ? (task.width / task.height).toFixed(4) : "1");
          image.classList.toggle("smooth", (task.width || 0) >= 256);  // photos: no nearest-neighbour shrinking
          $("item-caption").textContent = task.name || ("item " + task.item_id);
          $("item-size").textContent = task.width && task.height ? `${task.width} × ${task.height} px` : "";
          shownAt = performance.now();
        }
        const note = $("task-note");
        note.hidden = !(task.correcting || task.kind === "check");
        note.textContent = task.correcting
          ? "Its round has closed: your answer corrects it and is used from the next training on."
          : "Second opinion while the engine trains: the label is hidden; your answer adds a vote.";
      }
    }
    if (empty) schedulePoll();
  }

  function toggleZoom() {
    const frame = $("image-frame");
    if (!frame || grid) return;
    const actual = frame.classList.toggle("zoom-actual");
    $("zoom-state").textContent = actual ? "100%" : "fit";
  }

  function renderGrid() {
    const container = $("grid");
    const ids = queue.map((t) => String(t.item_id));
    for (const cell of [...container.children]) {
      if (!ids.includes(cell.dataset.itemId)) cell.remove();
    }
    for (const task of queue) {
      let cell = container.querySelector(`[data-item-id="${task.item_id}"]`);
      if (!cell) {
        cell = document.createElement("button");
        cell.type = "button";
        cell.className = "grid-cell";
        cell.dataset.itemId = task.item_id;
        const image = document.createElement("img");
        image.src = task.image_url;
        image.alt = "item " + task.item_id;
        cell.appendChild(image);
        cell.addEventListener("click", () => toggle(task.item_id));
        container.appendChild(cell);
      }
      cell.classList.toggle("selected", selected.has(task.item_id));
      cell.setAttribute("aria-pressed", selected.has(task.item_id));
    }
  }

  function toggle(itemId) {
    if (selected.has(itemId)) selected.delete(itemId); else selected.add(itemId);
    renderGrid();
  }

  function schedulePoll() {
    clearTimeout(pollTimer);
    if (finished) return;
    pollTimer = setTimeout(refill, 1500);
  }

  async function refill() {
    clearTimeout(pollTimer);
    let response;
    try {
      response = await api("GET", "/api/tasks?checks=1&count=" + config.prefetch);
    } catch (error) {
      toast("The server cannot be reached; retrying…");
      schedulePoll();
      return;
    }
    if (response.status === 401) { window.location.reload(); return; }
    if (!response.ok) { schedulePoll(); return; }
    const data = await response.json();
    const onScreen = queue.length ? queue[0].item_id : null;
    let tasks = data.tasks.filter((t) => !answered.has(t.item_id));
    const corrections = queue.filter((t) => t.correcting || t.broughtBack);  // brought back after their round closed
    tasks = [...corrections, ...tasks.filter((t) => !corrections.some((c) => c.item_id === t.item_id))];
    if (!grid && onScreen !== null) {  // keep the image on screen first, whatever the server's order
      const index = tasks.findIndex((t) => t.item_id === onScreen);
      if (index > 0) tasks.unshift(tasks.splice(index, 1)[0]);
    }
    queue = tasks;
    for (const id of [...selected]) if (!queue.some((t) => t.item_id === id)) selected.delete(id);
    showStatus(data.status);
    preload(grid ? [] : queue.slice(1));
    finished = Boolean(data.status && data.status.finished);
    render();
  }

  function send(tasks, label, takenMs) {
    const body = tasks.length === 1 && !grid
      ? {item_id: tasks[0].item_id, time_taken_ms: takenMs}
      : {item_ids: tasks.map((t) => t.item_id)};
    if (label === null) body.skip = true; else body.label = label;
    if (tasks.every((t) => t.kind === "check")) body.kind = "check";  // a second opinion: one more vote
    const url = "item_id" in body ? "/api/annotations" : "/api/annotations/bulk";
    chain = chain.then(async () => {
      let response;
      try {
        response = await api("POST", url, body);
      } catch (error) {
        response = null;
      }
      if (!response || response.status !== 201) {
        const message = response ? (await response.json().catch(() => ({}))).error : "network error";
        toast("Not saved: " + (message || response.status));
        for (const task of tasks) answered.delete(task.item_id);
      } else if (tasks.length === 1 && !grid) {
        const outcome = (await response.json().catch(() => ({}))).outcome;
        if (outcome === "corrected") toast("Corrected: the new label is used from the next training on");
      }
      await refill();
      refreshRecent();
    });
  }

  function remember(tasks) {
    history.push(tasks.map((t) => ({...t, correcting: false, broughtBack: false})));
    while (history.length > HISTORY) history.shift();
  }

  function answer(label) {
    if (grid) {
      const tasks = queue.filter((t) => selected.has(t.item_id));
      if (!tasks.length) { toast("Select images first (click them, or press a for all)"); return; }
      for (const task of tasks) { answered.add(task.item_id); selected.delete(task.item_id); }
      remember(tasks);
      queue = queue.filter((t) => !answered.has(t.item_id));
      render();
      send(tasks, label);
      return;
    }
    if (!queue.length) return;
    const takenMs = Math.round(performance.now() - shownAt);  // before render() shows the next image
    const task = queue.shift();
    answered.add(task.item_id);
    remember([task]);
    render();  // the next image (preloaded) shows before the server answers
    send([task], label, takenMs);
  }

  // Bring answered tasks back: the answer is withdrawn while its round is open; once the round has
  // closed (the engine may already train on it) the image comes back as a correction.
  function bringBack(tasks) {
    chain = chain.then(async () => {
      for (const task of tasks) {
        const response = await api("DELETE", "/api/annotations/" + task.item_id).catch(() => null);
        if (response && response.ok) {
          answered.delete(task.item_id);
          queue = [{...task, correcting: false}, ...queue.filter((t) => t.item_id !== task.item_id)];
        } else if (response && response.status === 409 && !grid) {  // closed: answer again to correct it
          answered.delete(task.item_id);
          queue = [{...task, correcting: task.kind !== "check", broughtBack: true},
                   ...queue.filter((t) => t.item_id !== task.item_id)];
        } else {
          const message = response ? (await response.json().catch(() => ({}))).error : "network error";
          toast("Cannot undo: " + (message || response.status));
        }
      }
      render();
      await refill();
      refreshRecent();
    });
  }

  function undo() {
    const tasks = history.pop();
    if (!tasks) { toast("Nothing to undo"); return; }
    bringBack(tasks);
  }

  async function refreshRecent() {
    const list = $("recent");
    if (!list) return;
    const response = await api("GET", "/api/answers/recent").catch(() => null);
    if (!response || !response.ok) return;
    const data = await response.json();
    list.replaceChildren(...data.answers.map((a) => {
      const entry = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "recent-entry";
      button.tabIndex = -1;
      button.title = a.closed ? "round closed: click to correct" : "click to change";
      const thumb = document.createElement("img");
      thumb.src = a.image_url;
      thumb.alt = "";
      const text = document.createElement("span");
      text.textContent = (a.label_name === null ? "skipped" : a.label_name) + (a.source === "review" ? " ✎" : "");
      button.append(thumb, text);
      button.addEventListener("click", () => {
        button.blur();
        const index = history.findIndex((h) => h.length === 1 && h[0].item_id === a.item_id);
        if (index >= 0) history.splice(index, 1);
        bringBack([{item_id: a.item_id, image_url: a.image_url, name: a.name, width: a.width, height: a.height}]);
      });
      entry.appendChild(button);
      return entry;
    }));
  }

  function toggleInstructions() {
    const dialog = $("instructions");
    if (!dialog) return;
    if (dialog.open) dialog.close(); else dialog.showModal();
  }

  function toggleKeymap() {
    const dialog = $("keymap");
    if (dialog.open) dialog.close(); else dialog.showModal();
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest && event.target.closest("input, textarea, select")) return;
    // A focused button must not answer again on Space or Enter (its browser default): keys answer
    // only through the key map.
    if ((event.key === " " || event.key === "Enter") && event.target.closest && event.target.closest("main button")) {
      event.preventDefault();
      return;
    }
    if (event.key === "?") { event.preventDefault(); toggleKeymap(); return; }
    if ($("keymap").open || ($("instructions") && $("instructions").open)) {
      if (event.key === "h" && $("instructions").open) { event.preventDefault(); toggleInstructions(); }
      return;
    }
    const index = keys.indexOf(keyOf(event));
    if (index >= 0 && index < classes.length) { event.preventDefault(); answer(index); return; }
    if (event.key === "Backspace") { event.preventDefault(); undo(); }
    else if (event.key === "h") { event.preventDefault(); toggleInstructions(); }
    else if (event.key === "z" && !grid) { event.preventDefault(); toggleZoom(); }
    else if (event.key === "s" && !grid) { event.preventDefault(); answer(null); }
    else if (event.key === "a" && grid) {
      event.preventDefault();
      if (selected.size === queue.length) selected.clear(); else queue.forEach((t) => selected.add(t.item_id));
      renderGrid();
    } else if (event.key === "g") { window.location.href = grid ? "/" : "/grid"; }
  });
  document.addEventListener("keyup", (event) => {  // Space activates a focused button on keyup
    if (event.key === " " && event.target.closest && event.target.closest("main button")) event.preventDefault();
  });
  document.querySelectorAll(".class-button").forEach((button) => {
    button.addEventListener("click", () => { button.blur(); answer(Number(button.dataset.label)); });
  });
  if (!grid) $("image-box").addEventListener("click", toggleZoom);
  if ($("instructions-button")) $("instructions-button").addEventListener("click", toggleInstructions);
  if ($("instructions")) {
    $("instructions").addEventListener("close", () => {
      if (config.instructions && config.show_instructions) {
        config.show_instructions = false;
        api("POST", "/api/instructions/seen", {version: config.instructions}).catch(() => null);
      }
    });
    if (config.show_instructions) $("instructions").showModal();  // first sign-in, or new guidelines
  }
  // Leases live while this page is open and its person is active: no heartbeat after IDLE_MS without a
  // key press, click or tap (an idle colleague's items come free within 2 minutes), and a closing page
  // hands its items back at once (sendBeacon carries the CSRF token as a form field).
  let lastActive = Date.now();
  for (const type of ["keydown", "pointerdown"]) document.addEventListener(type, () => { lastActive = Date.now(); }, true);
  setInterval(() => {
    if (Date.now() - lastActive < IDLE_MS) api("POST", "/api/heartbeat").catch(() => null);
  }, HEARTBEAT_MS);
  window.addEventListener("pagehide", () => {
    const form = new FormData();
    form.append("csrf_token", config.csrf);
    navigator.sendBeacon("/api/leases/release", form);
  });
  refreshRecent();
  $("undo-button").addEventListener("click", undo);
  $("help-button").addEventListener("click", toggleKeymap);
  if ($("skip-button")) $("skip-button").addEventListener("click", () => answer(null));
  if ($("select-all-button")) $("select-all-button").addEventListener("click", () => {
    if (selected.size === queue.length) selected.clear(); else queue.forEach((t) => selected.add(t.item_id));
    renderGrid();
  });
  refill();
})();
