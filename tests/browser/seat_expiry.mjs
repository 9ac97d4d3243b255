// The sale page in a real browser (issue 13), run by tests/browser.rs against its own stack:
// two visitors on one schedule. A queues, holds seat 1 and lets the hold expire; B watches seat 1
// turn HELD and then AVAILABLE without reloading, holds it and pays; A then sees it SOLD and its
// RESERVATION_EXPIRED notification.
//
// Pages are driven the way a person uses them: by roles and visible text. Every wait is on a
// condition, never on time. On failure both pages are saved as screenshots in $SCREENSHOT_DIR.
//
// Environment: BASE_URL (the api), SCREENSHOT_DIR, STEP_TIMEOUT_MS (longest wait for one condition).
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const base = process.env.BASE_URL;
const shots = process.env.SCREENSHOT_DIR || '.';
const timeout = Number(process.env.STEP_TIMEOUT_MS || 30000);
if (!base) throw new Error('BASE_URL is not set');

// Debian's Chromium, never a downloaded one. Playwright gives each launch a fresh temporary
// --user-data-dir (and removes it at close); the flags keep the browser from reaching out.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

const pages = {};
let step = 'start';
const log = (msg) => console.log(`[browser] ${msg}`);

async function visitor(name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('console', (m) => { if (m.type() === 'error') log(`${name} console: ${m.text()}`); });
  page.on('pageerror', (e) => log(`${name} page error: ${e.message}`));
  pages[name] = page;
  await page.goto(base);
  // A marker that only survives as long as the page is never reloaded.
  await page.evaluate(() => { window.__notReloaded = true; });
  return page;
}

const seat = (page, no, status) => page.getByRole('button', { name: `Seat ${no}: ${status}`, exact: true });

async function openSchedule(page) {
  await page.getByRole('button', { name: /^Browser test concert, / }).click();
  await seat(page, 1, 'available').waitFor();
  // The seat map's own status line says the stream is connected.
  await page.getByRole('status').filter({ hasText: /^live$/ }).waitFor();
}

async function signUpAndQueue(page, name) {
  await page.getByLabel('Your name').fill(name);
  await page.getByRole('button', { name: 'Sign up' }).click();
  await page.getByText(`Signed in as ${name}`).waitFor();
  await page.getByRole('button', { name: 'Enter the queue' }).click();
  await page.getByText(/^Your turn: pick an available seat/).waitFor();
}

try {
  step = 'both visitors open the schedule';
  const a = await visitor('a');
  const b = await visitor('b');
  await openSchedule(a);
  await openSchedule(b);

  step = 'both sign up and are admitted from the queue';
  await signUpAndQueue(a, 'Alice');
  await signUpAndQueue(b, 'Bob');
  await b.getByRole('button', { name: 'Charge 100,000 points (demo)' }).click();
  await b.getByText('Balance: 100,000 points').waitFor();

  step = 'A holds seat 1';
  await seat(a, 1, 'available').click();
  await a.getByText(/^Expires in \d+:\d\d$/).waitFor();

  step = 'B sees seat 1 turn HELD';
  await seat(b, 1, 'held').waitFor();
  log('B saw seat 1 HELD');

  step = "B sees seat 1 AVAILABLE again once A's hold expired";
  await seat(b, 1, 'available').waitFor();
  log('B saw seat 1 AVAILABLE');

  step = 'B holds seat 1 and pays';
  await seat(b, 1, 'available').click();
  await b.getByRole('button', { name: /^Pay [\d,]+ points$/ }).click();
  await b.locator('.reservation').getByText('CONFIRMED', { exact: true }).waitFor();

  step = 'A sees seat 1 SOLD and its RESERVATION_EXPIRED notification';
  await seat(a, 1, 'sold').waitFor();
  await a.getByRole('listitem').filter({ hasText: 'RESERVATION_EXPIRED' }).filter({ hasText: '예약 만료' }).waitFor();
  await a.locator('.reservation').getByText('EXPIRED', { exact: true }).waitFor();

  step = 'neither page was reloaded';
  for (const [name, page] of Object.entries(pages)) {
    if (!(await page.evaluate(() => window.__notReloaded === true))) throw new Error(`page ${name} was reloaded`);
  }
  // DOCS_SCREENSHOT=docs/screenshot.png saves the README's picture of the page (page B, the buyer).
  if (process.env.DOCS_SCREENSHOT) await pages.b.screenshot({ path: process.env.DOCS_SCREENSHOT });
  log('scenario passed');
  await browser.close();
} catch (e) {
  console.error(`[browser] FAILED at step "${step}": ${e.message}`);
  mkdirSync(shots, { recursive: true });
  for (const [name, page] of Object.entries(pages)) {
    const path = join(shots, `page-${name}.png`);
    await page.screenshot({ path, fullPage: true }).catch(() => {});
    console.error(`[browser] screenshot of page ${name}: ${path}`);
  }
  await browser.close();
  process.exit(1);
}
