<?php

/**
 * mfagate for Roundcube: multi-factor authentication inside the webmail, in front of mfagate's per-address
 * grants.
 *
 * After Roundcube's own IMAP login has proved the password, the plugin asks mfagate whether this user needs a
 * second factor from the browser's address. If so, the session is not kept: its login is set aside (user,
 * host and Roundcube's encrypted password) in an empty, unauthenticated session, and the browser gets the code
 * page. Nothing else works meanwhile, because for Roundcube nobody is signed in: the mailbox, AJAX requests,
 * compose, settings and downloads all meet its login page or its session error. Once mfagate accepts a code
 * (which creates the grant for the browser's address), the plugin signs the user in again with the set-aside
 * login and opens the mailbox, naming the address and until when mail programs work there.
 *
 * Settings get a "多要素認証 / Multi-factor authentication" section: MFA on and off, the authenticator app,
 * the external address, backup codes, the status table with a revoke button per row, and (with
 * mfagate_passcodes) the app passcodes: per-device passwords for mail programs, shown once when made.
 *
 * mfagate holds every secret and decides; the plugin talks to it only through its webmail API (a UNIX socket,
 * or loopback TCP with a bearer token), and never logs or stores a code or a secret.
 */
require_once __DIR__ . '/lib/mfagate_api.php';
require_once __DIR__ . '/lib/mfagate_ui.php';

class mfagate extends rcube_plugin
{
    public $task = '.*';

    /** The session key of a sign-in waiting for its second factor. */
    const PENDING = 'mfagate_pending';
    /** The session key of the notice the mailbox shows once after MFA passed. */
    const NOTICE = 'mfagate_notice';
    /**
     * The session key of an app passcode just made, between the POST that made it and the one page that shows
     * it (encrypted with Roundcube's des_key, removed by that page, and never shown after SHOWN_TTL seconds).
     */
    const SHOWN = 'mfagate_passcode_shown';
    const SHOWN_TTL = 120;
    /** What an app passcode may be used for, as mfagate names it. */
    const PROTOCOLS = ['imap', 'pop3', 'smtp', 'sieve'];

    /** @var rcmail */
    private $rc;
    /** @var mfagate_api|null */
    private $client;

    public function init()
    {
        $this->rc = rcmail::get_instance();
        // plugins/mfagate/config.inc.php when there is one, else mfagate.inc.php in Roundcube's config
        // directory; the keys may also be in Roundcube's main config. Defaults are in the code (see cfg()).
        $this->load_config();
        $this->add_texts('localization/');

        $this->add_hook('startup', [$this, 'startup']);
        $this->add_hook('storage_connect', [$this, 'storage_connect']);
        $this->add_hook('login_after', [$this, 'login_after']);
        $this->add_hook('ready', [$this, 'ready']);
        $this->add_hook('send_page', [$this, 'send_page']);

        if ($this->rc->task == 'settings') {
            $this->add_hook('settings_actions', [$this, 'settings_actions']);
            $this->register_action('plugin.mfagate', [$this, 'settings_action']);
        }
    }

    private function cfg($key, $default)
    {
        return $this->rc->config->get("mfagate_$key", $default);
    }

    private function api()
    {
        if (!$this->client) {
            // A TCP URL, when set, is what the site chose over the default socket.
            $url = (string) $this->cfg('api_url', '');
            $this->client = new mfagate_api([
                'socket'     => $url === '' ? $this->cfg('api_socket', '/run/mfagate/api.sock') : '',
                'url'        => $url,
                'token_file' => $this->cfg('api_token_file', ''),
                'timeout'    => $this->cfg('api_timeout', 5),
            ]);
        }

        return $this->client;
    }

    /** One line in Roundcube's log "mfagate": never a code, a secret or a password. */
    private function log($event, array $fields = [])
    {
        $line = $event;
        foreach ($fields as $k => $v) {
            $line .= ' ' . $k . '=' . (is_scalar($v) ? json_encode((string) $v, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE) : json_encode($v));
        }
        rcube::write_log('mfagate', $line);
    }

    /**
     * The browser's address as Roundcube sees it ([proxy_whitelist] decides whether X-Forwarded-For is
     * believed); null when that is not an IP address, which fails closed.
     */
    private function client_ip()
    {
        $ip = rcube_utils::remote_addr();

        return filter_var($ip, FILTER_VALIDATE_IP) !== false ? $ip : null;
    }

    // ---- Dovecot sees the browser ------------------------------------------------------------------------

    /**
     * Sends the browser's address to Dovecot before authentication (IMAP ID "x-originating-ip"), so that its
     * logs and %{rip} show the browser and not the webmail host (Dovecot believes it from
     * login_trusted_networks only).
     */
    public function storage_connect($args)
    {
        if ($ip = $this->client_ip()) {
            $ident = isset($args['preauth_ident']) && is_array($args['preauth_ident']) ? $args['preauth_ident'] : [];
            $args['preauth_ident'] = $ident + ['x-originating-ip' => $ip];
        }

        return $args;
    }

