"""The operator console: the guard's traffic, detections and decisions in a browser, and actions on them.

Served by the guard at ``/console`` (``GuardApp.console``), behind a login with the admin token:

- :mod:`.web`      — the starlette app: pages, forms, login, security headers;
- :mod:`.session`  — signed session cookies and CSRF tokens;
- :mod:`.queries`  — the read queries (indexed rows and pre-aggregated counters only; keyset pages);
- :mod:`.actions`  — throttle / block / clear / review verdicts, each with an audit row;
- :mod:`.graph`    — the cluster graph's layout (drawn as inline SVG);
- ``templates/``   — Jinja2 pages (autoescaped); ``static/`` — CSS, the page script and uPlot
  (MIT, vendored from npm ``uplot`` 1.6.32 with its licence), so nothing loads from a CDN.

Try it: ``stillhouse guard demo --fake`` prints nothing about it, so start a guard and open
http://127.0.0.1:8080/console/ (name + admin token). ``stillhouse bench console`` measures its pages.
"""
