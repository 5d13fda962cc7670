"""Connecting to OMERO without ever writing a secret down.

Where each setting comes from, first match wins:

=============  =====================================  ===========================================
setting        argument                               environment
=============  =====================================  ===========================================
host           ``host`` (``wss://...`` allowed)        ``OMERO_HOST``
port           ``port``                               ``OMERO_PORT`` (default 4064)
user           ``user``                               ``OMERO_USER``
group          ``group``                              ``OMERO_GROUP``
password       ``password`` (API only)                ``OMERO_PASSWORD`` (or ezomero's ``OMERO_PASS``),
                                                      else an interactive ``getpass`` prompt
session key    ``session_key`` (API only)             ``OMERO_SESSION_KEY``, or the session of an
                                                      ``omero login`` (``use_cli_login=True``)
=============  =====================================  ===========================================

A session key, when given, is used instead of a password. Secrets are held in memory only, in a
:class:`Secret` whose ``repr``/``str`` print ``***``; they are never written to a file, and a logging
filter masks them in everything omero-py logs (omero-py logs the session key at INFO level when it
connects). Logins go over TLS (Glacier2's SSL router, OMERO's default); ``secure=True`` (our default)
keeps the data connection encrypted too.

Errors are :class:`OmeroError` subclasses with a message that names the host and the fix:
:class:`OmeroConnectionError` (host unreachable, connection lost), :class:`OmeroAuthError` (wrong user
or password, expired session), :class:`OmeroPermissionError`, :class:`OmeroNotFoundError`.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..errors import StimageInputError

log = logging.getLogger(__name__)

ENV_HOST, ENV_PORT, ENV_USER, ENV_GROUP = "OMERO_HOST", "OMERO_PORT", "OMERO_USER", "OMERO_GROUP"
ENV_PASSWORD, ENV_PASSWORD_EZOMERO, ENV_SESSION_KEY, ENV_SECURE = (
    "OMERO_PASSWORD", "OMERO_PASS", "OMERO_SESSION_KEY", "OMERO_SECURE")
DEFAULT_PORT = 4064
_INSTALL_HINT = ('the OMERO client (omero-py with zeroc-ice 3.6) is not installed. Install it with '
                 '`bash .ci/install_omero.sh .venv/bin/python` (builds zeroc-ice once), '
                 '`pip install "stimage_nb[omero]"` where a zeroc-ice 3.6.5 wheel exists, or conda-forge\'s '
                 'zeroc-ice=3.6.5 (environment.yml).')


# ----------------------------------------------------------------------------- errors
class OmeroError(RuntimeError):
    """Base class of OMERO failures (server side or transport); the message names the fix."""


class OmeroConnectionError(OmeroError):
    """The server cannot be reached, or the connection dropped."""


class OmeroAuthError(OmeroError):
    """Login refused: wrong user name or password, or an expired session key."""


class OmeroPermissionError(OmeroError):
    """The user may not read or write the object."""


class OmeroNotFoundError(OmeroError, StimageInputError):
    """An id that names no object the user can see (also a :class:`StimageInputError`)."""


def require_omero():
    """Import omero-py (and Ice), or raise an :class:`ImportError` that says how to install it."""
    try:
        import Ice  # noqa: F401
        import omero  # noqa: F401
        import omero.clients  # noqa: F401  (registers the model object factories)
        import omero.gateway  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the client
        raise ImportError(f"stimage_nb.omero: {_INSTALL_HINT} ({e})") from e
    return omero


# ----------------------------------------------------------------------------- secrets
class Secret:
    """A string that never shows itself in ``repr``, ``str``, f-strings or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        """The secret itself: call only where it is handed to omero-py."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "***"

    def __reduce__(self):  # never pickled to disk (e.g. by a notebook checkpoint of a session object)
        raise TypeError("Secret objects cannot be pickled")

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class _Redactor(logging.Filter):
    """Mask every live secret in records logged by omero-py and by this package."""

    def __init__(self):
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if value and len(value) >= 4:  # a 1-3 character "password" would mask half of every message
            with self._lock:
                self._secrets.add(value)

    def discard(self, value: str) -> None:
        with self._lock:
            self._secrets.discard(value)

    def redact(self, text: str, *, uuids: bool = False) -> str:
        for s in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(s, "***")
        if uuids:  # OMERO session keys are UUIDs; omero-py logs a new one before we can learn it
            text = _UUID_RE.sub("***", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix
            return True
        clean = self.redact(msg, uuids=record.name.startswith("omero"))
        if clean != msg:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = self.redact(str(record.exc_info[1]))
            if text != str(record.exc_info[1]):
                record.exc_info = None
                record.exc_text = None
                record.msg = f"{record.msg} [exception text withheld: it contained a secret]"
        return True


REDACTOR = _Redactor()
# Loggers whose records may carry a password or session key: omero-py's gateway (logs the session
# uuid on connect/close), its client, and ours. A filter on a logger runs before any handler sees
# the record, including handlers reached by propagation.
_REDACTED_LOGGERS = ("omero", "omero.gateway", "omero.client", "omero.clients", "omero.util",
                     "omero.gateway.utils", "stimage_nb.omero", "stimage_nb.omero.connection",
                     "stimage_nb.omero.pull", "stimage_nb.omero.push", "stimage_nb.omero.tables",
                     "stimage_nb.omero.browse", "stimage_nb.omero.cli", "stimage_nb.omero.model")


def _install_redaction() -> None:
    for name in _REDACTED_LOGGERS:
        lg = logging.getLogger(name)
        if REDACTOR not in lg.filters:
            lg.addFilter(REDACTOR)


_install_redaction()


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class OmeroTarget:
    """Where to connect (no secrets here: this object may be printed and logged)."""

    host: str
    port: int = DEFAULT_PORT
    user: str | None = None
    group: str | None = None
    secure: bool = True

    def __str__(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"{who}{self.host}:{self.port}"


def _env_bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "t", "yes", "y", "on")


def resolve_target(host: str | None = None, port: int | None = None, user: str | None = None,
                   group: str | None = None, secure: bool | None = None) -> OmeroTarget:
    """Fill host, port, user, group and ``secure`` from the arguments, else the environment."""
    host = host or os.environ.get(ENV_HOST)
    if not host:
        raise StimageInputError(f"no OMERO host given: pass host= (CLI: --host) or set {ENV_HOST}.")
    port_s = port if port is not None else os.environ.get(ENV_PORT) or DEFAULT_PORT
    try:
        port_i = int(port_s)
    except (TypeError, ValueError):
        raise StimageInputError(f"OMERO port {port_s!r} is not a number (set {ENV_PORT} or --port).") from None
    return OmeroTarget(host=str(host), port=port_i, user=user or os.environ.get(ENV_USER) or None,
                       group=group or os.environ.get(ENV_GROUP) or None,
                       secure=_env_bool(os.environ.get(ENV_SECURE), True) if secure is None else bool(secure))


def _cli_login_session(target: OmeroTarget) -> Secret | None:
    """The session key of a current ``omero login`` for this host (omero-py's session store)."""
    try:
        from omero.util.sessions import SessionsStore
    except ImportError:
        return None
    try:
        host, name, uuid, port = SessionsStore().get_current()
    except Exception:  # noqa: BLE001 - no store, unreadable store: just no session
        return None
    if uuid and host == target.host and (port is None or int(port) == target.port):
        return Secret(uuid)
    return None


def resolve_secret(target: OmeroTarget, *, password: str | Secret | None = None,
                   session_key: str | Secret | None = None, prompt: bool | None = None,
                   use_cli_login: bool = False, input_fn: Callable[[str], str] | None = None
                   ) -> tuple[str, Secret]:
    """Choose the credential: ``("session", key)`` or ``("password", pw)``.

    Order: explicit session key, explicit password, ``OMERO_SESSION_KEY``, ``OMERO_PASSWORD`` /
    ``OMERO_PASS``, an ``omero login`` session (``use_cli_login``), then a ``getpass`` prompt when
    ``prompt`` (default: when stdin is a terminal).
    """
    def wrap(v):
        return v if isinstance(v, Secret) else Secret(str(v))

    if session_key:
        return "session", wrap(session_key)
    if password:
        return "password", wrap(password)
    if os.environ.get(ENV_SESSION_KEY):
        return "session", Secret(os.environ[ENV_SESSION_KEY])
    for var in (ENV_PASSWORD, ENV_PASSWORD_EZOMERO):
        if os.environ.get(var):
            return "password", Secret(os.environ[var])
    if use_cli_login:
        key = _cli_login_session(target)
        if key is not None:
            return "session", key
    if prompt is None:
        prompt = sys.stdin is not None and sys.stdin.isatty()
    if prompt:
        ask = input_fn or getpass.getpass
        value = ask(f"OMERO password for {target}: ")
        if value:
            return "password", Secret(value)
    raise StimageInputError(
        f"no OMERO credential for {target}: set {ENV_PASSWORD} or {ENV_SESSION_KEY} in the environment, "
        "run interactively to be prompted, or log in with `omero login` and pass use_cli_login=True "
        "(CLI: --cli-login). Passwords are never accepted on the command line.")


# ----------------------------------------------------------------------------- errors from Ice
def _ice_error_class(exc) -> type[OmeroError] | None:
    """Map an Ice/Glacier2/omero exception to our error class (None: not a known failure)."""
    try:
        import Glacier2
        import Ice
        import omero
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, (Glacier2.PermissionDeniedException, Glacier2.CannotCreateSessionException,
                        omero.AuthenticationException, omero.ExpiredCredentialException)):
        return OmeroAuthError
    if isinstance(exc, omero.CmdError):       # a server-side command (e.g. Delete2) failed
        return OmeroError
    if isinstance(exc, omero.SecurityViolation):
        return OmeroPermissionError
    if isinstance(exc, Glacier2.SessionNotExistException):
        return OmeroAuthError
    if isinstance(exc, (Ice.ConnectionLostException, Ice.ConnectFailedException, Ice.DNSException,
                        Ice.TimeoutException, Ice.SocketException, Ice.CommunicatorDestroyedException,
                        Ice.ObjectNotExistException, Ice.ConnectionRefusedException,
                        Ice.CloseConnectionException, Ice.SecurityException, omero.ClientError)):
        return OmeroConnectionError
    return None


