"""Storage URLs for people: a password is never printed, only masked or left out."""

from __future__ import annotations

import re

from sqlalchemy.engine import URL, make_url

#: The environment variable PostgreSQL's client library reads the password from.
PASSWORD_ENV = "PGPASSWORD"

_PASSWORD_IN_URL = re.compile(r"(?P<head>://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)")


def masked_url(url: str) -> str:
    """The storage URL with any password replaced by ``***`` (also for unparsable URLs)."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:
        shown = url
    return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", shown)


def has_password(url: str) -> bool:
    """Whether the URL carries a password."""
    try:
        return bool(make_url(url).password)
    except Exception:
        return bool(_PASSWORD_IN_URL.search(url))


def url_without_password(url: str) -> str:
    """The URL with its password left out (the client then reads ``$PGPASSWORD``)."""
    try:
        parsed = make_url(url)
    except Exception:
        return _PASSWORD_IN_URL.sub(r"\g<head>\g<tail>", url).replace(":@", "@")
    # URL.set() keeps a password given as None; build the URL without one instead.
    return URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    ).render_as_string(hide_password=False)


def server_said(text: str) -> str:
    """The useful part of a driver's error text, on one line."""
    said = " ".join(text.split())
    said = re.sub(r"^connection failed: connection to server at [^:]*? failed: ", "", said)
    said = re.sub(r"^.*?FATAL:\s*", "", said)
    for tail in (" This probably means", " Is the server running"):
        said = said.split(tail, 1)[0]
    return said[:200]
