"""`--json PATH`, shared by the bench scripts: their figures as JSON for bench/run_all.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the figures here as JSON")


def write_json(path: str | None, results) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")
