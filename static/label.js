// The labeling page and grid mode: answer with keys or buttons, no full-page reloads.
// Items come leased from /api/tasks; the next ones are preloaded so the following image shows at once.
(() => {
  "use strict";
  const config = JSON.parse(document.getElementById("annotator-config").textContent);
  const grid = config.mode === "grid";
  const classes = config.classes;
  const keys = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0"];

  let queue = [];            // tasks leased to me; in single mode queue[0] is on screen
  const answered = new Set(); // item ids answered here but maybe not yet confirmed by the server
  const history = [];         // answered tasks, most recent last (for undo)
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
          $("item-caption").textContent = "item " + task.item_id;
          shownAt = performance.now();
        }
      }
    }
    if (empty) schedulePoll();
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
      response = await api("GET", "/api/tasks?count=" + config.prefetch);
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

  function send(tasks, label) {
    const body = tasks.length === 1 && !grid
      ? {item_id: tasks[0].item_id, time_taken_ms: Math.round(performance.now() - shownAt)}
      : {item_ids: tasks.map((t) => t.item_id)};
    if (label === null) body.skip = true; else body.label = label;
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
      }
      await refill();
    });
  }

  function answer(label) {
    if (grid) {
      const tasks = queue.filter((t) => selected.has(t.item_id));
      if (!tasks.length) { toast("Select images first (click them, or press a for all)"); return; }
      for (const task of tasks) { answered.add(task.item_id); selected.delete(task.item_id); }
      history.push(tasks);
      queue = queue.filter((t) => !answered.has(t.item_id));
      render();
      send(tasks, label);
      return;
    }
    if (!queue.length) return;
    const task = queue.shift();
    answered.add(task.item_id);
    history.push([task]);
    render();  // the next image (preloaded) shows before the server answers
    send([task], label);
  }

  function undo() {
    const tasks = history.pop();
    if (!tasks) { toast("Nothing to undo"); return; }
    chain = chain.then(async () => {
      for (const task of tasks) {
        const response = await api("DELETE", "/api/annotations/" + task.item_id).catch(() => null);
        if (response && response.ok) {
          answered.delete(task.item_id);
          queue = [task, ...queue.filter((t) => t.item_id !== task.item_id)];
        } else {
          const message = response ? (await response.json().catch(() => ({}))).error : "network error";
          toast("Cannot undo: " + (message || response.status));
        }
      }
      render();
      await refill();
    });
  }

  function toggleKeymap() {
    const dialog = $("keymap");
    if (dialog.open) dialog.close(); else dialog.showModal();
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest && event.target.closest("input, textarea, select")) return;
    if (event.key === "?") { event.preventDefault(); toggleKeymap(); return; }
    if ($("keymap").open) return;
    const index = keys.indexOf(event.key);
    if (index >= 0 && index < classes.length) { event.preventDefault(); answer(index); return; }
    if (event.key === "Backspace") { event.preventDefault(); undo(); }
    else if (event.key === "s" && !grid) { event.preventDefault(); answer(null); }
    else if (event.key === "a" && grid) {
      event.preventDefault();
      if (selected.size === queue.length) selected.clear(); else queue.forEach((t) => selected.add(t.item_id));
      renderGrid();
    } else if (event.key === "g") { window.location.href = grid ? "/" : "/grid"; }
  });
  document.querySelectorAll(".class-button").forEach((button) => {
    button.addEventListener("click", () => answer(Number(button.dataset.label)));
  });
  $("undo-button").addEventListener("click", undo);
  $("help-button").addEventListener("click", toggleKeymap);
  if ($("skip-button")) $("skip-button").addEventListener("click", () => answer(null));
  if ($("select-all-button")) $("select-all-button").addEventListener("click", () => {
    if (selected.size === queue.length) selected.clear(); else queue.forEach((t) => selected.add(t.item_id));
    renderGrid();
  });
  refill();
})();
