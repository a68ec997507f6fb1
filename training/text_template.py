"""Item text from columns: the names a `[data] text_template` such as "{title} | {genres}" composes (no deps: the
config validates templates with it, the loader composes texts with it)."""

from __future__ import annotations

import string


def template_fields(template: str) -> list[str]:
    """Column names a text template composes; ValueError for what the vectorised composer cannot do."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"[data] text_template {template!r}: {e}") from e
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(
                f"[data] text_template {template!r}: use plain column names such as {{title}}, got {{{name}"
                f"{'!' + conv if conv else ''}{':' + spec if spec else ''}}} (write {{{{ }}}} for a literal brace)"
            )
        names.append(name)
    return names