def is_connection_loss(exc: BaseException) -> bool:
    """True for failures a reconnect can cure (dropped TCP connection, destroyed session proxy)."""
    return _ice_error_class(exc) is OmeroConnectionError


def translate_error(exc: BaseException, target: OmeroTarget | str, doing: str) -> OmeroError:
    """An :class:`OmeroError` with a message that names the host, the action and the fix."""
    cls = _ice_error_class(exc) or OmeroError
    name = type(exc).__name__
    err = getattr(exc, "err", None)  # omero.CmdError carries the command's ERR response
    raw = (f"{getattr(err, 'category', '')}: {getattr(err, 'name', '')}" if err is not None
           else getattr(exc, "message", "") or getattr(exc, "reason", "") or exc)
    detail = REDACTOR.redact(str(raw).strip())[:300]
    if cls is OmeroAuthError:
        msg = (f"{doing} on {target}: login refused ({name}). Check the user name and password "
               f"({ENV_USER}/{ENV_PASSWORD}), or get a fresh session key; expired keys are refused too.")
    elif cls is OmeroConnectionError:
        msg = (f"{doing} on {target}: cannot reach the OMERO server ({name}{': ' + detail if detail else ''}). "
               "Check the host name and port (the Ice port, usually 4064, or wss://host/omero-ws), your "
               "network/VPN, and that the server is running.")
    elif cls is OmeroPermissionError:
        msg = (f"{doing} on {target}: permission denied ({name}: {detail}). The object belongs to a group "
               "you cannot write to, or you are not a member; ask its owner or choose another group.")
    else:
        msg = f"{doing} on {target}: {name}: {detail}"
    err = cls(msg)
    err.__cause__ = exc
    return err


