"""Value types for argparse shared by every command line of the project (app.py, the bench,
al_engine.distributed), so a list or an option is spelled and refused the same way everywhere."""
from __future__ import annotations

import argparse


def key_value(text: str) -> tuple[str, str]:
    """'key=value' (the value may itself hold '=')."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def comma_list(text: str) -> list[str]:
    """'a,b,c' with blanks around items ignored; an empty list is refused."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def int_list(text: str) -> list[int]:
    """'0,1,2'."""
    try:
        return [int(item) for item in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
