# Prints what a user of the built image sees (perf/podman_workloads.py checks every line).
cd /
echo "fstypes $(tr '\n' ' ' < /opt/perf/fstypes)"
for p in /etc/issue.net /usr/share/doc /etc/debian_version /srv/data; do
    [ -e "$p" ] && echo "present $p" || echo "absent $p"
done
echo "licenses $(ls /usr/share/common-licenses | tr '\n' ' ')$(cat /usr/share/common-licenses/NEW)"
echo "renamed $(cat /etc/debian_version.renamed)"
if [ -d /srv/data-renamed ]; then
    echo "files $(find /srv/data-renamed -type f -name 'f*' | wc -l)"
    echo "sum $(find /srv/data-renamed -type f -name 'f*' | LC_ALL=C sort | xargs cat | md5sum | cut -d' ' -f1)"
    echo "big $(stat -c %s /srv/data-renamed/big) $(od -An -tx1 -N16 -j 33554400 /srv/data-renamed/big | tr -d ' ')"
fi
if command -v jq >/dev/null; then echo "jq $(echo '{"ok": 7}' | jq .ok)"; fi
if command -v file >/dev/null; then echo "file $(file -b -L /usr/bin/jq | cut -d' ' -f1)"; fi
