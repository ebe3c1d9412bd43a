<?php

/**
 * The HTML of the plugin's two screens: the code page between the password and the mailbox, and the
 * "多要素認証 / Multi-factor authentication" section of Settings (with its "アプリ用パスコード / App passcodes"
 * part). Plain forms (Roundcube adds its request token to each), every field with a label, errors next to the
 * field they concern, no script of its own.
 */
class mfagate_ui
{
    /** @var mfagate */
    private $plugin;

    /** The form handler's URL, e.g. "./?_task=login&_action=plugin.mfagate". */
    private $action;

    /** Field id -> error text, shown next to that field. */
    private $errors = [];

    /** The key and QR code of an app registration just begun: shown in this one answer. */
    public $enrolment_shown;

    public function __construct($plugin, $action)
    {
        $this->plugin = $plugin;
        $this->action = $action;
    }

    public function field_error($field, $text)
    {
        $this->errors[$field] = $text;
    }

    private function t($name, $vars = [])
    {
        return $this->plugin->gettext(['name' => $name, 'vars' => $vars]);
    }

    private static function q($text)
    {
        return rcube::Q((string) $text);
    }

    /** "2026-11-21 13:05 (JST)", as mfagate's MFA page and mails write times. */
    public static function jst($iso)
    {
        try {
            $d = new DateTime((string) $iso);
        }
        catch (Exception $e) {
            return (string) $iso;
        }

        $d->setTimezone(new DateTimeZone('+09:00'));

        return $d->format('Y-m-d H:i') . ' (JST)';
    }

    /** A POST form to the plugin's handler doing `$op`. */
    public function form($id, $op, $content, $class = 'propform')
    {
        return html::tag('form', ['id' => $id, 'method' => 'post', 'action' => $this->action, 'class' => $class],
            html::tag('input', ['type' => 'hidden', 'name' => '_mfagate_op', 'value' => $op]) . $content);
    }

    /**
     * A labelled text field for a code, an address or a name, with its hint (if any) and its error (if any)
     * next to it.
     */
    public function input($id, $name, $label, $kind = 'code', $value = '', $hint = null)
    {
        $attrs = ['type' => 'text', 'id' => $id, 'name' => $name, 'class' => 'form-control', 'value' => $value, 'required' => 'required'];

        if ($kind == 'name') {
            $attrs += ['autocomplete' => 'off', 'maxlength' => 64];
        }
        else if ($kind == 'code') {
            $attrs += ['autocomplete' => 'one-time-code', 'inputmode' => 'numeric', 'spellcheck' => 'false', 'maxlength' => 64];
        }
        else if ($kind == 'backup') {
            // Backup codes have letters: no numeric keyboard.
            $attrs += ['autocomplete' => 'one-time-code', 'spellcheck' => 'false', 'autocapitalize' => 'none', 'maxlength' => 64];
        }
        else {
            $attrs['type'] = 'email';
            $attrs += ['autocomplete' => 'email', 'maxlength' => 254];
        }

        $error = '';
        $described = [];
        if ($hint !== null) {
            $described[] = "$id-hint";
            $hint = html::div(['id' => "$id-hint", 'class' => 'hint'], self::q($hint));
        }
        if (isset($this->errors[$id])) {
            $attrs['aria-invalid'] = 'true';
            $described[] = "$id-error";
            $error = html::div(['id' => "$id-error", 'class' => 'mfagate-error', 'role' => 'alert'], self::q($this->errors[$id]));
        }
        if ($described) {
            $attrs['aria-describedby'] = implode(' ', $described);
        }

        return html::div('mfagate-field',
            html::label(['for' => $id], self::q($label)) . html::tag('input', $attrs) . (string) $hint . $error);
    }

    public function p($text, $class = null, $id = null)
    {
        return html::p(array_filter(['class' => $class, 'id' => $id]), self::q($text));
    }

    // ---- the code page ----------------------------------------------------------------------------------

