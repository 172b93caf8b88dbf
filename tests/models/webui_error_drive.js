// Drives emma-mamba serve's chat page (GET /) in jsdom: questions whose answers fail (the test's server breaks off
// the first answer with an error event after some text; a max_tokens of 0 is refused with a 400 before any text),
// each followed by a question that is answered. Prints, for every question, what the page showed just before it
// was sent and the messages of the request it sent. Run by tests/models/test_webui.py;
// node webui_error_drive.js BASE_URL IMAGE
const fs = require("fs");
const {openPage, sleep, until, summary} = require("./webui_jsdom");
const [base, imagePath] = process.argv.slice(2);
(async () => {
  const {w, d, $, bodies} = await openPage(base);
  const file = new w.File([fs.readFileSync(imagePath)], "cat.png", {type: "image/png"});
  Object.defineProperty($("image"), "files", {value: [file]});
  $("image").dispatchEvent(new w.Event("change"));
  await until(() => $("preview").style.display === "block");
  const turns = () => [...d.querySelectorAll("#log .turn")].map((e) => [e.className, e.textContent]);
  const asked = [];
  async function ask(text, maxTokens) {
    $("max_tokens").value = maxTokens;
    const shown = turns(), n = bodies.length;
    $("prompt").value = text;
    $("prompt").dispatchEvent(new w.KeyboardEvent("keydown", {key: "Enter"}));
    await until(() => bodies.length === n + 1);
    await sleep(20);
    await until(() => !$("send").disabled);
    asked.push({shown, body: summary(bodies[n])});
  }
  await ask("First question?", "4");   // broken off by the server after some text
  await ask("Second question?", "4");
  await ask("Third question?", "0");   // refused: 400
  await ask("Fourth question?", "4");
  process.stdout.write(JSON.stringify({asked, shown: turns()}) + "\n", () => process.exit(0));
})().catch((e) => { console.error(e); process.exit(1); });