# ----------------------------------------------------------------------------- the session
@dataclass(repr=False)
class OmeroSession:
    """A BlitzGateway connection that can reconnect itself; safe to print.

    Use :func:`connect` to make one. ``session.gateway`` is the ``omero.gateway.BlitzGateway``;
    :meth:`reconnect` re-joins the server session (or logs in again with the password) after a
    dropped connection, so long pushes and pulls resume where they stopped. Tests build one around a
    test double with a ``factory`` that returns fresh gateways.
    """

    target: OmeroTarget
    gateway: object
    factory: Callable[[], object] | None = None
    _credential: tuple[str, Secret] | None = field(default=None, repr=False)
    _joined: bool = False

    def __repr__(self) -> str:
        state = "connected" if self.is_connected() else "closed"
        return f"OmeroSession({self.target}, {state})"

    __str__ = __repr__

    def is_connected(self) -> bool:
        try:
            return bool(self.gateway is not None and self.gateway.isConnected())
        except Exception:  # noqa: BLE001
            return False

    @property
    def session_key(self) -> Secret | None:
        """The server session key (for handing to another process); a :class:`Secret`."""
        try:
            return Secret(self.gateway.c.getSessionId())
        except Exception:  # noqa: BLE001
            return None

    def reconnect(self) -> object:
        """Replace the gateway with a fresh connection (raises :class:`OmeroError` when impossible)."""
        if self.factory is None:
            raise OmeroConnectionError(f"the connection to {self.target} was lost and this session cannot "
                                       "reconnect (it was built around an existing gateway); connect again.")
        try:
            self.gateway.close(hard=False)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self.gateway = self.factory()
        log.info("reconnected to %s", self.target)
        return self.gateway

    def close(self) -> None:
        """End the connection; a joined session (session key) is left alive for its owner."""
        if self.gateway is None:
            return
        try:
            self.gateway.close(hard=not self._joined)
        except Exception as e:  # noqa: BLE001
            log.debug("closing %s: %s", self.target, type(e).__name__)
        finally:
            if self._credential is not None:
                REDACTOR.discard(self._credential[1].reveal())
            self.gateway = None

    def __enter__(self) -> "OmeroSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_session(conn) -> OmeroSession:
    """Accept an :class:`OmeroSession` or a bare (connected) BlitzGateway."""
    if isinstance(conn, OmeroSession):
        return conn
    if conn is None:
        raise StimageInputError("no OMERO connection: call stimage_nb.omero.connect(...) first.")
    host = getattr(conn, "host", None) or "omero"
    port = getattr(conn, "port", None) or DEFAULT_PORT
    try:
        port = int(port)
    except (TypeError, ValueError):
        port = DEFAULT_PORT
    return OmeroSession(OmeroTarget(str(host), port), conn)