    /**
     * @param array $st   mfagate's status of the user (factors, login)
     * @param array $view 'ip', 'hours', 'email_sent' ([to, until]) , 'enrolment' ([secret, qr_svg]) when
     *                    registering a first factor
     */
    public function code_page(array $st, array $view)
    {
        $f = $st['factors'] ?? [];
        $out = html::tag('h1', ['class' => 'mfagate-title'], self::q($this->t('code_title')))
            . $this->p($this->t('need_mfa', ['ip' => $view['ip']]), 'mfagate-lead', 'mfagate-need')
            . $this->p($this->t('after_pass', ['hours' => $view['hours']]), 'hint');

        $has_factor = !empty($f['totp']) || !empty($f['email']);

        if (!empty($view['enrolment'])) {
            $out .= $this->enrolment($view['enrolment'], 'enrol-login', 'totp-confirm');
        }
        else if (!$has_factor) {
            $out .= $this->p($this->t('no_factor_yet'), 'mfagate-notice');
            if (!empty($view['can_register'])) {
                $out .= $this->form('mfagate-register', 'totp-begin', $this->submit($this->t('register_app_button')));
            }
        }

        if (!empty($f['totp'])) {
            $out .= html::tag('section', ['class' => 'mfagate-card', 'aria-labelledby' => 'mfagate-totp-title'],
                html::tag('h2', ['id' => 'mfagate-totp-title'], self::q($this->t('totp_title')))
                . $this->form('mfagate-verify-totp', 'verify',
                    html::tag('input', ['type' => 'hidden', 'name' => '_method', 'value' => 'totp'])
                    . $this->input('mfagate-totp-code', '_code', $this->t('totp_code_label'))
                    . $this->submit($this->t('verify_button'))));
        }

        if (!empty($f['email'])) {
            $email = $this->form('mfagate-send', 'send', $this->submit($this->t('email_send_button', ['to' => $f['email']]), 'mfagate-secondary'));
            if (!empty($view['email_sent'])) {
                $email .= $this->p($this->t('email_sent', ['to' => $view['email_sent'][0], 'until' => self::jst($view['email_sent'][1])]), 'hint', 'mfagate-email-sent')
                    . $this->form('mfagate-verify-email', 'verify',
                        html::tag('input', ['type' => 'hidden', 'name' => '_method', 'value' => 'email'])
                        . $this->input('mfagate-email-code', '_code', $this->t('email_code_label'))
                        . $this->submit($this->t('verify_button')));
            }
            $out .= html::tag('section', ['class' => 'mfagate-card', 'aria-labelledby' => 'mfagate-email-title'],
                html::tag('h2', ['id' => 'mfagate-email-title'], self::q($this->t('email_title'))) . $email);
        }

        if (!empty($f['backup_codes_left'])) {
            $open = isset($this->errors['mfagate-backup-code']) ? ['open' => 'open'] : [];
            $out .= html::tag('details', ['class' => 'mfagate-card', 'id' => 'mfagate-backup'] + $open,
                html::tag('summary', null, self::q($this->t('backup_title')))
                . $this->p($this->t('backup_hint'), 'hint')
                . $this->form('mfagate-verify-backup', 'verify',
                    html::tag('input', ['type' => 'hidden', 'name' => '_method', 'value' => 'backup'])
                    . $this->input('mfagate-backup-code', '_code', $this->t('backup_code_label'), 'backup')
                    . $this->submit($this->t('verify_button'))));
        }

        $out .= $this->form('mfagate-cancel', 'cancel', $this->submit($this->t('cancel_button'), 'mfagate-link'), 'mfagate-cancel');

        return html::div(['id' => 'mfagate-code', 'class' => 'mfagate'], $out);
    }

