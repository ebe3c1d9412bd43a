-- mfagate app passcodes: a Dovecot 2.3 Lua passdb (Debian's dovecot-auth-lua) that goes FIRST in the passdb
-- chain, before the site's own passdb, which stays as it is:
--
--   passdb {
--     driver = lua
--     args = file=/path/to/mfagate-passcode.lua blocking=yes
--     mechanisms = plain login
--     result_success = return-ok
--     result_failure = continue
--     result_internalfail = continue
--   }
--
-- ("mfagate setup dovecot" prints it, with this file's path.) For a password that has the shape of an app
-- passcode (16 letters without i, l and o, spaces, hyphens and case aside) and a mail protocol, it asks mfagate
-- (POST ?command=passcode on its Dovecot endpoint, with the API key) whether it is a working passcode of the
-- user. Yes: OK, with the field mfagate_passcode naming it, which the auth policy request carries to mfagate
-- (passcode=%{passdb:mfagate_passcode}). Anything else falls through to the site's passdb: a password that is
-- not passcode-shaped never leaves Dovecot, and with mfagate unreachable the site password still works as
-- before (a passcode then fails).
--
-- Where mfagate listens and its key come from Dovecot's environment (import_environment, also printed by
-- "mfagate setup dovecot"): MFAGATE_PASSCODE_URL, MFAGATE_API_HEADER, MFAGATE_API_KEY. No auth cache key is
-- set: an empty one crashes Dovecot 2.3.19's auth process, and a cached passcode would outlive its revocation.

local URL = os.getenv("MFAGATE_PASSCODE_URL") or "http://127.0.0.1:8470/?command=passcode"
local HEADER = os.getenv("MFAGATE_API_HEADER") or "X-API-Key"
local KEY = os.getenv("MFAGATE_API_KEY") or ""

-- The protocols passcodes are for (Dovecot's service names); the MFA page's checks ("mfagate-web") and
-- anything else are not asked about.
local SERVICES = { imap = true, pop3 = true, smtp = true, submission = true, sieve = true }

local client

function script_init()
  client = dovecot.http.client({
    request_timeout_msecs = 3000,
    max_attempts = 1,
    user_agent = "mfagate-passcode/1",
  })
  return 0
end

function script_deinit()
end

-- The passcode as mfagate stores it, or nil when the password does not look like one.
local function passcode_of(password)
  local s = password:gsub("[%s%-]", ""):lower()
  if #s ~= 16 or s:find("[^abcdefghjkmnpqrstuvwxyz]") then
    return nil
  end
  return s
end

-- A JSON string: quotes, backslashes and control characters escaped.
local function json(value)
  return '"' .. value:gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

function auth_password_verify(req, password)
  local service = req:var_expand("%s")
  if not SERVICES[service] then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
  end
  local passcode = passcode_of(password)
  if passcode == nil then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
  end

  local body = "{" ..
    '"login":' .. json(req:var_expand("%u")) .. "," ..
    '"passcode":' .. json(passcode) .. "," ..
    '"remote":' .. json(req:var_expand("%{rip}")) .. "," ..
    '"real_remote":' .. json(req:var_expand("%{real_rip}")) .. "," ..
    '"protocol":' .. json(service) .. "}"
  local request = client:request({ url = URL, method = "POST" })
  request:add_header("Content-Type", "application/json")
  if KEY ~= "" then
    request:add_header(HEADER, KEY)
  end
  request:set_payload(body)
  local response = request:submit()
  local status = response:status()
  if status ~= 200 then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "mfagate answered " .. tostring(status)
  end
  local id = response:payload():match('"result":"ok","passcode":"(%d+)"')
  if id == nil then
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  return dovecot.auth.PASSDB_RESULT_OK, { mfagate_passcode = id }
end
