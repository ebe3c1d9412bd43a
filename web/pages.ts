// The MFA page's views: server-rendered HTML that works without JavaScript. Each view takes what it shows and
// the language; web/server.ts decides which one to render. Every field has a label; an error is shown next to
// the field it is about (and the field is marked aria-invalid and points at it with aria-describedby).
import { jst } from '../mfa/messages.js';
import { type Html, html, trusted } from './html.js';
import { type Lang, LANGS, type Text } from './i18n.js';
import type { Notice } from './session.js';
import type { GrantView, Method } from '../mfa/service.js';

export interface View {
  lang: Lang;
  t: Text;
  /** The base path ("" or "/mfa"): every link and form action starts with it. */
  base: string;
  csrf: string;
  user: string | undefined;
  current: 'home' | 'settings' | 'signin' | 'other';
  notices: Notice[];
  /** Field errors, keyed "<form id>.<field name>". */
  errors: Record<string, string>;
  /** Values to put back into fields after an error, keyed like errors. */
  values: Record<string, string>;
}

// ---- building blocks -----------------------------------------------------------------------------------

function csrfField(v: View): Html {
  return html`<input type="hidden" name="csrf" value="${v.csrf}">`;
}

interface FieldOptions {
  form: string;
  name: string;
  label: string;
  type?: 'text' | 'password' | 'email';
  /** A one-time code: numeric keyboard and the browser's one-time-code autofill. */
  code?: 'numeric' | 'text';
  autocomplete?: string;
  hint?: string;
  required?: boolean;
  value?: string;
}

export function field(v: View, o: FieldOptions): Html {
  const id = `${o.form}-${o.name}`;
  const key = `${o.form}.${o.name}`;
  const error = v.errors[key];
  const describedBy = [o.hint ? `${id}-hint` : '', error ? `${id}-error` : ''].filter(Boolean).join(' ');
  const value = o.type === 'password' ? undefined : (v.values[key] ?? o.value);
  const autocomplete = o.code ? 'one-time-code' : o.autocomplete;
  return html`<label for="${id}">${o.label}</label>${o.hint ? html`<p class="hint" id="${id}-hint">${o.hint}</p>` : null}<input id="${id}" name="${o.name}" type="${o.type ?? 'text'}"${o.code ? html` class="code" inputmode="${o.code}" maxlength="32" spellcheck="false" autocapitalize="off"` : null}${autocomplete ? html` autocomplete="${autocomplete}"` : null}${o.required === false ? null : html` required`}${value !== undefined ? html` value="${value}"` : null}${describedBy ? html` aria-describedby="${describedBy}"` : null}${error ? html` aria-invalid="true"` : null}>${error ? html`<p class="field-error" id="${id}-error" role="alert">${error}</p>` : null}`;
}

export function form(v: View, id: string, action: string, body: Html | (Html | null)[], cls = ''): Html {
  return html`<form id="${id}" method="post" action="${v.base}${action}"${cls ? html` class="${cls}"` : null}>${csrfField(v)}${body}</form>`;
}

export function button(label: string, cls = '', name?: string, value?: string): Html {
  return html`<button type="submit"${cls ? html` class="${cls}"` : null}${name ? html` name="${name}" value="${value ?? ''}"` : null}>${label}</button>`;
}

function notices(list: Notice[]): Html {
  return html`${list.map((n) => html`<p class="notice ${n.kind}" role="${n.kind === 'error' ? 'alert' : 'status'}">${n.text}</p>`)}`;
}

// ---- the frame -------------------------------------------------------------------------------------------