    /**
     * An app being registered: the steps, the QR code and the key (in the answer to "register" only: they are
     * never kept by the plugin), then the field for the first code. `$e` is ['secret', 'qr_svg'], or
     * ['pending' => true] when the key was shown before and only the code is asked again.
     */
    public function enrolment(array $e, $id, $op)
    {
        $shown = '';
        if (empty($e['pending'])) {
            $qr  = 'data:image/svg+xml;base64,' . base64_encode((string) $e['qr_svg']);
            $key = trim(chunk_split((string) $e['secret'], 4, ' '));
            $shown = html::tag('ol', null,
                    html::tag('li', null, self::q($this->t('enrol_step1')))
                    . html::tag('li', null, self::q($this->t('enrol_step2')))
                    . html::tag('li', null, self::q($this->t('enrol_step3'))))
                . html::img(['src' => $qr, 'alt' => $this->t('qr_alt'), 'class' => 'mfagate-qr', 'width' => 200, 'height' => 200])
                . html::p(null, self::q($this->t('manual_key')) . ': ' . html::tag('code', ['id' => "$id-key", 'class' => 'mfagate-key'], self::q($key)));
        }
        else {
            $shown = $this->p($this->t('enrol_step3'));
        }

        return html::tag('section', ['class' => 'mfagate-card', 'id' => $id, 'aria-labelledby' => "$id-title"],
            html::tag('h2', ['id' => "$id-title"], self::q($this->t('enrol_title')))
            . $shown
            . $this->form("$id-form", $op,
                $this->input("$id-code", '_code', $this->t('totp_code_label'))
                . $this->submit($this->t('enrol_confirm'))));
    }

    // ---- settings ---------------------------------------------------------------------------------------

