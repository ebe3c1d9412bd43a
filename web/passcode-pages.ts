// The アプリ用パスコード / App passcodes part of Settings, and the page that shows a new passcode once.
import { PASSCODE_PROTOCOLS } from '../config/config.js';
import { jst } from '../mfa/messages.js';
import type { PasscodeView } from '../mfa/passcodes.js';
import { type Html, html } from './html.js';
import { type SettingsModel, type View, button, field, form, layout, proofFields } from './pages.js';

export interface PasscodesModel {
  list: PasscodeView[];
  /** [app_passcodes] max_per_user. */
  max: number;
  /** What a new passcode is for unless the user unticks some ([app_passcodes] protocols). */
  defaults: string[];
}

/** A passcode just made: shown once on /settings/passcode, then gone from the session. */
export interface ShownPasscode {
  name: string;
  code: string;
  protocols: string[];
}

function protocolList(v: View, protocols: readonly string[]): string {
  return protocols.map((p) => v.t.pc.protocolNames[p] ?? p).join(v.lang === 'ja' ? '、' : ', ');
}

function passcodesTable(v: View, list: readonly PasscodeView[]): Html {
  const t = v.t.pc;
  const head = [t.colName, t.colProtocols, t.colCreated, t.colLastUse, t.colExpires, t.colAction];
  return html`<table class="grants passcodes"><thead><tr>${head.map((h) => html`<th scope="col">${h}</th>`)}</tr></thead><tbody>${list.map((p) => {
    const used = p.last_used_at === null ? t.never : t.lastUse(jst(Date.parse(p.last_used_at)), p.last_used_ip ?? '', p.last_used_protocol ?? '');
    return html`<tr data-passcode="${p.id}"><td data-label="${t.colName}">${p.name}</td><td data-label="${t.colProtocols}">${protocolList(v, p.protocols)}</td><td data-label="${t.colCreated}">${jst(Date.parse(p.created_at))}</td><td data-label="${t.colLastUse}">${used}</td><td data-label="${t.colExpires}">${p.expires_at === null ? t.noExpiry : jst(Date.parse(p.expires_at))}</td><td data-label="${t.colAction}">${form(v, `passcode-revoke-${p.id}`, '/passcodes/revoke', [html`<input type="hidden" name="id" value="${p.id}">`, html`<button type="submit" class="danger" aria-label="${t.revokeLabel(p.name)}">${t.revokeButton}</button>`], 'inline')}</td></tr>`;
  })}</tbody></table>`;
}

function createForm(v: View, m: SettingsModel, pm: PasscodesModel): Html {
  const t = v.t.pc;
  const id = 'passcode-add';
  const ticked = v.values[`${id}.protocols`]?.split(',') ?? pm.defaults;
  const protocolError = v.errors[`${id}.protocols`];
  const boxes = html`<fieldset${protocolError ? html` aria-describedby="${id}-protocols-error"` : null}><legend>${t.protocolsLegend}</legend>${PASSCODE_PROTOCOLS.map(
    (p) => html`<label class="check"><input type="checkbox" name="protocol" value="${p}"${ticked.includes(p) ? html` checked` : null}> ${t.protocolNames[p] ?? p}</label>`,
  )}${protocolError ? html`<p class="field-error" id="${id}-protocols-error" role="alert">${protocolError}</p>` : null}</fieldset>`;
  const open = Object.keys(v.errors).some((k) => k.startsWith(`${id}.`));
  return html`<details${open ? html` open` : null}><summary>${t.createSummary}</summary>${form(v, id, '/passcodes/add', [
    field(v, { form: id, name: 'name', label: t.nameLabel, hint: t.nameHint, autocomplete: 'off' }),
    boxes,
    proofFields(v, id, m),
    button(t.createButton),
  ])}</details>`;
}

export function passcodesSection(v: View, m: SettingsModel, pm: PasscodesModel): Html {
  const t = v.t.pc;
  const hasFactor = m.totp || m.email !== null;
  return html`<section class="card" aria-labelledby="h-passcodes"><h2 id="h-passcodes">${t.section}</h2><p>${t.intro}</p><p class="hint">${t.passwordStill}</p>${
    pm.list.length === 0 ? html`<p id="no-passcodes">${t.none}</p>` : passcodesTable(v, pm.list)
  }${!hasFactor ? html`<p>${t.needsFactor}</p>` : pm.list.length >= pm.max ? html`<p>${t.max(pm.max)}</p>` : createForm(v, m, pm)}</section>`;
}

export function passcodeShownPage(v: View, p: ShownPasscode): string {
  const t = v.t.pc;
  const body = html`<section class="card"><p>${t.shownFor(p.name)} <span class="hint">(${protocolList(v, p.protocols)})</span></p><p class="notice info">${t.shownOnce}</p><p class="passcode"><code id="passcode" class="key">${p.code}</code></p><p>${t.howTo}</p><h2>${t.howToHeading}</h2><dl class="howto">${t.howToSteps.map(
    ([device, steps]) => html`<dt>${device}</dt><dd>${steps}</dd>`,
  )}</dl><p><a href="${v.base}/settings">${t.shownDone}</a></p></section>`;
  return layout(v, t.shownTitle, body);
}
