// Drives emma-mamba serve's chat page (GET /) in jsdom against a live server: loads it, picks an image, asks,
// follows up; prints what the page shows as JSON. Run by tests/models/test_webui.py where jsdom can be required
// (e.g. `npm install jsdom` and NODE_PATH=<that folder>/node_modules); node drive.js BASE_URL IMAGE_FILE
const fs = require("fs");
const {openPage, sleep} = require("./webui_jsdom");
const [base, imagePath] = [process.argv[2], process.argv[3]];
(async () => {
  const {w, d, $} = await openPage(base);
  // the page fetches the model's name when it loads: wait for it (no fixed sleep: a busy machine answers late)
  for (let i = 0; i < 400 && $("model").textContent === "model: (loading)"; i++) await sleep(50);
  const out = {model: $("model").textContent};
  // pick an image: a File in the input, then its change event
  const bytes = fs.readFileSync(imagePath);
  const file = new w.File([bytes], "cat.png", {type: "image/png"});
  Object.defineProperty($("image"), "files", {value: [file]});
  $("image").dispatchEvent(new w.Event("change"));
  for (let i = 0; i < 400 && $("preview").style.display !== "block"; i++) await sleep(50);
  out.preview = $("preview").src.slice(0, 22);
  $("max_tokens").value = "6"; $("temperature").value = "1"; $("seed").value = "3";
  async function ask(text) {
    $("prompt").value = text;
    $("prompt").dispatchEvent(new w.KeyboardEvent("keydown", {key: "Enter"}));
    for (let i = 0; i < 400 && $("send").disabled !== false || i === 0; i++) await sleep(50);
    for (let i = 0; i < 400 && $("send").disabled; i++) await sleep(50);
  }
  await ask("What is in the picture?");
  await ask("And its colour?");
  out.turns = [...d.querySelectorAll("#log .turn")].map((e) => [e.className, e.textContent]);
  console.log(JSON.stringify(out));
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