    /**
     * @param array $st   mfagate's status of the user
     * @param array $view 'block' (this network's block), 'enrolment', 'backup_codes' (just issued), 'confirm'
     *                    (a change waiting for its proof: ['op', 'fields']), 'proof_sent' ([to, until]),
     *                    'address' (the address field's value), 'passcodes' (the working app passcodes; false
     *                    when they cannot be listed; absent when the site does not offer them),
     *                    'passcode_shown' (one just made: ['code', 'name', 'protocols']), 'passcode_form' (the
     *                    new passcode form's values: ['name', 'protocols'])
     */
    public function settings(array $st, array $view)
    {
        $f = $st['factors'] ?? [];
        $has_factor = !empty($f['totp']) || !empty($f['email']);
        $out = '';

        // A change that needs a code first: asked for on top, before anything else.
        if (!empty($view['confirm'])) {
            $out .= $this->confirm($f, $view['confirm'], $view['proof_sent'] ?? null);
        }

        // An app passcode just made: shown on this page only.
        if (!empty($view['passcode_shown'])) {
            $out .= $this->passcode_shown($view['passcode_shown']);
        }

        // Just issued backup codes: shown this once.
        if (!empty($view['backup_codes'])) {
            $codes = '';
            foreach ($view['backup_codes'] as $c) {
                $codes .= html::tag('li', null, html::tag('code', null, self::q($c)));
            }
            $out .= html::tag('section', ['class' => 'mfagate-card', 'id' => 'mfagate-backup-codes', 'aria-labelledby' => 'mfagate-codes-title'],
                html::tag('h2', ['id' => 'mfagate-codes-title'], self::q($this->t('backup_section')))
                . $this->p($this->t('backup_shown_once'), 'mfagate-notice')
                . html::tag('ol', ['class' => 'mfagate-codes'], $codes));
        }

        if (!empty($view['enrolment'])) {
            $out .= $this->enrolment($view['enrolment'], 'enrol-settings', 'totp-confirm');
        }

        if (!empty($f['email_pending'])) {
            $out .= html::tag('section', ['class' => 'mfagate-card', 'id' => 'mfagate-email-confirm'],
                $this->p($this->t('email_confirm_intro', ['address' => $f['email_pending']]))
                . $this->form('mfagate-email-confirm-form', 'email-confirm',
                    $this->input('mfagate-email-confirm-code', '_code', $this->t('email_confirm_label'))
                    . $this->submit($this->t('email_confirm_button'))));
        }

        // MFA on / off and the status table (seed 001's 多要素認証状況).
        if (!empty($st['mfa_enabled'])) {
            $switch = $this->form('mfagate-disable', 'disable', $this->submit($this->t('disable_button'), 'mfagate-danger'));
        }
        else if ($has_factor) {
            $switch = $this->form('mfagate-enable', 'enable', $this->submit($this->t('enable_button')));
        }
        else {
            $switch = $this->p($this->t('enable_needs_factor'), 'hint');
        }
        $out .= html::tag('section', ['class' => 'mfagate-card', 'aria-labelledby' => 'mfagate-mfa-title'],
            html::tag('h2', ['id' => 'mfagate-mfa-title'], self::q($this->t('mfa_section')))
            . $this->p(!empty($st['mfa_enabled']) ? $this->t('mfa_on') : $this->t('mfa_off'), 'mfagate-state', 'mfagate-state')
            . (!empty($st['mfa_required']) && empty($st['mfa_enabled']) ? $this->p($this->t('mfa_site_required'), 'hint') : '')
            . $switch
            . $this->grants($st['grants'] ?? [], $view['block'] ?? ''));

        // The app.
        $app = $this->p(!empty($f['totp']) ? $this->t('registered') : $this->t('not_registered'), 'mfagate-state', 'mfagate-totp-state');
        if (empty($view['enrolment'])) {
            $app .= $this->form('mfagate-totp-begin', 'totp-begin',
                $this->submit(!empty($f['totp']) ? $this->t('app_replace_button') : $this->t('app_register_button'), 'mfagate-secondary'));
        }
        if (!empty($f['totp'])) {
            $app .= $this->form('mfagate-totp-remove', 'totp-remove', $this->submit($this->t('app_remove_button'), 'mfagate-danger'));
        }
        $out .= html::tag('section', ['class' => 'mfagate-card', 'aria-labelledby' => 'mfagate-app-title'],
            html::tag('h2', ['id' => 'mfagate-app-title'], self::q($this->t('totp_title'))) . $app);

        // The external address.
        $email = $this->p(!empty($f['email']) ? $this->t('email_registered_as', ['address' => $f['email']]) : $this->t('not_registered'), 'mfagate-state', 'mfagate-email-state');
        $email .= $this->form('mfagate-email-register', 'email-register',
            $this->input('mfagate-email-address', '_address', $this->t('email_address_label'), 'email', $view['address'] ?? '')
            . $this->p($this->t('email_address_hint'), 'hint')
            . $this->submit(!empty($f['email']) ? $this->t('email_change_button') : $this->t('email_register_button'), 'mfagate-secondary'));
        if (!empty($f['email'])) {
            $email .= $this->form('mfagate-email-remove', 'email-remove', $this->submit($this->t('email_remove_button'), 'mfagate-danger'));
        }
        $out .= html::tag('section', ['class' => 'mfagate-card', 'aria-labelledby' => 'mfagate-addr-title'],
            html::tag('h2', ['id' => 'mfagate-addr-title'], self::q($this->t('email_title'))) . $email);

        // Backup codes.
        $left = (int) ($f['backup_codes_left'] ?? 0);
        $backup = $this->p($left > 0 ? $this->t('backup_left', ['n' => $left]) : $this->t('backup_none'), 'mfagate-state', 'mfagate-backup-state');
        if ($has_factor) {
            $backup .= $this->form('mfagate-backup-generate', 'backup', $this->submit($left > 0 ? $this->t('backup_regenerate') : $this->t('backup_generate'), 'mfagate-secondary'));
        }
        $out .= html::tag('section', ['class' => 'mfagate-card', 'aria-labelledby' => 'mfagate-backup-title'],
            html::tag('h2', ['id' => 'mfagate-backup-title'], self::q($this->t('backup_section'))) . $backup)
            . $this->p($this->t('recommend_both'), 'hint');

        if (array_key_exists('passcodes', $view)) {
            $out .= $this->passcodes($view['passcodes'], $has_factor, $view['passcode_form'] ?? null, $view['passcode_site'] ?? null);
        }

        return html::div(['id' => 'mfagate-settings', 'class' => 'mfagate formcontent'],
            html::tag('h1', ['class' => 'voice'], self::q($this->t('title'))) . $out);
    }

