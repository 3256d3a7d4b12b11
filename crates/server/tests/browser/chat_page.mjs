// Drives camelid's chat page in headless Chromium. Run by crates/server/tests/chat_page.rs:
//   node chat_page.mjs BASE_URL MODEL_ID KEYED_BASE_URL API_KEY   (env CHROMIUM: the browser)
// KEYED_BASE_URL is a second server started with --api-key API_KEY.
// Exits non-zero with a message on the first failed check.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, modelId, keyedBase, apiKey] = process.argv.slice(2);
if (!base || !modelId || !keyedBase || !apiKey) {
  console.error("usage: node chat_page.mjs BASE_URL MODEL_ID KEYED_BASE_URL API_KEY");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = 180_000; // a generous bound for a reply on a slow, shared CPU

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

async function metric(name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  if (!line) throw new Error(`metric ${name} missing`);
  return Number(line.split(" ")[1]);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, f, ms = WAIT) {
  const end = Date.now() + ms;
  for (;;) {
    if (await f()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

const userDataDir = mkdtempSync(join(tmpdir(), "camelid-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = false;
try {
  const page = context.pages()[0] || (await context.newPage());
  const origin = new URL(base).origin;
  const foreign = [], pageErrors = [], chatBodies = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(origin)) foreign.push(r.url());
    if (r.url().endsWith("/v1/chat/completions")) chatBodies.push(r.postDataJSON());
  });
  page.on("pageerror", (e) => pageErrors.push(String(e)));

  const messages = () =>
    page.$$eval("#log .msg", (els) =>
      els.map((e) => ({ role: e.querySelector(".role").textContent, content: e.querySelector(".content").textContent })));
  const idle = () =>
    page.evaluate(() => !document.getElementById("send").disabled && document.getElementById("stop").disabled);
  const lastReply = () =>
    page.evaluate(() => {
      const all = document.querySelectorAll("#log .msg.assistant .content");
      return all.length ? all[all.length - 1].textContent : null;
    });

  // 1. The page loads and fills the model picker from /v1/models.
  await page.goto(`${base}/`);
  await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0, null, { timeout: 30_000 });
  check((await page.inputValue("#model")) === modelId, `the model picker offers ${modelId}`);
  check((await messages()).length === 0, "a fresh browser starts with an empty conversation");

  // 2. A typed message gets a streamed reply, equal to the API's greedy reply.
  const systemPrompt = "You are a concise assistant.";
  const question = "Name three colors.";
  await page.fill("#system", systemPrompt);
  await page.fill("#temperature", "0");
  await page.fill("#max-tokens", "40");
  // Record every text the reply shows while it streams.
  await page.evaluate(() => {
    window.__seen = [];
    // Every text the page set, from the mutation records: the page replaces the reply's text
    // node on each streamed piece, and several pieces may arrive between two callbacks.
    new MutationObserver((records) => {
      for (const r of records) {
        if (r.type !== "childList" || !r.target.matches?.("#log .msg.assistant .content")) continue;
        for (const n of r.addedNodes) {
          const t = n.textContent;
          if (t && window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
        }
      }
    }).observe(document.getElementById("log"), { childList: true, subtree: true, characterData: true });
    // A short reply can start and end between two polls, so the stop button's enabling is
    // recorded as it happens rather than polled for.
    window.__stopEnabled = false;
    const stop = document.getElementById("stop");
    new MutationObserver(() => {
      if (!stop.disabled) window.__stopEnabled = true;
    }).observe(stop, { attributes: true, attributeFilter: ["disabled"] });
  });
  await page.fill("#input", question);
  await page.press("#input", "Enter");
  await until("the stop button to be enabled", () => page.evaluate(() => window.__stopEnabled), 30_000);
  await until("the reply to finish", idle);
  const reply = await lastReply();
  const seen = await page.evaluate(() => window.__seen);
  check(typeof reply === "string" && reply.length > 0, `the reply ends non-empty (${JSON.stringify(reply)})`);
  check(seen.length >= 2, `the reply grew across ${seen.length} observations (at least 2)`);
  check(seen.every((t, i) => i === 0 || (t.startsWith(seen[i - 1]) && t.length > seen[i - 1].length)),
    "each observation extends the previous one");
  check(seen[seen.length - 1] === reply, "the last observation is the final reply");
  const sent = chatBodies[0];
  check(sent && sent.stream === true && sent.model === modelId && sent.temperature === 0 && sent.max_tokens === 40,
    `the request streams with the picked model, temperature 0 and max_tokens 40 (${JSON.stringify(sent)})`);
  check(JSON.stringify(sent.messages) === JSON.stringify([
    { role: "system", content: systemPrompt }, { role: "user", content: question }]),
    "the request carries the system prompt and the message");
  const api = await (await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: modelId, messages: sent.messages, temperature: 0, max_tokens: 40 }),
  })).json();
  check(api.choices[0].message.content === reply, "the page shows exactly the API's reply to the same request");

  // 3. The stop button ends a long generation, and the server cancels the sequence.
  const cancelledBefore = await metric("camelid_sequences_cancelled_total");
  await page.route("**/v1/chat/completions", (route) => {
    const body = route.request().postDataJSON();
    route.continue({ postData: JSON.stringify({ ...body, ignore_eos: true }) });
  });
  await page.fill("#max-tokens", "4000");
  await page.fill("#input", "Tell me a long story about a camel.");
  await page.click("#send");
  await until("the long reply to stream", async () => !(await idle()) && ((await lastReply()) || "").length >= 20);
  await page.click("#stop");
  await until("the page to stop", idle, 30_000);
  const stopped = await lastReply();
  check((await page.textContent("#status")) === "stopped", "the status says stopped");
  await sleep(1500);
  check((await lastReply()) === stopped, "the reply no longer grows after stop");
  await until("the server to cancel the sequence", async () =>
    (await metric("camelid_sequences_cancelled_total")) === cancelledBefore + 1 &&
    (await metric("camelid_running_sequences")) === 0, 30_000);
  console.log("ok: the server counted one cancelled sequence and runs none");
  await page.unroute("**/v1/chat/completions");
  const before = await messages();
  check(before.length === 4 && before[3].role === "assistant" && before[3].content === stopped,
    "the stopped reply stays in the conversation");

  // 4. The conversation and settings survive a reload.
  await page.reload();
  await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0, null, { timeout: 30_000 });
  check(JSON.stringify(await messages()) === JSON.stringify(before), "the conversation survives a reload");
  check((await page.inputValue("#system")) === systemPrompt && (await page.inputValue("#temperature")) === "0",
    "the system prompt and temperature survive a reload");
  // For a look by eye; nothing is asserted on pixels.
  if (process.env.CHAT_PAGE_SCREENSHOT) await page.screenshot({ path: process.env.CHAT_PAGE_SCREENSHOT });

  // 5. Clear conversation empties it, also after a reload.
  await page.click("#clear");
  check((await messages()).length === 0, "clear conversation empties the page");
  await page.reload();
  await page.waitForSelector("#model option", { state: "attached", timeout: 30_000 });
  check((await messages()).length === 0, "the cleared conversation stays cleared after a reload");

  check(foreign.length === 0, `the page requests nothing outside the server (${foreign.join(", ")})`);

  // 6. A server that needs an API key: the page says so, and works once the key is entered.
  const keyed = await context.newPage();
  keyed.on("pageerror", (e) => pageErrors.push(String(e)));
  const auth = [];
  keyed.on("request", (r) => {
    if (r.url().includes("/v1/")) auth.push(r.headers()["authorization"] || "");
  });
  await keyed.goto(`${keyedBase}/`);
  const keyedStatus = () => keyed.textContent("#status");
  await until("the page to ask for a key", async () => (await keyedStatus()).includes("needs an API key"), 30_000);
  check((await keyed.$$("#model option")).length === 0, "without the key the model picker stays empty");
  await keyed.fill("#api-key", "wrong");
  await keyed.dispatchEvent("#api-key", "change");
  await until("the page to refuse the wrong key", async () => (await keyedStatus()).includes("refused"), 30_000);
  await keyed.fill("#api-key", apiKey);
  await keyed.dispatchEvent("#api-key", "change");
  await keyed.waitForFunction(() => document.querySelectorAll("#model option").length > 0, null, { timeout: 30_000 });
  await keyed.fill("#max-tokens", "4");
  await keyed.fill("#input", "Hi");
  await keyed.press("#input", "Enter");
  const keyedReply = () =>
    keyed.evaluate(() => {
      const all = document.querySelectorAll("#log .msg.assistant .content");
      return all.length ? all[all.length - 1].textContent : "";
    });
  await until("the keyed reply", async () =>
    (await keyed.evaluate(() => !document.getElementById("send").disabled)) && (await keyedReply()).length > 0);
  check(auth[auth.length - 1] === `Bearer ${apiKey}`, `the chat request carries the key (${auth.join(" | ")})`);
  console.log("ok: with the key entered, the page lists the models and chats");
  check(pageErrors.length === 0, `no script errors (${pageErrors.join("; ")})`);

} catch (e) {
  failed = true;
  console.error(e.stack || String(e));
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