export function layout(v: View, title: string, body: Html): string {
  const t = v.t;
  const langLinks = LANGS.map((l) =>
    l === v.lang
      ? html`<span aria-current="true" lang="${l}">${l === 'ja' ? '日本語' : 'English'}</span>`
      : html`<a href="?lang=${l}" lang="${l}" hreflang="${l}">${l === 'ja' ? '日本語' : 'English'}</a>`,
  );
  const nav = v.user
    ? html`<nav class="main" aria-label="${t.mainNav}"><span class="who">${t.signedInAs(v.user)}</span><a href="${v.base}/"${v.current === 'home' ? html` aria-current="page"` : null}>${t.navHome}</a><a href="${v.base}/settings"${v.current === 'settings' ? html` aria-current="page"` : null}>${t.navSettings}</a>${form(v, 'signout', '/signout', button(t.signOut, 'link'), 'inline')}</nav>`
    : null;
  return `<!doctype html>
${html`<html lang="${v.lang}"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><meta name="referrer" content="no-referrer"><title>${title} - ${t.site}</title><link rel="stylesheet" href="${v.base}/style.css"></head><body><header class="site"><div class="bar"><p class="title">${t.site}<small lang="${v.lang === 'ja' ? 'en' : 'ja'}">${t.siteOther}</small></p><nav class="lang" aria-label="${t.language}">${langLinks}</nav></div>${nav}</header><main id="main"><h1>${title}</h1>${notices(v.notices)}${body}</main></body></html>`}`;
}

// ---- sign-in ---------------------------------------------------------------------------------------------

export function signInPage(v: View): string {
  const t = v.t;
  const body = html`<section class="card"><p>${t.signInIntro}</p>${form(v, 'signin', '/signin', [
    field(v, { form: 'signin', name: 'user', label: t.userLabel, autocomplete: 'username' }),
    field(v, { form: 'signin', name: 'password', label: t.passwordLabel, type: 'password', autocomplete: 'current-password' }),
    button(t.signInButton),
  ])}</section>`;
  return layout(v, t.signInTitle, body);
}

// ---- home: pass MFA --------------------------------------------------------------------------------------

export interface HomeModel {
  ip: string;
  state: 'trusted' | 'grant' | 'not-enabled' | 'exempt' | 'not-enforced' | 'need';
  grantUntil?: number;
  mfaEnabled: boolean;
  totp: boolean;
  email: string | null;
  backupLeft: number;
  emailSent?: { to: string; expiresAt: number };
  ttlHours: number;
}

export function homePage(v: View, m: HomeModel): string {
  const t = v.t;
  const parts: (Html | null)[] = [];
  const toSettings = html`<p><a href="${v.base}/settings">${t.goSettings}</a></p>`;
  switch (m.state) {
    case 'trusted':
      parts.push(html`<section class="card"><p class="status" id="network-status">${t.trustedNetwork(m.ip)}</p>${m.mfaEnabled ? null : html`<p>${t.inviteRegister}</p>`}${toSettings}</section>`);
      break;
    case 'grant':
      parts.push(html`<section class="card"><p class="status" id="network-status">${t.grantActive(m.ip, jst(m.grantUntil ?? 0))}</p>${toSettings}</section>`);
      break;
    case 'not-enabled':
    case 'exempt':
    case 'not-enforced':
      parts.push(html`<section class="card"><p class="status" id="network-status">${m.state === 'exempt' ? t.exempt : m.state === 'not-enforced' ? t.notEnforced : t.notEnabled}</p>${m.mfaEnabled ? null : html`<p>${t.inviteRegister}</p>`}${toSettings}</section>`);
      break;
    case 'need':
      parts.push(html`<section class="card"><p class="status" id="network-status">${t.needMfa(m.ip)}</p><p>${t.afterPass(m.ttlHours)}</p>${!m.totp && !m.email ? html`<p>${t.noFactorYet}</p>${toSettings}` : null}</section>`);
      parts.push(verifyForms(v, m));
      break;
  }
  return layout(v, t.homeTitle, html`${parts}`);
}

