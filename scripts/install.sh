#!/usr/bin/env bash
# Installs the asterisk-prepaid runtime onto a PBX host (Debian, as root). No test tools.
#   - the system user asterisk-prepaid (no login; in the asterisk group, to read the CDR file)
#   - the application in the venv /opt/asterisk-prepaid/.venv (from --wheel, else this checkout)
#   - /etc/asterisk-prepaid/prepaid.toml, 0640 root:asterisk-prepaid (an existing one is kept)
#   - the prompts as prepaid/<name> in Asterisk's sounds directory (prepaid sounds install)
#   - the systemd unit asterisk-prepaid.service (enabled when systemd runs, not started)
# Asterisk's own configuration (dialplan, AMI user, CDRs) stays manual:
# asterisk-conf/README-install.md. Run again to upgrade: the venv is updated, the config kept.
set -euo pipefail
umask 022
here=$(cd "$(dirname "$0")/.." && pwd)

NAME=asterisk-prepaid
VENV=/opt/asterisk-prepaid/.venv  # the path asterisk-conf/asterisk-prepaid.service runs
ETC=/etc/asterisk-prepaid
UNIT_DIR=/etc/systemd/system
sounds_dir=/usr/share/asterisk/sounds/en
wheel=""
wheelhouse=""

usage() {
  cat <<EOF
usage: $0 [--wheel FILE] [--wheelhouse DIR] [--sounds-dir DIR]
  --wheel FILE      install this asterisk_prepaid-*.whl (default: build from $here)
  --wheelhouse DIR  install offline: every package (and pip) from the wheels in DIR,
                    no package index, no apt (for a host without either)
  --sounds-dir DIR  Asterisk's sounds directory of the language (default $sounds_dir)
EOF
}

die() { echo "install: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --wheel) wheel=${2:?}; shift 2 ;;
    --wheelhouse) wheelhouse=${2:?}; shift 2 ;;
    --sounds-dir) sounds_dir=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (it adds a user and writes /opt, /etc)"
[ -z "$wheel" ] || [ -f "$wheel" ] || die "$wheel: no such wheel"
[ -z "$wheelhouse" ] || [ -d "$wheelhouse" ] || die "$wheelhouse: no such directory"
for f in prepaid.toml asterisk-prepaid.service; do
  [ -f "$here/asterisk-conf/$f" ] || die "$here/asterisk-conf/$f is missing"
done
command -v python3 >/dev/null || die "python3 is missing (apt-get install python3)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "python3 is $(python3 -V 2>&1); 3.11 or later is needed"

pip_source=()
if [ -n "$wheelhouse" ]; then
  wheelhouse=$(cd "$wheelhouse" && pwd)
  pip_source=(--no-index --find-links "$wheelhouse")
fi

# 1. The service user.
if ! getent group "$NAME" >/dev/null; then
  groupadd --system "$NAME"
fi
if ! getent passwd "$NAME" >/dev/null; then
  useradd --system --gid "$NAME" --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin --comment "asterisk-prepaid service" "$NAME"
  echo "install: added the system user $NAME"
fi
if getent group asterisk >/dev/null; then
  usermod --append --groups asterisk "$NAME"  # reads /var/log/asterisk/cdr-custom/prepaid.csv
fi

# 2. The venv. Debian keeps ensurepip in python3-venv; without it (and offline) the venv is
# made without pip and pip installs itself from its own wheel (a wheel is importable).
if [ ! -x "$VENV/bin/python" ]; then
  if python3 -c 'import ensurepip' 2>/dev/null; then
    python3 -m venv "$VENV"
  elif [ -n "$wheelhouse" ]; then
    python3 -m venv --without-pip "$VENV"
  else
    echo "install: installing python3-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/pip" ]; then  # made without pip (now, or by an earlier run)
  if [ -n "$wheelhouse" ]; then
    pip_wheel=$(find "$wheelhouse" -maxdepth 1 -name 'pip-*.whl' | sort -V | tail -n 1)
    [ -n "$pip_wheel" ] || die "no ensurepip and no pip-*.whl in the wheelhouse $wheelhouse"
    "$VENV/bin/python" "$pip_wheel/pip" install -q "${pip_source[@]}" pip
  else
    "$VENV/bin/python" -m ensurepip >/dev/null ||
      die "$VENV has no pip and ensurepip is missing: apt-get install python3-venv, or --wheelhouse"
  fi
fi
pip=("$VENV/bin/pip" -q --disable-pip-version-check)

# 3. The application, without the test extras.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$wheel" ]; then
  # From a copy without build output: setuptools never empties an in-tree build/, whose
  # leftovers (modules moved away since) would ship in the wheel.
  mkdir "$tmp/src"
  tar -C "$here" --exclude=./build --exclude=./.git --exclude='./.venv*' \
    --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$tmp/src" -xf -
  "${pip[@]}" wheel --no-deps "${pip_source[@]}" -w "$tmp" "$tmp/src"
  wheel=$(find "$tmp" -maxdepth 1 -name 'asterisk_prepaid-*.whl')
  [ -n "$wheel" ] || die "building the wheel from $here made none"
fi
"${pip[@]}" install "${pip_source[@]}" "$wheel"
# The same version again (a rebuilt checkout) is installed too, not skipped as present.
"${pip[@]}" install --no-deps --force-reinstall "$wheel"
echo "install: $("$VENV/bin/prepaid" --version) in $VENV"

# 4. The configuration: the shipped example once; the admin's file is never replaced.
install -d -m 0755 "$ETC"
if [ -e "$ETC/prepaid.toml" ]; then
  echo "install: kept $ETC/prepaid.toml"
else
  install -m 0640 -o root -g "$NAME" "$here/asterisk-conf/prepaid.toml" "$ETC/prepaid.toml"
  echo "install: wrote $ETC/prepaid.toml (0640 root:$NAME); edit it, secrets may go to $ETC/secrets.env"
fi

# 5. The prompts, as prepaid/<name> for Playback().
"$VENV/bin/prepaid" sounds install --dir "$sounds_dir"

# 6. The systemd unit.
install -d -m 0755 "$UNIT_DIR"
install -m 0644 "$here/asterisk-conf/asterisk-prepaid.service" "$UNIT_DIR/$NAME.service"
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable "$NAME.service"
  echo "install: $NAME.service enabled; start it with: systemctl start $NAME"
else
  echo "install: systemd is not running; $UNIT_DIR/$NAME.service installed, not enabled"
fi