    // ---- the sign-in ------------------------------------------------------------------------------------

    /**
     * Right after Roundcube's IMAP login accepted the password: does this user need a code from this address?
     * If mfagate cannot say, nobody is signed in (fail closed).
     */
    public function login_after($args)
    {
        $user = (string) ($_SESSION['username'] ?? '');
        $ip   = $this->client_ip();

        try {
            if ($ip === null) {
                throw new mfagate_api_error('the browser\'s address is not an IP address: ' . rcube_utils::remote_addr());
            }
            $r = $this->api()->status($user, $ip);
            if ($r['status'] != 200) {
                throw new mfagate_api_error("status answered {$r['status']}: " . ($r['body']['error'] ?? ''));
            }
        }
        catch (mfagate_api_error $e) {
            $this->log('login-refused', ['user' => $user, 'ip' => (string) $ip, 'reason' => 'mfagate unavailable', 'error' => $e->getMessage()]);
            $this->rc->kill_session();
            $this->login_page('err_unavailable');
        }

        $login = $r['body']['login'] ?? null;
        if (!is_array($login) || empty($login['needs_mfa'])) {
            $this->log('login', ['user' => $user, 'ip' => $ip, 'mfa' => 'not needed', 'rule' => $login['rule'] ?? '']);
            return $args;
        }

        // Set the login aside and drop the session: until a factor passes, nobody is signed in.
        $pending = [
            'user'     => $user,
            'host'     => $this->rc->autoselect_host(),
            'pass'     => $_SESSION['password'] ?? '',
            'ip'       => $ip,
            'since'    => time(),
            'failures' => 0,
            'redirect' => $args,
            'language' => $_SESSION['language'] ?? null,
            'timezone' => $_SESSION['timezone'] ?? null,
        ];
        $this->rc->kill_session();
        $this->rc->session->regenerate_id(false);
        if ($pending['language']) {
            $_SESSION['language'] = $pending['language'];
        }
        $_SESSION[self::PENDING] = $pending;
        $this->log('code-asked', ['user' => $user, 'ip' => $ip, 'rule' => $login['rule'] ?? '']);
        $this->rc->output->redirect(['_task' => 'login', '_action' => 'plugin.mfagate'], 0, true);
    }

    /**
     * Every request: while a sign-in waits for its code, plain page loads get the code page and its forms are
     * handled here (before Roundcube's own dispatch, which sees nobody signed in and refuses the rest).
     */
    public function startup($args)
    {
        $pending = $_SESSION[self::PENDING] ?? null;
        if (!is_array($pending) || !empty($_SESSION['user_id'])) {
            return $args;
        }

        // A new sign-in replaces the waiting one; AJAX and framed requests meet Roundcube's session error.
        $action = (string) $args['action'];
        if ($action == 'login' || $this->rc->output->ajax_call || !empty($_REQUEST['_framed']) || !empty($_REQUEST['_remote'])) {
            return $args;
        }

        $this->code_page($pending);
    }

    /** The code page and its forms; never returns. */
    private function code_page(array $p)
    {
        $ip = $this->client_ip();
        if ($ip !== $p['ip']) {
            $this->log('code-ended', ['user' => $p['user'], 'ip' => (string) $ip, 'was' => $p['ip'], 'reason' => 'address changed']);
            $this->end_pending('err_moved');
        }
        if (time() > $p['since'] + (int) $this->cfg('pending_ttl', 300)) {
            $this->log('code-ended', ['user' => $p['user'], 'ip' => $ip, 'reason' => 'expired']);
            $this->end_pending('err_expired');
        }

        $view = ['ip' => $ip, 'hours' => (int) $this->cfg('grant_hours', 14), 'can_register' => (bool) $this->cfg('register_at_login', true)];
        $ui   = new mfagate_ui($this, './?_task=login&_action=plugin.mfagate');

        if ($_SERVER['REQUEST_METHOD'] == 'POST') {
            if (!$this->rc->check_request()) {
                $this->rc->output->show_message('invalidrequest', 'error');
            }
            else {
                $this->code_post($p, $ui, $view);
                $p = $_SESSION[self::PENDING];
            }
        }

        $view['email_sent'] = $p['email_sent'] ?? null;
        $view['enrolment']  = $ui->enrolment_shown ?? (!empty($p['enrolling']) ? ['pending' => true] : null);

        try {
            $r = $this->api()->status($p['user'], $ip);
            if ($r['status'] != 200) {
                throw new mfagate_api_error("status answered {$r['status']}");
            }
        }
        catch (mfagate_api_error $e) {
            $this->log('code-ended', ['user' => $p['user'], 'ip' => $ip, 'reason' => 'mfagate unavailable', 'error' => $e->getMessage()]);
            $this->end_pending('err_unavailable');
        }

        $body = $ui->code_page($r['body'], $view);
        $this->rc->output->add_handlers(['mfagatecode' => function () use ($body) { return $body; }]);
        $this->rc->output->set_pagetitle($this->gettext('code_title'));
        $this->include_stylesheet($this->local_skin_path() . '/mfagate.css');
        $this->rc->output->send('mfagate.code');
    }