function verifyForms(v: View, m: HomeModel): Html {
  const t = v.t;
  const out: Html[] = [];
  if (m.totp) {
    out.push(html`<section class="card" aria-labelledby="h-totp"><h2 id="h-totp">${t.totpTitle}</h2>${form(v, 'verify-totp', '/verify', [
      html`<input type="hidden" name="method" value="totp">`,
      field(v, { form: 'verify-totp', name: 'code', label: t.totpCodeLabel, code: 'numeric' }),
      button(t.verifyButton),
    ])}</section>`);
  }
  if (m.email) {
    out.push(html`<section class="card" aria-labelledby="h-email"><h2 id="h-email">${t.emailTitle}</h2>${form(v, 'send-code', '/email-code', [
      html`<input type="hidden" name="return" value="home">`,
      button(t.emailSendButton(m.email), m.emailSent ? 'secondary' : ''),
    ])}${m.emailSent ? html`<p class="hint">${t.emailSent(m.emailSent.to, jst(m.emailSent.expiresAt))}</p>` : null}${form(v, 'verify-email', '/verify', [
      html`<input type="hidden" name="method" value="email">`,
      field(v, { form: 'verify-email', name: 'code', label: t.emailCodeLabel, code: 'numeric' }),
      button(t.verifyButton),
    ])}</section>`);
  }
  if (m.backupLeft > 0) {
    const open = v.errors['verify-backup.code'] !== undefined;
    out.push(html`<section class="card"><details${open ? html` open` : null}><summary>${t.backupTitle}</summary><p class="hint">${t.backupHint}</p>${form(v, 'verify-backup', '/verify', [
      html`<input type="hidden" name="method" value="backup">`,
      field(v, { form: 'verify-backup', name: 'code', label: t.backupCodeLabel, code: 'text' }),
      button(t.verifyButton),
    ])}</details></section>`);
  }
  return html`${out}`;
}

// ---- settings --------------------------------------------------------------------------------------------

export interface SettingsModel {
  ipBlock: string;
  mfaEnabled: boolean;
  siteRequired: boolean;
  totp: boolean;
  email: string | null;
  emailPending: string | null;
  backupLeft: number;
  grants: GrantView[];
  emailSent?: { to: string; expiresAt: number };
  /** The first factor may not be registered from this network ([web] first_registration = "trusted-only"). */
  registrationBlocked: boolean;
}

/** The proof a change needs once a factor is registered: which factor, and its code. */
export function proofFields(v: View, formId: string, m: SettingsModel): Html | null {
  if (!m.totp && !m.email) return null;
  const t = v.t;
  const methods: Method[] = [];
  if (m.totp) methods.push('totp');
  if (m.email) methods.push('email');
  if (m.backupLeft > 0) methods.push('backup');
  const chosen = v.values[`${formId}.method`] ?? methods[0];
  const id = `${formId}-method`;
  return html`<fieldset><legend>${t.proofLegend}</legend><label for="${id}">${t.proofMethodLabel}</label><select id="${id}" name="method">${methods.map(
    (mm) => html`<option value="${mm}"${mm === chosen ? html` selected` : null}>${t.methodNames[mm] ?? mm}</option>`,
  )}</select>${field(v, { form: formId, name: 'code', label: t.proofCodeLabel, code: 'text' })}</fieldset>`;
}

