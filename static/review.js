// The review page: select an answered item (click, or j / k), press a class key (the labeling page's
// keys) or click a class to relabel it. On a closed round the server records a correction.
(() => {
  "use strict";
  const config = JSON.parse(document.getElementById("annotator-config").textContent);
  const classes = config.classes;
  const keys = config.keys;
  const cards = [...document.querySelectorAll(".review-card")];
  let current = cards.length ? 0 : -1;

  const keyOf = (event) => window.annotatorKeyOf(event, keys);  // static/keys.js

  function toast(message) {
    const box = document.getElementById("toast");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, 3500);
  }

  function select(index) {
    if (index < 0 || index >= cards.length) return;
    cards.forEach((card, i) => card.classList.toggle("selected", i === index));
    current = index;
    cards[index].scrollIntoView({block: "nearest"});
  }

  async function relabel(label) {
    if (current < 0) { toast("Select an image first"); return; }
    const card = cards[current];
    const response = await fetch("/api/annotations", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": config.csrf},
      body: JSON.stringify({item_id: Number(card.dataset.itemId), label}),
    }).catch(() => null);
    if (!response || response.status !== 201) {
      const message = response ? (await response.json().catch(() => ({}))).error : "network error";
      toast("Not saved: " + (message || response.status));
      return;
    }
    const result = await response.json();
    card.querySelector(".review-label").textContent = classes[label];
    const answers = card.querySelector(".review-answers");
    answers.textContent = answers.textContent.replace(/ · now: .*$/, "") + ` · now: ${classes[label]} ✎`;
    card.classList.add("relabeled");
    card.dataset.outcome = result.outcome;
    toast(result.outcome === "corrected" ? `Corrected to ${classes[label]}: used from the next training on`
      : `Answered ${classes[label]} (${result.outcome})`);
    select(current + 1);
  }

  cards.forEach((card, index) => card.addEventListener("click", () => { card.blur(); select(index); }));
  document.querySelectorAll(".class-button").forEach((button) => {
    button.addEventListener("click", () => { button.blur(); relabel(Number(button.dataset.label)); });
  });
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest && event.target.closest("input, textarea, select")) return;
    if ((event.key === " " || event.key === "Enter") && event.target.closest && event.target.closest("button")) {
      event.preventDefault();
      return;
    }
    const index = keys.indexOf(keyOf(event));
    if (index >= 0) { event.preventDefault(); relabel(index); return; }
    if (event.key === "j" || event.key === "ArrowRight") { event.preventDefault(); select(current + 1); }
    if (event.key === "k" || event.key === "ArrowLeft") { event.preventDefault(); select(current - 1); }
  });
  select(current);
})();