    /** A form of the code page: a code, a mailed code asked for, the first app registered, or giving up. */
    private function code_post(array $p, mfagate_ui $ui, array $view)
    {
        $op   = rcube_utils::get_input_string('_mfagate_op', rcube_utils::INPUT_POST);
        $user = $p['user'];
        $ip   = $view['ip'];

        if ($op == 'cancel') {
            $this->log('code-ended', ['user' => $user, 'ip' => $ip, 'reason' => 'cancelled']);
            $this->end_pending('loggedout', 'confirmation');
        }

        if ($op == 'send') {
            $r = $this->call('POST', '/email/code', $user, ['ip' => $ip]);
            if ($r['status'] == 200) {
                $_SESSION[self::PENDING]['email_sent'] = [$r['body']['sent_to'] ?? '', $r['body']['expires_at'] ?? ''];
            }
            else {
                $this->rc->output->show_message('mfagate.' . $this->error_label($r), 'error', $this->error_vars($r));
            }
            return;
        }

        if ($op == 'totp-begin' && $this->cfg('register_at_login', true)) {
            // The first factor is registered with the password alone (mfagate refuses this once one exists).
            $r = $this->call('POST', '/totp', $user, ['ip' => $ip]);
            if ($r['status'] == 200) {
                // The key and the QR code are in this answer only; the session just remembers that a
                // registration waits for its first code (mfagate keeps the key, 15 minutes).
                $ui->enrolment_shown = ['secret' => $r['body']['secret'] ?? '', 'qr_svg' => $r['body']['qr_svg'] ?? ''];
                $_SESSION[self::PENDING]['enrolling'] = true;
                $this->log('app-register-begun', ['user' => $user, 'ip' => $ip, 'at' => 'sign-in']);
            }
            else {
                $this->rc->output->show_message('mfagate.' . $this->error_label($r), 'error', $this->error_vars($r));
            }
            return;
        }

        if ($op == 'totp-confirm' && !empty($p['enrolling'])) {
            $code = trim((string) rcube_utils::get_input_string('_code', rcube_utils::INPUT_POST));
            if ($code === '') {
                $ui->field_error('enrol-login-code', $this->gettext('err_code'));
                return;
            }
            $r = $this->call('POST', '/totp/confirm', $user, ['ip' => $ip, 'code' => $code]);
            if ($r['status'] == 200) {
                unset($_SESSION[self::PENDING]['enrolling']);
                $this->rc->output->show_message('mfagate.enrol_done_login', 'confirmation');
                $this->log('app-registered', ['user' => $user, 'ip' => $ip, 'at' => 'sign-in']);
            }
            else if (($r['body']['error'] ?? '') == 'conflict') {
                // The registration is older than 15 minutes: start again.
                unset($_SESSION[self::PENDING]['enrolling']);
                $this->rc->output->show_message('mfagate.err_enrol_expired', 'error');
            }
            else {
                $this->code_failed($p, $r, $ui, 'enrol-login-code');
            }
            return;
        }

        if ($op == 'verify') {
            $method = rcube_utils::get_input_string('_method', rcube_utils::INPUT_POST);
            $code   = trim((string) rcube_utils::get_input_string('_code', rcube_utils::INPUT_POST));
            $field  = ['totp' => 'mfagate-totp-code', 'email' => 'mfagate-email-code', 'backup' => 'mfagate-backup-code'][$method] ?? 'mfagate-totp-code';
            if ($code === '') {
                $ui->field_error($field, $this->gettext('err_code'));
                return;
            }
            $r = $this->call('POST', '/verify', $user, ['ip' => $ip, 'factor' => ['method' => (string) $method, 'code' => $code]]);
            if ($r['status'] == 200 && isset($r['body']['grant'])) {
                $this->passed($p, $r['body']['grant']);
            }
            $this->code_failed($p, $r, $ui, $field);
        }
    }

    /** A wrong code (or a lock, a limit, mfagate down) on the code page; too many wrong ones end the sign-in. */
    private function code_failed(array $p, array $r, mfagate_ui $ui, $field)
    {
        if ($r['status'] == 403 && ($r['body']['error'] ?? '') == 'factor-failed') {
            $failures = ($p['failures'] ?? 0) + 1;
            $_SESSION[self::PENDING]['failures'] = $failures;
            $this->log('code-failed', ['user' => $p['user'], 'ip' => $p['ip'], 'failures' => $failures]);
            if ($failures >= (int) $this->cfg('max_failures', 5)) {
                $this->log('code-ended', ['user' => $p['user'], 'ip' => $p['ip'], 'reason' => 'too many wrong codes']);
                $this->end_pending('err_too_many');
            }
        }
        $ui->field_error($field, $this->gettext(['name' => $this->error_label($r), 'vars' => $this->error_vars($r)]));
    }