    /** The section with nothing but a passcode just made (when mfagate's status could not be read after it). */
    public function settings_shown_only(array $shown)
    {
        return html::div(['id' => 'mfagate-settings', 'class' => 'mfagate formcontent'],
            html::tag('h1', ['class' => 'voice'], self::q($this->t('title'))) . $this->passcode_shown($shown));
    }

    // ---- app passcodes ----------------------------------------------------------------------------------

    /** "IMAP (receiving), SMTP (sending)": what a passcode is for. */
    private function protocol_list(array $protocols)
    {
        $names = [];
        foreach ($protocols as $p) {
            $p = (string) $p;
            $names[] = in_array($p, mfagate::PROTOCOLS) ? $this->t('passcode_proto_' . $p) : $p;
        }

        return implode($this->t('list_separator'), $names);
    }

    /** "IMAP", "POP", "SMTP", "Sieve": the protocol of a last use. */
    private static function protocol_name($p)
    {
        $known = ['imap' => 'IMAP', 'pop3' => 'POP', 'smtp' => 'SMTP', 'submission' => 'SMTP', 'sieve' => 'Sieve'];

        return $known[strtolower((string) $p)] ?? strtoupper((string) $p);
    }

    /**
     * The app passcodes part: the working passcodes (name, use, created, last use, expiry) with a remove button
     * each, and the form for a new one, which the confirmation with a code follows.
     *
     * @param array|false $list  mfagate's passcodes, or false when they could not be listed
     * @param array|null  $form  the form's values after an error: ['name', 'protocols']
     * @param array|null  $site  mfagate's [app_passcodes]: ['enabled', 'max_per_user', 'protocols']
     */
    private function passcodes($list, $has_factor, $form, $site)
    {
        $out = html::tag('h2', ['id' => 'mfagate-passcodes-title'], self::q($this->t('passcodes_section')))
            . $this->p($this->t('passcodes_intro'))
            . $this->p($this->t('passcodes_password_still'), 'hint');

        if ($list === false) {
            $out .= $this->p($this->t('err_passcodes_list'), 'mfagate-notice', 'mfagate-passcodes-unavailable');
        }
        else if (empty($list)) {
            $out .= $this->p($this->t('passcodes_none'), 'hint', 'mfagate-no-passcodes');
        }
        else {
            $out .= $this->passcode_table($list);
        }

        $max = is_array($site) ? (int) ($site['max_per_user'] ?? 0) : 0;
        if (!$has_factor) {
            $out .= $this->p($this->t('passcodes_need_factor'), 'mfagate-notice', 'mfagate-passcodes-need-factor');
        }
        else if ($max > 0 && is_array($list) && count($list) >= $max) {
            $out .= $this->p($this->t('passcodes_at_max', ['n' => $max]), 'mfagate-notice', 'mfagate-passcodes-at-max');
        }
        else {
            $defaults = is_array($site) && is_array($site['protocols'] ?? null) ? array_values(array_intersect(mfagate::PROTOCOLS, $site['protocols'])) : mfagate::PROTOCOLS;
            $out .= $this->passcode_form($form, $defaults ?: mfagate::PROTOCOLS);
        }

        return html::tag('section', ['class' => 'mfagate-card', 'id' => 'mfagate-passcodes', 'aria-labelledby' => 'mfagate-passcodes-title'], $out);
    }

