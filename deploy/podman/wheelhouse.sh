#!/usr/bin/env bash
# The wheelhouse of local image builds: every dependency of the CPU image as a wheel, made on this machine
# (inside a container PyPI is not reachable over TLS: the image does not trust this machine's CA).
#
#   deploy/podman/wheelhouse.sh WHEELHOUSE BASE_IMAGE     (run by `make wheelhouse`)
#
# The wheels are resolved by Debian's own python3.11, the interpreter the base image has (3.11.2), not by the
# virtual environment's: environment markers compare full versions (redis wants async-timeout only below
# 3.11.3), so a wheelhouse resolved on another patch release can miss a package the image needs. The script
# checks that the two versions agree. torch==2.13.0 goes first and comes from this machine's local CPU build,
# as in `make install`; everything is pinned by constraints.txt, and the build backend (setuptools, wheel)
# is added so that the image can install the project itself offline.
set -euo pipefail

wheelhouse=$1
base_image=$2
python=${WHEELHOUSE_PYTHON:-/usr/bin/python3.11}
venv="$wheelhouse.venv"

if [ ! -x "$python" ]; then
    echo "$python not found: Debian's python3.11 resolves the image's wheels (apt-get install python3-venv)" >&2
    exit 1
fi
host_version=$("$python" -c 'import platform; print(platform.python_version())')
image_version=$(podman run --rm "$base_image" python3 -c 'import platform; print(platform.python_version())')
if [ "$host_version" != "$image_version" ]; then
    echo "$python is Python $host_version but $base_image has $image_version: the markers would differ" >&2
    exit 1
fi

# This machine's pip configuration names index folders that may be absent: pip warns for each, every time.
quiet_pip() {
    "$venv/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

test -x "$venv/bin/pip" || "$python" -m venv "$venv"
rm -rf "$wheelhouse.partial"
"$python" deploy/dependencies.py >"$venv/requirements.txt"
quiet_pip wheel --quiet --disable-pip-version-check -w "$wheelhouse.partial" torch==2.13.0
quiet_pip wheel --quiet --disable-pip-version-check -w "$wheelhouse.partial" \
    -c constraints.txt -r "$venv/requirements.txt" "setuptools>=69" wheel
rm -rf "$wheelhouse"
mv "$wheelhouse.partial" "$wheelhouse"
echo "wheelhouse $wheelhouse: $(ls "$wheelhouse" | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1), for Python $host_version"
