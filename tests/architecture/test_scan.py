"""A source scan: every query that could cross tenants says why, next to it.

The runtime guard (tenants.scoping) stops an unscoped query on a tenant-owned model; this scan
makes each deliberate escape reviewable, and catches the ones that bypass the default manager.
"""

from __future__ import annotations

import re
from pathlib import Path

from django.apps import apps

from tenants.scoping import TenantOwned

ROOT = Path(__file__).resolve().parents[2]
APP_DIRS = [
    "controlplane",
    "tenants",
    "ai_agents",
    "conversations",
    "memory",
    "schedules",
    "events",
    "protocol",
    "usage",
]
REASON = "# tenant-scope:"
# Ways around the fail-closed default manager.
ESCAPES = re.compile(
    r"\.unscoped\(|\._base_manager\b|\._default_manager\b|\.raw\(|connection\.cursor\("
)


def _sources():
    for name in APP_DIRS:
        base = ROOT / name
        if base.is_dir():
            for path in base.rglob("*.py"):
                if "migrations" not in path.parts:
                    yield path


def _has_reason(lines: list[str], index: int) -> bool:
    window = lines[max(0, index - 2) : index + 1]
    return any(REASON in line and line.split(REASON, 1)[1].strip() for line in window)


def test_every_escape_from_tenant_scoping_carries_a_reason():
    offenders = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0]
            if ESCAPES.search(code) and not _has_reason(lines, i):
                offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    # The scoping machinery and the health check are where these are defined or needed.
    allowed = {"tenants/scoping.py", "controlplane/health.py"}
    offenders = [o for o in offenders if o.split(":", 1)[0] not in allowed]
    assert not offenders, (
        "Escapes from tenant scoping need a `# tenant-scope: <reason>` comment on the line or "
        "just above it:\n" + "\n".join(offenders)
    )


def test_tenant_owned_models_are_only_queried_through_a_scope():
    owned = [m.__name__ for m in apps.get_models() if issubclass(m, TenantOwned)]
    direct = re.compile(
        r"\b(" + "|".join(owned) + r")\.objects\.(?!for_tenant\(|create\(|unscoped\()"
    )
    offenders = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0]
            if direct.search(code) and "tenant" not in code and not _has_reason(lines, i):
                offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not offenders, (
        "Query tenant-owned models with .for_tenant(tenant) (or filter on the tenant), or give a "
        "`# tenant-scope:` reason:\n" + "\n".join(offenders)
    )


def test_the_scan_catches_what_it_should(tmp_path):
    """The scan's own regexes, on lines that must and must not be flagged."""
    lines = [
        "x = Membership.objects.unscoped('r')",
        "# tenant-scope: the sweeper",
        "q.unscoped('r')",
    ]
    assert ESCAPES.search(lines[0]) and not _has_reason(lines, 0)
    assert _has_reason(lines, 2)


def test_every_template_comment_closes_on_its_own_line():
    """Django's `{# ... #}` comment is one line only: one that goes on is printed on the page.
    A longer comment is a `{% comment %}` block."""
    offenders = []
    for name in [*APP_DIRS, "templates"]:
        base = ROOT / name
        for path in base.rglob("*.html") if base.is_dir() else ():
            for i, line in enumerate(path.read_text().splitlines()):
                if line.count("{#") != line.count("#}"):
                    offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not offenders, "Comments printed on the page:\n" + "\n".join(offenders)
