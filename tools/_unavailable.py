"""Entry points whose issues have not landed yet: say so clearly and exit 2."""

import sys


def unavailable(command: str, what: str) -> int:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(f"usage: {command} ...\n\n{what}\n\nNot available yet in this release of megaprolong.")
        return 2
    print(f"{command}: not available yet ({what} has not landed in this release of megaprolong)", file=sys.stderr)
    return 2
