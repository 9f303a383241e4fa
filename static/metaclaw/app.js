// MetaClaw: small progressive enhancements. Everything works without this file.

// Swap 409 and 422 answers too: they carry the re-rendered panel with the reason ("already
// approved by X at T", "give a reason"). Other errors are shown as a flash message below.
document.addEventListener("DOMContentLoaded", () => {
  if (window.htmx) {
    htmx.config.responseHandling = [
      {code: "204", swap: false},
      {code: "[23]..", swap: true},
      {code: "409|422", swap: true, error: false},
      {code: "[45]..", swap: false, error: true},
      {code: "...", swap: false},
    ];
  }
  markSelected();
});

document.addEventListener("htmx:responseError", (event) => {
  const flash = document.getElementById("flash") || document.querySelector(".page").insertAdjacentElement("afterbegin", Object.assign(document.createElement("div"), {id: "flash", className: "flash"}));
  flash.innerHTML = "";
  const p = document.createElement("p");
  p.className = "flash-error";
  p.textContent = event.detail.xhr.status === 409 || event.detail.xhr.status === 403
    ? (event.detail.xhr.responseText.replace(/<[^>]+>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300) || "Refused.")
    : "Something went wrong (" + event.detail.xhr.status + "). Please reload.";
  flash.appendChild(p);
});

// --- Review queue: keep the open proposal highlighted, and drive it from the keyboard. ---------

function markSelected() {
  const detail = document.getElementById("detail");
  const id = detail && detail.dataset.revisionId;
  document.querySelectorAll(".queue-item").forEach((item) => {
    const on = item.dataset.id === id;
    item.classList.toggle("selected", on);
    if (on) item.setAttribute("aria-current", "true"); else item.removeAttribute("aria-current");
  });
}

document.addEventListener("htmx:afterSettle", (event) => {
  markSelected();
  // On a phone the panel sits below the list: bring the opened proposal into view.
  if (event.detail.elt && event.detail.elt.id === "detail" && window.matchMedia("(max-width: 760px)").matches) {
    event.detail.elt.scrollIntoView({block: "start"});
  }
});

function typing(target) {
  return target.closest("input, textarea, select, [contenteditable]") !== null;
}

document.addEventListener("keydown", (event) => {
  if (!document.querySelector("[data-review]") || event.ctrlKey || event.metaKey || event.altKey) return;
  if (typing(event.target)) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  const items = Array.from(document.querySelectorAll(".queue-item"));
  // The open proposal is the one in the panel: the list's highlight follows it only once
  // htmx settles, and a second key pressed before that must still move on from it.
  const detail = document.getElementById("detail");
  const openId = detail && detail.dataset.revisionId;
  const current = items.findIndex((item) => item.dataset.id === openId);
  const submit = (form) => form && (form.requestSubmit ? form.requestSubmit() : form.submit());
  switch (event.key) {
    case "j":
    case "k": {
      if (!items.length) return;
      const next = event.key === "j" ? Math.min(items.length - 1, current + 1) : Math.max(0, current - 1);
      if (next === current && current !== -1) return;
      items[current === -1 ? 0 : next].click();
      items[current === -1 ? 0 : next].scrollIntoView({block: "nearest"});
      break;
    }
    case "a":
      submit(document.getElementById("approve-form"));
      break;
    case "r": {
      const form = document.getElementById("reject-form");
      if (!form) return;
      const reason = window.prompt("Why reject this proposal?");
      if (reason && reason.trim()) {
        form.querySelector("[name=reason]").value = reason.trim();
        submit(form);
      }
      break;
    }
    case "e": {
      const panel = document.getElementById("edit-panel");
      if (!panel) return;
      panel.open = true;
      panel.querySelector("textarea, input").focus();
      break;
    }
    default:
      return;
  }
  event.preventDefault();
});