    private function passcode_table(array $list)
    {
        $rows = '';
        foreach ($list as $p) {
            $id   = (int) ($p['id'] ?? 0);
            $name = (string) ($p['name'] ?? '');
            $by   = strpos((string) ($p['created_by'] ?? ''), 'cli') === 0 ? ' ' . html::span('hint', self::q($this->t('passcode_by_helpdesk'))) : '';
            $used = empty($p['last_used_at']) ? $this->t('passcode_never')
                : $this->t('passcode_last_use', ['at' => self::jst($p['last_used_at']), 'ip' => (string) ($p['last_used_ip'] ?? ''), 'protocol' => self::protocol_name($p['last_used_protocol'] ?? '')]);
            $expires = empty($p['expires_at']) ? $this->t('passcode_no_expiry') : self::jst($p['expires_at']);
            $remove = $this->form('mfagate-passcode-revoke-' . $id, 'passcode-revoke',
                html::tag('input', ['type' => 'hidden', 'name' => '_passcode', 'value' => $id])
                . html::tag('button', ['type' => 'submit', 'class' => 'btn mfagate-submit mfagate-danger', 'aria-label' => $this->t('passcode_remove_label', ['name' => $name])], self::q($this->t('passcode_remove_button'))),
                'mfagate-inline');
            $rows .= html::tag('tr', ['data-passcode' => $id],
                html::tag('td', ['class' => 'mfagate-passcode-name'], self::q($name))
                . html::tag('td', null, self::q($this->protocol_list((array) ($p['protocols'] ?? []))))
                . html::tag('td', null, self::q(self::jst($p['created_at'] ?? '')) . $by)
                . html::tag('td', ['class' => 'mfagate-passcode-used'], self::q($used))
                . html::tag('td', null, self::q($expires))
                . html::tag('td', null, $remove));
        }

        $head = '';
        foreach (['passcode_col_name', 'passcode_col_protocols', 'passcode_col_created', 'passcode_col_used', 'col_expires', 'col_action'] as $col) {
            $head .= html::tag('th', ['scope' => 'col'], self::q($this->t($col)));
        }

        return html::div('mfagate-table-wrap', html::tag('table', ['class' => 'table mfagate-status mfagate-passcodes', 'id' => 'mfagate-passcodes-list', 'aria-labelledby' => 'mfagate-passcodes-title'],
            html::tag('thead', null, html::tag('tr', null, $head)) . html::tag('tbody', null, $rows)));
    }

    /** The form for a new passcode: the device's name and what it may be used for (mfagate's defaults ticked). */
    private function passcode_form($form, array $defaults)
    {
        $ticked = is_array($form) ? (array) ($form['protocols'] ?? []) : $defaults;
        $group  = 'mfagate-passcode-protocols';

        $boxes = '';
        foreach (mfagate::PROTOCOLS as $p) {
            $attrs = ['type' => 'checkbox', 'id' => "mfagate-passcode-$p", 'name' => '_protocols[]', 'value' => $p];
            if (in_array($p, $ticked, true)) {
                $attrs['checked'] = 'checked';
            }
            $boxes .= html::div('mfagate-check',
                html::tag('input', $attrs) . ' ' . html::label(['for' => "mfagate-passcode-$p"], self::q($this->t('passcode_proto_' . $p))));
        }

        $fieldset = ['id' => $group, 'class' => 'mfagate-protocols'];
        $error = '';
        if (isset($this->errors[$group])) {
            $fieldset['aria-describedby'] = "$group-error";
            $error = html::div(['id' => "$group-error", 'class' => 'mfagate-error', 'role' => 'alert'], self::q($this->errors[$group]));
        }

        return html::tag('h3', ['id' => 'mfagate-passcode-create-title'], self::q($this->t('passcode_create_title')))
            . $this->form('mfagate-passcode-create', 'passcode-create',
                $this->input('mfagate-passcode-name', '_name', $this->t('passcode_name_label'), 'name', is_array($form) ? (string) ($form['name'] ?? '') : '', $this->t('passcode_name_hint'))
                . html::tag('fieldset', $fieldset, html::tag('legend', null, self::q($this->t('passcode_protocols_legend'))) . $boxes . $error)
                . $this->p($this->t('passcode_create_hint'), 'hint')
                . $this->submit($this->t('passcode_create_button')));
    }

