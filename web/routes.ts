// The MFA page for a signed-in user: the home page (does this network need MFA, pass it), the settings
// (個人環境の設定: enable MFA, the app, the external address, backup codes, the status table) and every form
// behind them. Each step calls MfaService; what a user reads for its errors comes from the kit.
import { MfaError } from '../mfa/service.js';
import { blockOf, parseAddress } from '../policy/address.js';
import { isTrustedNetwork } from '../policy/decide.js';
import type { Ctx, Handler, Kit, Routed } from './context.js';
import { passcodeShownPage, passcodesSection } from './passcode-pages.js';
import * as pages from './pages.js';

/** An app enrolment shown longer than this is stale (MfaService keeps the pending secret 15 minutes). */
const ENROLMENT_MS = 15 * 60_000;

export function signedInRoutes(k: Kit): { get: Record<string, Handler>; post: Record<string, Handler> } {
  const { d, clock, sessions, derived, send, redirect, view, notify, toSignIn, errorMessage, statusOf, value } = k;

  // ---- models ----------------------------------------------------------------------------------------------

  function onTrustedNetwork(ip: string): boolean {
    const a = parseAddress(ip);
    return a !== undefined && isTrustedNetwork(derived().settings, a);
  }

  function ipBlock(ip: string): string {
    const a = parseAddress(ip);
    return a ? blockOf(a, derived().settings.prefixes) : ip;
  }

  /** The last login code sent from this session, while it is still valid (the page asks for it). */
  const liveEmailSent = (c: Ctx) => (c.session?.emailSent && c.session.emailSent.expiresAt > clock() ? c.session.emailSent : undefined);

  async function homeModel(c: Routed): Promise<pages.HomeModel> {
    const st = await d.mfa.status(c.user, c.ip);
    const block = ipBlock(c.ip);
    const emailSent = liveEmailSent(c);
    const m: pages.HomeModel = {
      ip: c.ip,
      state: 'need',
      mfaEnabled: st.mfa_enabled,
      totp: st.factors.totp,
      email: st.factors.email,
      backupLeft: st.factors.backup_codes_left,
      ttlHours: Math.round(d.config().grants.ttlMs / 3600_000),
      ...(emailSent ? { emailSent } : {}),
    };
    const rule = st.login?.rule;
    if (onTrustedNetwork(c.ip) || rule === 'trusted-network' || rule === 'webmail-host') m.state = 'trusted';
    else if (rule === 'grant') {
      m.state = 'grant';
      m.grantUntil = Math.max(0, ...st.grants.filter((g) => g.block === block).map((g) => Date.parse(g.expires_at)));
    } else if (rule === 'user-exempt') m.state = 'exempt';
    else if (rule === 'enforcement-off' || rule === 'protocol-not-enforced') m.state = 'not-enforced';
    else if (rule === 'mfa-not-required') m.state = 'not-enabled';
    return m;
  }

  async function settingsModel(c: Routed): Promise<pages.SettingsModel> {
    const st = await d.mfa.status(c.user);
    const emailSent = liveEmailSent(c);
    return {
      ipBlock: ipBlock(c.ip),
      mfaEnabled: st.mfa_enabled,
      siteRequired: st.mfa_required && !st.mfa_enabled,
      totp: st.factors.totp,
      email: st.factors.email,
      emailPending: st.factors.email_pending,
      backupLeft: st.factors.backup_codes_left,
      grants: st.grants,
      registrationBlocked: d.config().web.firstRegistration === 'trusted-only' && !onTrustedNetwork(c.ip),
      ...(emailSent ? { emailSent } : {}),
    };
  }

  const renderHome = async (c: Routed, status = 200, errors: Record<string, string> = {}) =>
    send(c, status, pages.homePage(view(c, 'home', errors), await homeModel(c)));
  const renderSettings = async (c: Routed, status = 200, errors: Record<string, string> = {}, values: Record<string, string> = {}) => {
    const v = view(c, 'settings', errors, values);
    const m = await settingsModel(c);
    const config = d.config().appPasscodes;
    const passcodes = config.enabled ? [passcodesSection(v, m, { list: await d.mfa.passcodeList(c.user), max: config.maxPerUser, defaults: config.protocols })] : [];
    send(c, status, pages.settingsPage(v, m, passcodes));
  };

  // ---- form helpers ----------------------------------------------------------------------------------------

  /** The proof a change needs once a factor is registered; undefined before the first one. */
  async function proof(c: Routed): Promise<{ method: string; code: string } | undefined> {
    const st = await d.mfa.status(c.user);
    if (!st.factors.totp && st.factors.email === null) return undefined;
    return { method: value(c, 'method'), code: value(c, 'code') };
  }

  /** Runs a settings change; an MfaError is shown next to the field it concerns (or at the top). */
  async function settingsAction(c: Routed, formId: string, action: () => Promise<void> | void, fieldFor: (e: MfaError) => string | undefined = () => undefined): Promise<void> {
    const values: Record<string, string> = {};
    for (const k of ['method', 'address', 'name']) if (c.form.has(k)) values[`${formId}.${k}`] = value(c, k);
    if (c.form.has('protocol')) values[`${formId}.protocols`] = c.form.getAll('protocol').join(',');
    try {
      await action();
    } catch (e) {
      if (!(e instanceof MfaError)) throw e;
      const fieldName = ['factor-failed', 'proof-required', 'locked'].includes(e.code) || (e.code === 'bad-request' && e.message.startsWith('factor')) ? 'code' : fieldFor(e);
      const text = errorMessage(c.t, e);
      if (fieldName) return renderSettings(c, statusOf(e), { [`${formId}.${fieldName}`]: text }, values);
      notify(c, 'error', text);
      return renderSettings(c, statusOf(e), {}, values);
    }
  }

  /**
   * The proof fields a change carries once a factor is registered (undefined before the first one). When the
   * code is empty, the form is shown again with the error next to it, and the answer is null.
   */
  async function proofOrAsk(c: Routed, formId: string, values: Record<string, string> = {}): Promise<{ method: string; code: string } | undefined | null> {
    const p = await proof(c);
    if (p && p.code === '') {
      await renderSettings(c, 400, { [`${formId}.code`]: c.t.errCode }, values);
      return null;
    }
    return p;
  }

  /** A route for a change that needs the proof fields: the code must be there, then the change runs. */
  function proofChange(formId: string, act: (c: Routed, p: { method: string; code: string } | undefined) => Promise<void>): Handler {
    return async (c) => {
      const p = await proofOrAsk(c, formId);
      if (p === null) return;
      return settingsAction(c, formId, () => act(c, p));
    };
  }

  async function firstRegistrationRefused(c: Routed): Promise<boolean> {
    if (d.config().web.firstRegistration !== 'trusted-only' || onTrustedNetwork(c.ip)) return false;
    const st = await d.mfa.status(c.user);
    if (st.factors.totp || st.factors.email !== null) return false;
    notify(c, 'error', c.t.errTrustedOnly);
    await renderSettings(c, 403);
    return true;
  }

  // ---- routes for signed-in users --------------------------------------------------------------------------

  const getRoutes: Record<string, Handler> = {
    '/': (c) => renderHome(c),
    '/settings': (c) => renderSettings(c),
    '/settings/app': (c) => {
      const e = c.session.enrolment;
      if (!e || e.startedAt + ENROLMENT_MS <= clock()) {
        delete c.session.enrolment;
        return redirect(c, '/settings');
      }
      send(c, 200, pages.enrolPage(view(c, 'other'), e));
    },
    '/settings/email': async (c) => {
      const pending = (await d.mfa.status(c.user)).factors.email_pending;
      if (pending === null) return redirect(c, '/settings');
      send(c, 200, pages.emailConfirmPage(view(c, 'other'), pending));
    },
    '/settings/passcode': (c) => {
      const shown = c.session.passcodeShown;
      if (!shown) return redirect(c, '/settings');
      // Shown once: gone from the session as soon as the page is rendered.
      delete c.session.passcodeShown;
      send(c, 200, passcodeShownPage(view(c, 'other'), shown));
    },
    '/settings/backup': (c) => {
      const codes = c.session.backupCodes;
      if (!codes) return redirect(c, '/settings');
      // Shown once: gone from the session as soon as the page is rendered.
      delete c.session.backupCodes;
      send(c, 200, pages.backupCodesPage(view(c, 'other'), codes));
    },
  };

  const postRoutes: Record<string, Handler> = {
    '/signout': (c) => {
      sessions.destroy(c.session.id);
      d.logger.log('info', 'web-signout', { user: c.user, ip: c.ip });
      // The answer clears the session cookie.
      (c as Ctx).session = undefined;
      c.staleCookie = true;
      toSignIn(c, 'signed-out');
    },
    '/verify': async (c) => {
      const method = value(c, 'method');
      const code = value(c, 'code');
      const formId = `verify-${['totp', 'email', 'backup'].includes(method) ? method : 'totp'}`;
      if (code === '') return renderHome(c, 400, { [`${formId}.code`]: c.t.errCode });
      try {
        await d.mfa.verify(c.user, c.ip, { method, code });
      } catch (e) {
        if (!(e instanceof MfaError)) throw e;
        return renderHome(c, statusOf(e), { [`${formId}.code`]: errorMessage(c.t, e) });
      }
      delete c.session.emailSent;
      notify(c, 'ok', c.t.passed);
      redirect(c, '/');
    },
    '/email-code': async (c) => {
      const back = value(c, 'return') === 'settings' ? '/settings' : '/';
      try {
        const r = await d.mfa.sendLoginCode(c.user, c.ip);
        c.session.emailSent = { to: r.sent_to, expiresAt: Date.parse(r.expires_at) };
      } catch (e) {
        if (!(e instanceof MfaError)) throw e;
        notify(c, 'error', errorMessage(c.t, e));
      }
      redirect(c, back);
    },
    '/mfa/enable': (c) =>
      settingsAction(c, 'enable', async () => {
        await d.mfa.enable(c.user, c.ip);
        notify(c, 'ok', c.t.enabledDone);
        redirect(c, '/settings');
      }),
    '/mfa/disable': proofChange('disable', async (c, p) => {
      await d.mfa.disable(c.user, c.ip, p);
      notify(c, 'ok', c.t.disabledDone);
      redirect(c, '/settings');
    }),
    '/totp/begin': async (c) => {
      if (await firstRegistrationRefused(c)) return;
      const p = await proofOrAsk(c, 'app-begin');
      if (p === null) return;
      return settingsAction(c, 'app-begin', async () => {
        const r = await d.mfa.totpBegin(c.user, c.ip, p);
        c.session.enrolment = { secret: r.secret, qrSvg: r.qr_svg, startedAt: clock() };
        redirect(c, '/settings/app');
      });
    },
    '/totp/confirm': async (c) => {
      const e = c.session.enrolment;
      if (!e) return redirect(c, '/settings');
      const code = value(c, 'code');
      const again = (status: number, text: string) => send(c, status, pages.enrolPage(view(c, 'other', { 'app-confirm.code': text }), e));
      if (code === '') return again(400, c.t.errCode);
      try {
        await d.mfa.totpConfirm(c.user, c.ip, code);
      } catch (err) {
        if (!(err instanceof MfaError)) throw err;
        if (err.code === 'conflict') {
          delete c.session.enrolment;
          notify(c, 'error', c.t.enrolExpired);
          return redirect(c, '/settings');
        }
        return again(statusOf(err), errorMessage(c.t, err));
      }
      delete c.session.enrolment;
      notify(c, 'ok', c.t.enrolDone);
      redirect(c, '/settings');
    },
    '/totp/cancel': (c) => {
      delete c.session.enrolment;
      redirect(c, '/settings');
    },
    '/totp/remove': proofChange('app-remove', async (c, p) => {
      await d.mfa.totpRemove(c.user, c.ip, p);
      notify(c, 'ok', c.t.appRemoved);
      redirect(c, '/settings');
    }),
    '/email/register': async (c) => {
      const address = value(c, 'address');
      const values = { 'email-register.address': address, 'email-register.method': value(c, 'method') };
      if (address === '') return renderSettings(c, 400, { 'email-register.address': c.t.errRequired }, values);
      if (await firstRegistrationRefused(c)) return;
      const p = await proofOrAsk(c, 'email-register', values);
      if (p === null) return;
      return settingsAction(
        c,
        'email-register',
        async () => {
          await d.mfa.emailRegister(c.user, c.ip, address, p);
          redirect(c, '/settings/email');
        },
        (e) => (e.code === 'bad-request' || e.code === 'refused-domain' || (e.code === 'conflict' && e.message.includes('already')) ? 'address' : undefined),
      );
    },
    '/email/confirm': async (c) => {
      const pending = (await d.mfa.status(c.user)).factors.email_pending;
      if (pending === null) return redirect(c, '/settings');
      const code = value(c, 'code');
      const again = (status: number, text: string) => send(c, status, pages.emailConfirmPage(view(c, 'other', { 'email-confirm.code': text }), pending));
      if (code === '') return again(400, c.t.errCode);
      try {
        const r = await d.mfa.emailConfirm(c.user, c.ip, code);
        notify(c, 'ok', c.t.emailDone(r.address));
      } catch (err) {
        if (!(err instanceof MfaError)) throw err;
        return again(statusOf(err), errorMessage(c.t, err));
      }
      redirect(c, '/settings');
    },
    '/email/remove': proofChange('email-remove', async (c, p) => {
      await d.mfa.emailRemove(c.user, c.ip, p);
      notify(c, 'ok', c.t.emailRemoved);
      redirect(c, '/settings');
    }),
    '/backup': proofChange('backup', async (c, p) => {
      c.session.backupCodes = (await d.mfa.backupGenerate(c.user, c.ip, p)).codes;
      redirect(c, '/settings/backup');
    }),
    '/passcodes/add': async (c) => {
      if (!d.config().appPasscodes.enabled) return redirect(c, '/settings');
      const formId = 'passcode-add';
      const name = value(c, 'name');
      const protocols = c.form.getAll('protocol');
      const values = { [`${formId}.name`]: name, [`${formId}.protocols`]: protocols.join(','), [`${formId}.method`]: value(c, 'method') };
      if (name === '') return renderSettings(c, 400, { [`${formId}.name`]: c.t.pc.errName }, values);
      if (protocols.length === 0) return renderSettings(c, 400, { [`${formId}.protocols`]: c.t.pc.errProtocols }, values);
      const p = await proofOrAsk(c, formId, values);
      if (p === null) return;
      return settingsAction(
        c,
        formId,
        async () => {
          const r = await d.mfa.passcodeCreate(c.user, c.ip, p, name, protocols);
          c.session.passcodeShown = { name: r.passcode.name, code: r.code, protocols: r.passcode.protocols };
          d.logger.log('info', 'web-passcode-add', { user: c.user, ip: c.ip, passcode: r.passcode.id });
          redirect(c, '/settings/passcode');
        },
        (e) => (e.code === 'bad-request' ? (e.message.startsWith('protocols') ? 'protocols' : 'name') : undefined),
      );
    },
    '/passcodes/revoke': async (c) => {
      const raw = value(c, 'id');
      try {
        if (!/^[1-9]\d{0,15}$/.test(raw)) throw new MfaError('not-registered', 'no such passcode');
        const p = await d.mfa.passcodeRevoke(c.user, c.ip, Number(raw));
        notify(c, 'ok', c.t.pc.revoked(p.name));
        d.logger.log('info', 'web-passcode-revoke', { user: c.user, ip: c.ip, passcode: p.id });
      } catch (e) {
        if (!(e instanceof MfaError)) throw e;
        notify(c, 'error', c.t.pc.gone);
      }
      redirect(c, '/settings');
    },
    '/grants/revoke': async (c) => {
      const raw = value(c, 'id');
      if (!/^[1-9]\d{0,15}$/.test(raw)) {
        notify(c, 'error', c.t.errGrantGone);
        return redirect(c, '/settings');
      }
      try {
        const g = await d.mfa.revokeGrant(c.user, c.ip, Number(raw));
        notify(c, 'ok', c.t.revoked(g.block));
        d.logger.log('info', 'web-revoke', { user: c.user, ip: c.ip, grant: g.id, block: g.block });
      } catch (e) {
        if (!(e instanceof MfaError)) throw e;
        notify(c, 'error', c.t.errGrantGone);
      }
      redirect(c, '/settings');
    },
  };


  return { get: getRoutes, post: postRoutes };
}
