// A real browser for end-to-end tests of the web page: Debian's Chromium package driven by playwright-core.
// Playwright never downloads a browser here; the tests use the distribution's binary (`apt-get install -y chromium`).
//
// Why `chromium.launch` and not `launchPersistentContext`: `launch` already starts Chromium with a fresh,
// private --user-data-dir (a temp dir "playwright_chromiumdev_profile-*" that Playwright creates for this launch
// and removes when the browser closes), and it returns a Browser on which every test can open its own
// isolated BrowserContext with its own viewport, locale and extra HTTP headers. A persistent context would
// give a single context whose locale is fixed at launch. Playwright refuses "--user-data-dir" in `args` and
// sets it itself, so the profile is never the user's ~/.config/chromium.
//
// Typical use:
//   const session = await launchChromium();
//   t.teardown(() => session.close());
//   const page = await newPage(session, { viewport: PHONE, locale: 'ja', headers: { 'X-Forwarded-For': '203.0.113.7' } });
//   await page.goto(url);
//   await screenshot(page, 'login-phone');
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Browser, type BrowserContext, type Page, chromium } from 'playwright-core';

/** The repository root (as in ./daemon.ts, computed here so this helper loads without the daemon's modules). */
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** Where screenshots go: <repo>/test-artifacts/screenshots (created on load; test-artifacts/ is git-ignored). */
export const SCREENSHOT_DIR: string = path.join(ROOT, 'test-artifacts', 'screenshots');
fs.mkdirSync(SCREENSHOT_DIR, { recursive: true });

/** Debian's package puts its launcher here. */
export const CHROMIUM_PATH = '/usr/bin/chromium';

/** Flags for a quiet, deterministic headless browser that talks to nothing but the pages a test opens. */
export const CHROMIUM_ARGS: readonly string[] = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** A phone (390x844) and a desktop (1280x900) viewport for screenshots. */
export const PHONE = { width: 390, height: 844 } as const;
export const DESKTOP = { width: 1280, height: 900 } as const;

export interface BrowserSession {
  browser: Browser;
  /** Closes every context and page, then the browser; Playwright removes the temp profile dir. Idempotent. */
  close(): Promise<void>;
}

export interface PageOptions {
  /** Default: DESKTOP (1280x900); PHONE is 390x844. */
  viewport?: { width: number; height: number };
  /**
   * Extra headers on every request of the page's context (navigations, form posts, fetches), e.g.
   * { 'X-Forwarded-For': '203.0.113.7' }. An 'Accept-Language' here is sent exactly as given; it cannot be
   * combined with `locale` (newPage throws), because Chromium then sends one or the other at random.
   */
  headers?: Record<string, string>;
  /**
   * navigator.language(s), Intl, and the Accept-Language header, sent exactly as given ('ja', not 'ja,en;q=0.9').
   * Without `locale` (and without an Accept-Language in `headers`) Chromium sends 'en-US,en;q=0.9'.
   * For the same race, never page.setExtraHTTPHeaders({ 'Accept-Language': ... }) on a page with a locale:
   * open a new page instead. Other headers (X-Forwarded-For) can be changed per page at any time.
   */
  locale?: string;
}

/** The Chromium binary: Debian's /usr/bin/chromium, else `chromium` on PATH; an Error telling how to install it. */
export function findChromium(): string {
  const onPath = (process.env.PATH ?? '').split(path.delimiter).filter(Boolean);
  const candidates = [CHROMIUM_PATH, ...onPath.map((dir) => path.join(dir, 'chromium'))];
  for (const file of candidates) {
    try {
      fs.accessSync(file, fs.constants.X_OK);
      if (fs.statSync(file).isFile()) return file;
    } catch {
      // not this one
    }
  }
  throw new Error(
    `Chromium not found (neither ${CHROMIUM_PATH} nor "chromium" on PATH). The browser tests need it: apt-get install -y chromium`,
  );
}

/** Launches Debian's Chromium headless with a fresh --user-data-dir (a temp dir removed on close). */
export async function launchChromium(): Promise<BrowserSession> {
  const browser = await chromium.launch({
    executablePath: findChromium(),
    headless: true,
    args: [...CHROMIUM_ARGS],
    // Playwright's default signal handlers stay on: a test killed by tap's timeout still takes Chromium and
    // its temp profile with it.
    timeout: 60_000,
  });
  let closing: Promise<void> | undefined;
  return {
    browser,
    close() {
      closing ??= (async () => {
        for (const context of browser.contexts()) await context.close().catch(() => undefined);
        await browser.close();
      })();
      return closing;
    },
  };
}

/** A new isolated context (own cookies, viewport, locale, headers) with one page in it; closed with the session. */
export async function newPage(session: BrowserSession, o: PageOptions = {}): Promise<Page> {
  if (o.locale !== undefined && Object.keys(o.headers ?? {}).some((h) => h.toLowerCase() === 'accept-language')) {
    throw new Error('newPage: give either `locale` or an Accept-Language header, not both (Chromium races them)');
  }
  const context: BrowserContext = await session.browser.newContext({
    viewport: o.viewport ?? DESKTOP,
    ...(o.locale !== undefined ? { locale: o.locale } : {}),
    ...(o.headers !== undefined ? { extraHTTPHeaders: o.headers } : {}),
  });
  return context.newPage();
}

/** page.screenshot({ path: SCREENSHOT_DIR/<name>.png, fullPage: true }) and returns the path. */
export async function screenshot(page: Page, name: string): Promise<string> {
  const file = path.join(SCREENSHOT_DIR, `${name.replace(/\.png$/i, '')}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

// ---- accessibility -------------------------------------------------------------------------------------------

let axeSource: string | undefined;

export interface AxeViolation {
  id: string;
  impact: string | null;
  help: string;
  /** CSS selectors of the offending elements. */
  targets: string[];
}

/**
 * Runs axe-core's WCAG 2.x A and AA rules on the page as it is now and returns the violations (empty: none).
 * The script goes in through the DevTools protocol (page.evaluate), which the page's own strict CSP does not
 * govern, so the page under test keeps its real headers.
 */
export async function accessibilityViolations(page: Page, o: { within?: readonly string[] } = {}): Promise<AxeViolation[]> {
  axeSource ??= fs.readFileSync(path.join(ROOT, 'node_modules/axe-core/axe.min.js'), 'utf8');
  await page.evaluate(axeSource);
  // `within`: only these parts of the page (CSS selectors), e.g. what a plugin renders inside another
  // application's page; by default the whole document.
  const context = o.within ? JSON.stringify({ include: o.within.map((s) => [s]) }) : 'document';
  const result = (await page.evaluate(`axe.run(${context}, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } })`)) as {
    violations: { id: string; impact: string | null; help: string; nodes: { target: string[] }[] }[];
  };
  return result.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, targets: v.nodes.flatMap((n) => n.target) }));
}