    /**
     * A passcode just made, on the one page that shows it: large, in its groups of four, with where to type it
     * into iPhone Mail, Android's Gmail or Outlook, and Thunderbird.
     */
    private function passcode_shown(array $s)
    {
        $howto = '';
        foreach (['iphone', 'android', 'thunderbird'] as $device) {
            $howto .= html::tag('dt', null, self::q($this->t("passcode_howto_{$device}_title")))
                . html::tag('dd', null, self::q($this->t("passcode_howto_$device")));
        }

        return html::tag('section', ['class' => 'mfagate-card mfagate-shown', 'id' => 'mfagate-passcode-shown', 'aria-labelledby' => 'mfagate-passcode-shown-title'],
            html::tag('h2', ['id' => 'mfagate-passcode-shown-title'], self::q($this->t('passcode_shown_title', ['name' => $s['name']])))
            . $this->p($this->t('passcode_shown_once'), 'mfagate-notice')
            . html::p('mfagate-passcode-box', html::tag('code', ['id' => 'mfagate-passcode-value', 'class' => 'mfagate-passcode'], self::q($s['code'])))
            . $this->p($this->t('passcode_shown_for', ['protocols' => $this->protocol_list($s['protocols'])]), 'hint', 'mfagate-passcode-shown-for')
            . html::tag('ul', ['class' => 'mfagate-passcode-notes'],
                html::tag('li', null, self::q($this->t('passcode_howto')))
                . html::tag('li', null, self::q($this->t('passcode_any_network')))
                . html::tag('li', null, self::q($this->t('passcode_one_per_device'))))
            . html::tag('h3', ['id' => 'mfagate-passcode-howto-title'], self::q($this->t('passcode_howto_heading')))
            . html::tag('dl', ['class' => 'mfagate-howto', 'aria-labelledby' => 'mfagate-passcode-howto-title'], $howto)
            . html::a(['href' => $this->action, 'class' => 'btn mfagate-submit mfagate-primary', 'id' => 'mfagate-passcode-done'], self::q($this->t('passcode_done'))));
    }

    /** The form's main button. */
    public function submit($label, $kind = 'mfagate-primary')
    {
        return html::tag('button', ['type' => 'submit', 'class' => "btn mfagate-submit $kind"], self::q($label));
    }