export function settingsPage(v: View, m: SettingsModel, more: Html[] = []): string {
  const t = v.t;
  const hasFactor = m.totp || m.email !== null;
  const sections: (Html | null)[] = [];

  if (hasFactor) sections.push(html`<p class="hint">${t.proofHint}</p>`);

  // Multi-factor authentication on/off
  sections.push(html`<section class="card" aria-labelledby="h-mfa"><h2 id="h-mfa">${t.mfaSection}</h2><p class="status" id="mfa-state">${m.mfaEnabled ? t.mfaOn : t.mfaOff}</p>${m.siteRequired && !m.mfaEnabled ? html`<p>${t.mfaSiteRequired}</p>` : null}${
    m.mfaEnabled
      ? html`<details${v.errors['disable.code'] ? html` open` : null}><summary>${t.disableButton}</summary>${form(v, 'disable', '/mfa/disable', [proofFields(v, 'disable', m), button(t.disableButton, 'danger')])}</details>`
      : hasFactor
        ? form(v, 'enable', '/mfa/enable', button(t.enableButton))
        : html`<p>${t.enableNeedsFactor}</p>`
  }<p class="hint">${t.recommendBoth}</p></section>`);

  // MFA status (多要素認証状況): near the top, where users look for the expiry; a revoke button per row.
  sections.push(html`<section class="card" aria-labelledby="h-status"><h2 id="h-status">${t.statusSection}</h2>${
    m.grants.length === 0
      ? html`<p id="no-grants">${t.noGrants}</p>`
      : html`<table class="grants"><thead><tr><th scope="col">${t.colIp}</th><th scope="col">${t.colAt}</th><th scope="col">${t.colExpires}</th><th scope="col">${t.colMethod}</th><th scope="col">${t.colAction}</th></tr></thead><tbody>${m.grants.map(
          (g) => html`<tr data-grant="${g.id}"><td data-label="${t.colIp}">${g.block}${g.block === m.ipBlock ? html` <span class="hint">${t.thisNetwork}</span>` : null}</td><td data-label="${t.colAt}">${jst(Date.parse(g.created_at))}</td><td data-label="${t.colExpires}">${jst(Date.parse(g.expires_at))}</td><td data-label="${t.colMethod}">${t.methodNames[g.method] ?? t.methodOther}</td><td data-label="${t.colAction}">${form(v, `revoke-${g.id}`, '/grants/revoke', [html`<input type="hidden" name="id" value="${g.id}">`, html`<button type="submit" class="danger" aria-label="${t.revokeLabel(g.block)}">${t.revokeButton}</button>`], 'inline')}</td></tr>`,
        )}</tbody></table>`
  }</section>`);


  // Sending an OTP to the external address, for the proofs below.
  if (m.email) {
    sections.push(html`<section class="card"><p class="hint">${t.proofSendHint}</p>${form(v, 'send-code', '/email-code', [html`<input type="hidden" name="return" value="settings">`, button(t.emailSendButton(m.email), 'secondary')])}${
      m.emailSent ? html`<p class="hint" role="status">${t.emailSent(m.emailSent.to, jst(m.emailSent.expiresAt))}</p>` : null
    }</section>`);
  }

  // Authenticator app
  sections.push(html`<section class="card" aria-labelledby="h-app"><h2 id="h-app">${t.totpTitle}</h2><p class="status" id="app-state">${m.totp ? t.registered : t.notRegistered}</p>${
    m.registrationBlocked && !hasFactor
      ? html`<p class="notice error">${t.errTrustedOnly}</p>`
      : m.totp
        ? html`<details${v.errors['app-begin.code'] ? html` open` : null}><summary>${t.appReplaceButton}</summary>${form(v, 'app-begin', '/totp/begin', [proofFields(v, 'app-begin', m), button(t.appReplaceButton, 'secondary')])}</details>`
        : form(v, 'app-begin', '/totp/begin', [proofFields(v, 'app-begin', m), button(t.appRegisterButton)])
  }${m.totp ? html`<details${v.errors['app-remove.code'] ? html` open` : null}><summary>${t.appRemoveButton}</summary>${form(v, 'app-remove', '/totp/remove', [proofFields(v, 'app-remove', m), button(t.appRemoveButton, 'danger')])}</details>` : null}</section>`);

  // External e-mail
  const emailForm = form(v, 'email-register', '/email/register', [
    field(v, { form: 'email-register', name: 'address', label: t.emailAddressLabel, type: 'email', autocomplete: 'email', hint: t.emailAddressHint }),
    proofFields(v, 'email-register', m),
    button(m.email ? t.emailChangeButton : t.emailRegisterButton, m.email ? 'secondary' : ''),
  ]);
  sections.push(html`<section class="card" aria-labelledby="h-mail"><h2 id="h-mail">${t.emailTitle}</h2><p class="status" id="email-state">${m.email ? t.emailRegisteredAs(m.email) : t.notRegistered}</p>${
    m.emailPending ? html`<p><a href="${v.base}/settings/email">${t.emailPendingAs(m.emailPending)}</a></p>` : null
  }${
    m.registrationBlocked && !hasFactor
      ? html`<p class="notice error">${t.errTrustedOnly}</p>`
      : m.email
        ? html`<details${v.errors['email-register.address'] || v.errors['email-register.code'] ? html` open` : null}><summary>${t.emailChangeButton}</summary>${emailForm}</details>`
        : emailForm
  }${m.email || m.emailPending ? html`<details${v.errors['email-remove.code'] ? html` open` : null}><summary>${t.emailRemoveButton}</summary>${form(v, 'email-remove', '/email/remove', [proofFields(v, 'email-remove', m), button(t.emailRemoveButton, 'danger')])}</details>` : null}</section>`);

  // Backup codes
  if (hasFactor) {
    const backupForm = form(v, 'backup', '/backup', [proofFields(v, 'backup', m), button(m.backupLeft > 0 ? t.backupRegenerate : t.backupGenerate, 'secondary')]);
    sections.push(html`<section class="card" aria-labelledby="h-backup"><h2 id="h-backup">${t.backupSection}</h2><p class="status" id="backup-state">${m.backupLeft > 0 ? t.backupLeft(m.backupLeft) : t.backupNone}</p>${
      m.backupLeft > 0 ? html`<details${v.errors['backup.code'] ? html` open` : null}><summary>${t.backupRegenerate}</summary>${backupForm}</details>` : backupForm
    }</section>`);
  }

  // Parts of their own files (app passcodes).
  sections.push(...more);

  return layout(v, t.settingsTitle, html`${sections}`);
}