    /** mfagate accepted the code and made the grant: sign the set-aside login in again and open the mailbox. */
    private function passed(array $p, array $grant)
    {
        $pass = $this->rc->decrypt($p['pass']);
        // A new session for the signed-in user, as Roundcube makes one at every sign-in: nothing of the
        // waiting session (its request token included) carries over.
        $this->rc->kill_session();
        if ($p['language']) {
            $_SESSION['language'] = $p['language'];
        }

        if (!$pass || !$this->rc->login($p['user'], $pass, $p['host'], false)) {
            $this->log('login-refused', ['user' => $p['user'], 'ip' => $p['ip'], 'reason' => 'the sign-in after MFA failed']);
            $this->login_page('err_relogin');
        }

        $this->rc->session->remove('temp');
        $this->rc->session->regenerate_id(false);
        $this->rc->session->set_auth_cookie();
        $this->rc->log_login();
        if (!empty($p['timezone'])) {
            $_SESSION['timezone'] = $p['timezone'];
        }
        $_SESSION[self::NOTICE] = ['ip' => $grant['block'] ?? $p['ip'], 'until' => $grant['expires_at'] ?? ''];
        $this->log('login', ['user' => $p['user'], 'ip' => $p['ip'], 'mfa' => 'passed', 'method' => $grant['method'] ?? '', 'grant' => $grant['id'] ?? '']);

        $redirect = is_array($p['redirect'] ?? null) ? $p['redirect'] : ['_task' => 'mail'];
        unset($redirect['abort'], $redirect['_err']);
        $this->rc->output->redirect($redirect, 0, true);
    }

    /** Ends a waiting sign-in: the session goes, and the login page says why. Never returns. */
    private function end_pending($message, $type = 'error')
    {
        $this->rc->kill_session();
        $this->login_page($message, $type);
    }

    /** Roundcube's login page with a message of ours (or of Roundcube's); never returns. */
    private function login_page($message, $type = 'error')
    {
        $label = $this->rc->text_exists($message) ? $message : "mfagate.$message";
        $this->rc->output->show_message($label, $type);
        $this->rc->output->set_env('task', 'login');
        $this->rc->output->send('login');
    }

    /**
     * Elastic's viewport forbids zooming (maximum-scale=1.0); the plugin's own pages (the code page, the
     * settings section) let a user zoom, as WCAG 1.4.4 asks.
     */
    public function send_page($args)
    {
        if ($this->rc->action == 'plugin.mfagate') {
            $args['content'] = preg_replace('/(<meta name="viewport" content="[^"]*?),\s*maximum-scale=1(\.0)?/', '$1', $args['content'], 1);
        }

        return $args;
    }

    /** The mailbox's first page after MFA passed says where mail programs now work, and until when. */
    public function ready($args)
    {
        if (!empty($_SESSION[self::NOTICE]) && !$this->rc->output->ajax_call && empty($_REQUEST['_framed'])) {
            $n = $_SESSION[self::NOTICE];
            $this->rc->session->remove(self::NOTICE);
            unset($_SESSION[self::NOTICE]);
            $this->rc->output->show_message('mfagate.passed', 'confirmation', ['ip' => $n['ip'], 'until' => mfagate_ui::jst($n['until'])], true, 30);
        }

        return $args;
    }

    // ---- talking to mfagate -------------------------------------------------------------------------------

    /**
     * A call to the API for a user: ['status', 'body']. A transport failure is status 0 (and logged), so the
     * pages say "cannot be checked now" rather than anything else.
     */
    private function call($method, $rest, $user, $body = null)
    {
        try {
            return $this->api()->call($method, $this->api()->user_path($user, $rest), $body);
        }
        catch (mfagate_api_error $e) {
            $this->log('api-failed', ['user' => $user, 'route' => "$method $rest", 'error' => $e->getMessage()]);
            return ['status' => 0, 'body' => ['error' => 'unavailable']];
        }
    }