    /**
     * A change mfagate answered with "proof-required": the same change again, with a code of a registered
     * factor (or a backup code), and for the mailed code a button that sends one (a form of its own, which
     * comes back here).
     */
    private function confirm(array $f, array $c, $sent)
    {
        $carry = '';
        foreach ($c['fields'] ?? [] as $name => $value) {
            foreach (is_array($value) ? $value : [$value] as $v) {
                $carry .= html::tag('input', ['type' => 'hidden', 'name' => is_array($value) ? $name . '[]' : $name, 'value' => (string) $v]);
            }
        }

        $options = '';
        foreach (['totp' => !empty($f['totp']), 'email' => !empty($f['email']), 'backup' => !empty($f['backup_codes_left'])] as $m => $ok) {
            if ($ok) {
                $options .= html::tag('option', ['value' => $m], self::q($this->t('method_' . $m)));
            }
        }

        $send = '';
        if (!empty($f['email'])) {
            $send = $this->form('mfagate-confirm-send', 'proof-send',
                html::tag('input', ['type' => 'hidden', 'name' => '_for', 'value' => $c['op']]) . $carry
                . $this->submit($this->t('proof_send_button', ['to' => $f['email']]), 'mfagate-secondary'));
            if ($sent) {
                $send .= $this->p($this->t('email_sent', ['to' => $sent[0], 'until' => self::jst($sent[1])]), 'hint', 'mfagate-proof-sent');
            }
        }

        $what = $this->t('confirm_' . str_replace('-', '_', (string) $c['op']), [
            'address'   => $c['fields']['_address'] ?? '',
            'name'      => $c['fields']['_name'] ?? '',
            'protocols' => $this->protocol_list((array) ($c['fields']['_protocols'] ?? [])),
        ]);

        return html::tag('section', ['class' => 'mfagate-card mfagate-confirm', 'id' => 'mfagate-confirm', 'aria-labelledby' => 'mfagate-confirm-title'],
            html::tag('h2', ['id' => 'mfagate-confirm-title'], self::q($this->t('proof_legend')))
            . $this->p($what, 'mfagate-state', 'mfagate-confirm-what')
            . $this->p($this->t('proof_hint'), 'hint')
            . $this->form('mfagate-confirm-form', $c['op'], $carry
                . html::div('mfagate-field',
                    html::label(['for' => 'mfagate-confirm-method'], self::q($this->t('proof_method_label')))
                    . html::tag('select', ['id' => 'mfagate-confirm-method', 'name' => '_method', 'class' => 'form-control custom-select'], $options))
                . $this->input('mfagate-confirm-code', '_code', $this->t('proof_code_label'), 'backup')
                . $this->submit($this->t('proof_confirm_button'))
                . html::a(['href' => $this->action, 'class' => 'btn mfagate-submit mfagate-link', 'id' => 'mfagate-confirm-cancel'], self::q($this->t('enrol_cancel'))))
            . $send);
    }

    /** The status table: one row per active grant, with a revoke button. */
    private function grants(array $grants, $block)
    {
        $head = html::tag('h3', ['id' => 'mfagate-status-title'], self::q($this->t('status_section')));
        if (empty($grants)) {
            return $head . $this->p($this->t('no_grants'), 'hint', 'mfagate-no-grants');
        }

        $rows = '';
        foreach ($grants as $g) {
            $method = in_array($g['method'] ?? '', ['totp', 'email', 'backup']) ? $this->t('method_' . $g['method']) : $this->t('method_other');
            $ip = (string) ($g['block'] ?? '');
            $this_net = $ip === $block ? ' ' . html::span('hint', self::q($this->t('this_network'))) : '';
            $revoke = $this->form('mfagate-revoke-' . (int) $g['id'], 'revoke',
                html::tag('input', ['type' => 'hidden', 'name' => '_grant', 'value' => (int) $g['id']])
                . html::tag('button', ['type' => 'submit', 'class' => 'btn mfagate-submit mfagate-secondary', 'aria-label' => $this->t('revoke_label', ['ip' => $ip])], self::q($this->t('revoke_button'))),
                'mfagate-inline');
            $rows .= html::tag('tr', ['data-grant' => (int) $g['id']],
                html::tag('td', null, self::q($ip) . $this_net)
                . html::tag('td', null, self::q(self::jst($g['created_at'] ?? '')))
                . html::tag('td', null, self::q(self::jst($g['expires_at'] ?? '')))
                . html::tag('td', null, self::q($method))
                . html::tag('td', null, $revoke));
        }

        return $head . html::tag('table', ['class' => 'table mfagate-status', 'id' => 'mfagate-status', 'aria-labelledby' => 'mfagate-status-title'],
            html::tag('thead', null, html::tag('tr', null,
                html::tag('th', ['scope' => 'col'], self::q($this->t('col_ip')))
                . html::tag('th', ['scope' => 'col'], self::q($this->t('col_at')))
                . html::tag('th', ['scope' => 'col'], self::q($this->t('col_expires')))
                . html::tag('th', ['scope' => 'col'], self::q($this->t('col_method')))
                . html::tag('th', ['scope' => 'col'], self::q($this->t('col_action')))))
            . html::tag('tbody', null, $rows));
    }
}
