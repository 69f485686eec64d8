// otel-subflow pages: the popover of chart marks (_html.page inlines this; no libraries).
// A mark with data-pop="ID" shows the content of <template id="ID"> on hover, and keeps it on
// click, Enter or Space; Escape or a click elsewhere closes it. A mark with data-row="ID" also
// highlights the table row of that id.
(function () {
  "use strict";
  var pop = document.getElementById("popover");
  if (!pop) { return; }
  var pinned = null;
  var shown = null;

  function rowOf(mark) {
    var id = mark.getAttribute("data-row");
    return id ? document.getElementById(id) : null;
  }

  function show(mark) {
    var source = document.getElementById(mark.getAttribute("data-pop"));
    if (!source || !source.content) { return; }
    hide();
    var close = document.createElement("button");
    close.className = "close";
    close.type = "button";
    close.setAttribute("aria-label", "close");
    close.textContent = "\u00d7";
    close.addEventListener("click", function (event) { event.stopPropagation(); pinned = null; hide(); });
    pop.replaceChildren(close, source.content.cloneNode(true));
    pop.hidden = false;
    var box = mark.getBoundingClientRect();
    var left = window.scrollX + box.left + box.width / 2 - 20;
    var maxLeft = window.scrollX + document.documentElement.clientWidth - pop.offsetWidth - 8;
    pop.style.left = Math.max(window.scrollX + 8, Math.min(left, maxLeft)) + "px";
    pop.style.top = (window.scrollY + box.bottom + 8) + "px";
    mark.classList.add("selected");
    var row = rowOf(mark);
    if (row) { row.classList.add("selected"); }
    shown = mark;
  }

  function hide() {
    if (shown) {
      shown.classList.remove("selected");
      var row = rowOf(shown);
      if (row) { row.classList.remove("selected"); }
    }
    shown = null;
    pop.hidden = true;
    pop.replaceChildren();
  }

  function markOf(target) {
    return target && target.closest ? target.closest("[data-pop]") : null;
  }

  document.addEventListener("mouseover", function (event) {
    var mark = markOf(event.target);
    if (mark && !pinned && mark !== shown) { show(mark); }
  });
  document.addEventListener("mouseout", function (event) {
    var mark = markOf(event.target);
    if (mark && !pinned && !mark.contains(event.relatedTarget)) { hide(); }
  });
  document.addEventListener("click", function (event) {
    var mark = markOf(event.target);
    if (mark) {
      pinned = mark;
      show(mark);
    } else if (!pop.contains(event.target)) {
      pinned = null;
      hide();
    }
  });
  document.addEventListener("keydown", function (event) {
    var mark = markOf(event.target);
    if (mark && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      pinned = mark;
      show(mark);
    } else if (event.key === "Escape") {
      pinned = null;
      hide();
    }
  });
})();
