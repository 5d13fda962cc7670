"""Credentials and connection errors: secrets never reach a repr, a log line or an error message."""

from __future__ import annotations

import logging
import pickle

import pytest

from stimage_nb.errors import StimageInputError
from stimage_nb.omero import connection as C

PASSWORD = "pw-Zq8!never-shown"
SESSION = "3f1c9a2e-5b7d-4e11-9c0a-7d2b6e8f0a41"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for v in (C.ENV_HOST, C.ENV_PORT, C.ENV_USER, C.ENV_GROUP, C.ENV_PASSWORD, C.ENV_PASSWORD_EZOMERO,
              C.ENV_SESSION_KEY, C.ENV_SECURE):
        monkeypatch.delenv(v, raising=False)


def test_secret_never_shows_itself():
    s = C.Secret(PASSWORD)
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % s, str([s]), str({"pw": s})):
        assert PASSWORD not in text
    assert s.reveal() == PASSWORD
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(ValueError):
        C.Secret("")


def test_target_from_environment(monkeypatch):
    with pytest.raises(StimageInputError, match="OMERO_HOST"):
        C.resolve_target()
    monkeypatch.setenv(C.ENV_HOST, "omero.example.org")
    monkeypatch.setenv(C.ENV_PORT, "4064")
    monkeypatch.setenv(C.ENV_USER, "analyst")
    monkeypatch.setenv(C.ENV_SECURE, "false")
    t = C.resolve_target()
    assert (t.host, t.port, t.user, t.secure) == ("omero.example.org", 4064, "analyst", False)
    assert C.resolve_target(host="other", port=14064, secure=True).port == 14064
    monkeypatch.setenv(C.ENV_PORT, "not-a-port")
    with pytest.raises(StimageInputError, match="port"):
        C.resolve_target()


def test_credential_order(monkeypatch):
    t = C.OmeroTarget("h", user="u")
    with pytest.raises(StimageInputError) as e:
        C.resolve_secret(t, prompt=False)
    assert "OMERO_PASSWORD" in str(e.value) and "command line" in str(e.value)
    kind, s = C.resolve_secret(t, prompt=True, input_fn=lambda msg: PASSWORD)
    assert kind == "password" and s.reveal() == PASSWORD
    monkeypatch.setenv(C.ENV_PASSWORD_EZOMERO, "from-ezomero-var")
    assert C.resolve_secret(t, prompt=False)[1].reveal() == "from-ezomero-var"
    monkeypatch.setenv(C.ENV_PASSWORD, PASSWORD)
    assert C.resolve_secret(t, prompt=False) == ("password", C.Secret(PASSWORD))
    monkeypatch.setenv(C.ENV_SESSION_KEY, SESSION)       # a session key wins over a password
    assert C.resolve_secret(t, prompt=False) == ("session", C.Secret(SESSION))
    assert C.resolve_secret(t, password="explicit")[1].reveal() == "explicit"


def test_redactor_masks_secrets_in_omero_py_log_records(caplog):
    C.REDACTOR.add(SESSION)
    try:
        with caplog.at_level(logging.DEBUG):
            logging.getLogger("omero.gateway").info("created connection (uuid=%s)" % SESSION)  # what omero-py logs
            logging.getLogger("omero.gateway").debug("Connect attempt, sUuid=%s", SESSION)
            try:
                raise RuntimeError(f"bad session {SESSION}")
            except RuntimeError:
                logging.getLogger("stimage_nb.omero.push").exception("failed")
        text = caplog.text + "".join(r.getMessage() for r in caplog.records)
        assert SESSION not in text
        assert text.count("***") >= 2
    finally:
        C.REDACTOR.discard(SESSION)


def test_session_repr_and_close_hide_secrets():
    class GW:
        def __init__(self):
            self.closed = None

        def isConnected(self):
            return True

        def close(self, hard=True):
            self.closed = hard

    gw = GW()
    s = C.OmeroSession(C.OmeroTarget("h", user="u"), gw, None, ("password", C.Secret(PASSWORD)))
    assert PASSWORD not in repr(s) and PASSWORD not in str(s) and "u@h:4064" in repr(s)
    with pytest.raises(C.OmeroConnectionError, match="connect again"):
        s.reconnect()
    s.close()
    assert gw.closed is True            # our own login: the session is ended
    gw2 = GW()
    C.OmeroSession(C.OmeroTarget("h"), gw2, None, ("session", C.Secret(SESSION)), _joined=True).close()
    assert gw2.closed is False          # a joined session (someone's key) is left alive


