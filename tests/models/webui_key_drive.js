// Drives emma-mamba serve's chat page (GET /) in jsdom against a server that needs an API key: the model label
// before and after the key is entered, and an Enter that confirms an input method's composition (isComposing) is
// not a send while a plain Enter is. Run by tests/models/test_webui.py; node webui_key_drive.js BASE_URL KEY
const {openPage, sleep, until} = require("./webui_jsdom");
const [base, key] = process.argv.slice(2);
(async () => {
  const {w, $, bodies} = await openPage(base);
  await until(() => !$("model").textContent.includes("(loading)"));
  const before = $("model").textContent;
  $("key").value = key;
  $("key").dispatchEvent(new w.Event("change"));
  await until(() => $("model").textContent !== before);
  const after = $("model").textContent;
  $("prompt").value = "にほ";
  $("prompt").dispatchEvent(new w.KeyboardEvent("keydown", {key: "Enter", isComposing: true}));
  await sleep(300);
  const composing = bodies.length;
  $("prompt").dispatchEvent(new w.KeyboardEvent("keydown", {key: "Enter"}));
  await until(() => bodies.length === composing + 1);
  await until(() => !$("send").disabled);
  process.stdout.write(JSON.stringify({before, after, composing, sent: bodies.length,
                                       asked: bodies.map((b) => b.messages.at(-1).content)}) + "\n",
                       () => process.exit(0));
})().catch((e) => { console.error(e); process.exit(1); });