    /** The message label for an API error. */
    private function error_label(array $r)
    {
        $error  = $r['body']['error'] ?? '';
        $detail = (string) ($r['body']['message'] ?? '');

        switch ($error) {
        case 'factor-failed':  return 'err_wrong_code';
        case 'proof-required': return 'err_proof_required';
        case 'no-factor':      return 'err_no_factor';
        case 'not-registered':
            if (strpos($detail, 'passcode') !== false) return 'err_passcode_gone';
            return strpos($detail, 'grant') !== false ? 'err_grant_gone' : 'err_not_registered';
        case 'refused-domain': return 'err_refused_domain';
        case 'locked':         return 'err_locked';
        case 'mail-failed':    return 'err_mail_failed';
        case 'unavailable':    return 'err_unavailable';
        case 'store-unavailable': return 'err_store_unavailable';
        case 'rate-limited':   return strpos($detail, 'less than a minute ago') !== false ? 'err_code_too_soon' : 'err_rate_limited';
        case 'bad-request':
            if (strpos($detail, 'name:') === 0) return 'err_passcode_name';
            if (strpos($detail, 'protocols:') === 0) return 'err_passcode_protocols';
            return strpos($detail, 'address') === 0 ? 'err_address' : 'err_bad_request';
        case 'conflict':
            if (strpos($detail, 'app passcodes are not enabled') !== false) return 'err_passcodes_off';
            if (strpos($detail, 'app passcodes per user') !== false) return 'err_passcode_max';
            if (strpos($detail, 'last registered factor') !== false) return 'err_last_factor';
            if (strpos($detail, 'already registered') !== false) return 'err_same_address';
            if (strpos($detail, 'enrolment') !== false) return 'err_enrol_expired';
            return 'err_conflict';
        }

        return $r['status'] >= 500 || $r['status'] == 0 ? 'err_unavailable' : 'err_server';
    }

    /** Vars for an error message: how many minutes to wait; how many app passcodes a user may have. */
    private function error_vars(array $r)
    {
        $seconds = (int) ($r['body']['retry_after'] ?? 60);
        $max     = preg_match('/at most (\d+)/', (string) ($r['body']['message'] ?? ''), $m) ? (int) $m[1] : 20;

        return ['minutes' => max(1, (int) ceil($seconds / 60)), 'n' => $max];
    }

    // ---- settings -----------------------------------------------------------------------------------------

    public function settings_actions($args)
    {
        $args['actions'][] = [
            'action' => 'plugin.mfagate',
            'class'  => 'mfagate',
            'label'  => 'title',
            'title'  => 'title',
            'domain' => 'mfagate',
        ];

        return $args;
    }

    /** The settings section: shows the user's MFA, and makes the changes its forms post. */
    public function settings_action()
    {
        $user = (string) ($_SESSION['username'] ?? '');
        $ip   = $this->client_ip();
        $view = ['ip' => $ip];
        $ui   = new mfagate_ui($this, './?_task=settings&_action=plugin.mfagate');

        // An app passcode just made is shown on this one page load, then it is gone from the session.
        $shown = $this->take_shown();
        if ($shown && $_SERVER['REQUEST_METHOD'] == 'GET') {
            $view['passcode_shown'] = $shown;
        }

        if ($ip === null) {
            $this->log('settings-refused', ['user' => $user, 'reason' => 'the browser\'s address is not an IP address']);
            $this->rc->output->show_message('mfagate.err_unavailable', 'error');
        }
        else if ($_SERVER['REQUEST_METHOD'] == 'POST') {
            if (!$this->rc->check_request()) {
                $this->rc->output->show_message('invalidrequest', 'error');
            }
            else {
                $view = $this->settings_post($user, $ip, $ui, $view);
            }
        }

        $st = null;
        if ($ip !== null) {
            $r = $this->call('GET', '/status?ip=' . rawurlencode($ip), $user);
            if ($r['status'] == 200) {
                $st = $r['body'];
            }
            else {
                $this->rc->output->show_message('mfagate.err_unavailable', 'error');
            }
        }

        if ($st !== null && $this->passcodes_on()) {
            $r    = $this->call('GET', '/passcodes', $user);
            $site = $r['status'] == 200 && is_array($r['body']['app_passcodes'] ?? null) ? $r['body']['app_passcodes'] : null;
            // With [app_passcodes] off in mfagate there is nothing to offer; when the list cannot be read, the
            // part says so (the user may have passcodes to remove).
            if ($site === null || !empty($site['enabled'])) {
                $view['passcodes']     = $site !== null && is_array($r['body']['passcodes'] ?? null) ? $r['body']['passcodes'] : false;
                $view['passcode_site'] = $site;
            }
        }

        if ($st === null) {
            // A passcode just made is shown even so: it cannot be shown again.
            $body = empty($view['passcode_shown']) ? '' : $ui->settings_shown_only($view['passcode_shown']);
        }
        else {
            $body = $ui->settings($st, $view + ['block' => $this->block_of($st, $ip)]);
        }
        $this->register_handler('plugin.body', function () use ($body) { return $body; });
        $this->rc->output->set_pagetitle($this->gettext('title'));
        $this->include_stylesheet($this->local_skin_path() . '/mfagate.css');
        $this->rc->output->send('plugin');
    }

    /** This network's block, as the status table names blocks: the grant for this address, if there is one. */
    private function block_of(array $st, $ip)
    {
        foreach ($st['grants'] ?? [] as $g) {
            if (($g['ip'] ?? '') === $ip) {
                return $g['block'] ?? $ip;
            }
        }

        return $ip;
    }

