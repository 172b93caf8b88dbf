// Drives emma-mamba serve's chat page (GET /) in a real headless Chromium against a live server, through
// puppeteer-core: loads it, picks an image through the file input, types a question and a follow-up and presses
// Enter; prints what the page shows as JSON and saves a screenshot. Run by tests/models/test_webui.py where
// Chromium and puppeteer-core are installed (npm install puppeteer-core; NODE_PATH; CHROMIUM=/usr/bin/chromium):
// node webui_browser.js BASE_URL IMAGE_FILE SCREENSHOT_PNG
const puppeteer = require("puppeteer-core");
const [base, imagePath, shot] = [process.argv[2], process.argv[3], process.argv[4]];
(async () => {
  const browser = await puppeteer.launch({executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true, args: ["--no-sandbox", "--disable-gpu"]});
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("response", (r) => { if (r.status() >= 400) errors.push(`${r.status()} ${r.url()}`); });
    await page.setViewport({width: 1000, height: 760});
    await page.goto(base + "/", {waitUntil: "networkidle0"});
    await page.waitForFunction(() => document.getElementById("model").textContent.startsWith("model:"));
    const out = {model: await page.$eval("#model", (e) => e.textContent), userAgent: await browser.version()};
    const input = await page.$("#image");
    await input.uploadFile(imagePath);
    await page.waitForFunction(() => document.getElementById("preview").style.display === "block");
    out.preview = await page.$eval("#preview", (e) => e.src.slice(0, 22));
    for (const [id, v] of [["max_tokens", "6"], ["temperature", "1"], ["seed", "3"]]) {
      await page.$eval("#" + id, (e, v) => { e.value = v; }, v);
    }
    async function ask(text) {
      const before = await page.$$eval("#log .turn.assistant", (es) => es.length);
      await page.click("#prompt");
      await page.keyboard.type(text);
      await page.keyboard.press("Enter");
      await page.waitForFunction((n) => document.querySelectorAll("#log .turn.assistant").length > n
        && !document.getElementById("send").disabled, {timeout: 60000}, before);
    }
    await ask("What is in the picture?");
    await ask("And its colour?");
    out.turns = await page.$$eval("#log .turn", (es) => es.map((e) => [e.className, e.textContent]));
    out.errors = errors;
    await page.screenshot({path: shot});
    console.log(JSON.stringify(out));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
