"""The web console at ``/console`` (docs/console.md): server-rendered pages (Jinja2) over the store
and the running engine, with one small script of our own for the self-refreshing parts.

* :mod:`~hms_ach.console.session`: login links, sessions, CSRF (no web framework);
* :mod:`~hms_ach.console.oidc`: sign-in at an OpenID provider (authorization code with PKCE);
* :mod:`~hms_ach.console.settings`: ``console:`` in channels.yaml;
* :mod:`~hms_ach.console.roles`: which console role may do what;
* :mod:`~hms_ach.console.control`: what the console needs of the engine (a Protocol);
* :mod:`~hms_ach.console.web`: templates, the session cookie and the checks of every request;
* :mod:`~hms_ach.console.signin`: sign-in (link, OIDC callback) and sign-out;
* :mod:`~hms_ach.console.pages`: the pages and actions; :func:`install_console` mounts them.
"""

from hms_ach.console.pages import install_console

__all__ = ["install_console"]
