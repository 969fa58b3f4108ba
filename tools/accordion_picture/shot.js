const { chromium } = require('playwright-core');
(async () => {
  const [url, out] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 800, height: 1400 }, deviceScaleFactor: 1 });
  await page.goto(url, { waitUntil: 'networkidle', timeout: 60000 });
  await page.waitForSelector('#charadapter_txt2img_accordion-visible-checkbox', { timeout: 30000 });
  await page.waitForTimeout(1500);
  await page.addStyleTag({ content: '#shot { padding: 8px; }' });
  const el = await page.$('#shot');
  await el.screenshot({ path: out });
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