def test_error_translation_with_real_exception_classes(omero_stack):
    import Glacier2
    import Ice
    import omero

    t = C.OmeroTarget("omero.example.org", user="u")
    auth = C.translate_error(Glacier2.PermissionDeniedException(reason="bad password"), t, "logging in")
    assert isinstance(auth, C.OmeroAuthError) and "user name and password" in str(auth)
    perm = C.translate_error(omero.SecurityViolation(message="not in group"), t, "saving")
    assert isinstance(perm, C.OmeroPermissionError) and "permission denied" in str(perm)
    lost = C.translate_error(Ice.ConnectionLostException(), t, "pushing")
    assert isinstance(lost, C.OmeroConnectionError) and C.is_connection_loss(Ice.ConnectionLostException())
    cmd = C.translate_error(omero.CmdError(omero.cmd.ERR(category="graph-fail", name="nope", parameters={})), t, "x")
    assert type(cmd) is C.OmeroError and "graph-fail: nope" in str(cmd)
    assert not C.is_connection_loss(ValueError("x"))


def test_real_ice_connection_refused_keeps_password_out_of_everything(omero_stack, monkeypatch, caplog, capfd):
    """A real BlitzGateway login against a closed local port: clear error; the password appears nowhere."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                      # nothing listens there now
    monkeypatch.setenv(C.ENV_PASSWORD, PASSWORD)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(C.OmeroConnectionError) as e:
            C.connect("127.0.0.1", port, "bob", prompt=False)
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "cannot reach" in msg
    out, err = capfd.readouterr()
    for text in (msg, repr(e.value), caplog.text, out, err):
        assert PASSWORD not in text


def test_real_ice_unknown_host(omero_stack, monkeypatch):
    monkeypatch.setenv(C.ENV_PASSWORD, PASSWORD)
    with pytest.raises(C.OmeroConnectionError) as e:
        C.connect("no-such-host.invalid", 4064, "bob", prompt=False)
    assert "no-such-host.invalid" in str(e.value) and PASSWORD not in str(e.value)


def test_connect_logs_in_and_rejoins_without_leaking(omero_stack, monkeypatch, caplog):
    """connect() hands the password to BlitzGateway only; a reconnect re-joins the server session."""
    import omero.gateway

    made = []

    class Client:
        def __init__(self, sid):
            self.sid = sid

        def getSessionId(self):
            return self.sid

        def enableKeepAlive(self, s):
            self.keepalive = s

    class FakeBG:
        def __init__(self, username=None, passwd=None, host=None, port=None, secure=None, group=None, **kw):
            self.args = dict(username=username, passwd=passwd, host=host, port=port, secure=secure, group=group)
            self.c = Client(SESSION)
            self.joined = None
            made.append(self)

        def connect(self, sUuid=None):
            self.joined = sUuid
            logging.getLogger("omero.gateway").info("created connection (uuid=%s)" % SESSION)
            return True

        def getEventContext(self):
            class EC:
                userName, groupName = "bob", "lab"
            return EC()

        def isConnected(self):
            return True

        def close(self, hard=True):
            self.hard = hard

    monkeypatch.setattr(omero.gateway, "BlitzGateway", FakeBG)
    monkeypatch.setenv(C.ENV_PASSWORD, PASSWORD)
    with caplog.at_level(logging.DEBUG):
        sess = C.connect("omero.example.org", 4064, "bob", prompt=False)
        assert made[0].args["passwd"] == PASSWORD and made[0].args["secure"] is True
        sess.reconnect()
    assert made[1].joined == SESSION and made[1].args["passwd"] is None   # re-join, no second login
    assert PASSWORD not in caplog.text and SESSION not in caplog.text
    assert "connected to omero.example.org as bob" in caplog.text
    assert PASSWORD not in repr(sess) and sess.session_key.reveal() == SESSION
    sess.close()
    assert made[1].hard is True
