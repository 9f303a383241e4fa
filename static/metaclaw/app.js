// MetaClaw: small progressive enhancements. Everything works without this file.
document.addEventListener("htmx:responseError", (event) => {
  const flash = document.getElementById("flash") || document.querySelector(".page").insertAdjacentElement("afterbegin", Object.assign(document.createElement("div"), {id: "flash", className: "flash"}));
  flash.innerHTML = "";
  const p = document.createElement("p");
  p.className = "flash-error";
  p.textContent = event.detail.xhr.status === 409 || event.detail.xhr.status === 403
    ? (event.detail.xhr.responseText.replace(/<[^>]+>/g, " ").trim().slice(0, 300) || "Refused.")
    : "Something went wrong (" + event.detail.xhr.status + "). Please reload.";
  flash.appendChild(p);
});