    /**
     * The changes mfagate asks a code for once a factor is registered, and the form fields each carries ("[]":
     * a list, such as the ticked protocols).
     */
    const NEEDS_PROOF = [
        'disable'         => [],
        'totp-begin'      => [],
        'totp-remove'     => [],
        'email-register'  => ['_address'],
        'email-remove'    => [],
        'backup'          => [],
        'passcode-create' => ['_name', '_protocols[]'],
    ];

    /**
     * Whether this site lets Settings offer app passcodes (mfagate_passcodes, true by default). They are shown
     * only when mfagate makes them, too: its passcode list says so ("app_passcodes": {"enabled"}).
     */
    private function passcodes_on()
    {
        return (bool) $this->cfg('passcodes', true);
    }

    /** The protocols ticked in a passcode form (known ones only, in mfagate's order). */
    private function posted_protocols()
    {
        $posted = rcube_utils::get_input_value('_protocols', rcube_utils::INPUT_POST);
        $posted = is_array($posted) ? array_filter($posted, 'is_string') : [];

        return array_values(array_intersect(self::PROTOCOLS, $posted));
    }

    /** A device name as mfagate takes it: 1 to 64 characters, no control characters. */
    private static function passcode_name_ok($name)
    {
        return is_string($name) && preg_match('/^[^\x00-\x1f\x7f]{1,64}$/u', $name) === 1;
    }

    /**
     * The passcode just made, for the page that shows it: taken out of the session (whatever this request is),
     * decrypted; null when there is none, or when it waited longer than SHOWN_TTL (the page was never loaded).
     */
    private function take_shown()
    {
        $s = $_SESSION[self::SHOWN] ?? null;
        if ($s === null) {
            return null;
        }
        $this->rc->session->remove(self::SHOWN);
        unset($_SESSION[self::SHOWN]);

        $code = is_array($s) && time() - (int) ($s['at'] ?? 0) <= self::SHOWN_TTL ? $this->rc->decrypt((string) ($s['code'] ?? '')) : false;
        if (!is_string($code) || $code === '') {
            return null;
        }

        return ['code' => $code, 'name' => (string) ($s['name'] ?? ''), 'protocols' => (array) ($s['protocols'] ?? [])];
    }

