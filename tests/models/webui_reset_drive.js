// Drives emma-mamba serve's chat page (GET /) in jsdom: a conversation reset while an answer is on its way ("New
// conversation", then another image picked) must leave the answer out of the new conversation. The first chat request
// of each phase is held until the reset is done. Prints, per phase, the next request's messages and what the page
// shows. Run by tests/models/test_webui.py; node webui_reset_drive.js BASE_URL IMAGE_A IMAGE_B
const fs = require("fs");
const {openPage, sleep, until, summary} = require("./webui_jsdom");
const [base, imageA, imageB] = process.argv.slice(2);
(async () => {
  let release = null, held = null;
  // hold the first request of each phase until the test lets it go
  const {w, d, $, bodies} = await openPage(base, {onChat: async () => {
    if (held === null) {
      held = new Promise((r) => { release = r; });
      await held;
    }
  }});
  async function pick(path, name) {
    const file = new w.File([fs.readFileSync(path)], name, {type: "image/png"});
    Object.defineProperty($("image"), "files", {value: [file], configurable: true});
    const before = $("preview").src;
    $("image").dispatchEvent(new w.Event("change"));
    await until(() => $("preview").src !== before && $("preview").style.display === "block");
  }
  function send(text) {
    $("prompt").value = text;
    $("prompt").dispatchEvent(new w.KeyboardEvent("keydown", {key: "Enter"}));
  }
  const turns = () => [...d.querySelectorAll("#log .turn")].map((e) => [e.className, e.textContent]);
  $("max_tokens").value = "4";
  await pick(imageA, "a.png");
  const out = {};
  // a question whose answer is held back, `reset` while it is on its way, then the next question: what it sent
  async function resetWhileStreaming(reset, first, next) {
    held = null; release = null;
    send(first);
    await until(() => release !== null);
    await reset();
    release(); await sleep(50);
    await until(() => !$("send").disabled);
    const n = bodies.length + 1;
    send(next);
    await until(() => bodies.length === n); await sleep(20);
    await until(() => !$("send").disabled);
    return {body: summary(bodies[n - 1]), turns: turns()};
  }
  // phase 1: New conversation while the first answer is on its way
  out.after_new = await resetWhileStreaming(() => $("new").click(), "First question?", "Second question?");
  // phase 2: another image picked while an answer is on its way
  out.after_image = await resetWhileStreaming(() => pick(imageB, "b.png"), "Third question?", "Fourth question?");
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(0));
})().catch((e) => { console.error(e); process.exit(1); });
