"""Print the Debian mirror this machine's apt uses for a suite (default bookworm), read from its sources.

`make base-image` builds the image's root filesystem from that mirror, so that no mirror host is written into
the project: where apt works, debootstrap works. Both formats are read: deb822 `*.sources` stanzas (URIs /
Suites) and one-line `deb URL SUITE ...` entries. Exit code 1, saying what was looked at, when none matches.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

APT_DIR = Path("/etc/apt")


def sources_files(apt_dir: Path = APT_DIR) -> list[Path]:
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    return [f for f in files if f.is_file() and f.suffix in (".list", ".sources")]


def mirrors(text: str, deb822: bool, suite: str) -> list[str]:
    """The URIs of `deb` entries that serve `suite` in one sources file."""
    found = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "\t", "#")):
                    fields[key.strip().lower()] = value.split()
            enabled = fields.get("enabled", ["yes"])[0].lower() != "no"
            if enabled and "deb" in fields.get("types", []) and suite in fields.get("suites", []):
                found += fields.get("uris", [])
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                found.append(words[1])
    return [uri for uri in found if uri.startswith(("http://", "https://"))]


def main(suite: str = "bookworm") -> int:
    files = sources_files()
    for path in files:
        uris = mirrors(path.read_text(), path.suffix == ".sources", suite)
        if uris:
            print(uris[0])
            return 0
    looked = ", ".join(str(f) for f in files) or f"nothing under {APT_DIR}"
    print(f"no apt source serves Debian {suite} (looked at {looked})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