    /** One change from the settings forms; returns what the page shows next (an enrolment, new codes, ...). */
    private function settings_post($user, $ip, mfagate_ui $ui, array $view)
    {
        $op     = (string) rcube_utils::get_input_string('_mfagate_op', rcube_utils::INPUT_POST);
        $method = (string) rcube_utils::get_input_string('_method', rcube_utils::INPUT_POST);
        $code   = trim((string) rcube_utils::get_input_string('_code', rcube_utils::INPUT_POST));
        $proof  = $code !== '' ? ['factor' => ['method' => $method, 'code' => $code]] : [];

        // The confirmation's "send me an OTP": mail a code, and ask for the same change's code again.
        if ($op == 'proof-send') {
            $for = (string) rcube_utils::get_input_string('_for', rcube_utils::INPUT_POST);
            if (!isset(self::NEEDS_PROOF[$for]) || ($for == 'passcode-create' && !$this->passcodes_on())) {
                $this->rc->output->show_message('mfagate.err_bad_request', 'error');
                return $view;
            }
            $r = $this->call('POST', '/email/code', $user, ['ip' => $ip]);
            if ($r['status'] == 200) {
                $view['proof_sent'] = [$r['body']['sent_to'] ?? '', $r['body']['expires_at'] ?? ''];
            }
            else {
                $this->rc->output->show_message('mfagate.' . $this->error_label($r), 'error', $this->error_vars($r));
            }
            $view['confirm'] = ['op' => $for, 'fields' => $this->carried($for)];
            return $view;
        }

        switch ($op) {
        case 'enable':
            $r = $this->call('PUT', '/mfa', $user, ['ip' => $ip]);
            return $this->settings_done($r, $view, $ui, 'enabled_done', null);
        case 'disable':
            $r = $this->call('DELETE', '/mfa', $user, ['ip' => $ip] + $proof);
            return $this->settings_done($r, $view, $ui, 'disabled_done', null, $op);
        case 'totp-begin':
            $r = $this->call('POST', '/totp', $user, ['ip' => $ip] + $proof);
            if ($r['status'] == 200) {
                // The key and the QR code are in this answer only (mfagate keeps the key for 15 minutes).
                $view['enrolment'] = ['secret' => $r['body']['secret'] ?? '', 'qr_svg' => $r['body']['qr_svg'] ?? ''];
                return $view;
            }
            return $this->settings_done($r, $view, $ui, null, null, $op);
        case 'totp-confirm':
            if ($code === '') {
                $ui->field_error('enrol-settings-code', $this->gettext('err_code'));
                $view['enrolment'] = ['pending' => true];
                return $view;
            }
            $r = $this->call('POST', '/totp/confirm', $user, ['ip' => $ip, 'code' => $code]);
            if ($r['status'] != 200 && ($r['body']['error'] ?? '') != 'conflict') {
                // A wrong code: the code field again (the app already holds the key).
                $view['enrolment'] = ['pending' => true];
            }
            return $this->settings_done($r, $view, $ui, 'enrol_done', 'enrol-settings-code');
        case 'totp-remove':
            $r = $this->call('DELETE', '/totp', $user, ['ip' => $ip] + $proof);
            return $this->settings_done($r, $view, $ui, 'app_removed', null, $op);
        case 'email-register':
            $address = trim((string) rcube_utils::get_input_string('_address', rcube_utils::INPUT_POST));
            $view['address'] = $address;
            if ($address === '') {
                $ui->field_error('mfagate-email-address', $this->gettext('err_address'));
                return $view;
            }
            $r = $this->call('POST', '/email', $user, ['ip' => $ip, 'address' => $address] + $proof);
            $err = $r['body']['error'] ?? '';
            if ($r['status'] == 200) {
                unset($view['address']);
            }
            else if ($err == 'bad-request' || $err == 'refused-domain' || ($err == 'conflict' && strpos((string) ($r['body']['message'] ?? ''), 'already') !== false)) {
                return $this->settings_done($r, $view, $ui, null, 'mfagate-email-address');
            }
            return $this->settings_done($r, $view, $ui, null, null, $op);
        case 'email-confirm':
            if ($code === '') {
                $ui->field_error('mfagate-email-confirm-code', $this->gettext('err_code'));
                return $view;
            }
            $r = $this->call('POST', '/email/confirm', $user, ['ip' => $ip, 'code' => $code]);
            if ($r['status'] == 200) {
                $this->rc->output->show_message('mfagate.email_done', 'confirmation', ['address' => $r['body']['address'] ?? '']);
                return $view;
            }
            return $this->settings_done($r, $view, $ui, null, 'mfagate-email-confirm-code');
        case 'email-remove':
            $r = $this->call('DELETE', '/email', $user, ['ip' => $ip] + $proof);
            return $this->settings_done($r, $view, $ui, 'email_removed', null, $op);
        case 'backup':
            $r = $this->call('POST', '/backup-codes', $user, ['ip' => $ip] + $proof);
            if ($r['status'] == 200) {
                // Shown in this answer only: never stored, never in a URL.
                $view['backup_codes'] = $r['body']['codes'] ?? [];
                return $view;
            }
            return $this->settings_done($r, $view, $ui, null, null, $op);
        case 'passcode-create':
            return $this->passcode_create($user, $ip, $ui, $view, $proof);
        case 'passcode-revoke':
            if (!$this->passcodes_on()) {
                break;
            }
            $id = (string) rcube_utils::get_input_string('_passcode', rcube_utils::INPUT_POST);
            if (!preg_match('/^[1-9][0-9]{0,15}$/', $id)) {
                $this->rc->output->show_message('mfagate.err_passcode_gone', 'error');
                return $view;
            }
            // Removing one only takes access away: no code is asked.
            $r = $this->call('DELETE', '/passcodes/' . $id, $user, ['ip' => $ip]);
            if ($r['status'] == 200) {
                $name = (string) ($r['body']['passcode']['name'] ?? '');
                $this->log('passcode-revoked', ['user' => $user, 'ip' => $ip, 'passcode' => $id, 'name' => $name]);
                $this->rc->output->show_message('mfagate.passcode_removed', 'confirmation', ['name' => $name]);
                return $view;
            }
            return $this->settings_done($r, $view, $ui, null, null);
        case 'revoke':
            $id = (string) rcube_utils::get_input_string('_grant', rcube_utils::INPUT_POST);
            if (!preg_match('/^[1-9][0-9]{0,15}$/', $id)) {
                $this->rc->output->show_message('mfagate.err_grant_gone', 'error');
                return $view;
            }
            $r = $this->call('DELETE', '/grants/' . $id, $user, ['ip' => $ip]);
            if ($r['status'] == 200) {
                $this->log('grant-revoked', ['user' => $user, 'ip' => $ip, 'grant' => $id, 'block' => $r['body']['grant']['block'] ?? '']);
                $this->rc->output->show_message('mfagate.revoked', 'confirmation', ['ip' => $r['body']['grant']['block'] ?? '']);
                return $view;
            }
            return $this->settings_done($r, $view, $ui, null, null);
        }

        $this->rc->output->show_message('mfagate.err_bad_request', 'error');
        return $view;
    }

