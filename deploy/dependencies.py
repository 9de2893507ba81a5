"""Print the project's dependencies from pyproject.toml, one a line (`deploy/dependencies.py [EXTRA...]`).

The image build installs them before the code is copied in (so that a code change reuses that layer), and
`make wheelhouse` downloads or builds their wheels; both read this one list. Python 3.11's tomllib only.
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
