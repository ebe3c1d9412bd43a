// Mail sending, by real delivery: the service's real SMTP mailer hands the messages to a real Postfix, which
// delivers them to a Maildir; the test reads them back, decodes them as a mail program would (MIME headers,
// base64 body) and uses the codes it finds: confirm the external address, then pass MFA with an e-mailed code.
import t from 'tap';
import { createMailer } from '../../mfa/mailer.js';
import { jst, OTP_SUBJECT } from '../../mfa/messages.js';
import { type MailStack, startMailStack } from '../helpers/mailstack.js';
import { codeIn, errorCode, type Harness, IP, MINUTE, mfaHarness, parseMail, settle } from '../helpers/mfa.js';

t.test('parseMail decodes what nodemailer writes (self-check of the test reader)', async (t) => {
  const raw = [
    'Return-Path: <mfagate@mail.test>',
    'Subject: =?UTF-8?Q?OTP_notification_=28OTP=E7=99=BA=E8=A1=8C=E3=81=AE?=',
    ' =?UTF-8?Q?=E3=81=8A=E7=9F=A5=E3=82=89=E3=81=9B=29?=',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: base64',
    '',
    Buffer.from('OTP: 123456\n有効期限').toString('base64'),
    '',
  ].join('\r\n');
  const m = parseMail(raw);
  t.equal(m.headers.get('subject'), OTP_SUBJECT);
  t.equal(m.text, 'OTP: 123456\n有効期限');
  t.equal(parseMail('Subject: =?utf-8?B?' + Buffer.from('確認').toString('base64') + '?=\n\nhi').headers.get('subject'), '確認');
});

let stack: MailStack;
let h: Harness;
const mailer = { close() {} } as { close(): void };

t.before(async () => {
  stack = await startMailStack({
    users: { alice: 'alice-pw', bob: 'bob-pw' },
    // The stack accepts mail only from SASL-authenticated clients; the site's MTA trusts mfagate by its network.
    postfixExtra: 'smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, reject',
  });
});

t.teardown(async () => {
  mailer.close();
  h?.close();
  await stack?.stop();
});

t.test('real delivery: confirm the external address and pass MFA with the code read from the real mailbox', async (t) => {
  const smtp = `smtp://127.0.0.1:${stack.smtpPort}`;
  const real = createMailer(smtp, 'mfagate@mail.test');
  mailer.close = () => real.close();
  h = mfaHarness({
    toml: `[otp]\nrefused_email_domains = ["kit.ac.jp", "edu.kit.ac.jp"]\n[mail]\nsmtp = "${smtp}"\nfrom = "mfagate@mail.test"\n`,
    mailer: real,
  });
  const external = `bob@${stack.domain}`;
  t.notOk(h.config.otp.refusedEmailDomains.some((d) => stack.domain === d || stack.domain.endsWith(`.${d}`)), 'the stack domain is not refused');
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, 'alice@edu.kit.ac.jp', undefined)), 'refused-domain', 'a campus address is');

  // 1. Register the address: the confirmation code arrives in bob's Maildir.
  await h.svc.emailRegister('alice', IP, external, undefined);
  const confirmRaw = await stack.waitForMessage('bob', (m) => parseMail(m).headers.get('subject')?.includes('外部メールアドレスの確認') ?? false);
  const confirm = parseMail(confirmRaw);
  t.match(confirm.headers.get('from'), 'mfagate@mail.test');
  t.match(confirm.headers.get('to'), external);
  const confirmCode = codeIn(confirm.text);
  t.match(confirmCode, /^\d{6}$/);
  t.equal(confirmRaw.indexOf(confirmCode), -1, 'the code is not readable in the raw message (the body is base64)');
  t.same(await h.svc.emailConfirm('alice', IP, confirmCode), { address: 'b***@mail.test' });

  // 2. Ask for a login code: the OTP notification arrives; decode it and use the code it carries.
  h.advance(MINUTE);
  const before = stack.messages('bob').length;
  await h.svc.sendLoginCode('alice', IP);
  const otpRaw = await stack.waitForMessage('bob', (m) => parseMail(m).headers.get('subject') === OTP_SUBJECT);
  t.equal(stack.messages('bob').length, before + 1, 'one new message');
  t.match(otpRaw, /^Subject: =\?UTF-8\?/im, 'the subject travelled MIME-encoded');
  t.match(otpRaw, /^Content-Transfer-Encoding: base64/im);
  const otp = parseMail(otpRaw);
  t.equal(otp.headers.get('subject'), 'OTP notification (OTP発行のお知らせ)');
  const code = codeIn(otp.text);
  t.match(code, /^\d{6}$/);
  const expiry = jst(h.clock.now + 10 * MINUTE);
  t.match(otp.text, `  OTP: ${code}`);
  t.equal(otp.text.split(code).length - 1, 2, 'the code in both languages');
  t.match(otp.text, `有効期限: ${expiry}`, 'the expiry, in Japanese');
  t.match(otp.text, `Valid until: ${expiry}`, 'and in English');
  t.match(otp.text, `要求元 IP アドレス: ${IP}`, 'the requesting address, in Japanese');
  t.match(otp.text, `Requested from IP address: ${IP}`, 'and in English');
  t.match(otp.text, /alice 様/);
  t.match(otp.text, /Dear alice,/);

  // 3. The code from the mailbox passes MFA and creates the grant.
  h.advance(MINUTE);
  const g = await h.svc.verify('alice', IP, { method: 'email', code });
  t.match(g, { method: 'email', ip: IP, block: IP });
  t.match(await h.svc.status('alice', IP), { login: { needs_mfa: false }, grants: [{ id: g.id }] });
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'email', code })), 'factor-failed', 'and only once');

  // 4. The grant notice goes out too (fire and forget): wait for it so the mailer is idle before the stack stops.
  const notice = parseMail(await stack.waitForMessage('bob', (m) => parseMail(m).headers.get('subject')?.includes('多要素認証のお知らせ') ?? false));
  t.match(notice.text, `IP address: ${IP}`);
  await settle();
  t.notOk(h.lines.some((l) => l.includes('"level":"warn"') || l.includes('"level":"error"')), 'nothing went wrong on the way');
  t.equal(stack.messages('alice').length, 0, "nothing went to alice's own (campus) mailbox");
});

t.test('a refused delivery is an error and nothing is stored', async (t) => {
  // The stack delivers only to its users: an unknown recipient is refused at RCPT.
  const before = h.store.db.prepare('SELECT count(*) AS n FROM email_codes').get() as { n: number };
  t.equal(await errorCode(() => h.svc.emailRegister('carol', IP, `nobody-here@${stack.domain}`, undefined)), 'mail-failed');
  t.same(h.store.db.prepare('SELECT count(*) AS n FROM email_codes').get(), before, 'no code stored');
  t.equal(await h.records.mfa.factors('carol'), undefined, 'no pending address');
});
