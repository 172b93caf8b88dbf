// What the jsdom drivers of tests/models/test_webui.py share: emma-mamba serve's chat page (GET /) loaded in jsdom
// against the live server, with the browser APIs the page uses that jsdom lacks, each chat request's body recorded
// (and, with onChat, held until the promise it returns settles), and the helpers to wait on the page.
const {JSDOM} = require("jsdom");

async function openPage(base, {onChat = null} = {}) {
  const html = await (await fetch(base + "/")).text();
  const bodies = [];
  const dom = new JSDOM(html, {url: base + "/", runScripts: "dangerously", pretendToBeVisual: true,
    beforeParse(window) {
      window.fetch = async (u, o) => {  // Node's fetch (streams) inside the page
        if (String(u).endsWith("/v1/chat/completions")) {
          bodies.push(JSON.parse(o.body));
          if (onChat) await onChat();
        }
        return fetch(new URL(u, base), o);
      };
      window.TextDecoder = TextDecoder;
      window.AbortController = AbortController;
      window.HTMLFormElement.prototype.requestSubmit = function () {
        this.dispatchEvent(new window.Event("submit", {cancelable: true}));
      };
    }});
  const w = dom.window, d = w.document;
  return {w, d, $: (id) => d.getElementById(id), bodies};
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// wait for cond() (no fixed sleep: a busy machine answers late), at most 15 s
const until = async (cond) => { for (let i = 0; i < 600 && !cond(); i++) await sleep(25); };
// a chat request's messages as [role, text, the image's first bytes or null]
const summary = (body) => body.messages.map((m) => typeof m.content === "string" ? [m.role, m.content, null]
  : [m.role, m.content.filter((p) => p.type === "text").map((p) => p.text).join(""),
     m.content.filter((p) => p.type === "image_url").map((p) => p.image_url.url.slice(0, 80))[0] || null]);

module.exports = {openPage, sleep, until, summary};
