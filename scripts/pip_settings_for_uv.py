"""Print pip's effective index settings as `uv pip install` options, one argument per line (scripts/setup.sh).

uv reads neither pip's config files nor PIP_* variables. Without them it would miss this machine's local wheel
folders and indexes (where torch 2.14.1 lies) and the constraint file that caps torch. Folders and file:// indexes
that do not exist are left out: pip only warns about them, uv stops. pip treats all its indexes alike, so uv is
told to as well (``--index-strategy unsafe-best-match``); by default it takes each package from the first index
that lists it.
"""

import os
import shlex
import subprocess
import sys
from urllib.parse import urlparse

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}


def exists(location: str) -> bool:
    url = urlparse(location)
    if url.scheme in ("http", "https"):
        return True
    return os.path.exists(url.path if url.scheme == "file" else location)


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    seen = set()
    for line in listed.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.find-links='/opt/wheels'
        key, _, value = line.partition("=")
        flag = FLAGS.get(key.rsplit(".", 1)[-1])
        if flag is None:
            continue
        for item in " ".join(shlex.split(value)).split():
            if (flag, item) not in seen and exists(item):
                seen.add((flag, item))
                print(flag)
                print(item)
    print("--index-strategy")
    print("unsafe-best-match")


if __name__ == "__main__":
    main()
