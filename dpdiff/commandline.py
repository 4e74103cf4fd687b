"""``key=value`` arguments (Hydra-style) for the small commands that do not compose a Hydra config."""

from __future__ import annotations

from dpdiff.errors import UserError


def parse_kv(args: list[str], allowed: dict[str, object]) -> dict:
    """``allowed`` maps every accepted key to its default; an unknown key or a bare word is a user error."""
    out = dict(allowed)
    for a in args:
        if "=" not in a:
            raise UserError(f"expected key=value, got {a!r} (keys: {', '.join(allowed)})")
        k, v = a.split("=", 1)
        if k not in allowed:
            raise UserError(f"unknown option {k!r} (keys: {', '.join(allowed)})")
        out[k] = v
    return out
