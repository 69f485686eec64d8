"""Credentials in URLs: the one place that masks them for people and strips them from links.

Every URL the CLI prints or writes goes through here, at the point where it is
built or shown (never by filtering output afterwards):

- :func:`mask_url` for showing which URL is used: ``redis://app:***@db:6379/0``;
- :func:`mask_urls_in` for a longer string with URLs inside (a command line, a message);
- :func:`join_url` for links a person opens (Jaeger traces, searches): no userinfo,
  no secret query parameters, so the link works and carries no credential
  (the browser asks for it);
- :func:`credentials` for the one place that needs them, an HTTP request
  (sent as an ``Authorization`` header, never in a URL);
- :func:`url_secrets` and :func:`scrub` for text we do not build ourselves
  (an exception's message, another program's log): the known secret values
  are replaced.

What counts as a secret: the password of the userinfo in any scheme
(``redis://``, ``rediss://``, ``unix://``, ``http(s)://``...); a userinfo without a
password in a non-Redis URL (``https://TOKEN@host``; in a Redis URL it is an ACL
user name and stays); query or fragment parameters named like ``password``,
``token``, ``secret``, ``api_key``... (:func:`is_secret_param`). Standard library only.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote, unquote_plus, urlencode, urlsplit

MASK = "***"

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "valkey", "valkeys"})
_SECRET_PARAM_NAMES = frozenset({
    "pass", "pwd", "auth", "key", "apikey", "sig", "signature", "authorization", "credential", "credentials",
})
_SECRET_PARAM_PARTS = ("password", "passwd", "secret", "token", "api_key", "api-key", "apikey", "access_key",
                       "private_key")
#: A URL inside a longer text: a scheme, ``://``, then up to whitespace, a quote or an angle bracket.
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s\"'<>`]+")


def is_secret_param(name: str) -> bool:
    """Whether a query/fragment parameter of this name holds a credential (``password``, ``token``...)."""
    lowered = unquote_plus(name).strip().lower()
    return lowered in _SECRET_PARAM_NAMES or any(part in lowered for part in _SECRET_PARAM_PARTS)


def _params(raw: str) -> list[tuple[str, str, str]]:
    """``a=1&b=2`` as (raw segment, name, raw value) triples, in order (no re-encoding)."""
    out = []
    for segment in raw.split("&"):
        name, _, value = segment.partition("=")
        out.append((segment, name, value))
    return out


def _mask_params(raw: str) -> str:
    return "&".join(f"{name}={MASK}" if is_secret_param(name) and value else segment
                    for segment, name, value in _params(raw))


def _public_params(raw: str) -> list[str]:
    return [segment for segment, name, _ in _params(raw) if segment and not is_secret_param(name)]


def _has_authority(url: str, scheme: str) -> bool:
    return url.strip()[len(scheme) + 1:].startswith("//") if scheme else url.strip().startswith("//")


def mask_url(url: str) -> str:
    """``url`` as shown to a person: a password (userinfo, query or fragment) replaced by ``***``.

    Everything else stays as written, so the user recognises the URL.

    >>> mask_url("redis://app:hunter2@db:6379/0?password=x")
    'redis://app:***@db:6379/0?password=***'
    >>> mask_url("https://TOKEN@jaeger.example")
    'https://***@jaeger.example'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if not _has_authority(url, parts.scheme):
        # No "//": no authority to parse. Anything before an "@" may be a password ("user:pw@host").
        if "@" in url:
            return f"{parts.scheme + ':' if parts.scheme else ''}{MASK}@{url.rpartition('@')[2]}"
        return url
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:{MASK}@{hostport}"
        elif parts.scheme.lower() not in _REDIS_SCHEMES:
            netloc = f"{MASK}@{hostport}"
    out = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"//{netloc}{parts.path}"
    if parts.query:
        out += "?" + _mask_params(parts.query)
    if parts.fragment:
        out += "#" + _mask_params(parts.fragment)
    return out


def mask_urls_in(text: str) -> str:
    """``text`` with every ``scheme://...`` URL inside it masked (:func:`mask_url`)."""
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group(0)), text)


def credentials(url: str) -> tuple[str, str] | None:
    """The (user, password) of the userinfo, percent-decoded; ``None`` without a userinfo."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at:
        return None
    user, _, password = userinfo.partition(":")
    return unquote(user), unquote(password)


def basic_auth_header(url: str) -> dict[str, str]:
    """``{"Authorization": "Basic ..."}`` for the userinfo of ``url``, or ``{}`` without one."""
    found = credentials(url)
    if found is None:
        return {}
    token = base64.b64encode(f"{found[0]}:{found[1]}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def join_url(base: str, path: str = "", query: Mapping[str, str | int] | None = None, *,
             keep_secret_params: bool = False) -> str:
    """``base`` + ``path`` + ``query``, WITHOUT the userinfo: a link to show, or a URL to request.

    The base's own query parameters come first, then ``query`` (percent-encoded
    with ``%20`` for spaces, as browsers write it). Secret parameters of the base
    are dropped unless ``keep_secret_params`` (for a request that is never shown).
    The base's fragment is dropped. Raises ``ValueError`` (without the URL in its
    message) when ``base`` is not a URL with a host.

    >>> join_url("http://admin:pw@jaeger:16686/", "/trace/abc")
    'http://jaeger:16686/trace/abc'
    """
    try:
        parts = urlsplit(base.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("not a valid URL") from None
    hostport = parts.netloc.rpartition("@")[2]
    if not parts.scheme or not hostport:
        raise ValueError("not an absolute URL with a host (e.g. http://localhost:16686)")
    params = [segment for segment, _, _ in _params(parts.query) if segment] if keep_secret_params \
        else _public_params(parts.query)
    if query:
        params.append(urlencode(query, quote_via=quote))
    out = f"{parts.scheme}://{hostport}{parts.path.rstrip('/')}{path}"
    return out + ("?" + "&".join(params) if params else "")


def url_secrets(url: str) -> list[str]:
    """The secret strings inside ``url`` as written and decoded (to scrub them from other text)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if colon:
            found.append(password)
        elif parts.scheme.lower() not in _REDIS_SCHEMES:
            found.append(user)
    elif not _has_authority(url, parts.scheme) and "@" in url:
        found.append(url.rpartition("@")[0].partition(":")[2] or url.rpartition("@")[0])
    for raw in (parts.query, parts.fragment):
        found += [value for _, name, value in _params(raw) if is_secret_param(name) and value]
    decoded = [unquote_plus(s) for s in found] + [unquote(s) for s in found]
    return sorted({s for s in found + decoded if s}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str], *, one_line: bool = True) -> str:
    """``text`` (someone else's message) with URLs masked and every known secret replaced by ``***``.

    ``one_line`` folds line breaks into spaces (for one-line error messages).
    """
    text = mask_urls_in(text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return re.sub(r"\s*\n\s*", " ", text).strip() if one_line else text


__all__ = [
    "MASK",
    "basic_auth_header",
    "credentials",
    "is_secret_param",
    "join_url",
    "mask_url",
    "mask_urls_in",
    "scrub",
    "url_secrets",
]