// ---- registering the app ---------------------------------------------------------------------------------

export function enrolPage(v: View, e: { secret: string; qrSvg: string }): string {
  const t = v.t;
  const grouped = e.secret.replace(/(.{4})(?=.)/g, '$1 ');
  const body = html`<section class="card"><ol class="steps">${t.enrolSteps.map((s) => html`<li>${s}</li>`)}</ol><figure class="qr" role="img" aria-label="${t.qrAlt}">${trusted(e.qrSvg)}</figure><p>${t.manualKey}: <code class="key" id="totp-key">${grouped}</code></p>${form(v, 'app-confirm', '/totp/confirm', [
    field(v, { form: 'app-confirm', name: 'code', label: t.totpCodeLabel, code: 'numeric' }),
    button(t.enrolConfirm),
  ])}${form(v, 'app-cancel', '/totp/cancel', button(t.enrolCancel, 'secondary'))}</section>`;
  return layout(v, t.enrolTitle, body);
}

// ---- confirming the external address ---------------------------------------------------------------------

export function emailConfirmPage(v: View, pending: string): string {
  const t = v.t;
  const body = html`<section class="card"><p>${t.emailConfirmIntro(pending)}</p>${form(v, 'email-confirm', '/email/confirm', [
    field(v, { form: 'email-confirm', name: 'code', label: t.emailConfirmLabel, code: 'numeric' }),
    button(t.emailConfirmButton),
  ])}<p><a href="${v.base}/settings">${t.navSettings}</a></p></section>`;
  return layout(v, t.emailTitle, body);
}

// ---- backup codes, shown once ----------------------------------------------------------------------------

export function backupCodesPage(v: View, codes: string[]): string {
  const t = v.t;
  const body = html`<section class="card"><p>${t.backupShownOnce}</p><p class="hint">${t.signedInAs(v.user ?? '')}</p><ul class="codes" id="backup-codes">${codes.map((c) => html`<li>${c}</li>`)}</ul><p class="hint noprint">${t.backupPrintHint}</p><p class="noprint"><a href="${v.base}/settings">${t.backupDoneLink}</a></p></section>`;
  return layout(v, t.backupSection, body);
}

// ---- errors ----------------------------------------------------------------------------------------------

export function messagePage(v: View, title: string, text: string): string {
  return layout(v, title, html`<section class="card"><p>${text}</p><p><a href="${v.base}/">${v.t.backToTop}</a></p></section>`);
}
