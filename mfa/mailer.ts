// Sending mail to the site's MTA over SMTP (nodemailer). A failed send throws MailError; callers store nothing
// for a message that did not go out.
import nodemailer from 'nodemailer';

export class MailError extends Error {
  override name = 'MailError';
}

export interface OutgoingMail {
  to: string;
  subject: string;
  text: string;
}

export interface Mailer {
  send(mail: OutgoingMail): Promise<void>;
  close(): void;
}

export function createMailer(smtpUrl: string, from: string): Mailer {
  const url = new URL(smtpUrl);
  const transport = nodemailer.createTransport({
    host: url.hostname,
    port: Number(url.port || (url.protocol === 'smtps:' ? 465 : 25)),
    secure: url.protocol === 'smtps:',
    // The site's own MTA on a trusted path: no AUTH; STARTTLS if offered, but a local MTA without TLS is fine.
    ignoreTLS: false,
    requireTLS: false,
    tls: { rejectUnauthorized: false },
    connectionTimeout: 10_000,
    greetingTimeout: 10_000,
    socketTimeout: 20_000,
  });
  return {
    async send(mail) {
      try {
        await transport.sendMail({ from, to: mail.to, subject: mail.subject, text: mail.text, textEncoding: 'base64' });
      } catch (e) {
        throw new MailError(`the mail server did not accept the message: ${(e as Error).message}`);
      }
    },
    close() {
      transport.close();
    },
  };
}