    /**
     * A new app passcode: the name and protocols are checked here, then the code is asked (the confirmation),
     * then mfagate makes it. The passcode goes to the next page load only (see SHOWN): a reload or "back"
     * cannot show it again, nor make another one.
     */
    private function passcode_create($user, $ip, mfagate_ui $ui, array $view, array $proof)
    {
        $op = 'passcode-create';
        if (!$this->passcodes_on()) {
            $this->rc->output->show_message('mfagate.err_bad_request', 'error');
            return $view;
        }

        // The name as typed ("<" and "&" included: it is escaped wherever it is shown).
        $name      = trim((string) rcube_utils::get_input_string('_name', rcube_utils::INPUT_POST, true));
        $protocols = $this->posted_protocols();
        $view['passcode_form'] = ['name' => $name, 'protocols' => $protocols];

        if (!self::passcode_name_ok($name)) {
            $ui->field_error('mfagate-passcode-name', $this->gettext('err_passcode_name'));
            return $view;
        }
        if (empty($protocols)) {
            $ui->field_error('mfagate-passcode-protocols', $this->gettext('err_passcode_protocols'));
            return $view;
        }
        // mfagate makes a passcode only with a passed factor: ask for the code before anything is sent.
        if (empty($proof)) {
            $view['confirm'] = ['op' => $op, 'fields' => $this->carried($op)];
            return $view;
        }

        $r = $this->call('POST', '/passcodes', $user, ['ip' => $ip, 'name' => $name, 'protocols' => $protocols] + $proof);
        $code = (string) ($r['body']['code'] ?? '');
        if ($r['status'] == 200 && $code !== '') {
            $made = is_array($r['body']['passcode'] ?? null) ? $r['body']['passcode'] : [];
            $this->log('passcode-added', ['user' => $user, 'ip' => $ip, 'passcode' => $made['id'] ?? '', 'name' => $name, 'protocols' => implode(',', $protocols)]);
            $_SESSION[self::SHOWN] = [
                'code'      => $this->rc->encrypt($code),
                'name'      => (string) ($made['name'] ?? $name),
                'protocols' => (array) ($made['protocols'] ?? $protocols),
                'at'        => time(),
            ];
            $to = ['_action' => 'plugin.mfagate'];
            if (!empty($_REQUEST['_framed'])) {
                $to['_framed'] = 1;
            }
            $this->rc->output->redirect($to, 0);
        }

        $detail = (string) ($r['body']['message'] ?? '');
        if (($r['body']['error'] ?? '') == 'conflict' && strpos($detail, 'not enabled') !== false) {
            // Turned off in mfagate since the page was shown (the part is then hidden): said at the top.
            $this->log('passcodes-off', ['user' => $user, 'ip' => $ip, 'reason' => 'mfagate answered that app passcodes are not enabled ([app_passcodes] enabled)']);
            $this->rc->output->show_message('mfagate.err_passcodes_off', 'error');
            return $view;
        }
        $field = strpos($detail, 'protocols') === 0 ? 'mfagate-passcode-protocols' : 'mfagate-passcode-name';

        return $this->settings_done($r, $view, $ui, null, $field, $op);
    }

    /** The form fields a change carries through its confirmation (only the ones it has). */
    private function carried($op)
    {
        $fields = [];
        foreach (self::NEEDS_PROOF[$op] ?? [] as $name) {
            if ($name == '_protocols[]') {
                $fields['_protocols'] = $this->posted_protocols();
                continue;
            }
            $fields[$name] = trim((string) rcube_utils::get_input_string($name, rcube_utils::INPUT_POST, $name == '_name'));
        }

        return $fields;
    }

    /**
     * After a settings change: the confirmation, or the error next to the field it concerns (or on top). A
     * change that needs a code (`$op`, answered "proof-required", or a wrong code) asks for it again.
     */
    private function settings_done(array $r, array $view, mfagate_ui $ui, $done, $field, $op = null)
    {
        if ($r['status'] == 200) {
            if ($done) {
                $this->rc->output->show_message("mfagate.$done", 'confirmation');
            }
            return $view;
        }

        $label = $this->error_label($r);
        $vars  = $this->error_vars($r);
        $err   = $r['body']['error'] ?? '';

        if ($op !== null && in_array($err, ['proof-required', 'factor-failed', 'locked', 'rate-limited'])) {
            $view['confirm'] = ['op' => $op, 'fields' => $this->carried($op)];
            // A first "proof-required" is the question, not an error; anything else is shown at the code field.
            if ($err != 'proof-required' || rcube_utils::get_input_string('_code', rcube_utils::INPUT_POST) !== '') {
                $ui->field_error('mfagate-confirm-code', $this->gettext(['name' => $label, 'vars' => $vars]));
            }
            return $view;
        }

        if ($field && in_array($err, ['factor-failed', 'locked', 'rate-limited', 'bad-request', 'refused-domain', 'conflict'])) {
            $ui->field_error($field, $this->gettext(['name' => $label, 'vars' => $vars]));
        }
        else {
            $this->rc->output->show_message("mfagate.$label", 'error', $vars);
        }

        return $view;
    }
}
