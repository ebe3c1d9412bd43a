<?php

/**
 * The client for mfagate's webmail API (docs/api.md in the mfagate repository): JSON over HTTP on mfagate's
 * UNIX socket, or on a loopback TCP port with a bearer token read from a file. mfagate holds every secret and
 * makes every decision; this class only carries requests and answers.
 */
class mfagate_api_error extends Exception
{
}

class mfagate_api
{
    private $socket;
    private $url;
    private $token_file;
    private $timeout;

    /**
     * @param array $config 'socket' (UNIX socket path), or 'url' (e.g. "http://127.0.0.1:8490") with
     *                      'token_file'; 'timeout' in seconds.
     */
    public function __construct(array $config)
    {
        $this->socket     = (string) ($config['socket'] ?? '');
        $this->url        = rtrim((string) ($config['url'] ?? ''), '/');
        $this->token_file = (string) ($config['token_file'] ?? '');
        $this->timeout    = max(1, (int) ($config['timeout'] ?? 5));

        if ($this->socket === '' && $this->url === '') {
            throw new mfagate_api_error('neither mfagate_api_socket nor mfagate_api_url is set');
        }
    }

    /** GET /v1/users/{user}/status?ip=: what this user needs from this address, factors, grants. */
    public function status($user, $ip)
    {
        return $this->call('GET', $this->user_path($user, '/status') . '?ip=' . rawurlencode($ip));
    }

    /** Any route of the API: returns ['status' => int, 'body' => array]. */
    public function call($method, $path, $body = null)
    {
        if (!function_exists('curl_init')) {
            throw new mfagate_api_error('PHP has no curl extension (install php-curl)');
        }

        $headers = ['Accept: application/json'];

        if ($this->socket !== '') {
            $url = 'http://localhost' . $path;
        }
        else {
            $url       = $this->url . $path;
            $headers[] = 'Authorization: Bearer ' . $this->token();
        }

        $ch = curl_init($url);
        curl_setopt_array($ch, [
            CURLOPT_CUSTOMREQUEST  => $method,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_CONNECTTIMEOUT => $this->timeout,
            CURLOPT_TIMEOUT        => $this->timeout,
            CURLOPT_FOLLOWLOCATION => false,
            CURLOPT_PROTOCOLS      => CURLPROTO_HTTP | CURLPROTO_HTTPS,
        ]);

        if ($this->socket !== '') {
            curl_setopt($ch, CURLOPT_UNIX_SOCKET_PATH, $this->socket);
        }

        if ($body !== null) {
            $headers[] = 'Content-Type: application/json';
            curl_setopt($ch, CURLOPT_POSTFIELDS, json_encode($body, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE));
        }

        curl_setopt($ch, CURLOPT_HTTPHEADER, $headers);

        $text   = curl_exec($ch);
        $status = (int) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
        $error  = curl_error($ch);
        curl_close($ch);

        if ($text === false || $status === 0) {
            // The request carried no secret we could leak here: the path names the user, never a code.
            throw new mfagate_api_error("no answer from mfagate ($method " . strtok($path, '?') . "): $error");
        }

        $json = json_decode((string) $text, true);

        if (!is_array($json)) {
            throw new mfagate_api_error("mfagate answered $status without a JSON object ($method " . strtok($path, '?') . ')');
        }

        return ['status' => $status, 'body' => $json];
    }

    /** "/v1/users/alice%40example.ac.jp/verify" */
    public function user_path($user, $rest)
    {
        return '/v1/users/' . rawurlencode((string) $user) . $rest;
    }

    /** The bearer token for a TCP listener: one word in the token file. */
    private function token()
    {
        if ($this->token_file === '') {
            throw new mfagate_api_error('mfagate_api_url is set but mfagate_api_token_file is not');
        }

        $token = @file_get_contents($this->token_file);

        if ($token === false || trim($token) === '') {
            throw new mfagate_api_error("cannot read the API token from {$this->token_file}");
        }

        return trim($token);
    }
}
