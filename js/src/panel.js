// Front end of llava_nb.ChatPanel (an anywidget). Python owns the conversation: this file only
// draws the widget's state (traitlets) and sends what the user does as custom messages, with
// images as binary buffers.
import DOMPurify from "dompurify";
import { marked } from "marked";
import "./panel.css";

marked.setOptions({ gfm: true, breaks: true });
// HTML in model text is shown as the text it is: passed through, DOMPurify dropped what it does
// not allow, and with it words ("a List<String> in Java" read "a List in Java").
const escapeHtml = (text) =>
  text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
marked.use({
  renderer: {
    html: ({ text, block }) => (block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text)),
  },
});

// What model text may become: Markdown's own elements, no more. DOMPurify's defaults keep
// <style>, style= and class= (which restyle or cover the whole page), forms (which navigate it)
// and images (which fetch any URL): an answer, or a chat file opened in the panel, is untrusted.
const MODEL_HTML = {
  ALLOWED_TAGS: ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "b", "i",
    "del", "s", "code", "pre", "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody",
    "tr", "th", "td", "sup", "sub"],
  ALLOWED_ATTR: ["href", "title", "start", "align"],
  ALLOW_DATA_ATTR: false,
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank"); // a link opens a tab; the notebook stays
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Model text (untrusted) as sanitized HTML. */
function markdown(text) {
  return DOMPurify.sanitize(marked.parse(text || ""), MODEL_HTML);
}

/** A small DOM helper: h("div", {class: "x"}, child, "text", ...). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== false && value != null) node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

/** Draw `html` into `body`, keeping its leading blocks that did not change: a selection in them,
 * or a drag selecting them, is not cut short by the redraw. */
function patchHtml(body, html) {
  const fresh = document.createElement("template");
  fresh.innerHTML = html;
  const old = [...body.childNodes];
  const next = [...fresh.content.childNodes];
  let same = 0;
  while (same < old.length && same < next.length && old[same].isEqualNode(next[same])) same++;
  for (const node of old.slice(same)) node.remove();
  body.append(...next.slice(same));
}

/** A point in `root` as the count of characters before it, and back: a selection outlives the
 * nodes it was in, the text before it being the same. */
function textOffset(root, node, offset) {
  const range = document.createRange();
  range.selectNodeContents(root);
  range.setEnd(node, offset);
  return range.toString().length;
}
function textPoint(root, offset) {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  let last = null;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (offset <= node.length) return [node, offset];
    offset -= node.length;
    last = node;
  }
  return last ? [last, last.length] : [root, 0];
}

