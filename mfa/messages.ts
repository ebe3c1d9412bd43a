// What a student or staff member reads in their mailbox: Japanese first, then English, as the university's
// own notices do. Plain text; times in Japan Standard Time with the zone named.

export const OTP_SUBJECT = 'OTP notification (OTP発行のお知らせ)';

/** "2026-11-21 13:05 (JST)" */
export function jst(ms: number): string {
  const d = new Date(ms + 9 * 3600_000);
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getUTCFullYear()}-${p(d.getUTCMonth() + 1)}-${p(d.getUTCDate())} ${p(d.getUTCHours())}:${p(d.getUTCMinutes())} (JST)`;
}

export function loginCodeMail(o: { user: string; code: string; expiresAt: number; ip: string; at: number; minutes: number }): { subject: string; text: string } {
  return {
    subject: OTP_SUBJECT,
    text: `${o.user} 様

メールの多要素認証のワンタイムパスワード (OTP) を発行しました。
多要素認証の画面 (Web メールからリンク) に次の OTP を入力してください。

  OTP: ${o.code}

有効期限: ${jst(o.expiresAt)} (${o.minutes} 分間、1 回限り有効)
要求元 IP アドレス: ${o.ip}
要求日時: ${jst(o.at)}

心当たりがない場合は、この OTP を使わず、パスワードを変更してヘルプデスクに連絡してください。

----

Dear ${o.user},

Here is your one-time password (OTP) for multi-factor authentication of your mail account.
Enter it on the multi-factor authentication page (linked from webmail):

  OTP: ${o.code}

Valid until: ${jst(o.expiresAt)} (${o.minutes} minutes, single use)
Requested from IP address: ${o.ip}
Requested at: ${jst(o.at)}

If you did not request it, do not use it: change your password and contact the helpdesk.
`,
  };
}

export function verifyAddressMail(o: { user: string; code: string; expiresAt: number; ip: string; at: number; minutes: number }): { subject: string; text: string } {
  return {
    subject: 'Confirm your external address (外部メールアドレスの確認)',
    text: `${o.user} 様

このアドレスを多要素認証の外部メールアドレスとして登録する手続きが行われました。
登録を完了するには、次の確認コードを入力してください。

  確認コード: ${o.code}

有効期限: ${jst(o.expiresAt)} (${o.minutes} 分間)
要求元 IP アドレス: ${o.ip}

心当たりがない場合は、このメールを無視してください。

----

Dear ${o.user},

This address is being registered as the external address for multi-factor authentication of your mail account.
To finish, enter this confirmation code:

  Code: ${o.code}

Valid until: ${jst(o.expiresAt)} (${o.minutes} minutes)
Requested from IP address: ${o.ip}

If this was not you, ignore this message.
`,
  };
}

export function grantNoticeMail(o: { user: string; ip: string; at: number; expiresAt: number; method: string }): { subject: string; text: string } {
  return {
    subject: 'MFA succeeded for your mail account (多要素認証のお知らせ)',
    text: `${o.user} 様

メールアカウントの多要素認証が成功しました。

IP アドレス: ${o.ip}
日時: ${jst(o.at)}
方法: ${o.method}
このネットワークからのメールソフトの利用は ${jst(o.expiresAt)} まで有効です。

心当たりがない場合は、すぐにパスワードを変更し、ヘルプデスクに連絡してください。

----

Dear ${o.user},

Multi-factor authentication succeeded for your mail account.

IP address: ${o.ip}
At: ${jst(o.at)}
Method: ${o.method}
Mail programs on that network can sign in until ${jst(o.expiresAt)}.

If this was not you, change your password now and contact the helpdesk.
`,
  };
}

export function addressChangedMail(o: { user: string; newAddress: string; ip: string; at: number }): { subject: string; text: string } {
  return {
    subject: 'Your external address was changed (外部メールアドレス変更のお知らせ)',
    text: `${o.user} 様

多要素認証の外部メールアドレスが ${o.newAddress} に変更されました。
以後、ワンタイムパスワードはこのアドレスには届きません。

要求元 IP アドレス: ${o.ip}
日時: ${jst(o.at)}

心当たりがない場合は、すぐにパスワードを変更し、ヘルプデスクに連絡してください。

----

Dear ${o.user},

The external address for multi-factor authentication of your mail account was changed to ${o.newAddress}.
One-time passwords will no longer be sent here.

Requested from IP address: ${o.ip}
At: ${jst(o.at)}

If this was not you, change your password now and contact the helpdesk.
`,
  };
}
