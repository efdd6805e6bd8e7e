"""Command line: `eembridge [options]` runs the bridge; subcommands do the rest.

Errors the user can fix are reported as one line on stderr with a non-zero exit,
never as a traceback (eembridge.errors.UserError).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import CODEC, __version__
from .errors import UserError

# Subcommand name -> module with add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "decode": ("eembridge.decode", "decode a usbmon capture of an EEM device into Ethernet pcap"),
}


def version_text() -> str:
    return f"eembridge {__version__} (codec: {CODEC})"


def _subcommand_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"eembridge {name}", description=help_text)
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser, module


def main_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<8} {help_text}" for name, (_m, help_text) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="eembridge",
        description="Userspace USB CDC-EEM host bridge: EEM device <-> TAP interface.",
        epilog=f"subcommands (eembridge SUBCOMMAND --help):\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            parser, module = _subcommand_parser(argv[0])
            args = parser.parse_args(argv[1:])
            return int(module.run(args) or 0)  # type: ignore[attr-defined]
        parser = main_parser()
        parser.parse_args(argv)
        parser.error("the bridge itself is not built yet; see the subcommands")
        return 2
    except UserError as exc:
        print(f"eembridge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