function megabytes(bytes) {
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function thumbnails(images, cls) {
  return h("div", { class: cls }, ...images.map((src) => h("img", { src, alt: "attached image" })));
}

function userMessage(turn) {
  return h(
    "div",
    { class: "llava-msg llava-user", "data-role": "user" },
    thumbnails(turn.images || [], "llava-thumbs"),
    h("div", { class: "llava-text" }, turn.question),
  );
}

function assistantMessage(text, { interrupted = false, live = false, thinking = false } = {}) {
  const body = h("div", { class: "llava-text llava-markdown" });
  body.innerHTML = markdown(text);
  const message = h(
    "div",
    { class: "llava-msg llava-assistant", "data-role": "assistant", "data-live": live },
    body,
  );
  if (live && !text) message.append(h("span", { class: "llava-typing" }, typing(thinking)));
  if (interrupted) message.append(h("div", { class: "llava-stopped" }, "stopped"));
  return message;
}

/** The live answer's stand-in until its text comes: a reasoning model says it is thinking. */
function typing(thinking) {
  return thinking ? "thinking…" : "…";
}

function render({ model, el }) {
  const root = h("div", { class: "llava-panel", "data-lm-suppress-shortcuts": "true" });
  const status = h("div", { class: "llava-status", title: "model · device · dtype · state" });
  const temperature = h("input", {
    class: "llava-temperature",
    type: "number",
    min: "0",
    max: "2",
    step: "0.1",
    "aria-label": "temperature",
  });
  const maxTokens = h("input", {
    class: "llava-max-tokens",
    type: "number",
    min: "1",
    step: "1",
    "aria-label": "max new tokens",
  });
  const clearButton = h("button", { class: "llava-clear", title: "Start a new chat" }, "New chat");
  const undo = h(
    "button",
    { class: "llava-undo", title: "Forget the last question and its answer" },
    "Undo",
  );
  const regenerate = h(
    "button",
    { class: "llava-regenerate", title: "Answer the last question again" },
    "Regenerate",
  );
  const header = h(
    "div",
    { class: "llava-header" },
    status,
    h(
      "div",
      { class: "llava-controls" },
      h("label", {}, "temperature ", temperature),
      h("label", {}, "max tokens ", maxTokens),
      regenerate,
      undo,
      clearButton,
    ),
  );
  // New chat forgets every turn, for every view of the chat: asked first, never undone by a slip.
  const confirmText = h("span", { class: "llava-confirm-text" });
  const confirmClear = h("button", { class: "llava-confirm-clear" }, "Forget them");
  const keep = h("button", { class: "llava-keep" }, "Keep");
  const confirm = h(
    "div",
    { class: "llava-confirm", role: "alertdialog", "aria-label": "start a new chat?", hidden: true },
    confirmText,
    confirmClear,
    keep,
  );
  const messages = h("div", { class: "llava-messages", role: "log", "aria-live": "polite" });
  const error = h("div", { class: "llava-error", role: "alert" });
  const attachments = h("div", { class: "llava-attachments" });
  const fileInput = h("input", {
    class: "llava-file",
    type: "file",
    accept: "image/*",
    multiple: true,
    hidden: true,
  });
  const attach = h("button", { class: "llava-attach", title: "Attach images" }, "Image…");
  const input = h("textarea", {
    class: "llava-input",
    rows: "2",
    placeholder: "Ask about the image… (Enter sends, Shift+Enter for a new line)",
    "aria-label": "question",
  });
  const send = h("button", { class: "llava-send", title: "Send (Enter)" }, "Send");
  const stop = h("button", { class: "llava-stop", title: "Stop the answer" }, "Stop");
  const composer = h("div", { class: "llava-composer" }, attach, fileInput, input, send, stop);
  root.append(header, confirm, messages, error, attachments, composer);
  el.append(root);

  /** Send to the kernel; once it restarted or the page lost it, say so instead of throwing.
   * Returns whether it was sent. */
  let kernelGone = false;
  function post(message, buffers) {
    try {
      model.send(message, undefined, buffers);
      return true;
    } catch {
      kernelGone = true;
      drawState();
      return false;
    }
  }

  // The messages follow the newest until the user scrolls up to read, and again once they scroll
  // back down or send. Followed from the start: the panel is drawn before it is on the page
  // (no height yet), so its first layout, like any resize, scrolls to the bottom as well.
  let following = true;
  function toBottom() {
    if (following) messages.scrollTop = messages.scrollHeight;
  }
  function keepBottom(update) {
    keepSelection(update);
    toBottom();
  }

  /** Run `update` (a redraw), then select again what was selected in a message, if the redraw
   * replaced the nodes it was in: the user may be copying a word from an answer being written. */
  function keepSelection(update) {
    const selection = document.getSelection();
    const texts = () => [...messages.querySelectorAll(".llava-text")];
    const within = selection.rangeCount && texts().find(
      (text) => text.contains(selection.anchorNode) && text.contains(selection.focusNode));
    if (!within) return update();
    const { anchorNode, anchorOffset, focusNode, focusOffset } = selection;
    const index = texts().indexOf(within);
    const anchor = textOffset(within, anchorNode, anchorOffset);
    const focus = textOffset(within, focusNode, focusOffset);
    update();
    const moved = selection.anchorNode !== anchorNode || selection.anchorOffset !== anchorOffset
      || selection.focusNode !== focusNode || selection.focusOffset !== focusOffset;
    const text = texts()[index];
    if (moved && text) {
      selection.setBaseAndExtent(...textPoint(text, anchor), ...textPoint(text, focus));
    }
  }
  messages.addEventListener("scroll", () => {
    following = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
  });
  const resized = new ResizeObserver(toBottom);
  resized.observe(messages);
  messages.addEventListener("load", toBottom, true); // a thumbnail's height comes once it loads

  // The answer being written, as this view has it: the kernel sends what changed (keep the first
  // `offset` characters, append `text`), not all of it each time. `synced`: false from a change
  // this view cannot apply (it opened mid-answer, or missed one) until the kernel sends it whole.
  let liveText = "";
  let synced = true;
  let resyncTimer = null;
  function askWhole() {
    synced = false;
    if (resyncTimer !== null) return; // asked already: asking again each second
    post({ type: "resync" });
    // asked again each second until the answer comes (or is over, drawn as a turn): after a
    // reload requests were seen to go unanswered, and asking again only on the answer's next
    // change never asked again once its last change had come
    resyncTimer = setInterval(() => {
      if (synced || !answering()) {
        clearInterval(resyncTimer);
        resyncTimer = null;
      } else {
        post({ type: "resync" });
      }
    }, 1000);
  }
  function applyLive(offset, text) {
    if (offset === 0) {
      synced = true;
      if (text === liveText) return;
      liveText = text;
    } else if (synced && offset <= liveText.length) {
      liveText = liveText.slice(0, offset) + text;
    } else {
      return askWhole();
    }
    // emptied: the answer ended or another starts, drawn whole with the state that says so
    if (liveText) drawLiveAnswer();
  }

  // A growing answer is parsed whole each time: a long one costs tens of ms a draw, more than the
  // kernel's 50 ms between updates, and the page froze. Each draw waits four times
  // as long as the last took (and for the next frame), so the page keeps most of its time.
  let liveRedraw = null;
  let nextDraw = 0;
  function drawMessages() {
    clearTimeout(liveRedraw); // drawn here, newest text included
    liveRedraw = null;
    keepBottom(() => {
      const nodes = [];
      for (const turn of model.get("turns")) {
        nodes.push(userMessage(turn), assistantMessage(turn.answer, turn));
      }
      const live = model.get("live_question");
      if (live && live.question !== undefined) {
        const thinking = model.get("thinking");
        nodes.push(userMessage(live), assistantMessage(liveText, { live: true, thinking }));
      }
      if (!nodes.length) nodes.push(h("div", { class: "llava-empty" }, "No messages yet."));
      messages.replaceChildren(...nodes);
    });
  }

  function drawLiveAnswer() {
    if (liveRedraw) return; // already due: it draws the newest text
    liveRedraw = setTimeout(() => requestAnimationFrame(() => {
      if (!liveRedraw) return; // drawMessages came first
      liveRedraw = null;
      const live = messages.querySelector('.llava-assistant[data-live=""]');
      if (!live) return answering() ? drawMessages() : undefined; // else: it ended, drawn so
      const start = performance.now();
      keepBottom(() => {
        patchHtml(live.querySelector(".llava-text"), markdown(liveText));
        if (liveText) live.querySelector(".llava-typing")?.remove();
      });
      nextDraw = performance.now() + 4 * (performance.now() - start);
    }), Math.max(0, nextDraw - performance.now()));
  }

  /** Whether the chat is answering: this panel's question, or another view's shown here. */
  function answering() {
    const live = model.get("live_question");
    return model.get("busy") || Boolean(live && live.question !== undefined);
  }

  function drawState() {
    const focused = root.contains(document.activeElement) ? document.activeElement : null;
    const busy = answering() && !kernelGone; // Stop, in whichever view of the chat
    status.textContent = kernelGone ? "not connected to a kernel" : model.get("status");
    root.classList.toggle("llava-busy", busy);
    send.hidden = busy;
    stop.hidden = !busy;
    stop.disabled = !model.get("stoppable");
    stop.title = model.get("stoppable")
      ? "Stop the answer"
      : "A running cell is reading this answer: interrupt the kernel (■) to stop it";
    const turns = model.get("turns").length;
    regenerate.disabled = busy || !turns;
    undo.disabled = busy || !turns;
    clearButton.disabled = busy;
    if (busy || !turns) confirm.hidden = true; // nothing (or nothing now) to ask about
    confirmText.textContent =
      `Start a new chat? This chat's ${turns === 1 ? "question and its answer" : `${turns} ` +
      "questions and their answers"} will be forgotten, here and wherever else it is shown.`;
    const message = kernelGone
      ? "the kernel is gone (restarted?); run the panel's cell again"
      : model.get("error");
    error.textContent = message;
    error.hidden = !message;
    if (focused && (focused.hidden || focused.disabled)) input.focus(); // not the page's: typing
    if (document.activeElement !== temperature) temperature.value = model.get("temperature");
    if (document.activeElement !== maxTokens) maxTokens.value = model.get("max_new_tokens");
  }

  function drawAttachments() {
    const thumbs = model.get("attachments");
    attachments.replaceChildren(
      ...thumbs.map((src, index) =>
        h(
          "div",
          { class: "llava-attachment" },
          h("img", { src, alt: `attachment ${index + 1}` }),
          h(
            "button",
            {
              class: "llava-detach",
              title: "Remove this image",
              "aria-label": "remove image",
              onclick: () => post({ type: "detach", index }),
            },
            "×",
          ),
        ),
      ),
    );
  }

  function submit() {
    const text = input.value.trim();
    if (!text || answering()) return;
    if (!post({ type: "send", text })) return; // kept in the box: nobody received it
    input.value = "";
    input.focus(); // Send clicked: the next question is typed here, not into the notebook
    following = true; // the question and its answer are what the user wants to see now
    toBottom();
  }

  // Each drop, pick or paste has an id: its files go one message each, as their reads finish,
  // so another drop's may come in between; the kernel joins each drop's refusals by its id.
  const viewId = Math.random().toString(36).slice(2); // the panel may be shown twice
  let drops = 0;
  async function upload(files) {
    const limit = model.get("max_upload_bytes");
    const big = files.filter((file) => file.size > limit);
    const refused = [];
    if (big.length) {
      const what = big.map((file) => `${file.name} is ${megabytes(file.size)}`).join(", ");
      const why = `more than the ${megabytes(limit)} a notebook connection carries`;
      refused.push(`${what}, ${why}; shrink ${big.length > 1 ? "them" : "it"} first`);
    }
    const small = files.filter((file) => file.size <= limit);
    if (!small.length) {
      model.set("error", refused.join("; ")); // nothing for the kernel to check
      model.save_changes();
      return;
    }
    const drop = `${viewId}-${++drops}`;
    for (const [index, file] of small.entries()) {
      const buffer = await file.arrayBuffer();
      // this browser's refusals go with the first file, joined with the kernel's in one line
      post({ type: "attach", name: file.name, drop, refused: index ? [] : refused }, [buffer]);
    }
  }

  function setting(name, node, whole = false) {
    node.addEventListener("change", () => {
      const value = Number(node.value); // all of it: parseInt reads "1e3" as 1
      if (whole && Number.isFinite(value) && !Number.isInteger(value)) {
        model.set("error", `${node.getAttribute("aria-label")} is a whole number, not ${value}`);
        model.save_changes();
        node.value = model.get(name);
      } else if (Number.isFinite(value) && node.value.trim() !== "") {
        model.set(name, value); // the kernel checks the range: says what is wrong, or clears it
        model.save_changes();
      } else {
        node.value = model.get(name);
      }
    });
  }

  root.addEventListener("keydown", (event) => {
    // typing here is not for the notebook: Shift+Enter would run the cell, 0 0 restart the kernel
    if (event.target.matches("input, textarea")) event.stopPropagation();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  input.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return;
    // copied from a document: its text is pasted as well (not dropped for the image beside it)
    if (!event.clipboardData.types.includes("text/plain")) event.preventDefault();
    upload(files);
  });
  root.addEventListener("dragover", (event) => {
    if ([...(event.dataTransfer?.types || [])].includes("Files")) {
      event.preventDefault();
      event.stopPropagation();
      root.classList.add("llava-drop");
    }
  });
  root.addEventListener("dragleave", (event) => {
    // left for one of its own parts (the messages, the input): still over the panel
    if (!root.contains(event.relatedTarget)) root.classList.remove("llava-drop");
  });
  root.addEventListener("drop", (event) => {
    root.classList.remove("llava-drop");
    const files = [...(event.dataTransfer?.files || [])];
    if (files.length) {
      event.preventDefault();
      event.stopPropagation();
      upload(files);
    }
  });
  attach.addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    upload([...fileInput.files]);
    fileInput.value = "";
  });
  send.addEventListener("click", submit);
  stop.addEventListener("click", () => post({ type: "stop" }));
  regenerate.addEventListener("click", () => post({ type: "regenerate" }));
  undo.addEventListener("click", () => post({ type: "undo" }));
  clearButton.addEventListener("click", () => {
    const turns = model.get("turns").length;
    if (!turns) return post({ type: "clear" });
    confirm.hidden = false;
    keep.focus(); // Enter keeps them
  });
  function closeConfirm() {
    confirm.hidden = true;
    input.focus(); // the focused button is gone: typing goes on in the panel
  }
  confirmClear.addEventListener("click", () => {
    closeConfirm();
    post({ type: "clear" });
  });
  keep.addEventListener("click", closeConfirm);
  confirm.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeConfirm();
  });
  error.addEventListener("click", () => {
    model.set("error", "");
    model.save_changes();
  });
  setting("temperature", temperature);
  setting("max_new_tokens", maxTokens, true);

  const onMessages = () => drawMessages();
  const onState = () => drawState();
  const onConnection = () => {
    // the kernel restarted (or the page lost it, and maybe found it again): say which, at once
    kernelGone = false;
    post({ type: "ping" });
    drawState();
  };
  model.on("comm_live_update", onConnection);
  const onDraft = () => {
    if (model.get("draft") && !input.value) input.value = model.get("draft"); // to fix and resend
  };
  model.on("change:draft", onDraft);
  model.on("change:turns", onMessages);
  model.on("change:live_question", onMessages);
  const onLiveState = () => applyLive(0, model.get("live_answer")); // all of it: the state
  const onCustom = (message) => {
    if (message.type === "live") applyLive(message.offset, message.text);
  };
  model.on("change:live_answer", onLiveState);
  model.on("msg:custom", onCustom);
  const onThinking = () => {
    const standIn = messages.querySelector('.llava-assistant[data-live=""] .llava-typing');
    if (standIn) standIn.textContent = typing(model.get("thinking"));
  };
  model.on("change:thinking", onThinking);
  for (const name of ["busy", "stoppable", "status", "error", "turns", "live_question"]) {
    model.on(`change:${name}`, onState);
  }
  model.on("change:attachments", drawAttachments);
  model.on("change:temperature", onState);
  model.on("change:max_new_tokens", onState);
  if (answering()) {
    // the widget's state had all of the answer when it was made, maybe long before this view
    liveText = model.get("live_answer");
    askWhole();
  }
  drawMessages();
  drawState();
  drawAttachments();

  return () => {
    clearTimeout(liveRedraw);
    clearInterval(resyncTimer);
    resized.disconnect();
    model.off("change:turns", onMessages);
    model.off("change:live_question", onMessages);
    model.off("change:live_answer", onLiveState);
    model.off("msg:custom", onCustom);
    model.off("change:thinking", onThinking);
    for (const name of ["busy", "stoppable", "status", "error", "turns", "live_question"]) {
      model.off(`change:${name}`, onState);
    }
    model.off("change:attachments", drawAttachments);
    model.off("change:temperature", onState);
    model.off("change:max_new_tokens", onState);
    model.off("change:draft", onDraft);
    model.off("comm_live_update", onConnection);
  };
}

export default { render };