def _open_gateway(target: OmeroTarget, kind: str, secret: Secret):
    """Log in (or join a session) and return a connected BlitzGateway; raise OmeroError on failure."""
    require_omero()
    from omero.gateway import BlitzGateway

    REDACTOR.add(secret.reveal())
    doing = "joining session" if kind == "session" else "logging in"
    gw = None

    def dispose():
        try:
            if gw is not None:
                gw.close(hard=False)  # destroys the Ice communicator it created
        except Exception:  # noqa: BLE001
            pass

    try:
        if kind == "session":
            gw = BlitzGateway(host=target.host, port=target.port, secure=target.secure, group=target.group)
            ok = gw.connect(sUuid=secret.reveal())
        else:
            gw = BlitzGateway(target.user, secret.reveal(), host=target.host, port=target.port,
                              secure=target.secure, group=target.group)
            ok = gw.connect()
    except Exception as e:  # noqa: BLE001 - Ice raises SyscallExceptions straight through connect()
        dispose()
        raise translate_error(e, target, doing) from None
    if not ok:
        last = gw.getLastError() if hasattr(gw, "getLastError") else None
        dispose()
        if last is not None:
            raise translate_error(last, target, doing) from None
        if kind == "session":
            raise OmeroAuthError(f"{doing} on {target}: the session key was refused (expired or from another "
                                 "server). Log in again or set a fresh OMERO_SESSION_KEY.")
        raise OmeroAuthError(f"{doing} on {target}: login refused. Check the user name and password.")
    try:
        sid = gw.c.getSessionId()
        REDACTOR.add(sid)
    except Exception:  # noqa: BLE001
        pass
    return gw


def connect(host: str | None = None, port: int | None = None, user: str | None = None, *,
            password: str | Secret | None = None, session_key: str | Secret | None = None,
            group: str | None = None, secure: bool | None = None, prompt: bool | None = None,
            use_cli_login: bool = False, keep_alive_s: int = 300) -> OmeroSession:
    """Connect to an OMERO server; returns an :class:`OmeroSession` (a context manager).

    Parameters
    ----------
    host, port, user, group
        Server and account; default to ``OMERO_HOST``, ``OMERO_PORT`` (4064), ``OMERO_USER``,
        ``OMERO_GROUP``.
    password, session_key
        Prefer the environment (``OMERO_PASSWORD``, ``OMERO_SESSION_KEY``) or the prompt; values passed
        here are wrapped in :class:`Secret` and never printed.
    secure
        Keep the data connection on TLS after the (always TLS) login; default ``OMERO_SECURE`` or True.
    prompt
        Ask for the password with ``getpass`` when none is found (default: when run in a terminal).
    use_cli_login
        Reuse the session of a current ``omero login`` for the same host.
    keep_alive_s
        Seconds between omero-py's keep-alive pings (0 disables them).

    Examples
    --------
    >>> with connect("omero.example.org", user="analyst") as conn:   # doctest: +SKIP
    ...     list_images(conn, dataset=51)
    """
    target = resolve_target(host, port, user, group, secure)
    kind, secret = resolve_secret(target, password=password, session_key=session_key, prompt=prompt,
                                  use_cli_login=use_cli_login)
    if kind == "password" and not target.user:
        raise StimageInputError(f"no OMERO user for {target.host}: pass user= (CLI: --user) or set {ENV_USER}.")

    state = {"kind": kind, "secret": secret}

    def factory():
        # Re-join the live server session first (cheap, keeps the session), else log in again.
        gw = None
        sid = state.get("sid")
        if sid is not None:
            try:
                gw = _open_gateway(target, "session", sid)
            except OmeroError:
                gw = None
        if gw is None:
            gw = _open_gateway(target, state["kind"], state["secret"])
        try:
            state["sid"] = Secret(gw.c.getSessionId())
        except Exception:  # noqa: BLE001
            pass
        if keep_alive_s:
            try:
                gw.c.enableKeepAlive(int(keep_alive_s))
            except Exception:  # noqa: BLE001
                pass
        return gw

    gw = factory()
    sess = OmeroSession(target, gw, factory, (kind, secret), _joined=(kind == "session"))
    try:
        ec = gw.getEventContext()
        log.info("connected to %s as %s (group %s)", target.host, ec.userName, ec.groupName)
    except Exception:  # noqa: BLE001
        log.info("connected to %s", target)
    return sess
