#!/usr/bin/env bash
# The second retrieval corpus: SQLite's own documentation, public domain, from Debian's
# sqlite3-doc package. Extracts the pages listed in data/eval/sqlite/documents.txt (topic pages;
# no release notes, cross-reference indexes or API dumps) into data/external/sqlite-docs/
# (git-ignored), with Debian's copyright file as .copyright (hidden: not ingested). Idempotent; needs apt (no root: apt-get download).
# The questions in data/eval/sqlite/questions.jsonl were written against 3.40.1-2+deb12u2.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-data/external/sqlite-docs}"
LIST="data/eval/sqlite/documents.txt"
WANTED_VERSION="3.40.1-2+deb12u2"

missing=0
while read -r name; do
  [ -z "$name" ] || [ -f "$DEST/$name" ] || missing=$((missing + 1))
done < "$LIST"
if [ "$missing" -eq 0 ] && [ -f "$DEST/.copyright" ]; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(
  cd "$work"
  if ! apt-get download sqlite3-doc >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get download sqlite3-doc >/dev/null
  fi
)
deb="$(ls "$work"/sqlite3-doc_*.deb)"
version="$(dpkg-deb -f "$deb" Version)"
if [ "$version" != "$WANTED_VERSION" ]; then
  echo "note: sqlite3-doc is $version here; the questions were written against $WANTED_VERSION" >&2
fi
dpkg-deb -x "$deb" "$work/x"
docs="$work/x/usr/share/doc/sqlite3"
copyright="$work/x/usr/share/doc/sqlite3-doc/copyright"
# The documentation (Files: *) is public domain; refuse anything else.
awk '/^Files: \*$/{f=1; next} f && /^License:/{print $2; exit}' "$copyright" | grep -qx "public-domain" \
  || { echo "sqlite3-doc's copyright no longer says public-domain for its files; not using it" >&2; exit 1; }
mkdir -p "$DEST"
while read -r name; do
  [ -z "$name" ] && continue
  cp "$docs/$name" "$DEST/$name"
done < "$LIST"
cp "$copyright" "$DEST/.copyright"
echo "sqlite-docs: $(wc -l < "$LIST") pages of sqlite3-doc $version in $DEST"
