#!/bin/sh
# Installs Debian's dataset-fashion-mnist (the Fashion-MNIST IDX files under
# /usr/share/datasets/fashion-mnist) where apt is available. The bundled demo runs on
# scikit-learn's digits and needs nothing from here; the fashion-mnist benchmark does.
DIR=/usr/share/datasets/fashion-mnist
[ -f "$DIR/t10k-labels-idx1-ubyte.gz" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: apt-get not found; install Fashion-MNIST yourself and pass --data-dir (digits needs nothing)" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
if ! { $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
       { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; }; then
  echo "note: could not apt-get install dataset-fashion-mnist (need root?); fashion-mnist runs will say how to install it" >&2
fi
exit 0
